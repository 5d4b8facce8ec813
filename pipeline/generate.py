"""Generate images from a checkpoint, one PNG per seed (or one .npz): EDM's generate.py for consistency models.

    python -m pipeline.generate --checkpoint checkpoints/cifar10/.../cd.pt --outdir out --seeds 0-63
    python -m pipeline.generate --checkpoint cd.pt --seeds 0-999 --steps 2 --npz samples.npz   # times: its config
    python -m pipeline.generate --checkpoint downloads/cd_imagenet64_l2.pt --seeds 0-63 --ts 80,1.382 --outdir out
    torchrun --standalone --nproc_per_node=8 -m pipeline.generate --checkpoint cd.pt --seeds 0-49999 --npz all.npz

--checkpoint: one of ours (teacher, cd, ct, ict, ect: what pipeline.models.load_model reads) or a state dict of
openai/consistency_models (converted in memory by pipeline.import_openai; kind and resolution from the published
file name, else --kind and --resolution; attention heads of --head-channels, 64 for the published names).
Consistency models run Algorithm 1 with --steps N (1: sigma_max alone; N > 1: the checkpoint's N-time schedule of
sample.<kind>_schedules; a published OpenAI file's 2 steps are launch.sh's, e.g. 80 and 1.382 for ImageNet 64 CD) or
the times --ts; the teacher EDM's Heun sampler on --steps Karras levels (default: its sample.teacher_steps, 40 for a
published EDM file as launch.sh, else 18) or the levels --ts. uint8 rounding and the teacher's clipping follow the
checkpoint's sample section, like the sample stage.

An image depends on its seed alone: its noise, its class (conditional models; --class fixes it) and the fresh
noise of each multistep step come from torch.Generator().manual_seed(seed), drawn on the CPU, so neither the batch,
the other seeds nor the number of processes change it (up to batch-dependent float rounding of some GPU kernels).
Under torchrun each rank generates seeds[rank::world] on cuda:LOCAL_RANK (else the CPU) and writes its own PNGs;
with --npz rank 0 gathers and writes `images` (uint8 NHWC), `seeds` and `labels` in the order of --seeds.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from pipeline import cm, distributed, import_openai, models
from pipeline.config import InputError
from pipeline.data import atomic_write, save_arrays, uint8_on_device
from pipeline.sample import solve

DEFAULT_TEACHER_STEPS = 18  # EDM's CIFAR-10 sampler (35 network evaluations)


# ----------------------------------------------------------------------------------------------------------
# Arguments that need more than argparse.


def parse_seeds(text: str) -> list[int]:
    """EDM's seed syntax: '0-63', '1,5,10-12' (ranges inclusive); InputError on anything else."""
    seeds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise InputError(f"--seeds {text!r}: expected numbers and ranges such as 0-63 or 1,5,10-12")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise InputError(f"--seeds {text!r}: the range {first}-{last} runs backwards")
        seeds += range(first, last + 1)
    return seeds


def parse_times(text: str, sigma_min: float, sigma_max: float) -> list[float]:
    """--ts '80,0.821': non-increasing times in [sigma_min, sigma_max] (a repeated time is a valid Alg. 1 step)."""
    try:
        times = [float(t) for t in text.split(",")]
    except ValueError:
        raise InputError(f"--ts {text!r}: expected comma-separated numbers such as 80,0.821") from None
    if any(b > a for a, b in zip(times, times[1:])):
        raise InputError(f"--ts {text!r}: the times must decrease (Algorithm 1 runs from sigma_max down)")
    outside = [t for t in times if not sigma_min <= t <= sigma_max]
    if outside:
        raise InputError(f"--ts {text!r}: {outside[0]:g} is outside the model's [sigma_min, sigma_max] = "
                         f"[{sigma_min:g}, {sigma_max:g}]")
    return times


# ----------------------------------------------------------------------------------------------------------
# The checkpoint: ours, or an official state dict imported in memory.


def _is_official(state: dict) -> bool:
    return "kind" not in state and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def read_checkpoint(path: str | Path, kind: str | None = None, resolution: int | None = None,
                    head_channels: int | None = None) -> dict[str, Any]:
    """A checkpoint in our layout. An official file takes kind and resolution from its published name unless given;
    attention heads cannot be read from shapes, so a file of another name needs head_channels (a guess of 64 would
    give a working but wrong network), and a published name must hold the published network unless both
    resolution and head_channels are given."""
    path = Path(path)
    published = import_openai.PUBLISHED.get(path.name)
    if not path.is_file():
        raise InputError(import_openai.missing_file_message(path) if published else f"{path}: no such checkpoint")
    state = models.load_checkpoint(path)
    if not _is_official(state):
        if "kind" not in state or "ema" not in state:
            raise InputError(f"{path}: neither a checkpoint of this pipeline nor an official state dict")
        given = [name for name, value in (("--kind", kind), ("--resolution", resolution),
                                          ("--head-channels", head_channels)) if value is not None]
        if given:
            raise InputError(f"{path}: a checkpoint of this pipeline ({state['kind']}) knows its network; "
                             f"{', '.join(given)} apply to official state dicts only")
        return state
    if published is None and head_channels is None:
        raise InputError(f"{path}: not a published file name ({', '.join(import_openai.PUBLISHED)}), so its "
                         "attention head width is unknown: pass --head-channels (64 in every published model)")
    as_given = resolution is not None and head_channels is not None  # nothing left to guess from the name
    kind = kind or (published.kind if published else None)
    resolution = resolution or (published.resolution if published else None)
    if kind is None or resolution is None:
        raise InputError(f"{path}: not a published file name: pass --kind (cd, ct or teacher) and --resolution")
    try:
        ckpt = import_openai.import_state(state, kind, resolution, source={"file": path.name},
                                          num_head_channels=head_channels or import_openai.HEAD_CHANNELS)
    except import_openai.OpenAIImportError as e:
        raise InputError(f"{path}: {e}") from None
    found = (kind, ckpt["network"], ckpt["shape"]["label_dim"])
    if published and not as_given and found != (published.kind, published.network, published.label_dim):
        raise InputError(f"{path}: holds a {kind} network {ckpt['network']} with {found[2]} classes, not the "
                         f"published {published.kind} {published.network}: pass --resolution and --head-channels "
                         "to use it as it is")
    if published and kind == published.kind:
        ckpt["config"] = {"sample": published.sample_section()}   # launch.sh's --steps 40 / 2-step times
    return ckpt


def build(ckpt: dict[str, Any], device: torch.device) -> models.Preconditioned:
    """The checkpoint's EMA model in eval mode (what models.load_model does from a file)."""
    shape = ckpt.get("shape", {})
    model = models.build_model(ckpt["kind"], ckpt["network"], ckpt["diffusion"], dropout=0.0,
                               resolution=shape.get("resolution", models.IMG_RESOLUTION),
                               label_dim=shape.get("label_dim", 0), **ckpt.get("model_options", {}))
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval().requires_grad_(False)


def sample_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's `sample` section (training config), {} for an imported one."""
    return dict((ckpt.get("config") or {}).get("sample") or {})


def sampling_times(ckpt: dict[str, Any], steps: int | None, ts: str | None) -> list[float]:
    """Alg. 1 times (consistency models) or Heun's noise levels (the teacher) from --steps / --ts."""
    d, kind, settings = ckpt["diffusion"], ckpt["kind"], sample_settings(ckpt)
    if ts is not None:
        times = parse_times(ts, d["sigma_min"], d["sigma_max"])
        if steps is not None and steps != len(times):
            raise InputError(f"--steps {steps} but --ts gives {len(times)} times")
        return times
    if kind == "teacher":
        steps = steps or settings.get("teacher_steps", DEFAULT_TEACHER_STEPS)
        return [d["sigma_max"]] if steps == 1 else cm.karras_sigmas(steps, d["sigma_min"], d["sigma_max"],
                                                                   d["rho"]).tolist()
    if steps in (None, 1):
        return [d["sigma_max"]]
    schedules = settings.get(f"{kind}_schedules") or []
    fixed = [s for s in schedules if len(s) == steps and all(isinstance(t, (int, float)) for t in s)]
    if not fixed:
        raise InputError(f"--steps {steps}: the checkpoint's config has no {steps}-time schedule of fixed times "
                         f"(sample.{kind}_schedules: {schedules or 'none'}); give the times with --ts, e.g. "
                         f"--ts {d['sigma_max']:g},0.821")
    return [float(t) for t in fixed[0]]


# ----------------------------------------------------------------------------------------------------------
# Sampling.


def seeded_batch(seeds: list[int], resolution: int, label_dim: int, class_label: int | None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Generator]]:
    """(z, labels, generators): each image's noise and class from its own torch.Generator seeded with its seed; the
    generators go on to draw its multistep noise. The class is drawn even under --class, so the noise after it does
    not depend on the option."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    z = torch.stack([torch.randn(3, resolution, resolution, generator=g) for g in generators])
    if label_dim == 0:
        return z, None, generators
    labels = torch.stack([torch.randint(label_dim, (), generator=g) for g in generators])
    return z, labels if class_label is None else torch.full_like(labels, class_label), generators


def per_image_noise(generators: list[torch.Generator]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The z of a multistep step: row i from generators[i] (on the CPU, so every device draws the same)."""
    def noise(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device, x.dtype)
    return noise


def generate_images(model: models.Preconditioned, kind: str, sigmas: list[float], seeds: list[int], batch: int,
                    device: torch.device, class_label: int | None = None, sigma_min: float = 0.002,
                    uint8: str = "round", teacher_clip: bool = False,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 NHWC image per seed and its class (0 for an unconditional model), in the order of `seeds`."""
    resolution, label_dim = model.net.img_resolution, model.label_dim
    images, labels = [], []
    starts = range(0, len(seeds), batch)
    for start in tqdm(starts, desc=f"{kind}, {len(sigmas)} step(s)", unit="batch", disable=not progress):
        z, y, generators = seeded_batch(seeds[start:start + batch], resolution, label_dim, class_label)
        x = solve(model, kind, (z * sigmas[0]).to(device), sigmas, None if y is None else y.to(device),
                  teacher_clip=teacher_clip, sigma_min=sigma_min, noise=per_image_noise(generators))
        images.append(uint8_on_device(x, uint8).cpu())
        labels.append(torch.zeros(len(z), dtype=torch.int64) if y is None else y)
    if not images:
        return np.zeros((0, resolution, resolution, 3), np.uint8), np.zeros(0, np.int64)
    return torch.cat(images).numpy(), torch.cat(labels).numpy()


# ----------------------------------------------------------------------------------------------------------
# Outputs.


def write_pngs(outdir: Path, seeds: list[int], images: np.ndarray) -> None:
    for seed, image in zip(seeds, images):
        with atomic_write(outdir / f"{seed:06d}.png") as tmp:
            Image.fromarray(image, "RGB").save(tmp, format="PNG")


def write_npz(ctx: distributed.Context, path: Path, seeds: list[int], images: np.ndarray,
              labels: np.ndarray) -> None:
    """Rank 0 gathers every rank's share (seeds[r::world]) and writes them interleaved back into seed order."""
    parts = [(images, labels)]
    if ctx.world_size > 1:
        parts = [None] * ctx.world_size if ctx.main else None
        dist.gather_object((images, labels), parts, dst=0, group=ctx.control)
    if not ctx.main:
        return
    all_images = np.zeros((len(seeds), *images.shape[1:]), np.uint8)
    all_labels = np.zeros(len(seeds), np.int64)
    for rank, (part_images, part_labels) in enumerate(parts):
        all_images[rank::ctx.world_size], all_labels[rank::ctx.world_size] = part_images, part_labels
    save_arrays(path, images=all_images, seeds=np.asarray(seeds, np.int64), labels=all_labels)


# ----------------------------------------------------------------------------------------------------------
# The command line.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every stage's errors
        sys.exit(f"error: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline.generate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="our checkpoint, or an official openai/consistency_models .pt")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--outdir", type=Path, metavar="DIR", help="write DIR/<seed:06d>.png")
    out.add_argument("--npz", type=Path, metavar="FILE", help="write one .npz: images (uint8 NHWC), seeds, labels")
    p.add_argument("--seeds", default="0-63", metavar="LIST", help="seeds, e.g. 0-63 or 1,5,10-12 (default: 0-63)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="consistency: Alg. 1 steps (default 1); teacher: Heun's noise levels")
    p.add_argument("--ts", metavar="TIMES", help="explicit times, e.g. 80,0.821 (Alg. 1) or the teacher's noise levels")
    p.add_argument("--class", dest="class_label", type=int, metavar="C",
                   help="class of every image (default: drawn per seed)")
    p.add_argument("--batch", type=int, default=64, metavar="B", help="images per batch and process (default: 64)")
    p.add_argument("--uint8", choices=("round", "truncate"), help="to uint8 (default: the checkpoint's sample.uint8, "
                   "else round)")
    p.add_argument("--kind", choices=("teacher", "cd", "ct"), help="official file: model kind (else from its name)")
    p.add_argument("--resolution", type=int, metavar="R", help="official file: image size (else from its name)")
    p.add_argument("--head-channels", type=int, metavar="N",
                   help="official file: channels per attention head (published: 64)")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("steps", "batch", "resolution", "head_channels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.npz is not None and args.npz.suffix != ".npz":
        raise InputError(f"--npz {args.npz}: the file name must end in .npz")  # np.savez would append it


def run(args: argparse.Namespace) -> None:
    check_arguments(args)
    seeds = parse_seeds(args.seeds)
    ckpt = read_checkpoint(args.checkpoint, args.kind, args.resolution, args.head_channels)
    sigmas = sampling_times(ckpt, args.steps, args.ts)
    label_dim = ckpt.get("shape", {}).get("label_dim", 0)
    if args.class_label is not None and not 0 <= args.class_label < max(label_dim, 1):
        raise InputError(f"--class {args.class_label}: the model is unconditional" if label_dim == 0 else
                         f"--class {args.class_label}: the model has classes 0..{label_dim - 1}")
    settings = sample_settings(ckpt)
    ctx = distributed.init()
    model = build(ckpt, ctx.device)
    mine = seeds[ctx.rank::ctx.world_size]
    start = time.perf_counter()
    images, labels = generate_images(model, ckpt["kind"], sigmas, mine, args.batch, ctx.device, args.class_label,
                                     ckpt["diffusion"]["sigma_min"], args.uint8 or settings.get("uint8", "round"),
                                     settings.get("teacher_clip", False), progress=ctx.main)
    if args.npz:
        write_npz(ctx, args.npz, seeds, images, labels)
    else:
        write_pngs(args.outdir, mine, images)
    distributed.barrier(ctx)
    if ctx.main:
        where = args.npz or f"{args.outdir}/"
        print(f"{len(seeds)} images ({ckpt['kind']}, times {[round(s, 4) for s in sigmas]}) in "
              f"{time.perf_counter() - start:.1f} s on {ctx.world_size} process(es) -> {where}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        run(args)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
