"""Helpers shared by the end-to-end tests: a synthetic CIFAR-10 and a micro-preset workspace.

The suite's budget (docs/tests.md): `make test` runs it on 2 workers (pytest-xdist, --dist loadfile: the tests of one
file run on one worker, so a session or module fixture used within one file is built once) and CI must finish in 25
minutes on 2 cores. So, from now on: a new end-to-end test reuses a shared workspace -- `micro_dag` (the micro DAG,
built once per run; copy it with `copy_workspace` before changing anything) or its module's fixture -- or says in
its docstring why it cannot. A session fixture used by tests of several files is built on each of their workers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.prepare_data import CLASSES

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each, in the worker and in every process it starts (torch's default of
    # one thread per core in both would put four busy threads on two cores).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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
    shutil.copytree(ROOT / "envs", ws / "envs")
    shutil.copy(ROOT / "Snakefile", ws)
    text = (ROOT / "params.yaml").read_text()
    (ws / "params.yaml").write_text(re.sub(r"(?m)^preset: \S+", f"preset: {preset}", text))
    make_class_folders(tmp_path / "cifar", {"train": 3, "test": 1})
    env = {**os.environ, "CIFAR10_SOURCE": str(tmp_path / "cifar"), "PYTHONPATH": str(ws),
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return ws, env


def copy_workspace(ws: Path, env: dict, dest: Path) -> tuple[Path, dict]:
    """A copy of a workspace (with its outputs, mtimes, Snakemake metadata and MLflow store) to change freely."""
    shutil.copytree(ws, dest, symlinks=True)
    env = {**env, "PYTHONPATH": str(dest), "MLFLOW_TRACKING_URI": f"sqlite:///{dest}/mlflow.db"}
    return dest, env


def run(args: list[str], ws: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TRAINING_STAGES = ("train_teacher", "distill_cd", "train_ct")
TRAINED = ("teacher", "cd", "ct")


def set_training_resources(ws: Path, cpus: int = 1, runtime: int = 10, mem_mb: int = 1000,
                           stages: tuple[str, ...] = TRAINING_STAGES, **fields) -> None:
    """Set the micro preset's resources of training stages: cpus and memory per node, the time limit in minutes
    and e.g. processes=2, launch='srun'."""
    text = (ws / "params.yaml").read_text()
    extra = "".join(f", {k}: {v}" for k, v in fields.items())
    for stage in stages:
        line = rf"(?m)^      {stage}: +\{{gpu: 0, cpus: 1, mem_mb: 1000, runtime: 10, nodes: 1\}}$"
        new = f"      {stage}: {{gpu: 0, cpus: {cpus}, mem_mb: {mem_mb}, runtime: {runtime}, nodes: 1{extra}}}"
        text, n = re.subn(line, new, text)
        assert n == 1, f"the micro preset's resources line of {stage} not found"
    (ws / "params.yaml").write_text(text)


def relative_difference(a: dict, b: dict) -> float:
    """The largest of max |a_k - b_k| / max |a_k| over the floating-point tensors k of two state dicts."""
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item()
               for k in a if a[k].is_floating_point() and a[k].abs().max() > 0)


def use_float64(ws: Path) -> None:
    """Train the workspace's micro preset in float64, so that float rounding cannot hide a difference of layouts."""
    set_micro_run(ws, dtype="float64")


def set_micro_run(ws: Path, **knobs) -> None:
    """Add run knobs to the workspace's micro preset (its one `run:` line: a second would silently replace it)."""
    text = (ws / "params.yaml").read_text()
    line = "\n  micro:" + text.split("\n  micro:", 1)[1].split("\n", 2)[0] + "\n    run: {compile: false}"
    assert line in text, "the micro preset's run line not found"
    extra = "".join(f", {k}: {v}" for k, v in knobs.items())
    (ws / "params.yaml").write_text(text.replace(line, line[:-1] + extra + "}", 1))


def largest_difference(first: dict, second: dict, keys=("model", "ema")) -> float:
    """The largest relative difference of two checkpoints' online, EMA and target (if any) weights."""
    pairs = [(first[k], second[k]) for k in keys] + [(first["extra"][k], second["extra"][k]) for k in first["extra"]]
    return max(relative_difference(a, b) for a, b in pairs)


@pytest.fixture
def one_thread():
    """Tiny networks: one thread is fastest, and it keeps the timing steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def micro_dag(tmp_path_factory) -> tuple[Path, dict]:
    """The micro preset's whole DAG (`snakemake all figure3`), built once per test run: its workspace and environment.
    Read it, never change it (copy_workspace first): other tests inspect the same files."""
    ws, env = workspace(tmp_path_factory.mktemp("micro_dag"))
    run([sys.executable, "-m", "snakemake", "--cores", "2", "all", "figure3"], ws, env)
    return ws, env


def pytest_collection_modifyitems(config, items) -> None:
    """The file with SLURM tests first (it mostly waits for the cluster, while the other worker computes), then the
    files with slow tests, then the rest, so that the short files fill the end of a 2-worker run. A stable sort:
    each file's tests keep their order."""
    rank: dict = {}
    for item in items:
        mine = 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2
        rank[item.path] = min(rank.get(item.path, 2), mine)
    items.sort(key=lambda item: rank[item.path])
