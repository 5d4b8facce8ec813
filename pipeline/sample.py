"""Stage sample: images from a trained model, as a uint8 array per number of network evaluations (NFE).

    python -m pipeline.sample --model cd [--config params.yaml]

teacher: EDM's Heun sampler with sample.teacher_steps noise levels (2 * steps - 1 NFE).
cd, ct:  multistep consistency sampling (paper Alg. 1), once per schedule in sample.{cd,ct}_schedules.
Every schedule starts from the same noise, so the grids compare like with like. Writes
samples/<model>.npz (keys nfe1, nfe2, ...) and results/figures/samples_<model>.png.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import cm, tracking
from pipeline.config import Config, stage_cli
from pipeline.data import atomic_write, save_arrays, to_uint8
from pipeline.models import load_model
from pipeline.stages import MODELS, checkpoint, samples
from pipeline.training import setup_torch


def schedules(cfg: Config, model: str) -> dict[int, list[float]]:
    """{NFE: sigmas}: for the teacher the Karras grid (Heun), else each Alg. 1 schedule."""
    d = cfg.diffusion
    if model == "teacher":
        steps = cfg.sample.teacher_steps
        return {2 * steps - 1: cm.karras_sigmas(steps, d.sigma_min, d.sigma_max, d.rho).tolist()}
    return {len(s): s for s in getattr(cfg.sample, f"{model}_schedules")}


def generate(model: torch.nn.Module, kind: str, sigmas: list[float], cfg: Config, device: torch.device) -> np.ndarray:
    """cfg.sample.num_samples images (uint8 NHWC); batch b starts from the noise of seed (seed, b)."""
    s = cfg.sample
    out = []
    batches = tqdm(range(0, s.num_samples, s.batch), desc=f"{kind}, {len(sigmas)} sigmas", unit="batch")
    for b, start in enumerate(batches):
        n = min(s.batch, s.num_samples - start)
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + b)
        x_T = (torch.randn(n, 3, 32, 32, generator=generator) * sigmas[0]).to(device)
        if kind == "teacher":
            x = cm.heun_sample(model, x_T, torch.tensor(sigmas))
        else:
            x = cm.multistep_sample(model, x_T, sigmas, generator=generator.manual_seed(s.seed + b + 1),
                                    sigma_min=cfg.diffusion.sigma_min)
        out.append(to_uint8(x.cpu()))
    return np.concatenate(out)


def save_grid(images: dict[int, np.ndarray], count: int, path: Path, title: str) -> None:
    """One panel per NFE, each a square grid of the first `count` images; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(1, int(math.sqrt(count)))
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.4), squeeze=False)
    for ax, (nfe, batch) in zip(axes[0], sorted(images.items())):
        tiles = batch[: side * side]
        tiles = np.concatenate([tiles, np.zeros((side * side - len(tiles), *tiles.shape[1:]), np.uint8)])
        grid = tiles.reshape(side, side, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(side * 32, side * 32, 3)
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(f"{title}, NFE {nfe}")
        ax.axis("off")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def main() -> None:
    cfg, args = stage_cli(__doc__, MODELS)
    device = setup_torch(cfg)
    model = load_model(checkpoint(args.model), device)
    with tracking.stage_run(f"sample_{args.model}", cfg, tags={"model": args.model}):
        images = {}
        for nfe, sigmas in schedules(cfg, args.model).items():
            start = time.perf_counter()
            images[nfe] = generate(model, args.model, sigmas, cfg, device)
            seconds = time.perf_counter() - start
            tracking.log_metrics({f"nfe{nfe}_img_per_s": len(images[nfe]) / seconds})
            print(f"{args.model}: {len(images[nfe])} samples at NFE {nfe} in {seconds:.1f} s", file=sys.stderr)
        save_arrays(samples(args.model), **{f"nfe{nfe}": x for nfe, x in images.items()})
        figure = Path(f"results/figures/samples_{args.model}.png")
        title = {"teacher": "EDM teacher (Heun)"}.get(args.model, args.model.upper())
        save_grid(images, cfg.sample.grid, figure, title)
        tracking.log_artifact(figure)


if __name__ == "__main__":
    main()
