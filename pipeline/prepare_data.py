"""Stage prepare_data: CIFAR-10 into data/cifar10/{train,test}.npz (uint8) and a manifest.

    python -m pipeline.prepare_data [--config params.yaml]
    CIFAR10_SOURCE=/path/to/cifar10-jpeg.tar.gz python -m pipeline.prepare_data

data.source is 'torchvision' (the official download) or a local .tar.gz / folder laid out as
<split>/<class>/<image> with split in {train, test}; the environment variable CIFAR10_SOURCE wins.
The manifest records counts per class and the sha256 of each file.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import tracking
from pipeline.config import Config, ConfigError, check_data_source, stage_cli
from pipeline.data import save_split, write_json
from pipeline.stages import DATA

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_FILE = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+\.(?:png|jpe?g|bmp))$", re.IGNORECASE)
RESOLUTION = 32


class SourceError(ValueError):
    pass


def _decode(data: bytes, name: str) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if image.shape != (RESOLUTION, RESOLUTION, 3):
        raise SourceError(f"{name}: expected a {RESOLUTION}x{RESOLUTION} RGB image, got shape {image.shape}")
    return image


def _files_in_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r|*") as archive:  # streaming: one pass over the compressed file
        for member in archive:
            if member.isfile() and IMAGE_FILE.search(member.name):
                yield member.name, archive.extractfile(member).read()


def _files_in_folder(path: Path) -> Iterator[tuple[str, bytes]]:
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_file() and IMAGE_FILE.search(name):
            yield name, file.read_bytes()


def read_class_folders(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images, labels), 'test': ...} from a .tar.gz or folder of <split>/<class>/<image>."""
    files = _files_in_archive(source) if source.is_file() else _files_in_folder(source)
    found: dict[str, list[tuple[int, str, np.ndarray]]] = {"train": [], "test": []}
    for name, data in tqdm(files, desc=f"reading {source.name}", unit="img", mininterval=1):
        split, cls, _ = IMAGE_FILE.search(name).groups()
        if cls not in CLASSES:
            raise SourceError(f"{source}: {name}: unknown class folder {cls!r} (expected one of {', '.join(CLASSES)})")
        found[split].append((CLASSES.index(cls), name, _decode(data, name)))
    out = {}
    for split, items in found.items():
        if not items:
            raise SourceError(f"{source}: no images under {split}/<class>/ (expected the layout "
                              f"{split}/airplane/0001.jpg, ...)")
        items.sort(key=lambda item: (item[0], item[1]))  # deterministic order, whatever the archive's
        out[split] = (np.stack([i[2] for i in items]), np.array([i[0] for i in items], dtype=np.int64))
    return out


def read_torchvision(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official CIFAR-10 through torchvision's downloader."""
    import torchvision

    out = {}
    for split in ("train", "test"):
        try:
            ds = torchvision.datasets.CIFAR10(root=str(root), train=split == "train", download=True)
        except Exception as e:  # URLError, timeouts, checksum errors
            raise SourceError(f"data.source: torchvision could not download CIFAR-10 ({e}); offline, point "
                              "CIFAR10_SOURCE or data.source at a .tar.gz or folder of class folders") from None
        out[split] = (np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64))
    return out


def read_source(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if source == "torchvision":
        return read_torchvision(Path(DATA) / "download")
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"data.source: {source} does not exist (give 'torchvision', a .tar.gz, or a folder "
                          "of <split>/<class>/ images; the environment variable CIFAR10_SOURCE overrides it)")
    return read_class_folders(path)


def shuffled_subset(images: np.ndarray, labels: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first n (all if None) of a fixed random permutation. Stored shuffled, so that any prefix of
    the training set (e.g. evaluate.ref_images) is a random sample of it, the same on every machine."""
    keep = np.random.default_rng(0).permutation(len(images))[:n]
    return images[keep], labels[keep]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(cfg: Config) -> dict:
    splits = read_source(cfg.data.source)
    splits["train"] = shuffled_subset(*splits["train"], cfg.data.max_train)
    manifest = {"dataset": cfg.data.dataset, "source": cfg.data.source, "resolution": RESOLUTION,
                "classes": list(CLASSES), "splits": {}}
    for split, (images, labels) in splits.items():
        path = Path(DATA) / f"{split}.npz"
        save_split(path, images, labels)
        manifest["splits"][split] = {
            "file": path.name, "count": int(len(images)), "sha256": sha256(path),
            "per_class": {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)},
        }
    write_json(Path(DATA) / "manifest.json", manifest)
    return manifest


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    try:
        check_data_source(cfg)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    with tracking.stage_run("prepare_data", cfg):
        try:
            manifest = prepare(cfg)
        except SourceError as e:
            sys.exit(f"error: {e}")
        tracking.log_metrics({f"{s}_images": v["count"] for s, v in manifest["splits"].items()})
        tracking.log_artifact(Path(DATA) / "manifest.json")
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"wrote {DATA}: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
