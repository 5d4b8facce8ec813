"""Stage proof: does the method work? The table and figure of the `proof` preset, on data with exact answers.

    python -m pipeline.proof [--config params.yaml]          # after evaluate_{teacher,cd,ct} on dataset gmm

Reads each model's metrics (the exact measures of every sample set and each model's error against the exact
answer) and writes results/<experiment>/tables/proof.{csv,md,png} (results/tables/: the selected one's copy).
Beside the trained models it measures, with the same measures: true draws (the train split: the floor a perfect
sampler reaches at this sample size) and the exact denoiser D* under the teacher's samplers (what the teacher would
reach if it had learned D* exactly: the sampler's own error). The Markdown states the paper's four claims, each with
the margin it must hold by, and whether it holds here:

  (i)   CD with 1 step is far better than the teacher with the same 1 and 2 network evaluations;
  (ii)  2 steps are at least as good as 1 step, for CD and for CT;
  (iii) CT with 1 step comes close to CD with 1 step;
  (iv)  the teacher's full sampler comes close to the exact answer.

The measures (pipeline.gmm, nats per dimension where a log-likelihood): NLL gap (precision: ~0 for a perfect
sampler, large when samples leave the modes), on-mode fraction (precision), mode TV (recall: 0 when every mode has
its weight), Frechet distance in pixel space to the exact mean and covariance (both).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import cm, tracking
from pipeline.config import Config, stage_cli
from pipeline.data import atomic_write, load_split, to_model_range, to_uint8, write_text
from pipeline.gmm import GaussianMixture
from pipeline.stages import data_dir, metrics, models, proof_outputs, samples
from pipeline.tables import to_markdown

MEASURES = ("nll_gap", "on_mode", "mode_tv", "frechet")
COLUMNS = ["model", "sampler", "nfe", *MEASURES, "nll", "num_samples", "sigmas"]
NAME = {"teacher": "teacher", "cd": "CD", "ct": "CT", "ict": "iCT", "ect": "ECT"}
SAMPLER = {None: {"teacher": "EDM Heun", "cd": "Alg. 1", "ct": "Alg. 1", "ict": "Alg. 1", "ect": "Alg. 1"},
           "euler": "Euler", "heun": "EDM Heun"}

# The margins the claims must hold by, in the measures' units (NLL gap: nats per dimension).
FAR = 5.0  # (i): the teacher's best Frechet distance at 1 and 2 NFE is at least FAR times CD's at 1 step (the paper's
FAR_NLL = 0.2  # claim is in FID, of which this is the pixel-space analogue), and its NLL gap exceeds CD's by FAR_NLL
AS_GOOD = 0.05  # (ii): the 2-step NLL gap exceeds the 1-step one by at most this, and TV by at most AS_GOOD too
CLOSE = 1 / 3  # (iii): CT's 1-step NLL gap exceeds CD's by at most CLOSE of the exact D*'s 1-step Euler gap (what
# even a perfect one-step denoiser misses by), and its mode TV CD's by at most AS_GOOD
EXACT = 0.1  # (iv): the teacher's full sampler: NLL gap at most that of D* under it plus EXACT, mode TV below EXACT


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    evidence: str  # the numbers compared, with the margin
    holds: bool


def _row(table: pd.DataFrame, model: str, nfe: int, sampler: str | None = None) -> pd.Series:
    rows = table[(table.model == model) & (table.nfe == nfe)]
    if sampler is not None:
        rows = rows[rows.sampler == sampler]
    if len(rows) != 1:
        raise KeyError(f"the proof table has {len(rows)} rows for {model} {sampler or ''} NFE {nfe}")
    return rows.iloc[0]


def claims(table: pd.DataFrame, teacher_full_nfe: int, iterations: dict[str, int] | None = None) -> list[Claim]:
    """The paper's claims (i)-(iv) on a proof table, each with the numbers it rests on and its margin; with iCT and
    ECT rows, their papers' claims (v) and (vi) too (iterations: each model's training steps)."""
    out = []
    cd1, cd2, ct1, ct2 = (_row(table, m, n) for m in ("CD", "CT") for n in (1, 2))
    few = table[(table.model == "teacher") & (table.nfe <= 2)]
    best_frechet, best_gap = few.frechet.min(), few.nll_gap.min()
    out.append(Claim(
        "(i)", "CD with 1 step is far better than the teacher with 1 and 2 NFE",
        f"Frechet: teacher's best at NFE <= 2 {best_frechet:.3f} >= {FAR:g} x CD's {cd1.frechet:.3f}; NLL gap: "
        f"teacher's best {best_gap:.3f} >= CD's {cd1.nll_gap:.3f} + {FAR_NLL:g}",
        bool(len(few) and best_frechet >= FAR * cd1.frechet and best_gap >= cd1.nll_gap + FAR_NLL)))
    later = [(m, _row(table, m, 1), _row(table, m, 2)) for m in ("iCT", "ECT") if (table.model == m).any()]
    for name, one, two in [("CD", cd1, cd2), ("CT", ct1, ct2)] + later:
        out.append(Claim(
            "(ii)", f"{name} with 2 steps is at least as good as with 1 step",
            f"NLL gap {two.nll_gap:.3f} <= {one.nll_gap:.3f} + {AS_GOOD:g}; mode TV {two.mode_tv:.3f} <= "
            f"{one.mode_tv:.3f} + {AS_GOOD:g}",
            bool(two.nll_gap <= one.nll_gap + AS_GOOD and two.mode_tv <= one.mode_tv + AS_GOOD)))
    denoiser = _row(table, "exact D*", 1).nll_gap
    out.append(Claim(
        "(iii)", "CT with 1 step comes close to CD with 1 step",
        f"NLL gap: CT {ct1.nll_gap:.3f} <= CD's {cd1.nll_gap:.3f} + 1/3 x the exact D*'s 1-step Euler "
        f"{denoiser:.3f}; mode TV {ct1.mode_tv:.3f} <= CD's {cd1.mode_tv:.3f} + {AS_GOOD:g}",
        bool(ct1.nll_gap <= cd1.nll_gap + CLOSE * denoiser and ct1.mode_tv <= cd1.mode_tv + AS_GOOD)))
    full, exact = _row(table, "teacher", teacher_full_nfe, "EDM Heun"), _row(table, "exact D*", teacher_full_nfe)
    out.append(Claim(
        "(iv)", "the teacher's full sampler comes close to the exact answer",
        f"NLL gap {full.nll_gap:.3f} <= exact D*'s under the same sampler {exact.nll_gap:.3f} + {EXACT:g}; mode TV "
        f"{full.mode_tv:.3f} <= {EXACT:g}",
        bool(full.nll_gap <= exact.nll_gap + EXACT and full.mode_tv <= EXACT)))
    steps = iterations or {}
    if (table.model == "iCT").any():
        ict1 = _row(table, "iCT", 1)
        out.append(Claim(
            "(v)", f"iCT with 1 step is at least as good as CT with 1 step ({steps.get('ict', '?')} against "
                   f"{steps.get('ct', '?')} steps)",
            f"NLL gap {ict1.nll_gap:.3f} <= CT's {ct1.nll_gap:.3f} + {AS_GOOD:g}; mode TV {ict1.mode_tv:.3f} <= "
            f"CT's {ct1.mode_tv:.3f} + {AS_GOOD:g}",
            bool(ict1.nll_gap <= ct1.nll_gap + AS_GOOD and ict1.mode_tv <= ct1.mode_tv + AS_GOOD)))
    if (table.model == "ECT").any():
        ect1 = _row(table, "ECT", 1)
        out.append(Claim(
            "(vi)", f"ECT from the teacher reaches CD's 1-step quality in a fraction of CT's steps "
                    f"({steps.get('ect', '?')} against {steps.get('ct', '?')})",
            f"NLL gap: ECT {ect1.nll_gap:.3f} <= CD's {cd1.nll_gap:.3f} + 1/3 x the exact D*'s 1-step Euler "
            f"{denoiser:.3f}; mode TV {ect1.mode_tv:.3f} <= CD's {cd1.mode_tv:.3f} + {AS_GOOD:g}",
            bool(ect1.nll_gap <= cd1.nll_gap + CLOSE * denoiser and ect1.mode_tv <= cd1.mode_tv + AS_GOOD
                 and steps.get("ect", 0) < steps.get("ct", 0))))
    return out


def exact_samples(mixture: GaussianMixture, solver: str, sigmas: list[float], num_samples: int,
                  seed: int) -> np.ndarray:
    """The exact denoiser D* under one of the teacher's samplers, in float64, as uint8 images like every sample."""
    x_T = torch.randn((num_samples, *mixture.means.shape[1:]), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64) * sigmas[0]
    sample = cm.euler_sample if solver == "euler" else cm.heun_sample
    return to_uint8(sample(mixture.denoiser, x_T, torch.tensor(sigmas, dtype=torch.float64)))


def _times(sigmas: list[float] | None) -> str:
    if not sigmas:
        return ""
    times = [f"{s:.4g}" for s in sigmas]
    return ", ".join(times) if len(times) <= 4 else f"{times[0]}, {times[1]}, ..., {times[-1]} ({len(times)} times)"


def build_table(cfg: Config, mixture: GaussianMixture, results: dict[str, dict]) -> pd.DataFrame:
    """Rows: true draws, the exact D* under the teacher's samplers, then every sample set of teacher, CD and CT."""
    s, folder = cfg.sample, data_dir(cfg)
    reference_nll = results["teacher"]["reference"]["nll"]
    train, _ = load_split(folder, "train")
    n = min(s.num_samples, len(train))
    rows = [{"model": "data", "sampler": "true draws (train split)", "nfe": None, "num_samples": n}
            | mixture.measures(to_model_range(train[:n]).double(), reference_nll)]
    d = cfg.diffusion
    for solver, nfe, sigmas in (("euler", 1, [d.sigma_max, d.sigma_min]),
                                ("heun", 2 * s.teacher_steps - 1, cm.karras_sigmas(s.teacher_steps, d.sigma_min,
                                                                                   d.sigma_max, d.rho).tolist())):
        images = exact_samples(mixture, solver, sigmas, s.num_samples, s.seed)
        rows.append({"model": "exact D*", "sampler": SAMPLER[solver], "nfe": nfe, "num_samples": len(images),
                     "sigmas": _times(sigmas)} | mixture.measures(to_model_range(images).double(), reference_nll))
    for model in results:
        for row in results[model]["rows"]:
            sampler = SAMPLER[row.get("sampler")]
            sampler = sampler[model] if isinstance(sampler, dict) else sampler
            rows.append({**row, "model": NAME[model], "sampler": sampler, "sigmas": _times(row.get("sigmas"))})
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["nfe"] = table["nfe"].astype("Int64")
    return table.round({"nll_gap": 3, "on_mode": 3, "mode_tv": 3, "frechet": 3, "nll": 3})


def error_table(results: dict[str, dict]) -> pd.DataFrame:
    """Each model's error against the exact answer per noise level: E||D - D*||^2 / d (teacher), E||f - f*||^2 / d."""
    rows = []
    for model in results:
        error = results[model]["error"]
        rows.append({"model": NAME[model], "error": f"E‖{'D − D*' if error['kind'] == 'denoiser' else 'f − f*'}‖² / d"}
                    | {f"sigma={k}": f"{v:.2e}" for k, v in error["per_sigma"].items()})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, errors: pd.DataFrame, found: list[Claim], cfg: Config) -> str:
    g = cfg.data.gmm
    lines = [f"Proof: the pipeline on a mixture of {g.components} Gaussians in 3x8x8 pixels (spread {g.spread}, "
             f"weights proportional to 1..{g.components}), where the right answer is known exactly "
             f"(preset {cfg.preset}).", "",
             "Measures of each sample set (pipeline/gmm.py): NLL gap in nats per dimension against true draws "
             "(precision, ~0 is perfect), on-mode fraction (precision, 1 is perfect), mode TV (recall, 0 is perfect), "
             "pixel-space Frechet distance to the exact moments.", "", to_markdown(table),
             "Each model's error against the exact answer, on noisy true draws at each noise level:", "",
             to_markdown(errors), "Claims of the paper, with the margin each must hold by:", ""]
    lines += [f"- {c.name} {c.statement}: **{'holds' if c.holds else 'FAILS'}** ({c.evidence})" for c in found]
    return "\n".join(lines) + "\n"


def plot(cfg: Config, mixture: GaussianMixture, panels: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Each sample set projected on the plane through the three heaviest mode means, beside the true draws; the
    first panel shows the mean images. A teacher's 1-step sample sits at the mean of the means (the star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = torch.argsort(mixture.weights, descending=True)[:3]
    a, b, c = (mixture.means[k].flatten() for k in order)
    e1 = (b - a) / (b - a).norm()
    e2 = (c - a) - ((c - a) @ e1) * e1
    e2 = e2 / e2.norm()

    def project(y: torch.Tensor) -> np.ndarray:
        centred = y.flatten(1) - a
        return torch.stack([centred @ e1, centred @ e2], 1).numpy()

    modes, middle = project(mixture.means), project(mixture.mean_and_covariance()[0][None])
    truth = project(panels[0][1])
    columns = math.ceil((len(panels) + 1) / 2)
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 5.6))
    axes = axes.flatten()
    tiles = to_uint8(mixture.means)
    k = len(tiles)
    side = math.ceil(math.sqrt(k))
    mosaic = np.zeros((side * 9, side * 9, 3), np.uint8)
    for i, tile in enumerate(tiles):
        mosaic[(i // side) * 9:(i // side) * 9 + 8, (i % side) * 9:(i % side) * 9 + 8] = tile
    axes[0].imshow(mosaic, interpolation="nearest")
    axes[0].set_title(f"the {k} mode means", fontsize=9)
    axes[0].axis("off")
    for ax, (title, y) in zip(axes[1:], panels):
        ax.scatter(truth[:, 0], truth[:, 1], s=2, c="0.8", linewidths=0)
        points = project(y)
        ax.scatter(points[:, 0], points[:, 1], s=2, c="tab:blue", linewidths=0)
        ax.scatter(modes[:, 0], modes[:, 1], s=25, c="k", marker="x")
        ax.scatter(middle[:, 0], middle[:, 1], s=60, c="tab:red", marker="*")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle("samples on the plane through the 3 heaviest mode means (x: means, star: mean of means, grey: "
                 "true draws)", fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def figure_panels(cfg: Config, table: pd.DataFrame, mixture: GaussianMixture) -> list[tuple[str, torch.Tensor]]:
    """(title, samples) of the rows the figure shows: true draws, then the teacher's and the models' sample sets."""
    train, _ = load_split(data_dir(cfg), "train")
    panels = [("true draws", to_model_range(train[: cfg.sample.num_samples]).double())]
    d, row = cfg.diffusion, _row(table, "exact D*", 1)
    exact = exact_samples(mixture, "euler", [d.sigma_max, d.sigma_min], cfg.sample.num_samples, cfg.sample.seed)
    panels.append((f"exact D* Euler, NFE 1\non-mode {row.on_mode:.2f}, NLL gap {row.nll_gap:.2f}",
                   to_model_range(exact).double()))
    for model in models(cfg):
        with np.load(samples(cfg, model)) as f:
            for key in f.files:
                if not (key.startswith("nfe") or key.startswith("euler_nfe")):
                    continue
                solver, nfe = key.split("nfe")
                sampler = SAMPLER[solver.rstrip("_") or None]
                sampler = sampler[model] if isinstance(sampler, dict) else sampler
                row = _row(table, NAME[model], int(nfe), sampler)
                panels.append((f"{NAME[model]} {sampler}, NFE {nfe}\non-mode {row.on_mode:.2f}, "
                               f"NLL gap {row.nll_gap:.2f}", to_model_range(f[key]).double()))
    return panels


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    if cfg.data.dataset != "gmm":
        sys.exit(f"error: data.dataset: the proof table needs dataset gmm (exact answers), got {cfg.data.dataset}; "
                 "run the preset proof")
    results = {model: json.loads(Path(metrics(cfg, model)).read_text()) for model in models(cfg)}
    mixture = GaussianMixture.from_dict(json.loads((Path(data_dir(cfg)) / "manifest.json").read_text())["mixture"])
    table = build_table(cfg, mixture, results)
    found = claims(table, 2 * cfg.sample.teacher_steps - 1, {m: getattr(cfg, m).iterations for m in results})
    csv, md, png = (Path(p) for p in proof_outputs(cfg))
    write_text(csv, table.to_csv(index=False))
    write_text(md, markdown(table, error_table(results), found, cfg))
    plot(cfg, mixture, figure_panels(cfg, table, mixture), png)
    with tracking.stage_run("proof", cfg):
        tracking.log_metrics({f"claim_{i}": float(c.holds) for i, c in enumerate(found)})
        for path in (csv, md, png):
            tracking.log_artifact(path)
    print(md.read_text(), file=sys.stderr)


if __name__ == "__main__":
    main()
