"""Data-parallel training: the result is fixed by params, not by the number of processes.

The weights after K steps with 1 process, with 2 processes under torchrun (gloo on this CPU) and with 1 process
and gradient accumulation 2 agree to float rounding; a run resumes on another number of processes; diverged
replicas stop the run; bad layouts stop before anything starts. "Relative difference" is the largest, over the
tensors of the online, EMA and target networks, of max |a - b| / max |a|. The layouts are compared in float64:
in float32, Adam turns the rounding differences of summing a batch in another order into relative differences up
to 1e-4 in small, zero-initialised biases after 20 steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, TRAINED, largest_difference, run, set_training_resources, use_float64, workspace

from pipeline import launch
from pipeline.config import TRAIN_STAGE, ConfigError, Resources, load, split_batch
from pipeline.noise import Noise
from pipeline.stages import checkpoint, slurm_resources, stages

STEPS = 20
TOLERANCE = 1e-5
KINDS = TRAINED + ("ict", "ect")
# iCT and ECT without dropout here (each rank draws its own masks); ECT through 4 stages of r(t)
SETS = ["run.threads=1", "run.dtype=float64", f"run.models=[{', '.join(KINDS)}]", "ict.dropout=0", "ect.dropout=0",
        "ect.stage_iterations=5"] + [
    f"{kind}.{knob}" for kind in KINDS for knob in (f"iterations={STEPS}", "checkpoint_every=5", "log_every=5")]
SETTINGS = [arg for knob in SETS for arg in ("--set", knob)]
MODULE = {"teacher": "pipeline.train_teacher", "cd": "pipeline.distill_cd", "ct": "pipeline.train_ct",
          "ict": "pipeline.train_ict", "ect": "pipeline.train_ect"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# Patches loaded into every process of a run through PYTHONPATH (sitecustomize runs before the stage).
OWN_NOISE = """
import os
if os.environ.get("RANK"):  # each rank draws its own noise instead of its slice of the global batch's
    import pipeline.noise as noise
    draw = noise.Noise.__init__
    noise.Noise.__init__ = lambda self, seed, *a, **k: draw(self, seed + 7919 * int(os.environ["RANK"]), *a, **k)
"""
DIVERGE = """
import os
if os.environ.get("RANK") == "1":  # rank 1 updates its EMA a little differently from rank 0
    import pipeline.models as models
    update = models.ema_update
    models.ema_update = lambda ema, model, rate: update(ema, model, rate * (1 - 1e-6))
"""


# --- the random numbers ----------------------------------------------------------------------------------


def test_any_slice_of_the_global_batch_draws_the_same_numbers():
    whole = Noise(3, 17, 0, 8)
    parts = [Noise(3, 17, start, 2) for start in (0, 2, 4, 6)]
    assert torch.equal(whole.normal(1, (3, 4, 4)), torch.cat([p.normal(1, (3, 4, 4)) for p in parts]))
    assert torch.equal(whole.integers(0, 17), torch.cat([p.integers(0, 17) for p in parts]))
    assert torch.equal(whole.uniform(2), torch.cat([p.uniform(2) for p in parts]))


def test_noise_is_standard_normal_and_streams_and_steps_are_independent():
    z = Noise(0, 5, 0, 4000).normal(1, (3, 8, 8)).flatten().double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n) and abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    for other in (Noise(0, 6, 0, 4000).normal(1, (3, 8, 8)), Noise(0, 5, 0, 4000).normal(2, (3, 8, 8)),
                  Noise(1, 5, 0, 4000).normal(1, (3, 8, 8))):
        assert abs(torch.corrcoef(torch.stack([z, other.flatten().double()]))[0, 1].item()) < 5 / math.sqrt(n)


def test_integers_are_uniform_and_in_range():
    n = Noise(0, 0, 0, 170_000).integers(0, 17)
    assert n.min() == 0 and n.max() == 16
    counts = torch.bincount(n, minlength=17).double()
    chi2 = ((counts - 10_000) ** 2 / 10_000).sum().item()
    assert chi2 < 50  # 16 degrees of freedom: P(chi2 > 50) ~ 2e-5


# --- layouts that cannot work stop before anything starts -------------------------------------------------


def test_split_batch():
    assert split_batch(512, 8, None) == (64, 1)
    assert split_batch(2048, 8, 64) == (64, 4)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        split_batch(512, 3, None)
    with pytest.raises(ValueError, match=r"not divisible by 8 processes x micro_batch 48 \(= 384\)"):
        split_batch(512, 8, 48)


@pytest.mark.parametrize("override, message", [
    ("resources.distill_cd.micro_batch=48",
     "resources.distill_cd: cd.batch: the global batch 512 is not divisible by 8 processes x micro_batch 48"),
    ("resources.train_ct.processes=3", "resources.train_ct: ct.batch: the global batch 512 is not divisible by 3"),
    ("resources.train_teacher.gpu=16", "resources.train_teacher.gpu: 16 GPUs per node, but a node holds "
                                       "cluster.gpus_per_node = 8"),
    ("resources.distill_cd.processes=9", "resources.distill_cd.processes: at most one process per GPU"),
    ("resources.train_ct.runtime=5", "resources.train_ct.runtime: 5 min leaves no time to train before the "
                                      "warning cluster.warn_seconds = 300 s ahead of the limit"),
    ("resources.train_ct.launch=srun", None),  # 8 processes on one node through srun: fine
    ("resources.train_ct.nodes=2", None),
])
def test_bad_layouts_are_named_in_one_line(override, message):
    sets = ["resources.distill_cd.nodes=1", override]
    if message is None:
        load(ROOT / "params.yaml", "paper_cifar10", sets)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(ROOT / "params.yaml", "paper_cifar10", sets)


def test_ablation_runs_are_checked_against_their_stage_layout():
    with pytest.raises(ConfigError, match="resources.distill_cd: ablation.runs.cd_l2.batch: the global batch 510"):
        load(ROOT / "params.yaml", "paper_cifar10", ["ablation.runs.cd_l2.batch=510"])


def test_several_nodes_without_slurm_stop_before_any_job(tmp_path):
    ws, env = workspace(tmp_path)
    set_training_resources(ws, stages=("train_ct",), processes=2, launch="srun")
    target = checkpoint(load(ws / "params.yaml"), "ct")
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", target], cwd=ws,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("resources.train_ct: 1 node(s) x 2 processes start with srun: run with --profile slurm (or inside "
            "salloc), not the local executor") in result.stderr
    assert not (ws / "data").exists()  # not even prepare_data ran
    out = subprocess.run([sys.executable, "-m", "pipeline.launch", "train_ct", "pipeline.train_ct"], cwd=ws,
                         env={k: v for k, v in env.items() if not k.startswith("SLURM_")}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "start with srun, inside a SLURM allocation" in out.stderr


# --- the launch command and the SLURM request of the three cluster shapes --------------------------------


def _shape(nodes: int, gpu: int) -> Resources:
    return Resources(gpu=gpu, cpus=64, mem_mb=256000, runtime=1440, nodes=nodes)


def test_the_three_cluster_shapes_launch_as_documented():
    one_gpu, one_node, eight_nodes = _shape(1, 1), _shape(1, 8), _shape(8, 8)
    assert launch.command(one_gpu, "pipeline.distill_cd", [], "python") == ["python", "-m", "pipeline.distill_cd"]
    assert launch.command(one_node, "pipeline.distill_cd", [], "python") == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", "-m", "pipeline.distill_cd"]
    assert launch.command(eight_nodes, "pipeline.distill_cd", ["--set", "a=1"], "python") == [
        "srun", "--nodes=8", "--ntasks-per-node=8", "--cpus-per-task=8", "--gres=gpu:8", "--kill-on-bad-exit=1",
        "python", "-m", "pipeline.distill_cd", "--set", "a=1"]
    assert eight_nodes.world_size == 64 and one_node.world_size == 8 and one_gpu.world_size == 1


def test_slurm_requests_of_the_paper_presets():
    cifar = load(ROOT / "params.yaml", "paper_cifar10")
    cd = next(s for s in stages(cifar) if s.name == "distill_cd")
    assert slurm_resources(cifar, cd) == {"mem_mb": 256000, "runtime": 1440, "cpus_per_task": 64, "gpu": 8,
                                          "slurm_extra": "--signal=URG@300 --open-mode=append"}
    imagenet = load(ROOT / "params.yaml", "paper_imagenet64")
    cd = next(s for s in stages(imagenet) if s.name == "distill_cd")
    assert imagenet.resources["distill_cd"].world_size == 64
    assert slurm_resources(imagenet, cd) == {"mem_mb": 256000, "runtime": 1440, "mpi": "srun", "nodes": 8,
                                             "cpus_per_task": 8, "tasks_per_node": 8, "gres": "gpu:8",
                                             "slurm_extra": "--signal=URG@300 --open-mode=append"}
    sample = next(s for s in stages(imagenet) if s.name == "sample_cd")
    assert "slurm_extra" not in slurm_resources(imagenet, sample)
    assert all(s.cmd.startswith("python -m pipeline.launch ") == s.training for s in stages(imagenet))


def test_sinfo_partitions_and_a_request_no_node_can_meet():
    from pipeline.stages import misfit, read_partitions

    sinfo = "debug*|2|22899|(null)|1\ngpu|64|512000+|gpu:a100:8(S:0-1)|4\ngpu|32|256000|gpu:4,gpu:v100:2|12\n"
    parts = read_partitions(sinfo)
    assert parts[""] == parts["debug"] and parts["debug"].cpus == 2 and parts["debug"].gpus == 0
    assert (parts["gpu"].cpus, parts["gpu"].mem_mb, parts["gpu"].gpus, parts["gpu"].nodes) == (64, 512000, 8, 16)
    tiny = load(ROOT / "params.yaml", "tiny")  # prepare_data asks for 4 CPUs
    assert misfit(tiny, parts["debug"]) == ("resources.prepare_data.cpus: prepare_data asks for 4 CPUs per node, "
                                             "and partition 'debug' has 2: SLURM would never start it; lower it in "
                                             "params.yaml")
    assert misfit(load(ROOT / "params.yaml", "micro"), parts["debug"]) is None
    imagenet = load(ROOT / "params.yaml", "paper_imagenet64")  # 8 nodes of 8 GPUs
    assert misfit(imagenet, parts["gpu"]) is None
    assert "train_teacher asks for 8 nodes" in misfit(imagenet, read_partitions("gpu|64|512000|gpu:8|4")["gpu"])


# --- the same weights however the batch is split ---------------------------------------------------------


def _command(kind: str, shape: str, dtype: str = "float64") -> list[str]:
    """Train `kind` for STEPS steps as 'one', 'two' (torchrun, 2 processes), 'accumulate' (1 process, 2 micro
    batches) or 'two_accumulate' (2 processes of 2 micro-batches: DDP's no_sync on all but the last)."""
    prefix = TORCHRUN if shape.startswith("two") else [sys.executable]
    args = [*prefix, "-m", MODULE[kind], *SETTINGS, "--set", f"run.dtype={dtype}"]
    micro = {"accumulate": 2, "two_accumulate": 1}.get(shape)
    return args + (["--set", f"resources.{TRAIN_STAGE[kind]}.micro_batch={micro}"] if micro else [])


def _patched(ws: Path, env: dict, patch: str) -> dict:
    (ws / "patch").mkdir(exist_ok=True)
    (ws / "patch" / "sitecustomize.py").write_text(patch)
    return {**env, "PYTHONPATH": f"{ws / 'patch'}{os.pathsep}{env['PYTHONPATH']}"}


def _checkpoint(ws: Path, kind: str) -> str:
    """The checkpoint of `kind` trained with SETTINGS (the same for every layout: resources are no part of its key),
    relative to the folder of the run; the resume file is .resume.pt beside it."""
    return checkpoint(load(ws / "params.yaml", overrides=SETS), kind)


def _folder(ws: Path, name: str) -> Path:
    """A folder of its own for one run, sharing the workspace's params, prepared data and teacher."""
    folder = ws / "runs" / name
    teacher = _checkpoint(ws, "teacher")
    (folder / teacher).parent.mkdir(parents=True)
    (folder / "data").symlink_to(ws / "data")
    (folder / "params.yaml").symlink_to(ws / "params.yaml")
    if (ws / teacher).exists():
        (folder / teacher).symlink_to(ws / teacher)
    return folder


def _train(ws: Path, env: dict, runs: dict[str, list[str]]) -> dict[str, dict]:
    """Run the named commands at once, each in a folder of its own; their checkpoints by name."""
    processes = {name: subprocess.Popen(args, cwd=_folder(ws, name), env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True) for name, args in runs.items()}
    out = {}
    for name, process in processes.items():
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}: {err[-3000:]}"
        kind = next(k for k in KINDS if MODULE[k] in runs[name])
        out[name] = torch.load(ws / "runs" / name / _checkpoint(ws, kind), map_location="cpu", weights_only=False)
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Each training stage for STEPS steps in float64 with 1 process, 2 processes and accumulation 2 (CD and ECT from
    the 1-process teacher), and CT with 2 processes that each draw their own noise."""
    ws, env = workspace(tmp_path_factory.mktemp("layouts"))
    run([sys.executable, "-m", "pipeline.prepare_data"], ws, env)
    out: dict = {}
    for kind in KINDS:
        out |= _train(ws, env, {f"{kind}.{shape}": _command(kind, shape)  # the one-process runs share the 2 cores
                                for shape in ("one", "accumulate")})
        out |= _train(ws, env, {f"{kind}.two": _command(kind, "two")})
        if kind == "teacher":  # CD distils from the one-process teacher
            teacher = _checkpoint(ws, "teacher")
            (ws / teacher).parent.mkdir(parents=True)
            (ws / "runs/teacher.one" / teacher).rename(ws / teacher)
    out |= _train(ws, _patched(ws, env, OWN_NOISE), {"ct.own_noise": _command("ct", "two")})
    out |= _train(ws, env, {"ct.two_accumulate": _command("ct", "two_accumulate")})
    return ws, env, out


@pytest.mark.slow
def test_one_process_two_processes_and_accumulation_reach_the_same_weights(layouts):
    ws, env, trained = layouts
    for kind in KINDS:
        one, two, accumulated = (trained[f"{kind}.{shape}"] for shape in ("one", "two", "accumulate"))
        assert one["step"] == two["step"] == accumulated["step"] == STEPS
        assert (two["world_size"], two["micro_batch"]) == (2, 2)
        assert (accumulated["world_size"], accumulated["micro_batch"]) == (1, 2)
        print(f"{kind}: 2 processes {largest_difference(one, two):.2e}, "
              f"accumulation 2 {largest_difference(one, accumulated):.2e}")
        assert largest_difference(one, two) < TOLERANCE, kind
        assert largest_difference(one, accumulated) < TOLERANCE, kind
    both = trained["ct.two_accumulate"]  # DDP and accumulation together: the gradient synchronised once per step
    assert (both["world_size"], both["micro_batch"]) == (2, 1)
    print(f"ct: 2 processes x accumulation 2 {largest_difference(trained['ct.one'], both):.2e}")
    assert largest_difference(trained["ct.one"], both) < TOLERANCE
    # The test can fail: when each rank draws its own noise, the weights move apart far beyond the tolerance.
    own = largest_difference(trained["ct.one"], trained["ct.own_noise"])
    print(f"ct, each rank its own noise: {own:.2e}")
    assert own > 1000 * TOLERANCE
    # Rank 0 alone tracked the 2-process runs; their layout is logged with the params.
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["consistency-models"]).set_index("run_id")
    runs = runs[runs["tags.role"] != "experiment"]  # the experiment's parent run holds the stage runs
    assert len(runs) == 1 + 3 * len(KINDS) + 2  # prepare_data's and one per training run, none from rank 1
    two = trained["ct.two"]["mlflow_run_id"]
    assert runs.loc[two, ["params.world_size", "params.micro_batch", "params.accumulation"]].tolist() == ["2", "2", "1"]
    assert runs.loc[trained["ct.accumulate"]["mlflow_run_id"], "params.accumulation"] == "2"


def _killed_at_a_checkpoint(args: list[str], folder: Path, env: dict, resume: Path) -> dict:
    """Start a 2-process run, SIGKILL torchrun and both workers (each in a session of its own) without warning once
    the first resume checkpoint exists; that checkpoint."""
    process = subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not resume.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for victim in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        victim.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return torch.load(resume, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_a_run_killed_on_two_processes_resumes_on_one_and_ends_as_an_uninterrupted_run(layouts):
    ws, env, trained = layouts
    final = ws / _checkpoint(ws, "ct")
    state = _killed_at_a_checkpoint(_command("ct", "two"), ws, env, final.with_suffix(".resume.pt"))
    assert state["world_size"] == 2 and 5 <= state["step"] < STEPS, state["step"]
    out = run(_command("ct", "one"), ws, env)
    assert f"resuming ct from step {state['step']}" in out.stderr and "written by 2 processes, now 1" in out.stderr
    resumed = torch.load(final, map_location="cpu", weights_only=False)
    assert resumed["step"] == STEPS and resumed["mlflow_run_id"] == state["mlflow_run_id"]
    assert largest_difference(trained["ct.one"], resumed) < TOLERANCE


@pytest.mark.slow
def test_a_two_process_run_with_dropout_killed_and_resumed_on_two_ends_as_the_uninterrupted_run(layouts):
    """Each rank's generator (CPU here, also CUDA's on a GPU) is in the resume checkpoint: the dropout masks after
    the resume are those an uninterrupted run draws (before, every rank restarted its masks from its seed)."""
    ws, env, _ = layouts
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/dropout.db"}  # the fixture's store counts its own runs
    dropout = ["--set", "ict.dropout=0.3"]  # iCT: the online and the target pass share each rank's masks
    final = checkpoint(load(ws / "params.yaml", overrides=SETS + ["ict.dropout=0.3"]), "ict")
    uninterrupted = _folder(ws, "ict.dropout.whole")
    run(_command("ict", "two") + dropout, uninterrupted, env)
    whole = torch.load(uninterrupted / final, map_location="cpu", weights_only=False)
    folder = _folder(ws, "ict.dropout.killed")
    state = _killed_at_a_checkpoint(_command("ict", "two") + dropout, folder, env,
                                    (folder / final).with_suffix(".resume.pt"))
    assert state["world_size"] == 2 and 5 <= state["step"] < STEPS and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])  # each rank its own masks
    run(_command("ict", "two") + dropout, folder, env)
    resumed = torch.load(folder / final, map_location="cpu", weights_only=False)
    assert resumed["step"] == STEPS
    print(f"ict with dropout, killed at step {state['step']} and resumed: {largest_difference(whole, resumed):.2e}")
    assert largest_difference(whole, resumed) < TOLERANCE


HANG = """
import os, sys, time
import torch.distributed as dist
from pipeline import distributed
ctx = distributed.init("cpu", timeout_minutes=0.05, interface="lo")  # 3 s
print(f"rank {ctx.rank} GLOO_SOCKET_IFNAME={os.environ['GLOO_SOCKET_IFNAME']}", flush=True)
if ctx.rank == 1:
    time.sleep(30)  # a rank that hangs
    sys.exit(0)
started = time.monotonic()
try:
    distributed.barrier(ctx)
except RuntimeError:
    print(f"rank 0 gave up after {time.monotonic() - started:.0f} s", flush=True)
    os._exit(3)
"""


def test_a_hung_rank_stops_the_others_after_the_timeout_on_the_named_interface(tmp_path):
    """cluster.timeout_minutes reaches the process group (a collective raises instead of waiting 30 minutes, the
    default) and cluster.network_interface becomes GLOO_SOCKET_IFNAME (and NCCL's) of every rank."""
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GLOO_SOCKET_IFNAME", None)
    started = time.monotonic()
    result = subprocess.run([*TORCHRUN, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert "rank 0 gave up after" in result.stdout, result.stdout + result.stderr[-2000:]
    assert result.stdout.count("GLOO_SOCKET_IFNAME=lo") == 2
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_replicas_that_diverge_stop_the_run_at_the_first_checkpoint(layouts):
    ws, env, _ = layouts
    folder = _folder(ws, "ct.diverged")
    result = subprocess.run(_command("ct", "two"), cwd=folder, env=_patched(ws, env, DIVERGE), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert ("train_ct: at step 5 the weights of rank(s) [1] (online, EMA or target) differ from rank 0's: the "
            "replicas diverged; no checkpoint written") in result.stderr
    ct = folder / _checkpoint(ws, "ct")
    assert not list(ct.parent.glob(f"{ct.stem}*"))


@pytest.mark.slow
def test_the_micro_dag_with_two_processes_per_training_stage_matches_one_process(tmp_path):
    """Snakemake's local job starts torchrun through pipeline.launch, the one launch path of all three training
    stages (their 1- and 2-process weights are compared above), so the teacher stands for them."""
    ws, env = workspace(tmp_path)
    use_float64(ws)
    set_training_resources(ws, cpus=2, processes=2, stages=("train_teacher",))
    teacher = ws / checkpoint(load(ws / "params.yaml"), "teacher")
    out = run([sys.executable, "-m", "snakemake", "--cores", "2", "-p", str(teacher.relative_to(ws))], ws, env)
    assert out.stderr.count("-m torch.distributed.run --standalone --nproc_per_node=2") == 1, out.stderr[-3000:]
    assert "resume" not in json.dumps(sorted(p.name for p in teacher.parent.iterdir()))
    two = torch.load(teacher, map_location="cpu", weights_only=False)
    teacher.unlink()
    run([sys.executable, "-m", "pipeline.train_teacher"], ws, env)  # the same params on one process
    one = torch.load(teacher, map_location="cpu", weights_only=False)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert largest_difference(one, two) < TOLERANCE
