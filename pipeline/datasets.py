"""The datasets of the paper and how their raw downloads are read.

Every dataset ends up in the same on-disk form (split_files, read and written by pipeline.data): uint8 NHWC
images and int64 labels per split. This module knows each dataset's shape and where its raw files come from.
"""

from __future__ import annotations

import functools
import io
import itertools
import multiprocessing
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def split_files(folder: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The two files of a prepared split: <folder>/<split>_images.npy (uint8 NHWC), <split>_labels.npy (int64)."""
    return Path(folder) / f"{split}_images.npy", Path(folder) / f"{split}_labels.npy"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    resolution: int
    num_classes: int  # labels 0..num_classes-1 (0: no labels, e.g. LSUN)
    download: str  # what to download and where to put it, for the message when the raw data is absent


DATASETS = {
    "cifar10": DatasetSpec("cifar10", 32, 10,
                           "data.source 'torchvision' downloads CIFAR-10; offline, point data.source (or the "
                           "environment variable CIFAR10_SOURCE) at a .tar.gz or folder of <split>/<class>/ images"),
    "imagenet64": DatasetSpec("imagenet64", 64, 1000,
                              "log in at https://image-net.org/download-images.php and download 'Downsampled "
                              "ImageNet 64x64' (Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip, "
                              "Imagenet64_val_npz.zip); unzip all three into the folder data.source names, so that "
                              "it holds train_data_batch_1.npz ... train_data_batch_10.npz and val_data.npz"),
    "lsun_bedroom": DatasetSpec("lsun_bedroom", 256, 0,
                                "download bedroom_train_lmdb.zip and bedroom_val_lmdb.zip with the LSUN tools "
                                "(https://github.com/fyu/lsun: python download.py -c bedroom) and unzip them into "
                                "the folder data.source names (bedroom_train_lmdb/, bedroom_val_lmdb/); a folder "
                                "of train/ and test/ image files works too"),
    "lsun_cat": DatasetSpec("lsun_cat", 256, 0,
                            "download the LSUN object category 'cat' (http://dl.yf.io/lsun/objects/cat.zip, or "
                            "python download.py -c cat with https://github.com/fyu/lsun) and unzip it into the "
                            "folder data.source names (cat/ holding data.mdb); a folder of train/ and test/ image "
                            "files works too"),
    # A mixture of Gaussians with exact answers (pipeline.gmm), generated from data.gmm: nothing to download.
    "gmm": DatasetSpec("gmm", 8, 0, "prepare_data generates it from data.gmm"),
}


# --- raw-data readers -----------------------------------------------------------------------------
# Each reader returns {'train': RawSplit, 'test': RawSplit}. A split is streamed in chunks because the raw data can
# be far larger than memory (ImageNet64 train: 15.7 GB; LSUN Bedroom: 3M images).

Chunk = tuple[np.ndarray, np.ndarray]  # (uint8 NHWC images, int64 labels)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LSUN_CHUNK = 1000  # images per chunk: ~200 MB at 256x256
IMAGENET_CHUNK = 16384  # rows per chunk; one batch file (~1.5 GB) is loaded at a time


class SourceError(ValueError):
    """The raw data is absent or malformed; the message is one line for the user."""


@dataclass(frozen=True)
class RawSplit:
    count: int  # images in this split
    chunks: Callable[[], Iterator[Chunk]]  # fresh iterator per call, fixed order; lengths sum to count


def raw_splits(spec: DatasetSpec, source: Path, workers: int = 0,
               lsun_resize: str = "halve_bicubic") -> dict[str, RawSplit]:
    """The train/test splits of a dataset read from its raw download at `source`."""
    if spec.name == "imagenet64":
        return read_imagenet64(source)
    if spec.name in ("lsun_bedroom", "lsun_cat"):
        return read_lsun(source, spec.name.removeprefix("lsun_"), spec.resolution, workers, lsun_resize)
    raise ValueError(f"no raw-data reader for dataset {spec.name!r}")


# --- ImageNet 64x64 -------------------------------------------------------------------------------


def _npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz without loading it (an npz is a zip of .npy files)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SourceError(f"{path}: not an .npz holding '{key}' ({e})") from None
    return shape, dtype


def _imagenet_count(path: Path, resolution: int) -> int:
    shape, dtype = _npz_header(path, "data")
    labels_shape, labels_dtype = _npz_header(path, "labels")
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != 3 * resolution**2:
        raise SourceError(f"{path}: 'data' is {dtype} {shape}, expected uint8 (N, {3 * resolution**2})")
    if labels_shape != (shape[0],) or labels_dtype.kind not in "iu":
        raise SourceError(f"{path}: 'labels' is {labels_dtype} {labels_shape}, expected {shape[0]} integers")
    return shape[0]


def _imagenet_chunks(files: list[Path], resolution: int, num_classes: int) -> Iterator[Chunk]:
    for path in files:
        with np.load(path) as npz:
            data, labels = npz["data"], npz["labels"].astype(np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > num_classes):
            raise SourceError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 1..{num_classes}")
        for start in range(0, len(data), IMAGENET_CHUNK):
            rows = data[start : start + IMAGENET_CHUNK]
            # Rows are CHW-flattened (all of R, then G, then B); the pipeline stores HWC.
            images = rows.reshape(-1, 3, resolution, resolution).transpose(0, 2, 3, 1)
            yield np.ascontiguousarray(images), labels[start : start + IMAGENET_CHUNK] - 1


def read_imagenet64(source: Path) -> dict[str, RawSplit]:
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): train_data_batch_{1..10}.npz and val_data.npz.

    The files are looked up anywhere below `source`; 'test' is the official validation set.
    """
    spec = DATASETS["imagenet64"]
    source = Path(source)
    if not source.is_dir():
        raise SourceError(f"ImageNet 64x64: {source} is not a folder; {spec.download}")
    found = {}
    for path in sorted(source.rglob("*.npz")):  # sorted: the shallowest-first duplicate wins, deterministically
        found.setdefault(path.name, path)
    names = {"train": [f"train_data_batch_{i}.npz" for i in range(1, 11)], "test": ["val_data.npz"]}
    missing = [name for split in names.values() for name in split if name not in found]
    if missing:
        raise SourceError(f"ImageNet 64x64: {source} lacks {', '.join(missing)}; {spec.download}")
    splits = {}
    for split, split_names in names.items():
        files = [found[name] for name in split_names]
        count = sum(_imagenet_count(path, spec.resolution) for path in files)
        chunks = functools.partial(_imagenet_chunks, files, spec.resolution, spec.num_classes)
        splits[split] = RawSplit(count, chunks)
    return splits


# --- LSUN -----------------------------------------------------------------------------------------


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """Shorter side to `resolution`, then the centre square, as ADM's center_crop_arr (guided-diffusion).

    Box-halving first keeps large downscales antialiased; the last step is bicubic.
    """
    image = image.convert("RGB") if image.mode != "RGB" else image
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def box_resize_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Shorter side to `resolution` in one BOX resize, then the centre square: the official
    datasets/lsun_bedroom.py that made OpenAI's LSUN training folders."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    scale = resolution / min(image.size)
    image = image.resize(tuple(int(round(scale * side)) for side in image.size), resample=Image.Resampling.BOX)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


RESIZES = {"halve_bicubic": center_crop_resize, "box": box_resize_crop}  # data.lsun_resize


def _decode(item: tuple[str, bytes], resolution: int, resize: str = "halve_bicubic") -> np.ndarray:
    name, data = item
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise SourceError(f"{name}: not an image in a format PIL reads") from None
    except Exception as e:  # corrupt data raises anything from OSError to SyntaxError or struct.error
        raise SourceError(f"{name}: cannot decode the image ({type(e).__name__}: {e})") from None
    return RESIZES[resize](image, resolution)


def _stack(images: list[np.ndarray]) -> Chunk:
    return np.stack(images), np.zeros(len(images), dtype=np.int64)  # LSUN is unconditional: label 0


def _decoded_chunks(items: Iterable[tuple[str, bytes]], resolution: int, workers: int,
                    resize: str = "halve_bicubic") -> Iterator[Chunk]:
    """Decoded images in the order of `items`, LSUN_CHUNK at a time, on `workers` processes (0: in-process)."""
    decode, items = functools.partial(_decode, resolution=resolution, resize=resize), iter(items)
    batches = iter(lambda: list(itertools.islice(items, LSUN_CHUNK)), [])
    if workers <= 0:
        yield from (_stack([decode(item) for item in batch]) for batch in batches)
        return
    # One batch decodes while the previous one is handed on, so at most two batches of encoded bytes are in flight
    # (Pool.imap would read ahead without bound); map_async keeps the order. fork where there is one: spawn re-runs
    # the caller's __main__ in each worker, which fails (and the pool respawns forever) when it is not a file.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending = None
        for batch in batches:
            job = pool.map_async(decode, batch, chunksize=max(1, len(batch) // (4 * workers)))
            if pending is not None:
                yield _stack(pending.get())
            pending = job
        if pending is not None:
            yield _stack(pending.get())


def _lmdb():
    try:
        import lmdb
    except ImportError:
        raise SourceError("reading LSUN's LMDB export needs the lmdb package: pip install lmdb") from None
    return lmdb


def _open_lmdb(path: Path):
    lmdb = _lmdb()
    try:  # read-only and lock-free: the export may sit on a read-only or network file system
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=1024)
    except lmdb.Error as e:
        raise SourceError(f"{path}: cannot open the LMDB ({e})") from None


def _lmdb_count(path: Path) -> int:
    with _open_lmdb(path) as env:
        return env.stat()["entries"]


def _lmdb_items(path: Path, start: int, stop: int) -> Iterator[tuple[str, bytes]]:
    """(name, encoded image) of entries start..stop-1 in key order."""
    with _open_lmdb(path) as env, env.begin() as txn:
        cursor, count = txn.cursor(), env.stat()["entries"]
        if start > 0 and stop == count:  # a held-out tail: walk back from the end instead of over every key
            keys = list(itertools.islice(cursor.iterprev(keys=True, values=False), count - start))[::-1]
            entries = ((key, txn.get(key)) for key in keys)
        else:
            entries = itertools.islice(cursor.iternext(keys=True, values=True), start, stop)
        for key, value in entries:
            yield f"{path}: key {key.decode(errors='replace')}", value


def _image_files(folder: Path) -> list[Path]:
    files = [path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


@dataclass(frozen=True)
class _Images:
    """The encoded images of an LMDB or an image folder, in a fixed order."""

    path: Path
    files: list[Path] | None  # None: an LMDB

    @property
    def count(self) -> int:
        return _lmdb_count(self.path) if self.files is None else len(self.files)

    def items(self, start: int, stop: int) -> Iterator[tuple[str, bytes]]:
        if self.files is None:
            return _lmdb_items(self.path, start, stop)
        return ((str(path), path.read_bytes()) for path in self.files[start:stop])


def _find_lsun(source: Path, category: str) -> tuple[_Images | None, _Images | None]:
    """(train, test) images under `source`: LMDB exports first, else train/ and test/ image folders."""
    train_lmdbs = [source / f"{category}_train_lmdb", source / category, source]
    train = next((_Images(path, None) for path in train_lmdbs if (path / "data.mdb").is_file()), None)
    if train is not None:
        val = source / f"{category}_val_lmdb"
        return train, _Images(val, None) if (val / "data.mdb").is_file() else None
    folders = {split: source / split for split in ("train", "test")}
    if not folders["train"].is_dir():
        return None, None
    test = _Images(folders["test"], _image_files(folders["test"])) if folders["test"].is_dir() else None
    return _Images(folders["train"], _image_files(folders["train"])), test


def read_lsun(source: Path, category: str, resolution: int, workers: int = 0,
              resize: str = "halve_bicubic") -> dict[str, RawSplit]:
    """LSUN Bedroom or Cat from the LMDB export (or train/ and test/ image folders), center-cropped to resolution.

    Bedroom: bedroom_train_lmdb/ and bedroom_val_lmdb/. Cat: cat/ (the object category export), cat_train_lmdb/ or
    `source` itself holding data.mdb. Images come in key (LMDB) or relative-path (folders) order. Where there is no
    test split (Cat; Bedroom without its val LMDB or test/ folder) the last min(1000, max(1, count // 10)) images of
    that order are held out as 'test' and left out of 'train'. Labels are all 0. `workers` > 0 decodes on that many
    processes with the same output. `resize`: data.lsun_resize (RESIZES).
    """
    if category not in ("bedroom", "cat"):
        raise ValueError(f"LSUN category must be 'bedroom' or 'cat', got {category!r}")
    spec, source = DATASETS[f"lsun_{category}"], Path(source)
    if not source.is_dir():
        raise SourceError(f"LSUN {category}: {source} is not a folder; {spec.download}")
    train, test = _find_lsun(source, category)
    if train is None:
        raise SourceError(f"LSUN {category}: {source} holds neither an LMDB export nor a train/ folder; "
                          f"{spec.download}")
    count = train.count
    held_out = 0 if test is not None else min(1000, max(1, count // 10))
    if count - held_out < 1:
        raise SourceError(f"LSUN {category}: {train.path} holds {count} images, too few for a train split")

    def split(images: _Images, start: int, stop: int) -> RawSplit:
        def chunks() -> Iterator[Chunk]:
            return _decoded_chunks(images.items(start, stop), resolution, workers, resize)

        return RawSplit(stop - start, chunks)

    if test is None:
        return {"train": split(train, 0, count - held_out), "test": split(train, count - held_out, count)}
    return {"train": split(train, 0, count), "test": split(test, 0, test.count)}
