"""Throughput of every GPU-heavy workload for the preset's network, and how close each is to the hardware.

    python -m pipeline.bench [--config params.yaml] [--preset P] [--set KEY=VALUE] [--batch 512] [--steps 20]
                             [--variants eager,bf16,compile,bf16+compile] [--fid-samples 50000] [--out results/bench]

Workloads: a teacher step (EDM), a CD step (Heun; l2 and LPIPS), a CT step, 1-step sampling, the teacher's Heun
sampler, Inception features, and N one-step samples plus their Inception features end to end (the FID path).
Training steps run the stages' own code (their trainer() and Training.train_step) on a synthetic split and a
random teacher in a temporary folder. Each workload runs under several variants in the same process: `eager`
(plain fp32 eager, TF32 off: the baseline) and optimisations joined by '+': tf32, bf16 (autocast), compile
(torch.compile), channels_last. The ratio to `eager` is the figure that holds on a noisy machine. Sampling runs
as the sample stage does (fp32), so its variants are eager, tf32 and compile.

TFLOP/s: the matmul and convolution FLOPs of one call (torch's FlopCounterMode, on the eager variant) over its
time, against a large matmul of the variant's dtype measured in the same run. Without LPIPS weights the LPIPS
rows use random VGG weights (the same cost). Writes <out>/<device>.md, rewritten after every row, so that a job
killed mid-way keeps the rows it finished. Each row is guarded: an out-of-memory or any other error is that row's
note, and the next row runs. Every compiled row starts from a fresh dynamo state (torch._dynamo.reset: the
recompile budget is per process) and says when dynamo nevertheless ran frames eager or broke the graph.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import cm, distill_cd, distributed, train_ct, train_teacher
from pipeline.config import TRAIN_STAGE, Config, ConfigError, add_arguments, load, missing_lpips_weights
from pipeline.data import save_split, write_text
from pipeline.lpips import LPIPS
from pipeline.models import atomic_save, build_model, compile_module, load_model
from pipeline.sample import generate
from pipeline.stages import checkpoint, training_io
from pipeline.training import setup_torch

VARIANT_KNOBS = {  # each optimisation as run.* knobs on top of the baseline
    "tf32": {"tf32": True}, "bf16": {"mixed_precision": "bf16"}, "compile": {"compile": True},
    "channels_last": {"channels_last": True},
}
BASELINE = {"compile": False, "mixed_precision": "none", "tf32": False, "channels_last": False}
DEFAULT_VARIANTS = ("eager", "tf32", "bf16", "compile", "bf16+compile", "bf16+compile+channels_last")
TRAINERS = {"teacher": train_teacher.trainer, "cd": distill_cd.trainer, "ct": train_ct.trainer}
TRAINING = {  # workload -> (model, its --set); the CT step uses the preset's metric
    "teacher step": ("teacher", []),
    "CD step (Heun, l2)": ("cd", ["cd.solver=heun", "cd.metric=l2"]),
    "CD step (Heun, LPIPS)": ("cd", ["cd.solver=heun", "cd.metric=lpips"]),
    "CT step": ("ct", []),
}
SAMPLING = ("1-step sampling", "teacher Heun sampler")


def variant_sets(variant: str) -> list[str]:
    """The --set overrides of a variant such as 'bf16+compile'."""
    knobs = dict(BASELINE)
    for part in [] if variant == "eager" else variant.split("+"):
        if part not in VARIANT_KNOBS:
            raise ValueError(f"unknown variant part {part!r}: expected eager or {', '.join(VARIANT_KNOBS)} joined by +")
        knobs |= VARIANT_KNOBS[part]
    return [f"run.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in knobs.items()]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def has_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic runs in hardware: always on CUDA; on a CPU only with AVX512-BF16 or AMX (oneDNN),
    without which PyTorch emulates it, tens of times slower than fp32."""
    return device.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_variants(device: torch.device) -> list[str]:
    """DEFAULT_VARIANTS less what the device cannot run fast: tf32 off CUDA, bf16 on a CPU without bf16 hardware."""
    parts_ok = {"tf32": device.type == "cuda", "bf16": has_bf16(device)}
    return [v for v in DEFAULT_VARIANTS if all(parts_ok.get(part, True) for part in v.split("+"))]


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int, calls: int) -> float:
    """Wall seconds per call after `warmup` calls (which include any compilation), the device drained."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def matmul_peak(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float:
    """TFLOP/s of a large square matmul: the reference for the fraction of peak."""
    n = 8192 if device.type == "cuda" else 1024
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    calls = 20 if device.type == "cuda" else 5
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, warmup=3, calls=calls) / 1e12


def counted_flops(fn: Callable[[], object]) -> int:
    """Matmul and convolution FLOPs of one call (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_label(variant: str) -> str:
    parts = variant.split("+")
    return "bf16" if "bf16" in parts else "tf32" if "tf32" in parts else "fp32"


@dataclass
class Row:
    workload: str
    variant: str
    images_per_s: float | None = None
    tflops: float | None = None
    peak_gb: float | None = None
    note: str = ""


def joined(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# ------------------------------------------------------------------------------------------------
# Rows that fail, and compiled rows that silently ran eager.

def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM, or an error that wraps one (an Inductor autotuning or compile failure) in a RuntimeError."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def failure(error: BaseException) -> str:
    if is_out_of_memory(error):
        return "OOM"
    message = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}" + (f": {message[0][:120]}".replace("|", "/") if message else "")


def free_memory(device: torch.device) -> None:
    """Give back what a finished or failed row held (a failed call's tensors are only garbage once its traceback
    is), so that the next row starts from an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dynamo_fallbacks() -> str:
    """What dynamo's counters, since the last reset, say ran outside compiled graphs: nothing compiled at all, frames
    past the recompile limit (run eager), graph breaks. Empty when the row ran as compiled graphs."""
    counters = torch._dynamo.utils.counters
    limit = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())
    breaks = sum(counters["graph_break"].values())
    return joined("ran eager: dynamo compiled no graph" if not counters["stats"]["unique_graphs"] else "",
                  f"hit dynamo's recompile limit {limit}x: those frames ran eager" if limit else "",
                  f"{breaks} graph breaks" if breaks else "")


def guarded(workload: str, variant: str, device: torch.device, run_row: Callable[[], Row], note: str = "") -> Row:
    """`run_row()`, or a row whose note says why it failed: one OOM or error must not cost the rest of a GPU session.
    A compiled variant starts from a fresh dynamo state, else earlier rows may have spent its recompile budget and
    it would time eager code."""
    compiled = "compile" in variant.split("+")
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    try:
        row = run_row()
        if compiled:
            row.note = joined(row.note, dynamo_fallbacks())
    except Exception as error:  # KeyboardInterrupt and SystemExit still end the run; the report keeps what finished
        row = Row(workload, variant, note=joined(failure(error), note))
        print(f"{workload:24s} {variant:28s} {row.note}", file=sys.stderr, flush=True)
    free_memory(device)
    return row


@dataclass
class Results:
    """The rows so far, rewritten to `path` after each (atomically): a job killed mid-way keeps every finished row."""
    path: Path
    header: dict[str, str]
    peaks: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.write(finished=False)

    def write(self, finished: bool) -> str:
        header = self.header if finished else self.header | {"incomplete": "the run had not finished (or was killed) "
                                                                           "when this was written"}
        text = report(self.rows, self.peaks, header)
        write_text(self.path, text)
        return text


# ------------------------------------------------------------------------------------------------
# A temporary workspace the stages' own code can train in.

def write_synthetic_workspace(cfg: Config, images: int, seed: int = 0) -> None:
    """In the current folder, where the DAG would put them: a random training split of the preset's shape and a
    random teacher checkpoint."""
    rng = np.random.default_rng(seed)
    resolution, label_dim = cfg.data.spec.resolution, cfg.data.label_dim
    save_split(training_io(cfg, "teacher")["data"], "train",
               rng.integers(0, 256, (images, resolution, resolution, 3), dtype=np.uint8),
               rng.integers(0, max(label_dim, 1), images))
    teacher = build_model("teacher", cfg.raw["network"], cfg.raw["diffusion"], 0.0, resolution, label_dim)
    state = teacher.state_dict()
    atomic_save({"kind": "teacher", "step": 0, "network": cfg.raw["network"], "diffusion": cfg.raw["diffusion"],
                 "shape": {"resolution": resolution, "label_dim": label_dim}, "model": state, "ema": state},
                checkpoint(cfg, "teacher"))


def lpips_sets(cfg: Config) -> tuple[list[str], str]:
    """--set overrides that give LPIPS its weights from here on (absolute paths, or random files written in the
    current folder when the real ones are missing), and a note for the report."""
    if not missing_lpips_weights(cfg.lpips):
        return [f"lpips.vgg16_weights={Path(cfg.lpips.vgg16_weights).resolve()}",
                f"lpips.linear_weights={Path(cfg.lpips.linear_weights).resolve()}"], ""
    lpips = LPIPS()
    vgg = torch.nn.Sequential(*[layer for block in lpips.slices for layer in block])
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, "vgg16-random.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(lpips.lins)}, "lpips-random.pth")
    note = "random VGG weights (LPIPS weights absent; same cost)"
    return [f"lpips.vgg16_weights={Path('vgg16-random.pth').resolve()}",
            f"lpips.linear_weights={Path('lpips-random.pth').resolve()}"], note


def training_step(cfg: Config, kind: str) -> Callable[[], object]:
    """One optimiser step of the teacher, CD or CT, through the stage's own trainer (seeded: the same initial
    weights for every variant)."""
    setup_torch(cfg)
    training, fit_args = TRAINERS[kind](cfg, getattr(cfg, kind), distributed.init(cfg.run.device),
                                 **training_io(cfg, kind))
    return functools.partial(training.train_step, **{k: fit_args.get(k) for k in ("loss_fn", "ema_rate",
                                                                                  "after_step", "lr_at")})


def random_consistency_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """A consistency model of the preset's network with random weights, compiled when run.compile asks."""
    model = build_model("cd", cfg.raw["network"], cfg.raw["diffusion"], 0.0, cfg.data.spec.resolution,
                        cfg.data.label_dim)
    return compile_module(model.to(device).eval().requires_grad_(False), cfg.run.compile)


def sampling_call(cfg: Config, workload: str, batch: int, device: torch.device) -> Callable[[], object]:
    """One batch of 1-step consistency sampling (a random CM of the preset's network) or of the teacher's Heun
    sampler (sample.teacher_steps noise levels), as the sample stage runs them."""
    setup_torch(cfg)
    d, resolution = cfg.diffusion, cfg.data.spec.resolution
    x_T = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if cfg.data.label_dim else None
    if workload == "1-step sampling":
        model = random_consistency_model(cfg, device)
        return torch.inference_mode()(lambda: model(x_T * d.sigma_max, d.sigma_max, labels))
    teacher = compile_module(load_model(checkpoint(cfg, "teacher"), device), cfg.run.compile)
    sigmas = cm.karras_sigmas(cfg.sample.teacher_steps, d.sigma_min, d.sigma_max, d.rho)
    return lambda: cm.heun_sample(lambda x, s: teacher(x, s, labels), x_T * d.sigma_max, sigmas)


def measure(add: Callable[[Row], None], workload: str, variants: list[str],
            build: Callable[[str], Callable[[], object]], batch: int, device: torch.device, warmup: int, calls: int,
            note: str = "") -> None:
    """Time `build(variant)()` for each variant, each a guarded row handed to `add` as soon as it is measured. FLOPs
    are counted once, on the first uncompiled variant that runs (eager, unless that failed)."""
    flops: list[int] = []
    for variant in variants:
        add(guarded(workload, variant, device, functools.partial(
            timed_row, workload, variant, build, batch, device, warmup, calls, flops, note), note))


def timed_row(workload: str, variant: str, build: Callable[[str], Callable[[], object]], batch: int,
              device: torch.device, warmup: int, calls: int, flops: list[int], note: str) -> Row:
    """One row of `measure`; `flops` holds the count once a variant has made it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    call = build(variant)
    if not flops and "compile" not in variant.split("+"):  # the counter's dispatch mode would trace compiled code
        call()  # lazy state (optimiser moments) first, so that the count is one steady-state call
        flops.append(counted_flops(call))
    seconds = seconds_per_call(call, device, warmup, calls)
    print(f"{workload:24s} {variant:28s} {batch / seconds:10.1f} img/s", file=sys.stderr, flush=True)
    return Row(workload, variant, batch / seconds, flops[0] / seconds / 1e12 if flops else None,
               torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None, note)


def fid_path(add: Callable[[Row], None], cfg: Config, device: torch.device, samples: int) -> None:
    """Inception features alone, and `samples` one-step samples plus their features, end to end: two guarded rows."""
    e = cfg.evaluate
    variant = "+".join(["compile"] * cfg.run.compile + ["tf32"] * (cfg.run.tf32 and device.type == "cuda")) or "eager"
    try:
        from pipeline.metrics import InceptionFeatures  # imports clean-fid: only this row needs it

        inception = InceptionFeatures(e.inception, e.mode, device, e.batch, weights_dir=cfg.run.weights_dir)
    except ImportError as error:
        why = f"no clean-fid: {failure(error)}"
    except (FileNotFoundError, OSError, RuntimeError, ValueError) as error:
        why = "OOM" if is_out_of_memory(error) else f"no Inception weights: {str(error).splitlines()[0][:80]}"
    else:
        add(guarded("Inception features", "eager", device, lambda: inception_row(inception, cfg, device)))
        add(guarded(f"{samples} samples + features", variant, device,
                    lambda: end_to_end_row(inception, cfg, device, samples, variant)))
        return
    add(Row("Inception features", "eager", note=why))
    add(Row(f"{samples} samples + features", "-", note=why))


def inception_row(inception: Callable, cfg: Config, device: torch.device) -> Row:
    e, resolution = cfg.evaluate, cfg.data.spec.resolution
    images = np.random.default_rng(0).integers(0, 256, (e.batch * 2, resolution, resolution, 3), dtype=np.uint8)
    seconds = seconds_per_call(lambda: inception(images, progress=False), device, warmup=1, calls=1)
    return Row("Inception features", "eager", len(images) / seconds, note=f"{e.mode} resize")


def end_to_end_row(inception: Callable, cfg: Config, device: torch.device, samples: int, variant: str) -> Row:
    d = cfg.diffusion
    model = random_consistency_model(cfg, device)
    generate(model, "cd", [d.sigma_max], min(samples, cfg.sample.batch), cfg.sample.batch, 0, device,
             d.sigma_min, progress=False)  # compile outside the clock
    start = time.perf_counter()
    x, _ = generate(model, "cd", [d.sigma_max], samples, cfg.sample.batch, 0, device, d.sigma_min, progress=False)
    inception(x, progress=False)
    seconds = time.perf_counter() - start
    return Row(f"{samples} samples + features", variant, samples / seconds,
               note=f"{seconds:.2f} s in all, sample.batch {cfg.sample.batch}")


# ------------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return f"CPU {names[0] if names else platform.processor()}, {torch.get_num_threads()} threads"


def report(rows: list[Row], peaks: dict[str, float], header: dict[str, str]) -> str:
    """The Markdown table: img/s, ratio to eager, TFLOP/s and fraction of the matmul peak, peak memory."""
    eager = {r.workload: r.images_per_s for r in rows if r.variant == "eager" and r.images_per_s}
    lines = [f"# Benchmark: {header['device']}", ""] + [f"- {k}: {v}" for k, v in header.items() if k != "device"]
    lines += ["- matmul peak measured here: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in peaks.items()), "",
              "| workload | variant | img/s | × eager | TFLOP/s | % of peak | peak GB | note |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.images_per_s is None:
            lines.append(f"| {r.workload} | {r.variant} | – | – | – | – | – | {r.note} |")
            continue
        ratio = f"{r.images_per_s / eager[r.workload]:.2f}" if r.workload in eager else "–"
        tflops = f"{r.tflops:.3f}" if r.tflops is not None else "–"
        peak = peaks.get(peak_label(r.variant))
        share = f"{100 * r.tflops / peak:.0f}%" if r.tflops is not None and peak else "–"
        memory = f"{r.peak_gb:.1f}" if r.peak_gb is not None else "–"
        lines.append(f"| {r.workload} | {r.variant} | {r.images_per_s:.1f} | {ratio} | {tflops} | {share} | "
                     f"{memory} | {r.note} |")
    return "\n".join(lines) + "\n"


def bench_header(base: Config, device: torch.device, name: str, batch: int, calls: int, warmup: int,
                 variants: list[str]) -> dict[str, str]:
    net = build_model("teacher", base.raw["network"], base.raw["diffusion"], 0.0, base.data.spec.resolution,
                      base.data.label_dim)
    header = {
        "device": name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__, "preset": base.preset,
        "network": f"{base.network.arch}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
                   f"{base.data.spec.resolution}x{base.data.spec.resolution}",
        "batch": f"{batch} images per training or sampling call; {calls} timed calls after {warmup} warm-up",
        "command": "python -m pipeline.bench " + " ".join(sys.argv[1:]),
    }
    if not has_bf16(device):
        header["bf16"] = "emulated on this CPU (no AVX512-BF16 or AMX): its matmul peak is no roofline"
    if any("compile" in v.split("+") for v in variants):
        header["compile"] = ("dynamo reset (torch._dynamo.reset) before each compiled row; its note says when dynamo "
                             "still ran frames eager (recompile limit) or broke the graph")
    header["failures"] = "a row that ran out of memory says OOM, one that raised says failed: <error>"
    return header


def run(args: argparse.Namespace) -> Path:
    config = Path(args.config).resolve()
    try:
        base = load(config, args.preset, args.set)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    # The rows run in a temporary folder: pin the weights folder (Inception, LPIPS) to where it is from here.
    knobs = [*args.set, f"run.weights_dir={Path(base.run.weights_dir).resolve()}"]
    base = load(config, args.preset, knobs)
    device = setup_torch(base)
    cuda = device.type == "cuda"
    batch = args.batch or (512 if cuda else 32)
    calls, warmup = args.steps or (20 if cuda else 3), args.warmup or (5 if cuda else 1)
    variants = args.variants.split(",") if args.variants else default_variants(device)
    variants = ["eager"] + [v for v in variants if v != "eager"]  # the baseline of every ratio
    for variant in variants:
        try:
            variant_sets(variant)
        except ValueError as e:
            sys.exit(f"error: --variants: {e}")
    chosen = re.compile(args.workloads if args.workloads else ".")
    samples = args.fid_samples or (50_000 if cuda else 256)
    label = device_name(device)
    out = Path(args.out).resolve() / f"{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.md"  # before chdir
    results = Results(out, bench_header(base, device, label, batch, calls, warmup, variants))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, contextlib.chdir(tmp):
        weights, lpips_note = lpips_sets(base)
        write_synthetic_workspace(base, images=max(2 * batch, 64))

        def config_for(variant: str, *sets: str) -> Config:
            cfg = load(config, args.preset, [*knobs, *weights, *sets, *variant_sets(variant)])
            teacher = Path(checkpoint(cfg, "teacher"))
            if not teacher.exists():  # run.* knobs of a variant are part of the teacher's key: the same random teacher
                teacher.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(checkpoint(base, "teacher"), teacher)
            return cfg

        results.peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
        if cuda:
            results.peaks["tf32"] = matmul_peak(device, torch.float32, tf32=True)
        results.write(finished=False)
        for name, (kind, sets) in TRAINING.items():
            workload = name if kind != "ct" else f"{name} ({base.ct.metric})"
            if not chosen.search(workload):
                continue
            sets = [*sets, f"{kind}.batch={batch}", f"resources.{TRAIN_STAGE[kind]}.micro_batch=null"]
            uses_lpips = "cd.metric=lpips" in sets or (kind == "ct" and base.ct.metric == "lpips")
            measure(results.add, workload, variants, lambda v, k=kind, s=sets: training_step(config_for(v, *s), k),
                    batch, device, warmup, calls, lpips_note if uses_lpips else "")
        sampling_variants = [v for v in variants if not {"bf16", "channels_last"} & set(v.split("+"))]
        for workload in SAMPLING:
            if chosen.search(workload):
                measure(results.add, workload, sampling_variants,
                        lambda v, w=workload: sampling_call(config_for(v), w, batch, device),
                        batch, device, warmup, calls)
        if chosen.search("Inception features"):  # as the sample and evaluate stages run: compiled if asked for
            compiled = any("compile" in v.split("+") for v in variants)
            cfg = config_for("+".join(["compile"] * compiled + ["tf32"] * cuda) or "eager")
            setup_torch(cfg)
            fid_path(results.add, cfg, device, samples)
    print(results.write(finished=True))
    print(f"wrote {out}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--batch", type=int, help="images per training step or sampling call (512 CUDA, 32 CPU)")
    parser.add_argument("--steps", type=int, help="timed calls per row (20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first, compilation included (5 CUDA, 1 CPU)")
    parser.add_argument("--variants", help=f"comma-separated (default: {','.join(DEFAULT_VARIANTS)}; no tf32 on a CPU, "
                        "no bf16 on one without bf16 hardware)")
    parser.add_argument("--workloads", help="a regular expression of the workloads to run (default: all)")
    parser.add_argument("--fid-samples", type=int, help="images of the end-to-end FID row (50000 CUDA, 256 CPU)")
    parser.add_argument("--out", default="results/bench", help="folder of the <device>.md report")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
