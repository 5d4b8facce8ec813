"""Nothing lost, nothing unsafe (issue 10): checkpoints are data, never torn; a hard-killed training run resumes
bit for bit in the same MLflow run without duplicated metric steps; concurrent MLflow writers lose nothing."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run, workspace

from pipeline import config as pipeline_config
from pipeline.models import CheckpointError, atomic_save, load_checkpoint, load_model, previous
from pipeline.stages import checkpoint, ref_stats


class RunsCode:
    """An object whose unpickling runs a shell command (what a crafted checkpoint would carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_is_refused_and_its_code_does_not_run(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "cd.pt"
    torch.save({"kind": "cd", "ema": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file does carry code: the test can fail
    assert marker.exists()


def test_a_stage_refuses_a_crafted_checkpoint_in_one_line(tmp_path):
    ws, env = workspace(tmp_path)
    marker = tmp_path / "ran"
    cd = checkpoint(pipeline_config.load(ws / "params.yaml"), "cd")
    (ws / cd).parent.mkdir(parents=True)
    torch.save({"kind": "cd", "payload": RunsCode(marker)}, ws / cd)
    result = subprocess.run([sys.executable, "-m", "pipeline.sample", "--model", "cd"], cwd=ws, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and not marker.exists()
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {cd}: refused to load")
    assert "Traceback" not in result.stderr


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "teacher.pt"
    atomic_save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=r"teacher.pt: truncated or corrupt .*re-run the stage"):
        load_checkpoint(path)


def test_atomic_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "x.resume.pt"
    atomic_save({"step": 1}, path, keep_previous=True)
    atomic_save({"step": 2}, path, keep_previous=True)
    assert previous(path) == tmp_path / "x.resume.prev.pt"
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(previous(path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.resume.prev.pt", "x.resume.pt"]


def test_a_full_disk_leaves_the_old_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "teacher.resume.pt"
    atomic_save({"step": 1, "w": torch.ones(10)}, path, keep_previous=True)
    before = path.read_bytes()
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(CheckpointError, match=r"no space left on the device .*is still the last good one"):
        atomic_save({"step": 2, "w": torch.zeros(10)}, path, keep_previous=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.resume.pt"]  # no temporary file left behind


# --------------------------------------------------------------------------------------------------
# Hard kills of real training stages.

ITERATIONS, CHECKPOINT_EVERY = 40, 4
STAGE = {"teacher": "train_teacher", "cd": "distill_cd", "ct": "train_ct"}


# The settings of all three stages in every command: CD and CT then read the teacher trained with these settings
# (its checkpoint's name carries the teacher's params).
SETS = ["run.threads=1"] + [f"{kind}.{knob}" for kind in STAGE for knob in (
    f"iterations={ITERATIONS}", f"checkpoint_every={CHECKPOINT_EVERY}", "log_every=1")]


def _settings(kind: str) -> list[str]:
    return [arg for knob in SETS for arg in ("--set", knob)]


def _checkpoint(ws: Path, kind: str) -> Path:
    """Where the stage writes `kind`'s checkpoint, with the settings above; its resume file: .resume.pt beside it."""
    return ws / checkpoint(pipeline_config.load(ws / "params.yaml", overrides=SETS), kind)


def _loss_steps(ws: Path, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def _kill_after_first_checkpoint(ws: Path, env: dict, kind: str, seed: int) -> int:
    """Start the stage; once its first periodic checkpoint exists, SIGKILL it after a random delay."""
    resume = _checkpoint(ws, kind).with_suffix(".resume.pt")
    process = subprocess.Popen([sys.executable, "-m", f"pipeline.{STAGE[kind]}", *_settings(kind)], cwd=ws,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not resume.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.6))
    process.send_signal(signal.SIGKILL)
    return process.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_at_a_random_step_resumes_bit_for_bit_in_the_same_mlflow_run(tmp_path):
    ws, env = workspace(tmp_path)
    run([sys.executable, "-m", "pipeline.prepare_data"], ws, env)
    for seed, kind in enumerate(("teacher", "cd", "ct")):
        final = _checkpoint(ws, kind)
        resume = final.with_suffix(".resume.pt")
        run([sys.executable, "-m", f"pipeline.{STAGE[kind]}", *_settings(kind)], ws, env)
        reference = torch.load(final, weights_only=True)
        final.unlink()  # the teacher's comes back, bit for bit, before CD and CT need it

        assert _kill_after_first_checkpoint(ws, env, kind, seed) == -signal.SIGKILL, f"{kind} finished too soon"
        killed_at = load_checkpoint(resume)["step"]
        assert CHECKPOINT_EVERY <= killed_at < ITERATIONS and not final.exists()
        run([sys.executable, "-m", f"pipeline.{STAGE[kind]}", *_settings(kind)], ws, env)
        resumed = torch.load(final, weights_only=True)
        assert resumed["step"] == ITERATIONS
        for key in ("model", "ema"):
            for name, tensor in reference[key].items():
                assert torch.equal(resumed[key][name], tensor), f"{kind}: {key}.{name} differs"
        for name, tensor in reference["extra"].get("target", {}).items():
            assert torch.equal(resumed["extra"]["target"][name], tensor), f"{kind}: target.{name} differs"
        # One MLflow run, every step logged exactly once, with the uninterrupted run's values.
        losses = _loss_steps(ws, resumed["mlflow_run_id"])
        assert [step for step, _ in losses] == list(range(1, ITERATIONS + 1)), f"{kind}: {losses}"
        assert losses == _loss_steps(ws, reference["mlflow_run_id"])
        assert not resume.exists()
        assert not previous(resume).exists()


@pytest.mark.slow
def test_a_torn_newest_resume_file_falls_back_to_the_one_before(tmp_path):
    ws, env = workspace(tmp_path)
    run([sys.executable, "-m", "pipeline.prepare_data"], ws, env)
    final = _checkpoint(ws, "ct")
    resume = final.with_suffix(".resume.pt")
    run([sys.executable, "-m", "pipeline.train_ct", *_settings("ct")], ws, env)
    reference = torch.load(final, weights_only=True)
    final.unlink()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.train_ct", *_settings("ct")], cwd=ws, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not previous(resume).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    resume.write_bytes(resume.read_bytes()[:4096])  # torn: what a dying disk or a copy cut short leaves
    out = run([sys.executable, "-m", "pipeline.train_ct", *_settings("ct")], ws, env)
    assert f"{resume.name}: truncated or corrupt" in out.stderr
    assert "resuming ct from step" in out.stderr and previous(resume).name in out.stderr
    resumed = torch.load(final, weights_only=True)
    for key in ("model", "ema"):
        for name, tensor in reference[key].items():
            assert torch.equal(resumed[key][name], tensor), f"{key}.{name} differs"


# --------------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from pipeline import config, tracking
    cfg = config.load("params.yaml", "micro")
    with tracking.stage_run(f"writer_{sys.argv[1]}", cfg, extra_params={f"extra_{i}": i for i in range(40)}):
        for step in range(25):
            tracking.log_metrics({f"metric_{k}": step * k for k in range(4)}, step=step)
""")


@pytest.mark.slow
def test_eight_concurrent_writers_lose_no_run_param_or_metric(tmp_path):
    """8 processes write one SQLite store at once; every run, param and metric value is there afterwards."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import config, tracking

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(i)], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                text=True) for i in range(8)]
    for writer in writers:
        assert writer.wait(timeout=600) == 0, writer.stderr.read()[-3000:]
    cfg = config.load(ROOT / "params.yaml", "micro")
    params = len(tracking.flatten({k: v for k, v in cfg.raw.items() if k != "resources"})) + 40
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    every = mlflow.search_runs(experiment_names=[cfg.run.experiment], output_format="list")
    runs = [r for r in every if "mlflow.parentRunId" in r.data.tags]  # the rest: the experiment's parent run
    assert sorted(r.info.run_name for r in runs) == [f"writer_{i}" for i in range(8)]
    assert len(every) == 9 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {(set(every) - set(runs)).pop()
                                                                                     .info.run_id}
    for r in runs:
        assert r.info.status == "FINISHED" and len(r.data.params) == params
        for k in range(4):
            history = client.get_metric_history(r.info.run_id, f"metric_{k}")
            assert sorted((m.step, m.value) for m in history) == [(s, float(s * k)) for s in range(25)]


def test_metrics_the_store_refuses_are_buffered_and_replayed(tmp_path, monkeypatch):
    """The store stops answering for three calls: those values wait in mlflow-buffer/ and reach the run later,
    with their steps; nothing raises."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import config, tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = config.load(ROOT / "params.yaml", "micro")
    down = {"now": False}

    def unless_down(real):
        def call(*args, **kwargs):
            if down["now"]:
                raise ConnectionError("store unreachable")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(mlflow, "log_metrics", unless_down(mlflow.log_metrics))
    monkeypatch.setattr(MlflowClient, "log_batch", unless_down(MlflowClient.log_batch))
    with tracking.stage_run("flaky", cfg) as active:
        for step in range(8):
            down["now"] = step in (3, 4, 5)
            tracking.log_metrics({"loss": step / 10}, step=step)
            if step == 5:
                assert len(tracking._buffer_file(active.info.run_id).read_text().splitlines()) == 3
    history = MlflowClient().get_metric_history(active.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(8)]
    assert not tracking._buffer_file(active.info.run_id).exists()


def test_a_checkpoint_of_another_preset_is_named(tmp_path, monkeypatch):
    from pipeline import bench, config

    monkeypatch.chdir(tmp_path)
    micro = config.load(ROOT / "params.yaml", "micro")
    bench.write_synthetic_workspace(micro, images=8)  # a micro teacher where the micro DAG puts it
    teacher = checkpoint(micro, "teacher")
    load_model(teacher, cfg=micro)
    with pytest.raises(CheckpointError, match=re.escape(teacher) + r": network.model_channels 8 \(config: 16\).*not "
                                              r"this run's preset tiny"):
        load_model(teacher, cfg=config.load(ROOT / "params.yaml", "tiny"))


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    """Python as an unprivileged user (root may write anywhere, so the check could not fail as root)."""
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_an_unwritable_output_folder_is_named_before_any_job():
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own folders are private to root
    try:
        base.chmod(0o777)  # the unprivileged user may write here, not in locked/
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        result = _as_nobody(textwrap.dedent(f"""
            from pipeline.config import unwritable
            print(unwritable(["{locked}/checkpoints/cifar10/teacher.pt"]))
            print(unwritable(["{base}/checkpoints/teacher.pt"]))
        """))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"{locked}/checkpoints/cifar10 (its parent {locked} is not writable)",
                                              "None"]
    finally:
        shutil.rmtree(base)


def test_a_split_that_does_not_match_its_manifest_is_refused(tmp_path):
    import json

    import numpy as np

    from pipeline.data import DataError, load_split, save_split, sha256_file, split_files

    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    save_split(tmp_path, "train", images, np.arange(6))
    entry = {"count": 6, **{p.name: sha256_file(p) for p in split_files(tmp_path, "train")}}
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": entry}}))
    assert np.array_equal(load_split(tmp_path, "train")[0], images)
    image_file = split_files(tmp_path, "train")[0]
    data = bytearray(image_file.read_bytes())
    data[-1] ^= 1  # one flipped bit, same size
    image_file.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_images.npy: its sha256 differs from .*manifest.json.*prepare_data"):
        load_split(tmp_path, "train")


def test_torn_reference_statistics_are_named(tmp_path):
    import numpy as np

    from pipeline.config import InputError
    from pipeline.metrics import load_reference_stats, save_reference_stats

    path = tmp_path / "fid_ref.npz"
    save_reference_stats(path, np.zeros(2048), np.eye(2048), mode="clean")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"fid_ref.npz: truncated or corrupt .*re-run reference_stats"):
        load_reference_stats(path)


def test_a_dvc_remote_that_does_not_exist_is_named(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path)
    result = subprocess.run([sys.executable, "-m", "pipeline.versions", "pull", "--set",
                             f"dvc.remote={tmp_path}/nowhere"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: dvc.remote: {tmp_path}/nowhere does not exist: nothing was pushed there "
                                     "(run `make push` where the pipeline ran, or set dvc.remote to the store)")
    assert not (tmp_path / ".dvc").exists()


@pytest.mark.slow
def test_the_workflow_can_log_through_its_own_mlflow_server(tmp_path):
    """run.tracking_server: Snakemake starts mlflow server on 127.0.0.1, jobs log through it into the SQLite
    store, and the server is gone when the workflow ends."""
    import psutil
    from conftest import set_micro_run
    from mlflow.tracking import MlflowClient

    ws, env = workspace(tmp_path)
    set_micro_run(ws, tracking_server="true")
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # params' sqlite:///mlflow.db in ws
    target = ref_stats(pipeline_config.load(ws / "params.yaml"))
    out = run([sys.executable, "-m", "snakemake", "--cores", "2", target], ws, env)
    assert "MLflow: jobs log through http://127.0.0.1:" in out.stderr
    client = MlflowClient(f"sqlite:///{ws}/mlflow.db")
    every = client.search_runs([e.experiment_id for e in client.search_experiments()])
    runs = [r for r in every if r.data.tags.get("role") != "experiment"]  # and their parent run, "micro"
    assert sorted(r.info.run_name for r in runs) == ["prepare_data", "reference_stats"]
    assert [r.info.run_name for r in every if r not in runs] == ["micro"]
    assert all(r.info.status == "FINISHED" for r in runs)

    def server_in_ws(process) -> bool:
        try:
            return "mlflow" in " ".join(process.cmdline()) and process.cwd() == str(ws)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    time.sleep(1)
    assert not [p for p in psutil.process_iter() if server_in_ws(p)]
