"""MLflow shows what ran: stage runs nested under one parent run per experiment name and tagged with it, ablation
runs logging the section they trained with, the experiment marked as model training, sample grids per step.

Fast: no training, a private SQLite store per test (MLFLOW_TRACKING_URI), real MLflow throughout."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import config, tracking

ROOT = Path(__file__).resolve().parents[1]


def _load(*overrides: str) -> config.Config:
    return config.load(ROOT / "params.yaml", "micro", list(overrides))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A new SQLite store, made once: MLflow's schema migrations take a second or more."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store):
    """A fresh SQLite store (a copy of empty_store; artifacts under tmp_path); the client that reads it."""
    from mlflow.tracking import MlflowClient

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def _parents(client, cfg: config.Config, view=None) -> list:
    from mlflow.entities import ViewType

    experiment = client.get_experiment_by_name(cfg.run.experiment)
    return client.search_runs([experiment.experiment_id], "tags.role = 'experiment'", run_view_type=view or
                              ViewType.ACTIVE_ONLY)


def test_ablation_runs_log_the_knobs_they_train_with(store):
    """Two Figure 3 runs started as ablation.train_run starts them (its section and tags, through the run that
    Training.fit opens): their params differ exactly on their knobs, and the knobs are the run's, not cd's."""
    from pipeline import ablation
    from pipeline.training import tracked_run

    cfg = _load()
    ids = {}
    for name in ("cd_l1", "cd_euler_N9"):
        model, section = ablation.run_section(cfg, name)
        with tracked_run(f"ablate_{name}", cfg, model, section, tags=ablation.run_tags(cfg, name)) as run:
            ids[name] = run.info.run_id
    l1, n9 = (store.get_run(ids[name]).data for name in ("cd_l1", "cd_euler_N9"))
    assert {k for k in l1.params.keys() | n9.params.keys() if l1.params.get(k) != n9.params.get(k)} == {
        "cd.metric", "cd.solver", "cd.N"}
    assert (l1.params["cd.metric"], l1.params["cd.solver"], l1.params["cd.N"]) == ("l1", "heun", "18")
    assert (n9.params["cd.metric"], n9.params["cd.solver"], n9.params["cd.N"]) == ("l2", "euler", "9")
    assert cfg.cd.metric == "l2" and cfg.cd.iterations != cfg.ablation.iterations
    assert l1.params["cd.iterations"] == n9.params["cd.iterations"] == str(cfg.ablation.iterations)
    assert (l1.tags["ablation_run"], n9.tags["ablation_run"]) == ("cd_l1", "cd_euler_N9")
    assert l1.tags["knob.metric"] == "l1" and n9.tags["model"] == "cd"


def test_stage_runs_nest_under_one_parent_per_experiment_name(store):
    from pipeline.training import tracked_run

    cfg, other = _load(), _load("run.name=other")
    with tracking.stage_run("prepare_data", cfg) as first:
        pass
    with tracked_run("distill_cd", cfg, "cd", cfg.cd) as second:
        pass
    with tracking.stage_run("prepare_data", other) as third:
        pass
    with tracking.stage_run("prepare_data", cfg, run_id=first.info.run_id):  # a resumed run keeps its place
        tracking.log_metrics({"resumed": 1.0})
    parents = {run.info.run_name: run for run in _parents(store, cfg)}
    assert sorted(parents) == ["micro", "other"] and cfg.name == "micro"
    parent = parents["micro"]
    assert parent.info.run_id == tracking.parent_run(cfg) and parent.info.status == "FINISHED"
    assert parent.data.params == tracking.flatten({k: v for k, v in cfg.raw.items() if k != "resources"})
    for run, stage in ((first, "prepare_data"), (second, "distill_cd")):
        run = store.get_run(run.info.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert {k: run.data.tags[k] for k in ("experiment", "stage", "dataset", "preset")} == {
            "experiment": "micro", "stage": stage, "dataset": "cifar10", "preset": "micro"}
        assert "git_commit" in run.data.tags
    assert store.get_run(second.info.run_id).data.params == parent.data.params  # no knobs: cfg's own section
    third = store.get_run(third.info.run_id)
    assert third.data.tags["mlflow.parentRunId"] == parents["other"].info.run_id
    assert third.data.tags["experiment"] == "other" and store.get_run(first.info.run_id).data.metrics == {
        "resumed": 1.0}


def _parent_in_a_new_process(barrier, locked: bool) -> str:
    cfg = _load()
    tracking.setup(cfg)  # the store and the experiment: then all ask for the parent at the same moment
    if not locked:  # as through an mlflow server: no file lock to take
        tracking._store_lock = lambda uri: contextlib.nullcontext()
    barrier.wait(timeout=60)
    return tracking.parent_run(cfg)


@pytest.mark.parametrize("locked", [True, False], ids=["sqlite", "no-lock"])
def test_parallel_first_uses_make_one_parent(store, locked):
    """Four processes ask for the parent of a new experiment name at once: they get one run. On SQLite the file lock
    lets one create it; without a lock (a server) each may create one, and all but the oldest are deleted."""
    from mlflow.entities import ViewType

    fork = multiprocessing.get_context("fork")  # spawn would import MLflow four more times
    with fork.Manager() as manager:
        barrier = manager.Barrier(4)
        with fork.Pool(4) as pool:
            ids = pool.starmap(_parent_in_a_new_process, [(barrier, locked)] * 4)
    assert len(set(ids)) == 1
    assert [run.info.run_id for run in _parents(store, _load())] == ids[:1]
    if locked:  # none made and deleted
        assert [run.info.run_id for run in _parents(store, _load(), ViewType.ALL)] == ids[:1]


def test_the_experiment_is_marked_as_model_training(store):
    cfg = _load()
    experiment_id = tracking.setup(cfg)
    assert store.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    store.set_experiment_tag(experiment_id, "mlflow.experimentKind", "finetuning")  # chosen in the UI: it stays
    tracking.setup(cfg)
    assert store.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "finetuning"


def _image_steps(client, run_id: str) -> list[int]:
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png")]
    return sorted(int(name.split("+")[2]) for name in names)  # samples_1step+step+<step>+timestamp+...


def test_sample_grids_are_logged_per_step_once(store):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    grid = tracking.grid(images)
    assert grid.shape == (24, 32, 3) and (grid[8:16, 8:16] == images[5]).all() and not grid[16:, 16:].any()
    assert tracking.grid(np.zeros((100, 8, 8, 3), np.uint8)).shape == (64, 64, 3)  # at most 64 images
    cfg = _load()
    with tracking.stage_run("ablate_cd_l1", cfg) as run:
        for step in (1, 2):
            tracking.log_image(grid, key="samples_1step", step=step)
    run_id = run.info.run_id
    with tracking.stage_run("ablate_cd_l1", cfg, run_id=run_id):  # resumed: recomputes step 2, then goes on
        for step in (2, 3):
            tracking.log_image(grid, key="samples_1step", step=step)
    assert _image_steps(store, run_id) == [1, 2, 3]
    png = next(f.path for f in store.list_artifacts(run_id, "images") if f.path.endswith(".png"))
    assert (np.asarray(Image.open(store.download_artifacts(run_id, png))) == grid).all()


def test_an_image_the_store_refuses_does_not_stop_the_job(store, monkeypatch, capsys):
    """The store stops answering (a server that is gone): log_image warns, the run goes on."""
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    with tracking.stage_run("ablate_cd_l1", _load()) as run:
        mlflow.set_tracking_uri("http://127.0.0.1:9")  # discard: nothing listens
        tracking.log_image(np.zeros((8, 8, 3), np.uint8), key="samples_1step", step=1)
        mlflow.set_tracking_uri(uri)
        tracking.log_metrics({"after": 1.0}, step=1)
    assert "could not log image samples_1step at step 1" in capsys.readouterr().err
    assert store.get_run(run.info.run_id).data.metrics == {"after": 1.0}


NO_MLFLOW = """
import runpy, sys
sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, as on a machine without it
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def test_with_tracking_none_a_stage_runs_where_mlflow_cannot_be_imported(tmp_path):
    """run.tracking: none: data preparation and a training stage run without MLflow (a GPU node without it); the
    checkpoint holds no run id and no store is made. With tracking on, the same command fails there."""
    import subprocess
    import sys

    import torch
    from conftest import workspace

    ws, env = workspace(tmp_path)
    (ws / "no_mlflow.py").write_text(NO_MLFLOW)
    env.pop("MLFLOW_TRACKING_URI")
    sets = ["--set", "run.tracking=none", "--set", "teacher.iterations=2"]

    def stage(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "no_mlflow.py", module, *args], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=300)

    assert stage("pipeline.prepare_data", *sets).returncode == 0
    trained = stage("pipeline.train_teacher", *sets)
    assert trained.returncode == 0, trained.stderr[-2000:]
    cfg = config.load(ws / "params.yaml", overrides=["run.tracking=none", "teacher.iterations=2"])
    from pipeline.stages import checkpoint

    ckpt = torch.load(ws / checkpoint(cfg, "teacher"), map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["mlflow_run_id"] is None
    assert not (ws / "mlflow.db").exists()
    tracked = stage("pipeline.prepare_data")  # tracking on: MLflow is needed
    assert tracked.returncode != 0 and "mlflow" in tracked.stderr.lower()
