"""Preemption: a training job killed by SIGTERM resumes where it stopped and ends where an
uninterrupted job ends (same weights, same MLflow run)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run, workspace

from pipeline.config import load
from pipeline.stages import checkpoint

ITERATIONS = 40
SETS = [f"teacher.iterations={ITERATIONS}", "teacher.checkpoint_every=1000", "teacher.log_every=5", "run.threads=1"]
SETTINGS = [arg for knob in SETS for arg in ("--set", knob)]


def _teacher(ws: Path, *sets: str) -> Path:
    """Where train_teacher writes its checkpoint with SETS and `sets` (the resume file: .resume.pt beside it)."""
    return ws / checkpoint(load(ws / "params.yaml", overrides=[*SETS, *sets]), "teacher")


def _train(ws, env) -> dict:
    run([sys.executable, "-m", "pipeline.train_teacher", *SETTINGS], ws, env)
    return torch.load(_teacher(ws), weights_only=False)


def _interrupt_after(ws, env, step: int, *extra: str) -> int:
    """Start training, send SIGTERM once the progress bar passes `step`; return the exit code."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline.train_teacher", *SETTINGS, *extra], cwd=ws, env=env,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        done = [int(n) for n in re.findall(rf"(\d+)/{ITERATIONS}", "".join(seen))]
        if done and max(done) >= step:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    code = process.wait(timeout=120)
    reader.join(timeout=5)
    assert "interrupted at step" in "".join(seen), "".join(seen)[-2000:]
    return code


@pytest.mark.slow
def test_sigterm_saves_a_resume_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path):
    ws, env = workspace(tmp_path)
    run([sys.executable, "-m", "pipeline.prepare_data"], ws, env)
    final = _teacher(ws)
    reference = _train(ws, env)
    final.unlink()

    assert _interrupt_after(ws, env, step=10) == 128 + signal.SIGTERM
    resume = torch.load(final.with_suffix(".resume.pt"), weights_only=False)
    assert 10 <= resume["step"] < ITERATIONS and not final.exists()

    resumed = _train(ws, env)
    assert not final.with_suffix(".resume.pt").exists()
    assert resumed["step"] == reference["step"] == ITERATIONS
    assert resumed["mlflow_run_id"] == resume["mlflow_run_id"]  # the same MLflow run continues
    for key in ("model", "ema"):
        for name, tensor in reference[key].items():
            torch.testing.assert_close(resumed[key][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


@pytest.mark.slow
def test_a_resume_checkpoint_from_other_params_is_not_used(tmp_path):
    """run.paths named: other params write the same checkpoint path, so the resume file's params are checked. (Keyed
    paths give other params other files: their resume file is not even read.)"""
    ws, env = workspace(tmp_path)
    named = "run.paths=named"
    run([sys.executable, "-m", "pipeline.prepare_data", "--set", named], ws, env)
    _interrupt_after(ws, env, 5, "--set", named)
    assert _teacher(ws) != _teacher(ws, "teacher.lr=5e-4")  # keyed
    assert _teacher(ws, named) == _teacher(ws, named, "teacher.lr=5e-4")
    assert _teacher(ws, named).with_suffix(".resume.pt").is_file()
    out = run([sys.executable, "-m", "pipeline.train_teacher", *SETTINGS, "--set", named, "--set", "teacher.lr=5e-4"],
              ws, env)
    assert "params changed since it was written; starting afresh" in out.stderr
    assert torch.load(_teacher(ws, named), weights_only=False)["step"] == ITERATIONS


OUT_OF_MEMORY = """
import torch
import pipeline.training as training
def step(self, loss_fn):  # the first micro-batch does not fit the GPU
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
training.Training._step = step
"""


def test_a_step_out_of_gpu_memory_names_the_micro_batch_to_set(tmp_path):
    """An OOM in a step stops the stage with one line: the micro-batch it had and the resources key to halve it."""
    ws, env = workspace(tmp_path)
    run([sys.executable, "-m", "pipeline.prepare_data"], ws, env)
    (ws / "patch").mkdir()
    (ws / "patch" / "sitecustomize.py").write_text(OUT_OF_MEMORY)
    env = {**env, "PYTHONPATH": f"{ws / 'patch'}:{env['PYTHONPATH']}"}
    result = subprocess.run([sys.executable, "-m", "pipeline.train_teacher"], cwd=ws, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert ("error: train_teacher: out of GPU memory at step 0 with 4 images per process at once (global batch 4 "
            "over 1 process(es), accumulation 1); set resources.train_teacher.micro_batch: 2") in result.stderr
    assert "Traceback" not in result.stderr


def test_the_micro_batch_that_fits_divides_the_share_and_leaves_the_margin():
    """Before step 1 on a GPU, micro_batch null becomes the largest divisor of the process's rows whose activations
    fit MEMORY_MARGIN of the free memory after the fixed bytes (placement, weights, moments); numbers in GB."""
    from pipeline.training import MEMORY_MARGIN, fitting_micro_batch

    gb = 1e9
    assert MEMORY_MARGIN == 0.85
    assert fitting_micro_batch(64, 1 * gb, 0.1 * gb, 10 * gb) == 64  # 64 x 0.1 <= 8.5 - 1: all at once
    assert fitting_micro_batch(64, 1 * gb, 0.2 * gb, 10 * gb) == 32  # at most 37 rows: the divisor 32
    assert fitting_micro_batch(48, 1 * gb, 0.2 * gb, 10 * gb) == 24  # 37 does not divide 48: 24
    assert fitting_micro_batch(64, 8 * gb, 0.2 * gb, 10 * gb) == 2   # 0.5 GB left after the fixed bytes
    assert fitting_micro_batch(64, 9 * gb, 0.2 * gb, 10 * gb) == 0   # nothing fits: an error before step 1
