"""Every Table 3 column's code path at micro size: `paper_imagenet64+micro` (class-conditional ADM at 64x64)
and `paper_lsun_bedroom+micro` (ADM at 256x256), each from synthetic raw files in the real download formats,
through Snakemake's whole default DAG: data preparation, teacher, CD, CT, 2-step search, sampling, metrics,
table2 and editing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run, workspace
from PIL import Image

from pipeline.config import load
from pipeline.stages import EDIT_TASKS, checkpoint, data_dir, edit_outputs, samples, split_paths, two_step

lmdb = pytest.importorskip("lmdb")


def write_imagenet64(folder: Path, per_batch: int, val: int, seed: int = 0) -> None:
    """The Downsampled ImageNet npz layout (10 train batches, one val file): rows of CHW-flattened uint8 pixels,
    labels 1..1000."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    files = [(f"train_data_batch_{i}.npz", per_batch) for i in range(1, 11)] + [("val_data.npz", val)]
    for name, n in files:
        images = rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
        np.savez(folder / name, data=images.reshape(n, -1), labels=rng.integers(1, 1001, n).tolist())


def write_lsun_lmdb(path: Path, n: int, seed: int = 0) -> None:
    """An LMDB export of n non-square noise images, JPEG-encoded as the LSUN tools store them (WebP there)."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
            buffer = __import__("io").BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            txn.put(f"{i:040x}".encode(), buffer.getvalue())
    env.close()


def check_table2(path: Path, dataset: str) -> pd.DataFrame:
    table = pd.read_csv(path)
    ours = table[table.dataset == dataset]
    assert list(zip(ours.method, ours.nfe)) == [("CD", 1), ("CD", 2), ("CT", 1), ("CT", 2)] or \
        set(ours.method) >= {"CD", "CT"}
    consistency = ours[ours.method.isin(["CD", "CT"])]
    assert all(math.isfinite(v) and v > 0 for v in consistency.fid)
    assert consistency.precision.between(0, 1).all() and consistency.recall.between(0, 1).all()
    assert consistency.paper_fid.notna().all() and consistency.paper_precision.notna().all()
    others = table[table.dataset != dataset]
    assert others.fid.isna().all() and others.notes.str.contains("not run here").all()
    return ours


@pytest.mark.slow
def test_imagenet64_column_runs_class_conditional_at_micro_size(tmp_path):
    ws, env = workspace(tmp_path, "paper_imagenet64+micro")
    cfg = load(ws / "params.yaml")
    write_imagenet64(ws / cfg.data.source, per_batch=4, val=10)
    run([sys.executable, "-m", "snakemake", "--cores", "2"], ws, env)
    check_table2(ws / "results/tables/table2.csv", "ImageNet 64x64")
    ckpt = torch.load(ws / checkpoint(cfg, "cd"), map_location="cpu", weights_only=False)
    assert ckpt["shape"] == {"resolution": 64, "label_dim": 1000} and ckpt["network"]["arch"] == "adm"
    assert ckpt["ema"]["net.map_label.weight"].shape[1] == 1000  # the labels enter the network
    with np.load(ws / samples(cfg, "cd")) as f:
        assert f["nfe1"].shape == (12, 64, 64, 3) and len(set(f["labels"].tolist())) > 1
        assert 0 <= f["labels"].min() and f["labels"].max() < 1000
    # The 2-step time comes from CD's grid of N = 40 levels, as the paper's 1.382 (level 22 of 40).
    search = json.loads((ws / two_step(cfg, "cd")).read_text())
    assert search["grid"] == 40 and 1 <= search["index"] <= 38
    assert cfg.data.label_dim == 1000 and cfg.cd.N == 40
    *figures, _ = edit_outputs(cfg, cfg.edit.model)
    assert len(figures) == len(EDIT_TASKS)
    for figure in figures:
        assert (ws / figure).stat().st_size > 1000
    manifest = json.loads((ws / data_dir(cfg) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 40 and manifest["splits"]["test"]["count"] == 10


@pytest.mark.slow
def test_lsun_bedroom_column_runs_at_256_micro_size(tmp_path):
    ws, env = workspace(tmp_path, "paper_lsun_bedroom+micro")
    cfg = load(ws / "params.yaml")
    (ws / cfg.data.source).mkdir(parents=True)
    write_lsun_lmdb(ws / cfg.data.source / "bedroom_train_lmdb", 24)
    run([sys.executable, "-m", "snakemake", "--cores", "2", "results/tables/table2.csv"], ws, env)
    check_table2(ws / "results/tables/table2.csv", "LSUN Bedroom 256x256")
    images = np.load(ws / split_paths(cfg, "train")[0], mmap_mode="r")
    assert images.shape == (22, 256, 256, 3)  # 24 minus the held-out tail of max(1, 24 // 10) = 2
    with np.load(ws / samples(cfg, "ct")) as f:
        assert f["nfe2"].shape == (12, 256, 256, 3)
    ckpt = torch.load(ws / checkpoint(cfg, "teacher"), map_location="cpu", weights_only=False)
    assert ckpt["shape"] == {"resolution": 256, "label_dim": 0}
