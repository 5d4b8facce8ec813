"""Files on disk: the uint8 dataset (N, H, W, 3) with labels as .npy files per split (memory-mapped, so a
590 GB LSUN Bedroom reads like CIFAR-10), training batches drawn from it, and atomic writes (temporary file
in the same folder, then rename) for every output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.config import InputError
from pipeline.datasets import split_files


def save_split(folder: str | os.PathLike, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a split that fits in memory, atomically."""
    image_path, label_path = split_files(folder, split)
    for path, array in ((image_path, images), (label_path, np.asarray(labels, np.int64))):
        with atomic_write(path) as tmp:
            np.save(tmp, array)


class DataError(InputError):
    """A prepared split that does not match its manifest (torn, changed or from another run of prepare_data)."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_split(folder: str | os.PathLike, split: str) -> None:
    """Check a split's files against the sha256s in <folder>/manifest.json (written by prepare_data). A file's
    hash is computed once per (size, mtime) and remembered in .verified.json, so a 590 GB LSUN split is hashed
    once, not before every stage."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return  # a split made by hand or by a test: nothing to check against
    entry = json.loads(manifest_path.read_text())["splits"].get(split)
    redo = "re-run prepare_data (snakemake -R prepare_data, or dvc checkout / dvc pull a good copy)"
    if entry is None:
        raise DataError(f"{manifest_path}: has no split {split!r}; {redo}")
    cache_path = folder / ".verified.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    changed = False
    for path in split_files(folder, split):
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        if cache.get(path.name, {}).get("stat") != key:
            cache[path.name] = {"stat": key, "sha256": sha256_file(path)}
            changed = True
        if cache[path.name]["sha256"] != entry.get(path.name):
            raise DataError(f"{path}: its sha256 differs from {manifest_path} (torn, changed or from another run of "
                            f"prepare_data); {redo}")
    if changed:
        with contextlib.suppress(OSError):  # a read-only dataset folder is checked again next time
            write_json(cache_path, cache)


def load_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, memory-mapped; labels int64) of a prepared split, checked against its manifest."""
    image_path, label_path = split_files(folder, split)
    for path in (image_path, label_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the prepare_data stage)")
    verify_split(folder, split)
    try:
        images, labels = np.load(image_path, mmap_mode="r"), np.load(label_path)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{image_path.parent}: the {split} split cannot be read ({e}); re-run prepare_data") from None
    if len(images) != len(labels) or images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"{image_path}: {images.dtype} {images.shape} does not go with {len(labels)} labels; "
                        "re-run prepare_data")
    return images, labels


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor, rounding: str = "round") -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (clipped; rounded or truncated: sample.uint8)."""
    return uint8_on_device(x, rounding).cpu().numpy()


def uint8_on_device(x: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NHWC on x's device (clipped): a quarter of the bytes to copy. rounding
    'round': the nearest level; 'truncate': (x + 1) * 127.5 cut towards zero, as both official codes do (every
    pixel about half a level darker on average, which shifts FID, IS and precision/recall)."""
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    levels = (x.clamp(-1, 1) + 1) * 127.5
    return (levels.round() if rounding == "round" else levels).to(torch.uint8).permute(0, 2, 3, 1)


def training_images(rows: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC rows -> float NCHW in [-1, 1], rows with flip set mirrored left-right (no host sync)."""
    x = to_model_range(rows)
    return torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)


def choose_placement(placement: str, nbytes: int, device: torch.device) -> str:
    """'device' or 'stream' for run.data_placement: auto keeps a split on the GPU when it takes at most a quarter
    of its memory (CIFAR-10: 0.15 GB, ImageNet 64: 16 GB), and streams it otherwise and on the CPU."""
    if placement != "auto":
        return placement
    if device.type == "cuda":
        return "device" if nbytes <= torch.cuda.get_device_properties(device).total_memory // 4 else "stream"
    return "stream"


class Batches:
    """Endless random training batches with optional horizontal flips. sampling 'replacement': each batch an
    independent uniform draw of rows; 'epochs': shuffled passes over the split without replacement, the last
    partial batch of each pass dropped (both official codes: a DataLoader with shuffle and drop_last).

    Every process draws the same global batch (row indices and flips from one seeded generator) and keeps its
    `rows` of it. next() returns them on `device` as uint8 NHWC rows, flip flags and labels; training_images()
    turns a micro-batch of them into model inputs there. placement 'device': the whole split lives on the
    device and rows are gathered there. 'stream': a background thread gathers the rows of the next batches
    from the (memory-mapped) split into pinned memory, and they are copied asynchronously. Both give the same
    batches; state_dict() is the position (generator state, and epoch and offset) before the first batch not yet
    returned."""

    PREFETCH = 2  # batches the stream thread keeps ready

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch: int, hflip: bool, seed: int,
                 rows: slice = slice(None), device: torch.device | str = "cpu", placement: str = "stream",
                 sampling: str = "replacement"):
        if placement not in ("device", "stream"):
            raise ValueError(f"placement must be 'device' or 'stream', got {placement!r}")
        if sampling not in ("replacement", "epochs"):
            raise ValueError(f"sampling must be 'replacement' or 'epochs', got {sampling!r}")
        if sampling == "epochs" and batch > len(images):
            raise ValueError(f"a batch of {batch} does not fit one epoch of {len(images)} images")
        self.batch, self.hflip, self.rows, self.sampling = batch, hflip, rows, sampling
        self.device, self.placement = torch.device(device), placement
        self.num_images, self.seed = len(images), seed
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.offset, self.order = 0, 0, None  # sampling 'epochs': the pass and its next row
        self.position = self._position()
        self.pin = self.device.type == "cuda"
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if placement == "device":  # copied in chunks: no second host copy of a 16 GB split
            self.images = torch.empty(images.shape, dtype=torch.uint8, device=self.device)
            for start in range(0, len(images), 1 << 14):
                self.images[start:start + (1 << 14)] = torch.from_numpy(np.array(images[start:start + (1 << 14)]))
            self.labels = labels.to(self.device)
        else:
            self.images, self.labels = images, labels
        self._queue: queue.Queue | None = None

    def _position(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        # Each pass's order depends on (seed, epoch) only: a resume rebuilds it from the position alone.
        return torch.randperm(self.num_images, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def _next_rows(self) -> torch.Tensor:
        if self.sampling == "replacement":
            return torch.randint(self.num_images, (self.batch,), generator=self.generator)
        if self.offset + self.batch > self.num_images:  # drop_last: the remainder of this pass is skipped
            self.epoch, self.offset, self.order = self.epoch + 1, 0, None
        if self.order is None:
            self.order = self._epoch_order(self.epoch)
        index = self.order[self.offset:self.offset + self.batch]
        self.offset += self.batch
        return index

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, flip flags) of the next global batch, on the CPU."""
        index = self._next_rows()
        if not self.hflip:
            return index, torch.zeros(self.batch, dtype=torch.bool)
        return index, torch.rand(self.batch, generator=self.generator) < 0.5

    def _to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [(t.pin_memory() if self.pin and not t.is_pinned() else t).to(self.device, non_blocking=True)
                for t in tensors]

    def _gather_host(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The stream thread's work: draw the next batch, read this process's rows from the split."""
        index, flip = (t[self.rows] for t in self.draw())
        images = torch.from_numpy(np.ascontiguousarray(self.images[index.numpy()]))
        return (images, flip, self.labels[index]), self._position()

    def _stream(self) -> None:
        while True:
            try:
                item = self._gather_host()
            except BaseException as e:  # handed to the training thread, which raises it
                self._queue.put(e)
                return
            self._queue.put(item)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(uint8 NHWC images, flips, labels) of this process's rows of the next global batch, on the device."""
        if self.placement == "device":
            index, flip = (t[self.rows] for t in self.draw())
            self.position = self._position()
            index, flip = self._to_device(index, flip)
            return self.images[index], flip, self.labels[index]
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self.PREFETCH)
            threading.Thread(target=self._stream, name="batches", daemon=True).start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        tensors, self.position = item
        images, flip, labels = self._to_device(*tensors)
        return images, flip, labels

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        if self._queue is not None:
            raise RuntimeError("Batches.load_state_dict after the first batch was drawn")
        self.generator.set_state(state["generator"])
        self.seed = state.get("seed", self.seed)
        self.epoch, self.offset, self.order = state.get("epoch", 0), state.get("offset", 0), None
        if self.sampling == "epochs":
            self.order = self._epoch_order(self.epoch)
        self.position = self._position()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block succeeds it is renamed to `path`.

    A killed job never leaves half a file under the final name (Snakemake and DVC would trust it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """An .npz of named arrays, written atomically."""
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)
