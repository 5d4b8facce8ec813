"""Stage prepare_data: a dataset into data/<dataset>/{train,test}_{images,labels}.npy and a manifest.

    python -m pipeline.prepare_data [--config params.yaml]
    CIFAR10_SOURCE=/path/to/cifar10-jpeg.tar.gz python -m pipeline.prepare_data

CIFAR-10: data.source is 'torchvision' (the official download) or a local .tar.gz / folder laid out as
<split>/<class>/<image> with split in {train, test}; the environment variable CIFAR10_SOURCE wins.
ImageNet 64 and LSUN: data.source is the folder of the raw download (pipeline.datasets says which files).
gmm: no source; the mixture of data.gmm (pipeline.gmm) is drawn, and written into the manifest as well.
Images are uint8 NHWC .npy files, written in a stream into a memory map (LSUN Bedroom is 590 GB), the
training set in a fixed random order. The manifest records counts (per class for CIFAR-10) and sha256s.
"""

from __future__ import annotations

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
from pipeline.data import atomic_write, sha256_file, split_files, write_json
from pipeline.datasets import RawSplit, SourceError, raw_splits
from pipeline.stages import data_dir

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_FILE = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+\.(?:png|jpe?g|bmp))$", re.IGNORECASE)
RESOLUTION = 32


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


def generate_mixture(cfg: Config) -> tuple[dict[str, RawSplit], dict]:
    """Dataset gmm: the train and test splits drawn from data.gmm's mixture (labels: the component of each draw,
    uint8 as every dataset), and the mixture itself for the manifest, where evaluate reads the exact answers."""
    import torch

    from pipeline.data import to_uint8
    from pipeline.gmm import shape_mixture

    g = cfg.data.gmm
    mixture = shape_mixture(g.components, g.spread)
    mean = mixture.mean_and_covariance()[0].reshape(1, *mixture.means.shape[1:])
    if mixture.on_mode_fraction(mean) > 0:  # a mixture whose one-step Euler sample looks right tells nothing
        raise SourceError(f"data.gmm.spread: {g.spread} puts the mean of the means on a mode; lower it")
    generator = torch.Generator().manual_seed(g.seed)
    splits = {}
    for split, count in (("train", g.train), ("test", g.test)):
        x0, component = mixture.sample(count, generator)
        splits[split] = in_memory(to_uint8(x0), component.numpy().astype(np.int64))
    return splits, {"mixture": mixture.to_dict()}


def read_source(cfg: Config) -> dict[str, RawSplit]:
    """The raw splits of the configured dataset, read from data.source."""
    source, spec = cfg.data.source, cfg.data.spec
    if spec.name != "cifar10":
        return raw_splits(spec, Path(source).expanduser(), workers=cfg.data.workers,
                          lsun_resize=cfg.data.lsun_resize)
    if source == "torchvision":
        splits = read_torchvision(Path("data/downloads") / cfg.data.dataset)  # one download, every data key
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SourceError(f"data.source: {source} does not exist; {spec.download}")
        splits = read_class_folders(path)
    return {split: in_memory(images, labels) for split, (images, labels) in splits.items()}


def in_memory(images: np.ndarray, labels: np.ndarray) -> RawSplit:
    return RawSplit(len(images), lambda: iter([(images, labels)]))


def shuffled_slots(count: int) -> np.ndarray:
    """slot[i]: where raw image i is stored. The training set is stored in a fixed random order, so that any
    prefix of it (data.max_train, evaluate.ref_images) is a random sample, the same on every machine."""
    order = np.random.default_rng(0).permutation(count)  # stored[j] = raw[order[j]]
    slots = np.empty(count, np.int64)
    slots[order] = np.arange(count)
    return slots


def write_split(folder: Path, split: str, raw: RawSplit, keep: int | None, shuffle: bool) -> np.ndarray:
    """Stream a raw split into <split>_images.npy (a memory map, written atomically) and its labels; returns
    the labels. With shuffle, raw image i goes to slot shuffled_slots[i]; slots >= keep are dropped."""
    slots = shuffled_slots(raw.count) if shuffle else np.arange(raw.count)
    kept = raw.count if keep is None else min(keep, raw.count)
    labels = np.zeros(kept, np.int64)
    image_path, label_path = split_files(folder, split)
    with atomic_write(image_path) as tmp:
        images, start = None, 0
        for chunk, chunk_labels in tqdm(raw.chunks(), desc=f"writing {split}", unit="chunk", mininterval=1):
            if images is None:
                images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(kept, *chunk.shape[1:]))
            where = slots[start:start + len(chunk)]
            inside = where < kept
            images[where[inside]] = chunk[inside]
            labels[where[inside]] = chunk_labels[inside]
            start += len(chunk)
        if start != raw.count:
            raise SourceError(f"{split}: expected {raw.count} images, read {start}")
        images.flush()
        del images
    with atomic_write(label_path) as tmp:
        np.save(tmp, labels)
    return labels


def prepare(cfg: Config) -> dict:
    spec, folder = cfg.data.spec, Path(data_dir(cfg))
    manifest = {"dataset": spec.name, "source": cfg.data.source, "resolution": spec.resolution,
                "num_classes": spec.num_classes, "splits": {}}
    if spec.name == "cifar10":
        manifest["classes"] = list(CLASSES)
    if spec.name == "gmm":
        splits, mixture = generate_mixture(cfg)
        manifest |= {"source": "generated", "gmm": cfg.section("data.gmm")} | mixture
    else:
        splits = read_source(cfg)
    for split, raw in splits.items():
        train = split == "train"
        labels = write_split(folder, split, raw, cfg.data.max_train if train else None, shuffle=train)
        entry = {"count": int(len(labels)), "raw_count": raw.count}
        for path in split_files(folder, split):
            entry[path.name] = sha256_file(path)
        if spec.name == "cifar10":
            entry["per_class"] = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
        manifest["splits"][split] = entry
    write_json(folder / "manifest.json", manifest)
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
        tracking.log_artifact(Path(data_dir(cfg)) / "manifest.json")
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"wrote {data_dir(cfg)}: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
