"""Tests against a real single-node SLURM cluster (scripts/slurm_local.sh) and the `slurm/` profile.

Run with:  pytest -q -m slurm tests/test_slurm.py
The session fixture starts the cluster (installing Debian packages on first use, ~20 s; ~1 s when it
is already up) and skips when that is impossible (not root, no apt-get, packages cannot be installed).
If the fixture started the cluster it stops it again at the end unless SLURM_LOCAL_KEEP=1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pipeline.config import load
from pipeline.stages import checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "slurm"

# One worker runs them all (one file: --dist loadfile): they share the cluster's 2 CPUs.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The first status check 2 s after a submission, then every 2 s (snakemake_fast_polling.py keeps the plugin from
# waiting 10 s longer after each check that finds nothing finished).
FAST_POLLING = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]

# Two sequential rules.
# Rule b also carries explicit resources and records how SLURM sees its own allocation.
WORKFLOW = textwrap.dedent(
    """
    rule all:
        input: "out/b.txt"

    rule a:
        output: "out/a.txt"
        shell: "echo \\"host=$(hostname -s) job=${{SLURM_JOB_ID:-}}\\" > {output}"

    rule b:
        input: "out/a.txt"
        output: "out/b.txt", "out/b_scontrol.txt"
        resources: gpu=0, cpus_per_task=1, mem_mb=200, runtime=5
        shell:
            "cat {input} > {output[0]}; echo \\"job=${{SLURM_JOB_ID:-}}\\" >> {output[0]}; "
            "scontrol show job \\"$SLURM_JOB_ID\\" > {output[1]}"
    """
)


def _snakemake_cmd() -> list[str]:
    """snakemake of the interpreter running pytest (the venv with the SLURM plugin), polling every 2 s."""
    return [sys.executable, str(REPO / "tests" / "snakemake_fast_polling.py")]


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local SLURM cluster once per session; skip where that cannot work."""
    if sys.platform != "linux":
        pytest.skip("local SLURM cluster needs Linux (Debian 12)")
    if os.geteuid() != 0:
        pytest.skip("local SLURM cluster needs root (installs packages, starts system daemons)")
    if not shutil.which("sinfo") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm missing")

    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/slurm_local.sh up did not finish within 20 min")
    if proc.returncode == 2:
        pytest.skip(f"local SLURM cluster unavailable: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm_local.sh up failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    yield
    if not was_up and not os.environ.get("SLURM_LOCAL_KEEP"):
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=300)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SNAKEMAKE_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def workflow_run(slurm_cluster, tmp_path_factory):
    """Run the tiny workflow once through sbatch; the tests below inspect the result."""
    wd = tmp_path_factory.mktemp("slurm_wf")
    (wd / "Snakefile").write_text(WORKFLOW)
    cmd = [*_snakemake_cmd(), "--profile", str(PROFILE), "--slurm-no-account", "-j", "2", *FAST_POLLING]
    # SBATCH_PARTITION exercises the profile's env-var templating (-> default resource slurm_partition)
    proc = subprocess.run(
        cmd, cwd=wd, capture_output=True, text=True, timeout=600, env=_env(SBATCH_PARTITION="debug")
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake failed (rc={proc.returncode}):\n{_tail(log)}"
    return wd, log


def _sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    fields = "JobID,JobName,Partition,State,Timelimit,ReqMem,ReqCPUS,AllocTRES"
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), f"--format={fields}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = fields.split(",")
    rows = [dict(zip(names, line.split("|"))) for line in out.splitlines() if line.strip()]
    return {r["JobID"]: r for r in rows}


def test_the_node_offers_every_core(slurm_cluster):
    """The node has the machine's cores even when `up` ran under OMP_NUM_THREADS=1 (as in a pytest-xdist worker):
    with one, every 2-CPU job would stay pending (PartitionConfig) and its test would wait for its timeout."""
    subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    node = subprocess.run(["scontrol", "show", "node"], capture_output=True, text=True, check=True).stdout
    assert f"CPUTot={len(os.sched_getaffinity(0))} " in node, node


def test_a_job_no_node_can_run_is_named_before_anything_is_submitted(slurm_cluster, tmp_path):
    """The node has 2 CPUs; prepare_data asking for 3 would pend forever (PartitionConfig) with Snakemake waiting."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import workspace

    ws, env = workspace(tmp_path)
    text = (ws / "params.yaml").read_text()
    line = "      prepare_data:  {gpu: 0, cpus: 1, mem_mb: 2000, runtime: 10}"
    assert line in text
    (ws / "params.yaml").write_text(text.replace(line, line.replace("cpus: 1", "cpus: 3")))
    proc = subprocess.run([*_snakemake_cmd(), "--profile", str(PROFILE), "--slurm-no-account", *FAST_POLLING],
                          cwd=ws, capture_output=True, text=True, timeout=300, env=_env(**{
                              k: env[k] for k in ("CIFAR10_SOURCE", "PYTHONPATH", "MLFLOW_TRACKING_URI", "PATH")}))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "submitted with SLURM jobid" not in log, _tail(log)
    assert ("resources.prepare_data.cpus: prepare_data asks for 3 CPUs per node, and partition 'debug' has 2: "
            "SLURM would never start it; lower it in params.yaml") in log, _tail(log)


def test_real_submission(workflow_run):
    wd, log = workflow_run
    a = (wd / "out" / "a.txt").read_text()
    b = (wd / "out" / "b.txt").read_text()
    assert a in b
    m = re.search(r"host=(\S+) job=(\S*)", a)
    assert m, a
    host, job_a = m.groups()
    assert job_a, f"rule a did not run under sbatch (empty SLURM_JOB_ID): {a!r}"
    assert host == subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    job_b = re.search(r"^job=(\S*)$", b, re.M).group(1)
    assert job_b and job_b != job_a

    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    assert {job_a, job_b} <= set(submitted), log
    acct = _sacct([job_a, job_b])
    for jid in (job_a, job_b):
        assert jid in acct, f"sacct does not list job {jid}: {acct}"
        assert acct[jid]["State"] == "COMPLETED", acct[jid]
        assert acct[jid]["Partition"] == "debug", acct[jid]
    # rule a has no resources of its own: the profile's default-resources apply (60 min, 4000 MB)
    assert acct[job_a]["Timelimit"] == "01:00:00", acct[job_a]
    assert acct[job_a]["ReqMem"].startswith("4000M"), acct[job_a]


def test_rule_resources_become_sbatch_options(workflow_run):
    wd, log = workflow_run
    show = (wd / "out" / "b_scontrol.txt").read_text()
    fields = dict(re.findall(r"(\S+?)=(\S*)", show))
    job_id = fields["JobId"]
    assert fields["TimeLimit"] == "00:05:00", show  # runtime=5 -> -t 5
    assert fields["MinMemoryNode"] == "200M", show  # mem_mb=200 -> --mem 200
    assert fields["NumCPUs"] == "1" and fields["CPUs/Task"] == "1", show  # cpus_per_task=1
    assert fields["Partition"] == "debug", show
    assert "gpu" not in fields["TRES"], show  # gpu=0 -> no --gpus
    acct = _sacct([job_id])[job_id]
    assert acct["Timelimit"] == "00:05:00" and acct["ReqMem"].startswith("200M"), acct
    assert acct["ReqCPUS"] == "1" and acct["State"] == "COMPLETED", acct


def test_pipeline_dryrun_with_profile():
    """`snakemake -n --profile slurm` from the repo root resolves ./slurm and plans the pipeline."""
    if not (REPO / "Snakefile").exists():
        pytest.skip("no Snakefile at the repository root yet")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm missing")
    # --forceall: list every job even where results already exist (otherwise "Nothing to be done")
    proc = subprocess.run(
        [*_snakemake_cmd(), "-n", "--forceall", "--profile", "slurm", "results/tables/table1.csv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, _tail(out)
    assert "Job stats:" in out and re.search(r"^total\s+\d+", out, re.M), _tail(out)
    assert "This was a dry-run" in out, _tail(out)


# --- data-parallel training through sbatch ----------------------------------------------------------------


def _submitted(log: str) -> dict[str, str]:
    """{rule: SLURM job id} from Snakemake's log (rule blocks name their jobid; the plugin maps it to SLURM's)."""
    rule_of, current = {}, None
    for line in log.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):", line.strip()):
            current = match.group(1)
        elif (match := re.match(r"^jobid: (\d+)$", line.strip())) and current:
            rule_of[match.group(1)] = current
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    return {rule_of[job]: slurm for job, slurm in submitted if job in rule_of}


def _steps(job: str) -> dict[str, dict[str, str]]:
    """sacct rows of a job and its steps: {step name: fields}."""
    fields = "JobID,JobName,State,NTasks,ReqCPUS,AllocCPUS,NNodes"
    out = subprocess.run(["sacct", "-n", "-P", "-j", job, f"--format={fields}"], capture_output=True, text=True,
                         check=True).stdout
    names = fields.split(",")
    return {row["JobID"]: row for row in (dict(zip(names, line.split("|"))) for line in out.splitlines() if line)}


# CD launches as the teacher does (torchrun in one task); test_distributed compares its 1- and 2-process weights.
PARALLEL = ("teacher", "ct")


@pytest.fixture(scope="module")
def parallel_dag(slurm_cluster, tmp_path_factory):
    """The micro DAG's teacher and CT on 2 processes each through sbatch, in float64: the teacher under torchrun in
    one task, CT as two srun tasks (the multi-node launch path, on the one node). Beside them, while the jobs wait
    in the queue, the same two trainings on one process, run directly: what the 2-process runs must reproduce."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import set_training_resources, use_float64, workspace

    ws, env = workspace(tmp_path_factory.mktemp("parallel"))
    ref_ws, ref_env = workspace(tmp_path_factory.mktemp("reference"))
    for folder in (ws, ref_ws):
        use_float64(folder)
    reference = subprocess.Popen(" && ".join(f"{sys.executable} -m pipeline.{module}" for module in
                                             ("prepare_data", "train_teacher", "train_ct")),
                                 shell=True, cwd=ref_ws, env=ref_env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    set_training_resources(ws, cpus=2, mem_mb=3000, stages=("train_teacher",), processes=2)
    set_training_resources(ws, cpus=2, mem_mb=3000, stages=("train_ct",), processes=2, launch="srun")
    cfg = load(ws / "params.yaml")
    cmd = [*_snakemake_cmd(), "--profile", str(PROFILE), "--slurm-no-account", "-j", "1", *FAST_POLLING, "-p",
           "--slurm-keep-successful-logs", *(checkpoint(cfg, kind) for kind in PARALLEL)]
    proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=1200, env=_env(**{
        k: env[k] for k in ("CIFAR10_SOURCE", "PYTHONPATH", "MLFLOW_TRACKING_URI", "PATH")}))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake failed (rc={proc.returncode}):\n{_tail(log, 120)}"
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    return ws, log, ref_ws


def test_two_process_training_through_sbatch_matches_one_process(parallel_dag):
    import torch
    from conftest import largest_difference

    ws, _, ref_ws = parallel_dag
    for kind in PARALLEL:
        mine = torch.load(ws / checkpoint(load(ws / "params.yaml"), kind), map_location="cpu", weights_only=False)
        one = torch.load(ref_ws / checkpoint(load(ref_ws / "params.yaml"), kind), map_location="cpu",
                         weights_only=False)
        assert mine["world_size"] == 2 and one["world_size"] == 1, kind
        assert largest_difference(one, mine) < 1e-5, kind


def test_sacct_shows_the_tasks_and_cpus_of_each_layout(parallel_dag):
    ws, log, _ = parallel_dag
    jobs = _submitted(log)
    assert {"train_teacher", "train_ct"} <= set(jobs), log[-3000:]
    steps = _steps(jobs["train_teacher"])  # one task of 2 CPUs; torchrun starts the 2 processes in it
    job = steps[jobs["train_teacher"]]
    assert job["State"] == "COMPLETED" and job["ReqCPUS"] == "2", steps
    assert steps[f"{jobs['train_teacher']}.0"]["NTasks"] == "1", steps
    steps = _steps(jobs["train_ct"])  # srun: one task per process, 1 CPU each
    assert steps[jobs["train_ct"]]["ReqCPUS"] == "2" and steps[jobs["train_ct"]]["State"] == "COMPLETED", steps
    srun_steps = [row for name, row in steps.items() if "." in name and name.split(".")[-1].isdigit()]
    assert [row["NTasks"] for row in srun_steps] == ["2"], steps
    slurm_log = "\n".join(p.read_text() for p in (ws / ".snakemake/slurm_logs").rglob(f"{jobs['train_ct']}.log"))
    assert "srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --kill-on-bad-exit=1" in slurm_log, slurm_log[-3000:]


def _release_requeued(stop: threading.Event, seen: list[str]) -> None:
    """SLURM holds a requeued job for about two minutes (Reason=BeginTime); start it now to keep the test short."""
    while not stop.is_set():
        out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            job, reason = line.split(maxsplit=1)
            if reason.strip() == "BeginTime":
                seen.append(job)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        stop.wait(2)


# Loaded through PYTHONPATH into the SLURM job's processes: until a leg has written its resume file, every training
# step also sleeps, so the first leg cannot finish on any machine (a fast one trained 300 plain steps in one leg),
# and the legs after it run at full speed. Numbers are untouched.
SLOW_STEPS = """
import importlib.abc, importlib.machinery, os, sys, time

class SlowSteps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.training" or os.path.exists(RESUME_FILE):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module
        def exec_module(module):
            execute(module)
            step = module.Training.train_step
            def slow_step(self, *args, **kwargs):
                time.sleep(STEP_SLEEP)
                return step(self, *args, **kwargs)
            module.Training.train_step = slow_step
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, SlowSteps())
"""


def test_training_cut_by_the_time_limit_requeues_itself_and_ends_as_an_uninterrupted_run(slurm_cluster, tmp_path):
    import torch
    from conftest import largest_difference, run, set_training_resources, workspace

    # Each leg has at most 60 s between its start and its warning (sbatch -t 2, warn_seconds 60); the first leg's
    # steps sleep 70 s in all, so at least two legs on any machine. The second leg runs at full speed (about 10 s
    # of computing on one core here, after some 20 s of starting up), so a busy machine needs no more legs.
    iterations, step_sleep = 100, 0.7
    edits = {"teacher: {source: train, iterations: 4, batch: 4,": f"teacher: {{iterations: {iterations}, batch: 4,",
             "ema_halflife_kimg: 0.01,\n              checkpoint_every: 2, log_every: 1}":
             "ema_halflife_kimg: 0.01,\n              checkpoint_every: 100000, log_every: 50}",
             "  warn_seconds: 300 ": "  warn_seconds: 60 "}
    workspaces = []
    for name in ("cluster", "reference"):
        (tmp_path / name).mkdir()
        ws, env = workspace(tmp_path / name)
        text = (ws / "params.yaml").read_text()
        for old, new in edits.items():
            assert old in text, old
            text = text.replace(old, new)
        (ws / "params.yaml").write_text(text)
        workspaces.append((ws, env))
    (ws, env), (ref_ws, ref_env) = workspaces
    set_training_resources(ws, runtime=2, mem_mb=2000)  # sbatch -t 2 and --signal=URG@60
    (ws / "patch").mkdir()
    teacher = checkpoint(load(ws / "params.yaml"), "teacher")
    resume_file = repr(str((ws / teacher).with_suffix(".resume.pt")))
    (ws / "patch" / "sitecustomize.py").write_text(
        SLOW_STEPS.replace("STEP_SLEEP", str(step_sleep)).replace("RESUME_FILE", resume_file))
    env = {**env, "PYTHONPATH": f"{ws / 'patch'}{os.pathsep}{env['PYTHONPATH']}"}
    run([sys.executable, "-m", "pipeline.prepare_data"], ref_ws, ref_env)
    reference = subprocess.Popen([sys.executable, "-m", "pipeline.train_teacher", "--set", "run.threads=1"],
                                 cwd=ref_ws, env=ref_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop, released = threading.Event(), []
    releaser = threading.Thread(target=_release_requeued, args=(stop, released), daemon=True)
    releaser.start()
    try:
        cmd = [*_snakemake_cmd(), "--profile", str(PROFILE), "--slurm-no-account", "-j", "1", *FAST_POLLING,
               "--slurm-keep-successful-logs", teacher]
        proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True, timeout=1500, env=_env(
            **{k: env[k] for k in ("CIFAR10_SOURCE", "PYTHONPATH", "MLFLOW_TRACKING_URI", "PATH")},
            OMP_NUM_THREADS="1"))
    finally:
        stop.set()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake failed (rc={proc.returncode}):\n{_tail(log, 120)}"
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    job = _submitted(log)["train_teacher"]
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "--format=JobID,State,Timelimit"],
                             capture_output=True, text=True, check=True).stdout.split()
    states = [row.split("|")[1] for row in history]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED" and "TIMEOUT" not in states, history
    assert job in released
    slurm_log = "\n".join(p.read_text() for p in (ws / ".snakemake/slurm_logs").rglob(f"{job}.log"))
    assert "time limit ahead at step" in slurm_log and "requeued this SLURM job" in slurm_log, slurm_log[-3000:]
    legs = len(states)
    assert slurm_log.count("requeued this SLURM job") == legs - 1, slurm_log[-3000:]
    assert slurm_log.count("resuming teacher from step") == legs - 1, slurm_log[-3000:]
    print(f"{legs} legs: {history}")
    resumed = torch.load(ws / teacher, map_location="cpu", weights_only=False)
    uninterrupted = torch.load(ref_ws / checkpoint(load(ref_ws / "params.yaml"), "teacher"), map_location="cpu",
                               weights_only=False)
    assert resumed["step"] == uninterrupted["step"] == iterations
    assert largest_difference(uninterrupted, resumed) == 0  # bit for bit
