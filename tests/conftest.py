"""Helpers shared by the end-to-end tests: a synthetic CIFAR-10 and a micro-preset workspace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.prepare_data import CLASSES

ROOT = Path(__file__).resolve().parents[1]


def make_class_folders(root: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random 32x32 PNGs in <split>/<class>/; returns the images in (class, name) order per split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in per_class.items():
        images = []
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / cls / f"{i:04d}.png")
                images.append(image)
        out[split] = np.stack(images)
    return out


def workspace(tmp_path: Path, preset: str = "micro") -> tuple[Path, dict]:
    """A copy of the pipeline with the given preset, a synthetic CIFAR-10 and a private MLflow store."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(ROOT / "pipeline", ws / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "Snakefile", ws)
    text = (ROOT / "params.yaml").read_text()
    (ws / "params.yaml").write_text(re.sub(r"(?m)^preset: \S+", f"preset: {preset}", text))
    make_class_folders(tmp_path / "cifar", {"train": 3, "test": 1})
    env = {**os.environ, "CIFAR10_SOURCE": str(tmp_path / "cifar"), "PYTHONPATH": str(ws),
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return ws, env


def run(args: list[str], ws: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
