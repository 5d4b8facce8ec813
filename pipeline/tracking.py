"""MLflow: one run per stage in one experiment, tagged with experiment, stage, dataset, preset and git commit, and
nested under one parent run per experiment name (cfg.name), so the UI groups what one experiment ran.

The tracking store is SQLite (params.yaml run.tracking_uri, default sqlite:///mlflow.db) unless the
environment variable MLFLOW_TRACKING_URI names another (e.g. a server, for many SLURM jobs at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """Call fn, retrying while SQLite reports 'database is locked' (parallel jobs share one file)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # mlflow wraps sqlalchemy's OperationalError in several ways
            if "locked" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt * (1 + random.random()))


def git_commit() -> str:
    """The commit of the working tree ('+dirty' when it has changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'ct': {'lr': 4e-4}} -> {'ct.lr': '0.0004'}: MLflow params are flat strings."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def start_server(backend_uri: str, artifacts: str = "mlartifacts",
                 timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 (a free port) over the store backend_uri: many jobs then write through one
    process instead of contending for the SQLite file. Returns (the process, its URL) once it answers."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                               "--artifacts-destination", str(Path(artifacts).resolve()), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: stop_server ends its workers too
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {server.stderr.read()[-500:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout:.0f} s")


def stop_server(server: subprocess.Popen, timeout: float = 30.0) -> None:
    """End a start_server process and its workers, and return only when all of them are gone: SIGTERM to its
    process group, then SIGKILL to what is left after `timeout` seconds (a loaded machine can take seconds)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)  # start_new_session: the server leads its own process group
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server.poll()  # reap the leader: unreaped, it would keep the group alive
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive lock beside the file while the store and experiment are first made:
    processes that start at once on a new file would otherwise race through MLflow's schema migrations."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# What the experiment is for MLflow 3 (model training, not GenAI). The 3.17 UI shows the kind of its sidebar switch
# instead ("Model training", or a link with ?workflowType=machine_learning, opens the experiment on its runs).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
ROLE = "experiment"  # the tag `role` of a parent run


def setup(cfg: Config) -> str:
    """Point MLflow at the store and the experiment (made on first use, marked as model training); returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.run.tracking_uri
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        experiment = _retry(mlflow.set_experiment, cfg.run.experiment)
        if KIND_TAG not in experiment.tags:  # a kind someone chose in the UI stays
            _retry(MlflowClient().set_experiment_tag, experiment.experiment_id, KIND_TAG, KIND)
    return experiment.experiment_id


def _config_params(config: dict) -> dict[str, str]:
    """The params a run logs for a resolved config (resources say where it ran, not what)."""
    return flatten({k: v for k, v in config.items() if k != "resources"})


def _log_params(params: dict[str, str], run_id: str | None = None) -> None:
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    items = list(params.items())
    for i in range(0, len(items), 90):  # MLflow takes at most 100 params per call
        if run_id is None:
            _retry(mlflow.log_params, dict(items[i:i + 90]))
        else:
            _retry(MlflowClient().log_batch, run_id, params=[Param(k, v) for k, v in items[i:i + 90]])


def _parents(experiment_id: str, name: str) -> list:
    """The live parent runs of the experiment `name`, oldest first (ties: by run id, the same order everywhere)."""
    from mlflow.tracking import MlflowClient

    quote = '"' if "'" in name else "'"
    runs = _retry(MlflowClient().search_runs, [experiment_id],
                  f"tags.role = '{ROLE}' and tags.experiment = {quote}{name}{quote}", max_results=1000)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _experiment_tags(cfg: Config) -> dict[str, str]:
    return {"experiment": cfg.name, "dataset": cfg.data.dataset, "preset": cfg.preset, "git_commit": git_commit()}


def parent_run(cfg: Config) -> str | None:
    """The id of the run every stage run of the experiment cfg.name nests under, made (FINISHED: it holds runs, it
    does not run) with the experiment's config as params on first use. On a SQLite store a file lock makes parallel
    first uses create one; through a server, a process that created a duplicate keeps the oldest and deletes its own.
    None with run.tracking: none."""
    return None if cfg.run.tracking == "none" else _parent_run(cfg, setup(cfg))


class _Untracked:
    """What stage_run yields with run.tracking: none: a run without an id (MLflow is not imported)."""

    class info:  # noqa: N801 (mlflow's Run.info)
        run_id = None


_tracking = [True]  # False inside a stage_run of run.tracking: none: the log_* calls do nothing


def _parent_run(cfg: Config, experiment_id: str) -> str:
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.run.tracking_uri
    with _store_lock(uri):
        found = _parents(experiment_id, cfg.name)
        if found:
            return found[0].info.run_id
        client = MlflowClient()
        run = _retry(client.create_run, experiment_id, run_name=cfg.name, tags={"role": ROLE, **_experiment_tags(cfg)})
        mine = run.info.run_id
        _log_params(_config_params(cfg.raw), mine)
        _retry(client.set_terminated, mine, "FINISHED")
        oldest = _parents(experiment_id, cfg.name)[0].info.run_id
        if oldest != mine:  # another process made one at the same time (server store): one parent stays
            _retry(client.delete_run, mine)
        return oldest


@contextlib.contextmanager
def stage_run(stage: str, cfg: Config, run_id: str | None = None, tags: dict | None = None,
              extra_params: dict | None = None, config: dict | None = None) -> Iterator[Any]:
    """Start (or, with run_id, resume) the MLflow run of one stage, a child of the experiment's parent_run; a new run
    logs every param of `config` (the resolved config as the stage ran it; None: cfg.raw) and extra_params (e.g.
    how the job was laid out). With run.tracking: none nothing is logged and MLflow is never imported (a GPU node
    without it, a user without a tracking store)."""
    if cfg.run.tracking == "none":
        _tracking[0] = False
        try:
            yield _Untracked()
        finally:
            _tracking[0] = True
        return
    import mlflow

    experiment_id = setup(cfg)
    _logged_through.clear()
    if run_id is not None:
        run = _retry(mlflow.start_run, run_id=run_id)
        _logged_through.update(_retry(_last_steps, run_id))
    else:
        parent = _parent_run(cfg, experiment_id)
        all_tags = {**_experiment_tags(cfg), "stage": stage, **(tags or {})}
        run = _retry(mlflow.start_run, run_name=stage, tags=all_tags, parent_run_id=parent)
        _log_params(_config_params(cfg.raw if config is None else config) | flatten(extra_params or {}))
    try:
        yield run
    except BaseException:
        _end_run("FAILED")
        raise
    else:
        _end_run("FINISHED")


def _end_run(status: str) -> None:
    import mlflow

    run_id = mlflow.active_run().info.run_id
    try:
        _replay(run_id)
        _retry(mlflow.end_run, status=status)
    except Exception as e:  # the work is done; the buffer file says what the store is missing
        _warn(f"MLflow: could not end run {run_id} ({e.__class__.__name__}: {str(e)[:120]}); its buffered "
              f"metrics stay in {_buffer_file(run_id)} and are sent when the run resumes")


# A resumed run (a training job killed after its last checkpoint) recomputes the steps between that checkpoint and
# the kill bit for bit; the values it already holds for them are not logged twice.
_logged_through: dict[str, int] = {}  # metric -> the last step the resumed run holds


def _last_steps(run_id: str) -> dict[str, int]:
    """The last step of each metric, and of each image key (as 'image:<key>'), that the run holds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {key: max(m.step for m in client.get_metric_history(run_id, key))
           for key in client.get_run(run_id).data.metrics}
    for image in client.list_artifacts(run_id, "images"):  # images/<key>+step+<step>+timestamp+...
        key, _, step = Path(image.path).name.split("+")[:3]
        out[f"image:{key}"] = max(out.get(f"image:{key}", -1), int(step))
    return out


BUFFER = Path("mlflow-buffer")  # metrics the store did not take, one <run id>.jsonl each, replayed later


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _buffer_file(run_id: str) -> Path:
    return BUFFER / f"{run_id}.jsonl"


def _replay(run_id: str) -> None:
    """Send the metrics buffered for this run (with their original timestamps), then drop the file."""
    path = _buffer_file(run_id)
    if not path.is_file():
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metrics = [Metric(k, v, e["timestamp"], e["step"] or 0) for e in entries for k, v in e["metrics"].items()]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        _retry(client.log_batch, run_id, metrics=metrics[i:i + 1000])
    path.unlink()
    _warn(f"MLflow: replayed {len(metrics)} buffered metric values of run {run_id}")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log to the active run. If the store does not answer (after the retries), the values go to
    mlflow-buffer/<run id>.jsonl and are sent with the next call that gets through, or when the run ends: logging
    never stops a training job."""
    if not _tracking[0]:
        return
    import mlflow

    if step is not None:
        metrics = {k: v for k, v in metrics.items() if step > _logged_through.get(k, -1)}
    if not metrics:
        return
    metrics = {k: float(v) for k, v in metrics.items()}
    run_id = mlflow.active_run().info.run_id
    try:
        _replay(run_id)
        _retry(mlflow.log_metrics, metrics, step=step)
    except Exception as e:
        path = _buffer_file(run_id)
        if not path.exists():
            _warn(f"MLflow: store unreachable ({e.__class__.__name__}: {str(e)[:120]}); buffering metrics in {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"metrics": metrics, "step": step, "timestamp": int(time.time() * 1000)}) + "\n")


def grid(images: np.ndarray, count: int = 64) -> np.ndarray:
    """The first `count` images (uint8 NHWC) tiled in a near-square grid (HWC), gaps black: one picture per step."""
    tiles = images[:count]
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    tiles = np.concatenate([tiles, np.zeros((rows * columns - len(tiles), *tiles.shape[1:]), tiles.dtype)])
    h, w, c = tiles.shape[1:]
    return tiles.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def log_image(image: np.ndarray, key: str, step: int | None = None) -> None:
    """Log an image (uint8 HWC) to the active run under `key` at `step`, which the UI shows per step. A store that
    does not answer costs the image, with a warning, never the training job; a resumed run skips steps it holds."""
    if not _tracking[0]:
        return
    import mlflow

    if step is not None and step <= _logged_through.get(f"image:{key}", -1):
        return
    try:
        _retry(mlflow.log_image, image, key=key, step=step, synchronous=True)
    except Exception as e:
        _warn(f"MLflow: could not log image {key} at step {step} ({e.__class__.__name__}: {str(e)[:120]})")


def log_artifact(path: str | os.PathLike) -> None:
    if not _tracking[0]:
        return
    import mlflow

    if Path(path).exists():
        _retry(mlflow.log_artifact, str(path))
