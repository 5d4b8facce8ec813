"""Files on disk: the uint8 dataset (N, H, W, 3) with labels as .npy files per split (memory-mapped, so a
590 GB LSUN Bedroom reads like CIFAR-10), training batches drawn from it, and atomic writes (temporary file
in the same folder, then rename) for every output."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def split_files(folder: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The two files of a prepared split: <folder>/<split>_images.npy (uint8 NHWC), <split>_labels.npy (int64)."""
    return Path(folder) / f"{split}_images.npy", Path(folder) / f"{split}_labels.npy"


def save_split(folder: str | os.PathLike, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a split that fits in memory, atomically."""
    image_path, label_path = split_files(folder, split)
    for path, array in ((image_path, images), (label_path, np.asarray(labels, np.int64))):
        with atomic_write(path) as tmp:
            np.save(tmp, array)


def load_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, memory-mapped; labels int64) of a prepared split."""
    image_path, label_path = split_files(folder, split)
    for path in (image_path, label_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the prepare_data stage)")
    return np.load(image_path, mmap_mode="r"), np.load(label_path)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (rounded, clipped)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class Batches:
    """Endless random training batches (images in [-1, 1] and labels), with replacement across batches, with
    optional horizontal flips. `draw()` picks the rows and flips of a whole global batch (every process draws
    the same); `load()` reads the slice one process trains on, touching only those rows of a memory-mapped
    split."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch: int, hflip: bool, seed: int):
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.int64)
        self.batch, self.hflip = batch, hflip
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, flip flags) of the next global batch."""
        index = torch.randint(len(self.images), (self.batch,), generator=self.generator)
        if not self.hflip:
            return index, torch.zeros(self.batch, dtype=torch.bool)
        return index, torch.rand(self.batch, generator=self.generator) < 0.5

    def load(self, index: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_range(np.ascontiguousarray(self.images[index.numpy()]))
        x[flip] = x[flip].flip(-1)
        return x, self.labels[index]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole next global batch."""
        return self.load(*self.draw())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


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


def write_json(path: str | os.PathLike, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """An .npz of named arrays, written atomically."""
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)
