"""Stages ablate_<run> and figure3: the ablations of the paper's Figure 3, FID against training iteration.

    python -m pipeline.ablation --run cd_l2     # train one run, scoring 1-step FID every ablation.eval_every
    python -m pipeline.ablation --figure        # one PNG per panel of ablation.panels

A run is the cd or ct section with a few knobs changed (ablation.runs: metric, solver and N for CD; fixed
versus adaptive N and mu for CT). Every ablation.eval_every iterations the EMA model draws
ablation.num_samples 1-step samples, scored by FID against reference_stats. Each run is an MLflow run
tagged ablation=figure3, run=ablation_run=<name>, panels=<its panels> and its knobs, whose params are its section
with the knobs in, with the metric fid_1step and an image samples_1step (a grid of the scored samples) per
iteration, so the MLflow UI compares a panel's runs side by side. Writes the run's result JSON, its curve as CSV
(dvc plots) and its checkpoint; figure3 one PNG per panel (python -m pipeline.stages prints the paths).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline import distill_cd, tracking, train_ct
from pipeline.config import Config, ablation_section, add_arguments, from_args
from pipeline.data import atomic_write, write_json, write_text
from pipeline.evaluate import load_inception, load_references
from pipeline.metrics import feature_statistics, frechet_distance
from pipeline.sample import generate
from pipeline.stages import ablation_checkpoint, ablation_curve, ablation_result, figure3, training_io
from pipeline.training import setup_training

TRAINERS = {"cd": distill_cd.trainer, "ct": train_ct.trainer}


def run_section(cfg: Config, name: str):
    """The cd/ct section of one run: ablation.iterations, then the run's own knobs, over the base section."""
    run = dict(cfg.ablation.runs[name])
    model = run["model"]
    if cfg.ablation.iterations is not None:
        run.setdefault("iterations", cfg.ablation.iterations)
    return model, ablation_section(getattr(cfg, model), run, f"ablation.runs.{name}.")


def panels_of(cfg: Config, name: str) -> list[str]:
    return [panel for panel, names in cfg.ablation.panels.items() if name in names]


def knobs_of(cfg: Config, name: str) -> dict:
    return {k: v for k, v in cfg.ablation.runs[name].items() if k != "model"}


def run_tags(cfg: Config, name: str) -> dict[str, str]:
    """The MLflow tags of one run: the UI filters a panel's runs (ablation_run set, panels) and shows their knobs."""
    return {"ablation": "figure3", "run": name, "ablation_run": name, "panels": ",".join(panels_of(cfg, name)),
            **{f"knob.{k}": str(v) for k, v in knobs_of(cfg, name).items()}}


def train_run(cfg: Config, name: str) -> dict | None:
    """Train one run (on every rank of the launch); rank 0 scores it and returns the result, the others None."""
    ctx = setup_training(cfg)
    device = ctx.device
    model, section = run_section(cfg, name)
    a, d = cfg.ablation, cfg.diffusion
    knobs = knobs_of(cfg, name)
    io = training_io(cfg, model, stage=f"ablate_{name}", output=ablation_checkpoint(cfg, name))
    training, fit_args = TRAINERS[model](cfg, section, ctx, tags=run_tags(cfg, name), **io)
    if ctx.main:  # rank 0 scores the EMA model; the others wait for it at the next step's gradient exchange
        reference, _ = load_references(cfg)
        inception = load_inception(cfg, device)
    train_step = fit_args["after_step"]

    def after_step(step: int) -> dict:
        logs = train_step(step)
        done = step + 1
        if ctx.main and (done % a.eval_every == 0 or done == section.iterations):
            training.ema.eval()
            with torch.no_grad():
                images, _ = generate(training.ema, model, [d.sigma_max], a.num_samples, cfg.sample.batch,
                                     seed=cfg.sample.seed, device=device, sigma_min=d.sigma_min, progress=False,
                                     uint8=cfg.sample.uint8)
            fid = frechet_distance(*feature_statistics(inception(images, progress=False).pool),
                                   reference["mu"], reference["sigma"])
            training.evaluations.append({"iteration": done, "fid": fid})
            tracking.log_metrics({"fid_1step": fid}, step=done)
            tracking.log_image(tracking.grid(images, 64), key="samples_1step", step=done)
        return logs

    training.fit(**{**fit_args, "after_step": after_step})
    if not ctx.main:
        return None
    result = {"run": name, "model": model, "knobs": knobs, "panels": panels_of(cfg, name),
              "section": cfg.raw[model] | knobs | {"iterations": section.iterations},
              "num_samples": a.num_samples, "evaluations": training.evaluations,
              "mlflow_run_id": training.run_id}
    write_json(ablation_result(cfg, name), result)
    curve = "iteration,fid_1step\n" + "".join(f"{e['iteration']},{e['fid']}\n" for e in training.evaluations)
    write_text(ablation_curve(cfg, name), curve)  # dvc plots
    last = training.evaluations[-1]
    print(f"ablate_{name}: FID {last['fid']:.2f} (1 step) at iteration {last['iteration']}", file=sys.stderr)
    return result


def plot_panel(results: list[dict], path: Path, title: str) -> None:
    """FID (1 step) against training iteration, one line per run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for result in results:
        points = result["evaluations"]
        knobs = ", ".join(f"{k}={v}" for k, v in result["knobs"].items())
        ax.plot([p["iteration"] for p in points], [p["fid"] for p in points], "o-", ms=3,
                label=f"{result['run']} ({knobs})" if knobs else result["run"])
    ax.set(xlabel="training iteration", ylabel="FID (1 step)", title=title)
    if all(p["fid"] > 0 for r in results for p in r["evaluations"]):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def make_figures(cfg: Config) -> list[Path]:
    paths = []
    with tracking.stage_run("figure3", cfg, tags={"ablation": "figure3"}):
        for panel, path in zip(cfg.ablation.panels, figure3(cfg)):
            results = [json.loads(Path(ablation_result(cfg, n)).read_text()) for n in cfg.ablation.panels[panel]]
            plot_panel(results, Path(path), f"Figure 3, {panel} ({cfg.data.dataset}, {cfg.preset})")
            tracking.log_artifact(path)
            paths.append(Path(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="train one run of ablation.runs")
    which.add_argument("--figure", action="store_true", help="plot every panel of ablation.panels")
    args = parser.parse_args()
    cfg = from_args(args)
    if args.figure:
        for path in make_figures(cfg):
            print(f"wrote {path}", file=sys.stderr)
        return
    if args.run not in cfg.ablation.runs:
        sys.exit(f"error: --run {args.run}: not in ablation.runs ({', '.join(cfg.ablation.runs)})")
    train_run(cfg, args.run)


if __name__ == "__main__":
    main()
