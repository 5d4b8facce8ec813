"""Stage search_<model>: the intermediate time of 2-step sampling, by ternary search of FID over the grid.

    python -m pipeline.search_two_step --model cd [--config params.yaml]

As the paper (Sec. 6): the 2-step schedule (sigma_max, tau) takes tau from a Karras grid, by default the
model's last training grid (CD: cd.N levels; CT: ct.s1 + 1), on which the paper's published times for
ImageNet 64 and LSUN lie (e.g. 1.382 = level 22 of 40, 1.913 = level 53 of 201). A ternary search over
the grid index finds the tau of lowest FID, assuming FID is unimodal in the index. Each probe samples
search.num_samples images (seed search.seed) and scores them against the training-set statistics of
reference_stats. Writes results/metrics/<dataset>/two_step_<model>.json (the
chosen sigma and every probe) and a plot of FID against tau; sample.<model>_schedules use it as 'search'.
Dataset gmm: the exact NLL gap (pipeline.gmm) in place of FID.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import cm, tracking
from pipeline.config import stage_cli
from pipeline.data import atomic_write, to_model_range, write_json
from pipeline.evaluate import load_inception, load_mixture, load_references
from pipeline.metrics import feature_statistics, frechet_distance
from pipeline.models import compile_module, load_model
from pipeline.sample import generate
from pipeline.stages import CONSISTENCY, checkpoint, search_figure, two_step
from pipeline.training import setup_torch


def ternary_search(cost: Callable[[int], float], lo: int, hi: int) -> tuple[int, dict[int, float]]:
    """argmin of cost over the integers lo..hi (inclusive), for a cost unimodal in its argument; each index
    is evaluated at most once. Returns (argmin, {index: cost} of every probe)."""
    if lo > hi:
        raise ValueError(f"empty range {lo}..{hi}")
    seen: dict[int, float] = {}

    def probe(i: int) -> float:
        if i not in seen:
            seen[i] = cost(i)
        return seen[i]

    while hi - lo > 2:
        third = (hi - lo) // 3
        m1, m2 = lo + third, hi - third
        if probe(m1) <= probe(m2):
            hi = m2  # the minimum is not right of m2 (it may be at m2 itself on a plateau)
        else:
            lo = m1
    best = min(range(lo, hi + 1), key=probe)
    return best, seen


def grid_levels(cfg, model: str) -> int:
    """Levels of the searched grid: search.grid, else the model's last training grid (ECT, continuous in t: the 2023
    CT's last grid, 151 levels)."""
    if cfg.search.grid is not None:
        return cfg.search.grid
    return {"cd": cfg.cd.N, "ct": cfg.ct.s1 + 1, "ict": cfg.ict.s1 + 1, "ect": ECT_SEARCH_LEVELS}[model]


ECT_SEARCH_LEVELS = 151


def search_range(levels: int, indices: str) -> tuple[int, int]:
    """The grid indices searched: 'interior' leaves out sigma_max (index 0) and sigma_min (levels - 1), 'all' is
    the official ternary_search.py (--begin 0 --end N-1: index 0 samples twice at sigma_max, N-1 is one step)."""
    return (0, levels - 1) if indices == "all" else (1, levels - 2)


def plot_search(probes: dict[float, float], best: float, path: Path, title: str, metric: str = "fid") -> None:
    """FID (or the metric searched) against the intermediate time, the chosen one marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted(probes)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(sigmas, [probes[s] for s in sigmas], "o-")
    ax.axvline(best, color="C3", ls="--", label=f"chosen: {best:.3f}")
    ax.set(xscale="log", xlabel="intermediate time tau (2-step sampling)", ylabel={"fid": "FID"}.get(metric, metric),
           title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def main() -> None:
    cfg, args = stage_cli(__doc__, CONSISTENCY)
    device = setup_torch(cfg)
    d, s = cfg.diffusion, cfg.search
    model = compile_module(load_model(checkpoint(cfg, args.model), device, cfg=cfg), cfg.run.compile)
    levels = grid_levels(cfg, args.model)
    grid = cm.karras_sigmas(levels, d.sigma_min, d.sigma_max, d.rho).tolist()
    with tracking.stage_run(f"search_{args.model}", cfg, tags={"model": args.model}) as run:
        metric, score = scorer(cfg, device)

        def cost_at(index: int) -> float:
            images, _ = generate(model, args.model, [d.sigma_max, grid[index]], s.num_samples, cfg.sample.batch,
                                 s.seed, device, d.sigma_min, progress=False, uint8=cfg.sample.uint8)
            cost = score(images)
            tracking.log_metrics({metric: cost, "sigma": grid[index]}, step=index)
            print(f"search_{args.model}: tau = grid[{index}] = {grid[index]:.4f}: {metric} {cost:.3f}",
                  file=sys.stderr)
            return cost

        lo, hi = search_range(levels, s.indices)
        best, seen = ternary_search(cost_at, lo, hi)
        result = {"model": args.model, "sigma": grid[best], "index": best, "grid": levels, "metric": metric,
                  metric: seen[best], "num_samples": s.num_samples, "mlflow_run_id": run.info.run_id,
                  "probes": [{"index": i, "sigma": grid[i], metric: seen[i]} for i in sorted(seen)]}
        write_json(two_step(cfg, args.model), result)
        path = Path(search_figure(cfg, args.model))
        plot_search({grid[i]: f for i, f in seen.items()}, grid[best], path,
                    f"{args.model.upper()}: 2-step {metric} ({s.num_samples} samples)", metric)
        tracking.log_metrics({"best_sigma": grid[best], f"best_{metric}": seen[best]})
        tracking.log_artifact(path)
    print(f"search_{args.model}: tau = {grid[best]:.4f} (index {best} of {levels}), {metric} {seen[best]:.3f} "
          f"after {len(seen)} probes", file=sys.stderr)


def scorer(cfg, device) -> tuple[str, Callable[[np.ndarray], float]]:
    """(name, cost of a uint8 sample set): FID against the training-set statistics; for dataset gmm, the exact NLL
    gap in nats per dimension against the test split (pipeline.gmm), which FID would only approximate."""
    if cfg.data.dataset == "gmm":
        mixture, reference_nll = load_mixture(cfg)
        return "nll_gap", lambda images: mixture.nll_per_dim(to_model_range(images).double()) - reference_nll
    reference, _ = load_references(cfg)
    inception = load_inception(cfg, device)
    return "fid", lambda images: frechet_distance(*feature_statistics(inception(images, progress=False).pool),
                                                  reference["mu"], reference["sigma"])


if __name__ == "__main__":
    main()
