"""Stage sample: images from a trained model, as a uint8 array per number of network evaluations (NFE).

    python -m pipeline.sample --model cd [--config params.yaml]

teacher: EDM's Heun sampler with sample.teacher_steps noise levels (2 * steps - 1 NFE); the few-step rows of
         sample.teacher_euler_nfe (Euler) and teacher_heun_nfe (EDM's Heun) beside it.
cd, ct:  multistep consistency sampling (paper Alg. 1), once per schedule in sample.{cd,ct}_schedules; the
         time 'search' is the one the search_<model> stage found (results/metrics/<dataset>/two_step_<model>.json).
Every schedule starts from the same noise (and, for class-conditional models, the same uniformly drawn
labels), so the grids compare like with like. Writes samples/<dataset>/<model>.npz (keys nfe1, nfe2, ...,
euler_nfe1, heun_nfe3, ... (sample_key), labels, and sigmas_<key>) and results/figures/<dataset>/samples_<model>.png.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import cm, tracking
from pipeline.config import MODELS, Config, stage_cli
from pipeline.data import atomic_write, save_arrays, uint8_on_device
from pipeline.models import compile_module, load_model
from pipeline.stages import checkpoint, sample_grid, samples, two_step
from pipeline.training import setup_torch


def searched_time(cfg: Config, model: str) -> float:
    """The 2-step intermediate time the search_<model> stage wrote."""
    path = Path(two_step(cfg, model))
    if not path.is_file():
        sys.exit(f"error: {path}: missing; run the search_{model} stage (sample.{model}_schedules names 'search')")
    return float(json.loads(path.read_text())["sigma"])


def sample_key(nfe: int, solver: str | None = None) -> str:
    """The name of a sample set: nfe<n> for the stage's own sampler, euler_nfe<n> / heun_nfe<n> for the teacher's
    few-step rows (sample.teacher_euler_nfe, teacher_heun_nfe)."""
    return f"{solver}_nfe{nfe}" if solver else f"nfe{nfe}"


def schedules(cfg: Config, model: str) -> dict[str, tuple[str, list[float]]]:
    """{sample key: (solver, sigmas)}: for the teacher EDM's Heun on the Karras grid (and the few-step rows), else
    each Alg. 1 schedule."""
    d, s = cfg.diffusion, cfg.sample
    if model == "teacher":
        def grid(n: int) -> list[float]:
            return cm.karras_sigmas(n, d.sigma_min, d.sigma_max, d.rho).tolist()

        out = {sample_key(2 * s.teacher_steps - 1): ("heun", grid(s.teacher_steps))}
        out |= {sample_key(n, "euler"): ("euler", grid(n + 1)) for n in s.teacher_euler_nfe}
        return out | {sample_key(n, "heun"): ("heun", grid((n + 1) // 2)) for n in s.teacher_heun_nfe}
    out = {}
    for schedule in getattr(s, f"{model}_schedules"):
        out[sample_key(len(schedule))] = ("multistep", [searched_time(cfg, model) if t == "search" else t
                                                        for t in schedule])
    return out


def class_labels(num_samples: int, label_dim: int, seed: int) -> np.ndarray | None:
    """Uniformly drawn classes for a class-conditional model (None if unconditional), fixed by the seed."""
    if label_dim == 0:
        return None
    return np.random.default_rng(seed).integers(0, label_dim, num_samples)


def solve(model: torch.nn.Module, kind: str, x_T: torch.Tensor, sigmas: list[float], labels: torch.Tensor | None,
          solver: str = "heun", teacher_clip: bool = False, sigma_min: float = 0.002,
          generator: torch.Generator | None = None,
          noise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """x_T = sigmas[0] * z -> images (floats, about [-1, 1]): the teacher's Heun (or Euler) solve of the ODE, or a
    consistency model's Alg. 1, its fresh noise from `generator` or noise(x) (cm.multistep_sample). Shared with
    pipeline.generate, so that both sample alike."""
    f = model if labels is None else (lambda x, sigma: model(x, sigma, labels))
    if kind == "teacher" and solver == "euler":
        return cm.euler_sample(f, x_T, torch.tensor(sigmas))
    if kind == "teacher":
        return cm.heun_sample(f, x_T, torch.tensor(sigmas), clip=teacher_clip)
    return cm.multistep_sample(f, x_T, sigmas, generator=generator, sigma_min=sigma_min, noise=noise)


def generate(model: torch.nn.Module, kind: str, sigmas: list[float], num_samples: int, batch: int, seed: int,
             device: torch.device, sigma_min: float = 0.002, progress: bool = True, uint8: str = "round",
             teacher_clip: bool = False, solver: str = "heun") -> tuple[np.ndarray, np.ndarray]:
    """num_samples images (uint8 NHWC, rounded or truncated: sample.uint8) and their labels; batch b starts from
    the noise of seed (seed, b). The teacher's solver: EDM's Heun (teacher_clip: it clamps each denoised output)
    or Euler."""
    resolution = model.net.img_resolution
    labels = class_labels(num_samples, model.label_dim, seed)
    out = []  # uint8 batches, copied to the host without waiting: the GPU runs on to the next batch
    batches = tqdm(range(0, num_samples, batch), desc=f"{kind}, {len(sigmas)} sigmas", unit="batch",
                   disable=not progress)
    for b, start in enumerate(batches):
        n = min(batch, num_samples - start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + b)
        x_T = (torch.randn(n, 3, resolution, resolution, generator=generator) * sigmas[0]).to(device)
        y = None if labels is None else torch.as_tensor(labels[start:start + n], device=device)
        x = solve(model, kind, x_T, sigmas, y, solver, teacher_clip, sigma_min,
                  generator=generator.manual_seed(seed + b + 1))
        out.append(uint8_on_device(x, uint8).to("cpu", non_blocking=device.type == "cuda"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last copies have landed
    images = torch.cat(out).numpy()
    return images, (labels if labels is not None else np.zeros(num_samples, np.int64))


def save_grid(images: dict[str, np.ndarray], count: int, path: Path, title: str) -> None:
    """One panel per sample set (key: sample_key), each a square grid of the first `count` images; written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(1, int(math.sqrt(count)))
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.4), squeeze=False)
    for ax, (key, batch) in zip(axes[0], images.items()):
        tiles = batch[: side * side]
        res = tiles.shape[1]
        tiles = np.concatenate([tiles, np.zeros((side * side - len(tiles), *tiles.shape[1:]), np.uint8)])
        grid = tiles.reshape(side, side, res, res, 3).transpose(0, 2, 1, 3, 4).reshape(side * res, side * res, 3)
        ax.imshow(grid, interpolation="nearest")
        solver, nfe = key.split("nfe")
        ax.set_title(f"{title}, {solver.rstrip('_').capitalize() + ', ' if solver else ''}NFE {nfe}")
        ax.axis("off")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100 if side * res <= 400 else 200)
    plt.close(fig)


def main() -> None:
    cfg, args = stage_cli(__doc__, MODELS)
    device = setup_torch(cfg)
    model = compile_module(load_model(checkpoint(cfg, args.model), device, cfg=cfg), cfg.run.compile)
    s = cfg.sample
    with tracking.stage_run(f"sample_{args.model}", cfg, tags={"model": args.model}):
        images, arrays = {}, {}
        for key, (solver, sigmas) in schedules(cfg, args.model).items():
            start = time.perf_counter()
            images[key], labels = generate(model, args.model, sigmas, s.num_samples, s.batch, s.seed, device,
                                           cfg.diffusion.sigma_min, uint8=s.uint8, teacher_clip=s.teacher_clip,
                                           solver=solver)
            seconds = time.perf_counter() - start
            arrays[f"sigmas_{key}"] = np.asarray(sigmas, np.float64)
            tracking.log_metrics({f"{key}_img_per_s": len(images[key]) / seconds})
            print(f"{args.model}: {len(images[key])} samples ({key}) in {seconds:.1f} s", file=sys.stderr)
        save_arrays(samples(cfg, args.model), labels=labels, **arrays, **images)
        path = Path(sample_grid(cfg, args.model))
        title = {"teacher": "EDM teacher (Heun)"}.get(args.model, args.model.upper())
        save_grid(images, s.grid, path, title)
        tracking.log_artifact(path)


if __name__ == "__main__":
    main()
