"""pipeline.datasets readers against synthetic raw downloads whose content is known.

ImageNet64 files are written from known NHWC images; LSUN images are constant colours (or PNG noise) whose order
and crop can be told apart after decoding, so each check has an answer that does not come from the reader.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import datasets
from pipeline.datasets import (
    DATASETS,
    RawSplit,
    SourceError,
    center_crop_resize,
    raw_splits,
    read_imagenet64,
    read_lsun,
)

lmdb = pytest.importorskip("lmdb")


def collect(split: RawSplit) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(split.chunks())
    assert sum(len(images) for images, _ in chunks) == split.count
    for images, labels in chunks:
        assert images.dtype == np.uint8 and labels.dtype == np.int64 and len(images) == len(labels)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


# --- ImageNet 64x64 -------------------------------------------------------------------------------


def write_imagenet_batch(path: Path, images: np.ndarray, labels: np.ndarray, compressed: bool = False) -> None:
    """The release's layout: rows of all R values (row-major), then G, then B; labels 1..1000."""
    rows = np.stack([np.concatenate([image[:, :, c].ravel() for c in range(3)]) for image in images])
    save = np.savez_compressed if compressed else np.savez
    save(path, data=rows, labels=list(labels + 1), mean=rows.mean(0))


@pytest.fixture
def imagenet(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    source = tmp_path / "imagenet64"
    (source / "part2").mkdir(parents=True)
    batches = {1: 3, 2: 2, **{i: 1 for i in range(3, 10)}, 10: 4}
    truth: dict[int | str, tuple[np.ndarray, np.ndarray]] = {}
    for index, n in {**batches, "val": 5}.items():
        images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        labels = rng.integers(0, 1000, n)
        name = "val_data.npz" if index == "val" else f"train_data_batch_{index}.npz"
        folder = source / "part2" if index in (9, 10) else source  # files may sit in subfolders
        write_imagenet_batch(folder / name, images, labels, compressed=index == 2)
        truth[index] = images, labels
    train = [truth[i] for i in range(1, 11)]  # numeric order: 1, 2, ..., 10 (not 1, 10, 2)
    return source, {"train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
                    "test": truth["val"]}


def test_imagenet64_round_trip(imagenet):
    source, truth = imagenet
    splits = read_imagenet64(source)
    assert set(splits) == {"train", "test"}
    for name, (images, labels) in truth.items():
        assert splits[name].count == len(images)
        got_images, got_labels = collect(splits[name])
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    again = collect(splits["train"])  # chunks() starts afresh each call
    np.testing.assert_array_equal(again[0], truth["train"][0])
    assert set(raw_splits(DATASETS["imagenet64"], source)) == {"train", "test"}


def test_imagenet64_count_reads_only_headers(imagenet, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("count must not load the arrays")

    monkeypatch.setattr(np, "load", no_load)
    splits = read_imagenet64(imagenet[0])
    assert splits["train"].count == len(imagenet[1]["train"][0]) and splits["test"].count == 5


def test_imagenet64_missing_and_malformed(imagenet, tmp_path):
    with pytest.raises(SourceError, match="Downsampled ImageNet"):
        read_imagenet64(tmp_path / "absent")
    source = imagenet[0]
    (source / "part2" / "train_data_batch_10.npz").unlink()
    with pytest.raises(SourceError, match="train_data_batch_10.npz.*Downsampled ImageNet"):
        read_imagenet64(source)

    np.savez(source / "part2" / "train_data_batch_10.npz", data=np.zeros((2, 100), np.uint8), labels=[1, 2])
    with pytest.raises(SourceError, match="train_data_batch_10.npz"):
        read_imagenet64(source)

    rows = np.zeros((2, 12288), np.uint8)
    np.savez(source / "part2" / "train_data_batch_10.npz", data=rows, labels=[0, 1000])  # 0: not 1-based
    splits = read_imagenet64(source)
    with pytest.raises(SourceError, match="train_data_batch_10.npz.*labels"):
        collect(splits["train"])

    (source / "val_data.npz").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="val_data.npz"):
        read_imagenet64(source)


# --- center_crop_resize ---------------------------------------------------------------------------


def test_center_crop_of_an_image_already_at_resolution():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (8, 19, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_resize(Image.fromarray(wide), 8), wide[:, 5:13])
    tall = rng.integers(0, 256, (13, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_resize(Image.fromarray(tall), 8), tall[2:10])


def test_center_crop_box_halves_large_images():
    # 32 -> 16 -> 8 by box-halving, then no resize: each pixel is the mean of a 4x4 block, up to PIL's fixed-point
    # rounding (<= 1 per halving). A direct bicubic or bilinear downscale of this noise is ~30 off.
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blocks = image.reshape(8, 4, 8, 4, 3).astype(np.float64).mean(axis=(1, 3))
    out = center_crop_resize(Image.fromarray(image), 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert np.abs(out - blocks).max() <= 2.0


def test_center_crop_matches_the_documented_steps():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    step = image.resize((20, 12), Image.Resampling.BOX)  # 24 >= 16: halve once; 12 < 16: stop
    step = step.resize((13, 8), Image.Resampling.BICUBIC)  # scale 8/12: round(13.33), 8
    np.testing.assert_array_equal(center_crop_resize(image, 8), np.asarray(step)[:, 2:10])


def test_center_crop_keeps_colours_and_sides():
    constant = Image.new("RGB", (100, 60), (200, 30, 90))
    assert np.abs(center_crop_resize(constant, 8).astype(int) - (200, 30, 90)).max() <= 1
    halves = np.zeros((20, 64, 3), np.uint8)
    halves[:, :32] = (255, 0, 0)
    halves[:, 32:] = (0, 0, 255)
    out = center_crop_resize(Image.fromarray(halves), 8).astype(int)  # crop straddles the boundary
    assert (out[:, :2, 0] > 200).all() and (out[:, :2, 2] < 50).all()
    assert (out[:, -2:, 2] > 200).all() and (out[:, -2:, 0] < 50).all()
    assert (out[:, :, 0] + out[:, :, 2] > 200).all()  # no other colour appears


# --- LSUN -----------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 255, 255),
           (0, 0, 0), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0)]
FORMATS = ["WEBP", "JPEG", "PNG"]


def encode(colour: tuple[int, int, int], size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def write_lmdb(path: Path, values: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()


def lsun_values(n: int, offset: int = 0) -> tuple[dict[bytes, bytes], list[tuple[int, int, int]]]:
    """n images, keys inserted out of order; returns the values and the colours in key order."""
    keys = [f"{i:04x}".encode() for i in range(n)]
    values = {}
    for i in reversed(range(n)):  # insertion order is not key order
        size = (20 + 3 * i, 12 + i % 5)  # non-square, wide
        values[keys[i]] = encode(COLOURS[(i + offset) % len(COLOURS)], size, FORMATS[i % 3])
    return values, [COLOURS[(i + offset) % len(COLOURS)] for i in range(n)]


def assert_colours(images: np.ndarray, colours: list[tuple[int, int, int]]) -> None:
    assert images.shape == (len(colours), 8, 8, 3)
    np.testing.assert_allclose(images.reshape(len(images), -1, 3).mean(1), colours, atol=4)  # JPEG is lossy


@pytest.mark.parametrize("layout", ["cat", "cat_train_lmdb", "."])
def test_lsun_cat_lmdb_holds_out_the_tail(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(datasets, "LSUN_CHUNK", 3)  # several chunks
    values, colours = lsun_values(12)
    write_lmdb(tmp_path / layout, values)
    splits = read_lsun(tmp_path, "cat", 8)
    assert (splits["train"].count, splits["test"].count) == (11, 1)  # min(1000, max(1, 12 // 10))
    images, labels = collect(splits["train"])
    assert_colours(images, colours[:11])
    assert not labels.any()
    assert_colours(collect(splits["test"])[0], colours[11:])


def test_lsun_hold_out_size(tmp_path):
    values, colours = lsun_values(25)
    write_lmdb(tmp_path / "cat", values)
    splits = raw_splits(DATASETS["lsun_cat"], tmp_path)  # also: resolution from the spec
    assert (splits["train"].count, splits["test"].count) == (23, 2)
    images = collect(splits["test"])[0]
    assert images.shape == (2, 256, 256, 3)
    np.testing.assert_allclose(images.reshape(2, -1, 3).mean(1), colours[23:], atol=4)


def test_lsun_bedroom_uses_the_val_lmdb(tmp_path):
    train, train_colours = lsun_values(5)
    val, val_colours = lsun_values(3, offset=5)
    write_lmdb(tmp_path / "bedroom_train_lmdb", train)
    write_lmdb(tmp_path / "bedroom_val_lmdb", val)
    splits = read_lsun(tmp_path, "bedroom", 8)
    assert (splits["train"].count, splits["test"].count) == (5, 3)
    assert_colours(collect(splits["train"])[0], train_colours)
    assert_colours(collect(splits["test"])[0], val_colours)


def test_lsun_image_folders(tmp_path):
    rng = np.random.default_rng(4)
    truth = {}
    for name in ["train/b/2.png", "train/a/9.png", "train/a/10.png", "train/c.png", "test/x.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (8, 11, 3), dtype=np.uint8)  # already at resolution: crop only
        Image.fromarray(image).save(tmp_path / name)
        truth[name] = image[:, 1:9]
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    splits = read_lsun(tmp_path, "bedroom", 8)
    order = ["train/a/10.png", "train/a/9.png", "train/b/2.png", "train/c.png"]  # by relative path
    np.testing.assert_array_equal(collect(splits["train"])[0], np.stack([truth[n] for n in order]))
    np.testing.assert_array_equal(collect(splits["test"])[0], truth["test/x.png"][None])


def test_lsun_errors(tmp_path):
    for category in ("bedroom", "cat"):
        hint = DATASETS[f"lsun_{category}"].download
        with pytest.raises(SourceError) as error:
            read_lsun(tmp_path / "absent", category, 8)
        assert hint in str(error.value)
        with pytest.raises(SourceError) as error:
            read_lsun(tmp_path, category, 8)  # exists but empty
        assert hint in str(error.value)

    values, _ = lsun_values(4)
    values[b"0002"] = b"RIFF\x00\x00garbage"
    write_lmdb(tmp_path / "cat", values)
    splits = read_lsun(tmp_path, "cat", 8)
    with pytest.raises(SourceError, match="key 0002"):
        collect(splits["train"])
    with pytest.raises(ValueError):
        read_lsun(tmp_path, "dog", 8)
    with pytest.raises(ValueError):
        raw_splits(DATASETS["cifar10"], tmp_path)


def test_lsun_workers_give_the_same_output(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "LSUN_CHUNK", 4)  # batching happens in this process: the patch applies
    values, _ = lsun_values(10)
    noise = np.random.default_rng(5).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    values[b"0003"] = buffer.getvalue()  # noise: resampling differences would show
    write_lmdb(tmp_path / "bedroom_train_lmdb", values)
    serial = read_lsun(tmp_path, "bedroom", 8)
    parallel = read_lsun(tmp_path, "bedroom", 8, workers=2)
    for split in ("train", "test"):
        a, b = [[chunk[0] for chunk in s[split].chunks()] for s in (serial, parallel)]
        assert [len(x) for x in a] == [len(x) for x in b]
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))

