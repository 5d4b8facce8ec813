"""params.yaml: load, pick the preset, validate every knob before any work starts.

params.yaml holds the values (paper CIFAR-10 defaults at the top level, per-preset overrides under
`presets:`, the switch `preset:`); this module holds their types and limits. Every problem is
reported as one line naming the key, e.g. `params.yaml: ct.lrr: unknown key (did you mean 'lr'?)`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.datasets import DATASETS, DatasetSpec

ENV_SOURCE = "CIFAR10_SOURCE"  # overrides data.source for CIFAR-10, so a local copy needs no edit of params.yaml
EDM_RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # LPIPS' backbone (torchvision)
OPENAI_RELEASE_URL = "https://openaipublic.blob.core.windows.net/consistency/"  # pipeline.import_openai's files


class ConfigError(ValueError):
    """A problem with params.yaml or an override; the message is one line naming the key."""


class InputError(Exception):
    """A file a stage cannot use (a corrupt or unsafe checkpoint, ...): every stage CLI prints its message as one
    line, `error: <message>` (no traceback), and exits with status 1."""


def _one_line_errors(kind, value, traceback) -> None:
    if issubclass(kind, InputError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


# ---------------------------------------------------------------------------------------------------
# Schema: one dataclass per section. Field types are checked; `problems()` checks values.


@dataclass(frozen=True)
class Run:
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    threads: int  # torch CPU threads; 0 = leave torch's default
    experiment: str
    tracking_uri: str  # the environment variable MLFLOW_TRACKING_URI wins when set
    tracking_server: bool  # Snakemake starts `mlflow server` on 127.0.0.1 over tracking_uri for its jobs
    mixed_precision: Literal["none", "fp16", "bf16"]  # autocast of training passes (Table 3: fp16); fp16: CUDA only
    dtype: Literal["float32", "float64"]  # of training weights; float64 only for numerical checks (tests of layouts)
    compile: bool  # torch.compile the networks of training and sampling
    tf32: bool  # TF32 matmuls and convolutions for the fp32 parts on CUDA
    channels_last: bool  # NHWC memory layout of the training networks and batches
    data_placement: Literal["auto", "device", "stream"]  # training split on the GPU, or streamed by a thread

    def problems(self) -> list[tuple[str, str]]:
        return [("threads", "must be >= 0")] if self.threads < 0 else []


@dataclass(frozen=True)
class Data:
    dataset: Literal["cifar10", "imagenet64", "lsun_bedroom", "lsun_cat"]
    source: str  # cifar10: 'torchvision' (download) or a .tar.gz / folder; others: the folder of the raw download
    max_train: int | None  # keep the first n of the shuffled training images (None = all)
    hflip: bool
    class_conditional: bool  # feed the labels to every network (ImageNet 64)
    workers: int  # processes that decode images in prepare_data (0: in-process)
    sampling: Literal["replacement", "epochs"]  # training batches: independent draws, or shuffled epochs (code)
    lsun_resize: Literal["halve_bicubic", "box"]  # LSUN: ADM's box halvings + bicubic, or one BOX resize (code)

    def problems(self) -> list[tuple[str, str]]:
        out = [("max_train", "must be > 0 or null")] if self.max_train is not None and self.max_train <= 0 else []
        if self.class_conditional and DATASETS[self.dataset].num_classes == 0:
            out.append(("class_conditional", f"{self.dataset} has no class labels"))
        return out + ([("workers", "must be >= 0")] if self.workers < 0 else [])

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.dataset]

    @property
    def label_dim(self) -> int:
        """Classes the networks are conditioned on (0: unconditional)."""
        return self.spec.num_classes if self.class_conditional else 0


@dataclass(frozen=True)
class Diffusion:
    sigma_min: float
    sigma_max: float
    rho: float
    sigma_data: float

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be > 0") for k in ("sigma_min", "sigma_max", "rho", "sigma_data") if getattr(self, k) <= 0]
        if not out and self.sigma_max <= self.sigma_min:
            out.append(("sigma_max", f"must be > sigma_min ({self.sigma_min})"))
        return out


@dataclass(frozen=True)
class Network:
    arch: Literal["ncsnpp", "ddpmpp", "adm"]
    model_channels: int
    channel_mult: list[int]
    num_blocks: int
    attn_resolutions: list[int]
    options: dict[str, Any]  # further keyword arguments of pipeline.networks.build_network
    c_noise: Literal["edm", "adm"]  # noise input of F: ln(sigma)/4 (EDM), or 1000 ln(sigma)/4 (official PyTorch)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.model_channels <= 0:
            out.append(("model_channels", "must be > 0"))
        if not self.channel_mult or min(self.channel_mult) <= 0:
            out.append(("channel_mult", "must be a non-empty list of positive integers"))
        if self.num_blocks < 1:
            out.append(("num_blocks", "must be >= 1"))
        return out


def _training_problems(cfg: Any) -> list[tuple[str, str]]:
    positive = ("iterations", "batch", "lr", "checkpoint_every", "log_every")
    out = [(k, "must be > 0") for k in positive if getattr(cfg, k) <= 0]
    if not 0 <= cfg.dropout < 1:
        out.append(("dropout", "must be in [0, 1)"))
    return out


@dataclass(frozen=True)
class Teacher:
    source: Literal["train", "import", "openai"]  # import: convert an NVlabs EDM pickle; openai: an OpenAI .pt
    edm_pickle: str  # the pickle imported when source is 'import' (edm-cifar10-32x32-uncond-{vp,ve}.pkl)
    openai_checkpoint: str  # the file imported when source is 'openai' (edm_imagenet64_ema.pt, ...)
    optimizer: Literal["adam", "radam"]  # EDM: Adam; the official PyTorch edm_train: RAdam
    iterations: int
    batch: int
    lr: float
    lr_rampup_kimg: float  # linear learning-rate warm-up over this many thousand images (EDM)
    dropout: float
    p_mean: float  # log-normal training sigmas: ln(sigma) ~ N(p_mean, p_std^2) (EDM)
    p_std: float
    ema_halflife_kimg: float
    ema_rampup: float | None  # EDM's ramp: half-life <= rampup * images seen
    checkpoint_every: int
    log_every: int

    def problems(self) -> list[tuple[str, str]]:
        out = _training_problems(self)
        if self.p_std <= 0:
            out.append(("p_std", "must be > 0"))
        if self.ema_halflife_kimg < 0 or self.lr_rampup_kimg < 0:
            out.append(("ema_halflife_kimg" if self.ema_halflife_kimg < 0 else "lr_rampup_kimg", "must be >= 0"))
        return out


Metric = Literal["l2", "l1", "lpips", "pseudo_huber"]
# The target network's dropout: none (evaluated without), shared (the online network's mask of the step: both
# official codes), independent (a mask of its own: what the PyTorch code's CPU-RNG replay gives on a GPU).
TargetDropout = Literal["none", "shared", "independent"]


@dataclass(frozen=True)
class Distill:
    iterations: int
    batch: int
    lr: float
    optimizer: Literal["radam", "adam"]
    N: int  # discretisation steps of the teacher's ODE
    mu: float  # target network EMA rate
    solver: Literal["euler", "heun"]
    metric: Metric
    ema: float  # EMA rate of the weights that are evaluated
    dropout: float
    init_from_teacher: bool
    init_weights: Literal["ema", "online"]  # which teacher weights the student starts from (PyTorch / JAX code)
    target_dropout: TargetDropout
    source: Literal["train", "openai"]  # openai: import a published consistency model instead of training
    openai_checkpoint: str  # the file imported when source is 'openai' (cd_imagenet64_lpips.pt, ...)
    checkpoint_every: int
    log_every: int

    def problems(self) -> list[tuple[str, str]]:
        out = _training_problems(self)
        if self.N < 2:
            out.append(("N", f"must be >= 2, got {self.N}"))
        out += [(k, "must be in [0, 1)") for k in ("mu", "ema") if not 0 <= getattr(self, k) < 1]
        return out


@dataclass(frozen=True)
class ConsistencyTraining:
    iterations: int
    batch: int
    lr: float
    optimizer: Literal["radam", "adam"]
    s0: int  # initial discretisation N(0)
    s1: int  # final discretisation N(K) - 1
    mu0: float  # target EMA rate at N = s0
    schedule: Literal["paper", "code", "fixed"]  # fixed: N = s1 + 1 and mu = mu0 throughout (Fig. 3d)
    metric: Metric
    ema: float
    dropout: float
    init_from_teacher: bool  # the official PyTorch launch script does; the paper starts from random
    init_weights: Literal["ema", "online"]  # with init_from_teacher: the teacher's EMA or online weights
    target_dropout: TargetDropout
    source: Literal["train", "openai"]  # openai: import a published consistency model instead of training
    openai_checkpoint: str  # the file imported when source is 'openai' (ct_imagenet64.pt, ...)
    checkpoint_every: int
    log_every: int

    def problems(self) -> list[tuple[str, str]]:
        out = _training_problems(self)
        if self.s0 < 2:
            out.append(("s0", f"must be >= 2 (N(0) = s0 discretisation steps), got {self.s0}"))
        elif self.s1 < self.s0:
            out.append(("s1", f"must be >= s0 ({self.s0}), got {self.s1}"))
        out += [(k, "must be in [0, 1)") for k in ("mu0", "ema") if not 0 <= getattr(self, k) < 1]
        return out


@dataclass(frozen=True)
class Lpips:
    vgg16_weights: str  # torchvision's vgg16-397923af.pth
    linear_weights: str  # the LPIPS v0.1 'vgg' linear layers
    pooling: Literal["max", "avg"]  # VGG's pooling: max (LPIPS v0.1, JAX code) or avg (piq replace_pooling: PyTorch)


@dataclass(frozen=True)
class Sample:
    num_samples: int
    batch: int
    seed: int
    teacher_steps: int  # EDM Heun sampler: 2 * steps - 1 network evaluations
    cd_schedules: list[list[float | Literal["search"]]]  # each: the descending times of Alg. 1 (length = NFE);
    ct_schedules: list[list[float | Literal["search"]]]  # 'search': the time the search_<model> stage found
    grid: int  # images in the PNG grid of each schedule
    uint8: Literal["round", "truncate"]  # samples to uint8: round, or truncate as both official codes
    teacher_clip: bool  # clamp each denoised output of the teacher's Heun sampler to [-1, 1] (PyTorch code)

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be > 0") for k in ("num_samples", "batch", "grid") if getattr(self, k) <= 0]
        if self.teacher_steps < 2:
            out.append(("teacher_steps", f"must be >= 2, got {self.teacher_steps}"))
        for key in ("cd_schedules", "ct_schedules"):
            for schedule in getattr(self, key):
                if schedule.count("search") > 1 or (schedule and schedule[0] == "search"):
                    out.append((key, f"'search' stands for one intermediate time (not the first), got {schedule}"))
                    continue
                schedule = [t for t in schedule if t != "search"]
                if not schedule or min(schedule) <= 0:
                    out.append((key, f"every time must be > 0, got {schedule}"))
                elif any(b >= a for a, b in zip(schedule, schedule[1:])):
                    out.append((key, f"times must be strictly descending, got {schedule}"))
            nfes = [len(s) for s in getattr(self, key)]
            if len(set(nfes)) != len(nfes):
                out.append((key, f"one schedule per number of steps, got lengths {nfes}"))
        return out


@dataclass(frozen=True)
class Search:
    """The 2-step intermediate time: a ternary search over the grid index, minimising FID (paper, Sec. 6)."""

    grid: int | None  # Karras levels searched; None: the model's last training grid (CD N, CT s1+1)
    num_samples: int  # samples per FID evaluation
    seed: int
    indices: Literal["interior", "all"]  # 1 .. grid-2, or 0 .. grid-1 as the official ternary_search.py

    def problems(self) -> list[tuple[str, str]]:
        out = [("grid", f"must be >= 3 or null, got {self.grid}")] if self.grid is not None and self.grid < 3 else []
        return out + ([("num_samples", "must be >= 2")] if self.num_samples < 2 else [])


@dataclass(frozen=True)
class Ablation:
    """Figure 3: training runs that differ from the cd or ct section in a few knobs, FID against iteration."""

    iterations: int | None  # every run's length (None: its section's iterations)
    eval_every: int  # iterations between FID evaluations of the 1-step EMA samples
    num_samples: int  # samples per FID evaluation
    runs: dict[str, Any]  # name -> {model: cd | ct, knobs of that section}
    panels: dict[str, Any]  # figure panel -> list of run names plotted together

    def problems(self) -> list[tuple[str, str]]:
        out = [(k, "must be > 0") for k in ("eval_every", "num_samples") if getattr(self, k) <= 0]
        if self.iterations is not None and self.iterations <= 0:
            out.append(("iterations", "must be > 0 or null"))
        for panel, names in self.panels.items():
            if not isinstance(names, list) or not names:
                out.append(("panels", f"{panel}: expected a non-empty list of run names, got {names!r}"))
            elif unknown := [n for n in names if n not in self.runs]:
                out.append(("panels", f"{panel}: unknown run {unknown[0]!r} (runs: {', '.join(self.runs)})"))
        return out

    def used_runs(self) -> list[str]:
        """The runs some panel plots, in order of first appearance (the others are not built)."""
        return list(dict.fromkeys(n for names in self.panels.values() for n in names))


@dataclass(frozen=True)
class Evaluate:
    ref_images: int | None  # training images in the FID reference statistics (None = all)
    pr_ref_images: int | None  # of those, how many keep their features for KID and precision/recall (None = all)
    pr_k: int  # precision/recall: the k of the k-NN manifolds (Kynkaanniemi et al. 2019; ADM uses 3)
    mode: Literal["clean", "legacy_tensorflow", "legacy_pytorch"]
    inception: str  # 'auto', 'clean-fid', 'fid-helper' or a path (env INCEPTION_WEIGHTS overrides auto)
    batch: int

    def problems(self) -> list[tuple[str, str]]:
        out = [("batch", "must be > 0")] if self.batch <= 0 else []
        if self.ref_images is not None and self.ref_images < 2:
            out.append(("ref_images", "must be >= 2 or null"))
        if self.pr_ref_images is not None and self.pr_ref_images < 2:
            out.append(("pr_ref_images", "must be >= 2 or null"))
        if self.pr_k < 1:
            out.append(("pr_k", "must be >= 1"))
        return out


@dataclass(frozen=True)
class Edit:
    model: Literal["cd", "ct"]  # the consistency model the `edit` stage uses (its figures carry no model name)
    num_images: int  # held-out test images edited per task (a random n of test.npz); also the FID sample
    batch: int
    seed: int
    steps: int  # Algorithm 4 runs over the Karras grid of this many times (sigma_max .. sigma_min)
    inpaint_mask: Literal["center", "left_half", "random_pixels"]
    sr_factor: int  # super-resolution: p x p patches; the known low-resolution image is (res/p) x (res/p)
    sdedit_times: list[float]  # stroke-guided generation (SDEdit): descending times
    denoise_sigma: float  # noise level added to the test images, in the [-1, 1] units of the model
    interp_pairs: int  # interpolation: pairs of latents (rows of the figure)
    interp_frames: int  # interpolation: points from z1 to z2 inclusive (columns)

    def problems(self) -> list[tuple[str, str]]:
        out = [("num_images", "must be >= 2 (FID needs two images)")] if self.num_images < 2 else []
        out += [(k, "must be > 0") for k in ("batch", "interp_pairs", "denoise_sigma") if getattr(self, k) <= 0]
        if self.steps < 2:
            out.append(("steps", f"must be >= 2 (the grid's last time, sigma_min, is skipped), got {self.steps}"))
        if self.sr_factor < 2:
            out.append(("sr_factor", f"must be >= 2, got {self.sr_factor}"))
        if not self.sdedit_times or min(self.sdedit_times) <= 0:
            out.append(("sdedit_times", f"must be a non-empty list of times > 0, got {self.sdedit_times}"))
        elif any(b >= a for a, b in zip(self.sdedit_times, self.sdedit_times[1:])):
            out.append(("sdedit_times", f"times must be strictly descending, got {self.sdedit_times}"))
        if self.interp_frames < 2:
            out.append(("interp_frames", f"must be >= 2 (z1 and z2), got {self.interp_frames}"))
        return out


@dataclass(frozen=True)
class Resources:
    """One stage's SLURM request, and for training stages the shape of the data-parallel job."""

    gpu: int  # GPUs per node (0: CPU only)
    cpus: int  # CPUs per node
    mem_mb: int  # memory per node
    runtime: int  # minutes (sbatch -t), at most the partition's limit: longer training requeues itself
    nodes: int = 1
    processes: int | None = None  # training processes per node (None: one per GPU, 1 without GPUs)
    micro_batch: int | None = None  # the most images one process puts through the network at once (None: its share)
    launch: Literal["auto", "torchrun", "srun"] = "auto"  # auto: torchrun on one node, srun on several

    @property
    def per_node(self) -> int:
        return self.processes or max(self.gpu, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    @property
    def launcher(self) -> str:
        """'python' (one process), 'torchrun' (one node) or 'srun' (one task per process, any number of nodes)."""
        if self.launch != "auto":
            return self.launch
        return "srun" if self.nodes > 1 else "torchrun" if self.per_node > 1 else "python"

    def problems(self) -> list[tuple[str, str]]:
        out = [("gpu", "must be >= 0")] if self.gpu < 0 else []
        out += [(k, "must be > 0") for k in ("cpus", "mem_mb", "runtime", "nodes") if getattr(self, k) <= 0]
        out += [(k, "must be > 0 or null") for k in ("processes", "micro_batch")
                if getattr(self, k) is not None and getattr(self, k) <= 0]
        if not out and self.gpu and self.per_node > self.gpu:
            out.append(("processes", f"at most one process per GPU ({self.gpu} per node), got {self.processes}"))
        if not out and self.launch == "torchrun" and self.nodes > 1:
            out.append(("launch", "torchrun --standalone runs on one node; use srun (or auto) for several nodes"))
        if not out and self.launch == "srun" and self.world_size == 1:
            out.append(("launch", "srun starts one task per process: needs nodes x processes > 1"))
        return out


@dataclass(frozen=True)
class Cluster:
    """What one node holds, and how training outlives the partition's time limit."""

    gpus_per_node: int  # a stage asking for more stops before anything is submitted
    warn_seconds: int  # training jobs ask SLURM for SIGURG this long before their time limit (sbatch --signal)
    requeue: bool  # on that signal: checkpoint, then `scontrol requeue` (false: checkpoint and exit)

    def problems(self) -> list[tuple[str, str]]:
        return [(k, "must be > 0") for k in ("gpus_per_node", "warn_seconds") if getattr(self, k) <= 0]


@dataclass(frozen=True)
class Dvc:
    """Where `make push` and `make pull` keep the DAG's outputs (datasets, checkpoints, samples, results)."""

    remote: str  # a folder (relative to the repository root) or a DVC remote URL (s3://, ssh://, gs://, ...)

    def problems(self) -> list[tuple[str, str]]:
        return [("remote", "must not be empty")] if not self.remote.strip() else []


@dataclass(frozen=True)
class Config:
    preset: str  # one preset name, or several joined by '+' (applied in order)
    follow: str  # 'paper' or 'code': which values a preset takes where the official code differs from the paper
    run: Run
    data: Data
    diffusion: Diffusion
    network: Network
    teacher: Teacher
    cd: Distill
    ct: ConsistencyTraining
    lpips: Lpips
    sample: Sample
    search: Search
    evaluate: Evaluate
    edit: Edit
    ablation: Ablation
    cluster: Cluster
    dvc: Dvc
    resources: dict[str, Resources] = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the resolved plain dict

    def section(self, dotted: str) -> Any:
        """The resolved plain value at a dotted key, e.g. 'ct' or 'run.seed'."""
        value: Any = self.raw
        for part in dotted.split("."):
            value = value[part]
        return value


SECTIONS = {name: hint for name, hint in typing.get_type_hints(Config).items()
            if name not in ("preset", "follow", "raw")}


# ---------------------------------------------------------------------------------------------------
# Loading.


REPLACED = {("ablation", "panels")}  # mappings a preset replaces whole (a smaller Figure 3 drops panels)


def deep_merge(base: dict, override: dict, path: tuple[str, ...] = ()) -> dict:
    """A copy of base with override's values put in, recursing into dicts (except those in REPLACED)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and path + (key,) not in REPLACED:
            out[key] = deep_merge(out[key], value, path + (key,))
        else:
            out[key] = copy.deepcopy(value)
    return out


def _unknown(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"{where}{key}: unknown key{hint}")


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Check value against a type hint; return it normalised (ints accepted as floats, '1e-4' too)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for inner in options[:-1]:
            try:
                return _check_value(path, value, inner)
            except ConfigError:
                pass
        return _check_value(path, value, options[-1])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_value(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"no check for {hint}")  # a schema bug, not a user error


def _build(cls: type, values: Any, where: str) -> Any:
    """Instantiate a schema dataclass from a dict: unknown, missing, mistyped and impossible values fail."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.')}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in values:
        if key not in names:
            raise _unknown(where, str(key), names)
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}{missing[0]}: missing (every knob lives in params.yaml)")
    obj = cls(**{n: _check_value(where + n, values[n], hints[n]) for n in names if n in values})
    for key, message in obj.problems() if hasattr(obj, "problems") else []:
        got = "" if "got" in message else f"; got {getattr(obj, key)!r}"
        raise ConfigError(f"{where}{key}: {message}{got}")
    return obj


def resolve(params: dict, preset: str | None = None, overrides: dict | None = None) -> dict:
    """The plain dict of one preset: top-level defaults, then each named preset in turn, then overrides.

    `preset: paper_imagenet64+micro` applies paper_imagenet64, then micro on top (a Table 3 column at test size).
    With `follow: code`, each applied preset's `code:` block (where the official code differs from the paper)
    is applied after it.
    """
    params = dict(params)
    presets = params.pop("presets", {}) or {}
    chosen = preset or params.pop("preset", None)
    params.pop("preset", None)
    follow = (overrides or {}).get("follow", params.pop("follow", "paper"))
    if follow not in ("paper", "code"):
        raise ConfigError(f"follow: must be paper or code; got {follow!r}")
    if chosen is None:
        raise ConfigError("preset: missing (name one of the presets, e.g. 'preset: tiny')")
    for name, body in presets.items():
        for key, value in (body or {}).items():
            if key == "code":
                for inner in value or {}:
                    if inner not in SECTIONS:
                        raise _unknown(f"presets.{name}.code.", str(inner), list(SECTIONS))
            elif key not in SECTIONS:
                raise _unknown(f"presets.{name}.", str(key), list(SECTIONS) + ["code"])
    out = params
    for name in str(chosen).split("+"):
        if name not in presets:
            raise ConfigError(f"preset: unknown preset {name!r} (known: {', '.join(presets)})")
        body = dict(presets[name] or {})
        code = body.pop("code", None) or {}
        out = deep_merge(out, body)
        if follow == "code":
            out = deep_merge(out, code)
    out = deep_merge(out, {k: v for k, v in (overrides or {}).items() if k != "follow"})
    out["preset"] = chosen
    out["follow"] = follow
    return out


def validate(resolved: dict, source: str = "params.yaml") -> Config:
    """Type- and value-check a resolved dict; raise ConfigError with one line naming the key."""
    where = f"{source}: "
    for key in resolved:
        if key not in ("preset", "follow") and key not in SECTIONS:
            raise _unknown(where, str(key), list(SECTIONS))
    sections = {}
    for name, cls in SECTIONS.items():
        if name not in resolved:
            raise ConfigError(f"{where}{name}: missing section")
        if name == "resources":
            if not isinstance(resolved[name], dict):
                raise ConfigError(f"{where}resources: expected a mapping of stage -> resources")
            sections[name] = {s: _build(Resources, v, f"{where}resources.{s}.") for s, v in resolved[name].items()}
        else:
            sections[name] = _build(cls, resolved[name], f"{where}{name}.")
    _cross_checks(sections, where)
    return Config(preset=resolved["preset"], follow=resolved.get("follow", "paper"), raw=resolved, **sections)


TRAIN_STAGE = {"teacher": "train_teacher", "cd": "distill_cd", "ct": "train_ct"}  # model -> its training stage


def split_batch(batch: int, world_size: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation steps) of one process for a global batch; ValueError if it does not split."""
    if micro_batch is None and batch % world_size:
        raise ValueError(f"the global batch {batch} is not divisible by {world_size} processes")
    micro = micro_batch or batch // world_size
    if batch % (world_size * micro):
        raise ValueError(f"the global batch {batch} is not divisible by {world_size} processes x micro_batch {micro} "
                         f"(= {world_size * micro})")
    return micro, batch // (world_size * micro)


def _cross_checks(s: dict, where: str) -> None:
    sigma_max = s["diffusion"].sigma_max
    for key in ("cd_schedules", "ct_schedules"):
        for schedule in getattr(s["sample"], key):
            if schedule[0] > sigma_max:
                raise ConfigError(f"{where}sample.{key}: starts at {schedule[0]} > diffusion.sigma_max {sigma_max}")
    resolution = s["data"].spec.resolution
    if resolution % s["edit"].sr_factor:
        raise ConfigError(f"{where}edit.sr_factor: must divide the resolution {resolution} of {s['data'].dataset}; "
                          f"got {s['edit'].sr_factor}")
    if s["teacher"].source == "import" and (s["data"].dataset != "cifar10" or s["data"].class_conditional):
        raise ConfigError(f"{where}teacher.source: 'import' reads the unconditional NVlabs EDM CIFAR-10 pickles; "
                          f"data.dataset is {s['data'].dataset}")
    for kind in ("teacher", "cd", "ct"):  # OpenAI's published models are ADM UNets fed 1000 ln(sigma) / 4
        if s[kind].source == "openai" and (s["network"].arch, s["network"].c_noise) != ("adm", "adm"):
            raise ConfigError(f"{where}{kind}.source: 'openai' imports an ADM UNet trained with c_noise adm; "
                              f"network.arch is {s['network'].arch}, network.c_noise {s['network'].c_noise}")
    ablation = s["ablation"]
    for name, run in ablation.runs.items():
        if not isinstance(run, dict) or run.get("model") not in ("cd", "ct"):
            raise ConfigError(f"{where}ablation.runs.{name}.model: must be cd or ct")
        ablation_section(s[run["model"]], run, f"{where}ablation.runs.{name}.")
    if s["run"].dtype == "float64" and "lpips" in (s["cd"].metric, s["ct"].metric):
        raise ConfigError(f"{where}run.dtype: float64 is for numerical checks with the l2, l1 or pseudo_huber "
                          "metric (LPIPS' weights are float32)")
    _parallel_checks(s, where)


def _parallel_checks(s: dict, where: str) -> None:
    """Each stage fits a node, and each training batch splits evenly over its processes and micro-batches."""
    cluster = s["cluster"]
    for stage, r in s["resources"].items():
        if r.gpu > cluster.gpus_per_node:
            raise ConfigError(f"{where}resources.{stage}.gpu: {r.gpu} GPUs per node, but a node holds "
                              f"cluster.gpus_per_node = {cluster.gpus_per_node}")
    for kind, stage in TRAIN_STAGE.items():
        if stage not in s["resources"]:
            raise ConfigError(f"{where}resources.{stage}: missing (every training stage needs its resources)")
        r = s["resources"][stage]
        if r.runtime * 60 <= cluster.warn_seconds:
            raise ConfigError(f"{where}resources.{stage}.runtime: {r.runtime} min leaves no time to train before the "
                              f"warning cluster.warn_seconds = {cluster.warn_seconds} s ahead of the limit")
        runs = [(kind, s[kind])] + [(f"ablation.runs.{name}", ablation_section(s[kind], run))
                                    for name, run in s["ablation"].runs.items() if run.get("model") == kind]
        for label, section in runs:
            try:
                split_batch(section.batch, r.world_size, r.micro_batch)
            except ValueError as e:
                raise ConfigError(f"{where}resources.{stage}: {label}.batch: {e}") from None


def ablation_section(base: Any, run: dict, where: str = "ablation.runs.") -> Any:
    """The cd or ct section of one ablation run: the base section with the run's knobs put in, validated."""
    knobs = {k: v for k, v in run.items() if k != "model"}
    return _build(type(base), {**dataclasses.asdict(base), **knobs}, where)


def parse_override(text: str) -> dict:
    """'ct.lr=1e-4' -> {'ct': {'lr': 1e-4}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. ct.lr=1e-4")
    key, value = text.split("=", 1)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the second silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one section "
                                    "(the second would silently replace the first)")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(path: str | os.PathLike = "params.yaml", preset: str | None = None, overrides: list[str] = ()) -> Config:
    """Read params.yaml, apply the preset and `--set` overrides and CIFAR10_SOURCE, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run from the repository root or pass --config)")
    try:
        params = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    merged: dict = {}
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    resolved = resolve(params, preset, merged)
    if os.environ.get(ENV_SOURCE) and resolved.get("data", {}).get("dataset") == "cifar10":
        resolved["data"]["source"] = os.environ[ENV_SOURCE]
    return validate(resolved, str(path))


def check_data_source(cfg: Config) -> None:
    """Local inputs must exist, checked before any job starts: the data source (a download is checked when it
    runs) and an EDM pickle or OpenAI checkpoint to import. The message says what to download and where to put it."""
    source, spec = cfg.data.source, cfg.data.spec
    if source == "torchvision" and spec.name != "cifar10":
        raise ConfigError(f"data.source: 'torchvision' downloads only CIFAR-10; for {spec.name}, {spec.download}")
    if source != "torchvision" and not Path(source).expanduser().exists():
        raise ConfigError(f"data.source: {source} does not exist; {spec.download}")
    if cfg.teacher.source == "import" and not Path(cfg.teacher.edm_pickle).expanduser().is_file():
        raise ConfigError(f"teacher.edm_pickle: {cfg.teacher.edm_pickle} does not exist; download "
                          f"edm-cifar10-32x32-uncond-ve.pkl (NCSN++) or -vp.pkl (DDPM++) from {EDM_RELEASE_URL}")
    for kind in ("teacher", "cd", "ct"):
        section = getattr(cfg, kind)
        if section.source == "openai" and not Path(section.openai_checkpoint).expanduser().is_file():
            name = Path(section.openai_checkpoint).name
            raise ConfigError(f"{kind}.openai_checkpoint: {section.openai_checkpoint} does not exist; download "
                              f"{OPENAI_RELEASE_URL}{name} and save it there (the published files: "
                              "https://github.com/openai/consistency_models#pre-trained-models)")


class LpipsWeightsMissing(FileNotFoundError):
    pass


def missing_lpips_weights(paths: Lpips) -> list[str]:
    return [p for p in (paths.vgg16_weights, paths.linear_weights) if not Path(p).is_file()]


def require_lpips_weights(paths: Lpips) -> None:
    """Raise one clear line when LPIPS is asked for but its weight files are absent."""
    if missing_lpips_weights(paths):
        raise LpipsWeightsMissing(
            f"metric lpips needs VGG16 ImageNet weights at {paths.vgg16_weights} (torchvision's vgg16-397923af.pth, "
            f"{VGG16_URL}) and the LPIPS v0.1 VGG linear layers at {paths.linear_weights} (the file "
            "lpips/weights/v0.1/vgg.pth of the `lpips` PyPI package); missing: "
            f"{', '.join(missing_lpips_weights(paths))}. Set lpips.vgg16_weights / lpips.linear_weights in "
            "params.yaml, or use metric l2, l1 or pseudo_huber offline.")


def check_lpips_weights(cfg: Config) -> None:
    """Fail before any job starts when a stage will need LPIPS weights that are absent."""
    users = [("cd", cfg.cd.metric), ("ct", cfg.ct.metric)]
    for name in cfg.ablation.used_runs():
        run = cfg.ablation.runs[name]
        users.append((f"ablation.runs.{name}", run.get("metric", getattr(cfg, run["model"]).metric)))
    for where, metric in users:
        if metric == "lpips" and missing_lpips_weights(cfg.lpips):
            try:
                require_lpips_weights(cfg.lpips)
            except LpipsWeightsMissing as e:
                raise LpipsWeightsMissing(f"{where}.{e}") from None


def unwritable(paths: list[str]) -> str | None:
    """The first folder among the paths' parents that cannot be created or written (None: all can)."""
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        existing = folder
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK | os.X_OK):
            return folder if existing == folder else f"{folder} (its parent {existing} is not writable)"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--preset", default=None, help="override the file's `preset:` switch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one knob, e.g. --set ct.lr=1e-4 (repeatable)")


def stage_cli(doc: str | None, models: tuple[str, ...] = ()) -> tuple[Config, argparse.Namespace]:
    """A stage's command line: --config, --preset, --set (and --model when `models` are given); the loaded config."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    if models:
        parser.add_argument("--model", choices=models, required=True)
    args = parser.parse_args()
    sys.excepthook = _one_line_errors
    return from_args(args), args


def from_args(args: argparse.Namespace) -> Config:
    """Load the config named by the CLI arguments; print one line and exit 2 on a problem."""
    try:
        return load(args.config, args.preset, args.set)
    except ConfigError as e:
        sys.exit(f"error: {e}")
