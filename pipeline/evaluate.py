"""Stage evaluate: FID, KID, IS (where the Inception weights have logits) and precision/recall of one
model's samples, all from one Inception pass per NFE.

    python -m pipeline.evaluate --model cd [--config params.yaml]

FID against the training-set statistics of reference_stats; KID and precision/recall (k-NN manifolds,
k = evaluate.pr_k, as the ADM evaluator) against its reference features; same Inception weights and
clean-fid mode. Writes the model's metrics JSON (python -m pipeline.stages prints its path), one entry per sample
set (NFE, and the teacher's few-step solvers), and a flat summary beside it for DVC. Dataset gmm: no Inception;
the exact measures of pipeline.gmm instead (evaluate_mixture).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import tracking
from pipeline.config import MODELS, InputError, stage_cli
from pipeline.data import load_split, to_model_range, write_json
from pipeline.gmm import GaussianMixture
from pipeline.metrics import (
    FeatureSet,
    InceptionFeatures,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_reference_stats,
    precision_recall,
)
from pipeline.models import load_model
from pipeline.stages import checkpoint, data_dir, metrics, ref_features, ref_stats, samples, summary
from pipeline.training import setup_torch

NO_LOGITS = "IS unavailable: {} Inception weights have no classifier layer"
NO_REF_FEATURES = "{} unavailable: the reference has mu and sigma only, no features"
TOO_FEW_FOR_PR = "precision/recall unavailable: k={} needs more than k samples and reference images (got {} and {})"
LOGGED = ("fid", "kid", "is", "precision", "recall")  # MLflow metrics <name>_<sample key>, e.g. fid_nfe1
MIXTURE_LOGGED = ("nll_gap", "mode_tv", "on_mode", "frechet")  # dataset gmm


def score(features: FeatureSet, reference_stats: dict, reference_features: np.ndarray | None, pr_k: int,
          weights_name: str = "these") -> dict:
    """Every metric of one sample set from its Inception features; None plus a note where one cannot be had.

    reference_stats: {'mu', 'sigma'} of the training set; reference_features: pool features (N, 2048) of a
    subset of it, or None (a reference of mu and sigma only: no KID nor precision/recall); weights_name: the
    Inception weights, named in the note when they have no logits.
    """
    n, n_ref = len(features), 0 if reference_features is None else len(reference_features)
    row = {"fid": frechet_distance(*feature_statistics(features.pool), reference_stats["mu"], reference_stats["sigma"]),
           "kid": None, "is": None, "is_std": None, "precision": None, "recall": None,
           "kid_note": "", "is_note": "", "pr_note": ""}
    if reference_features is not None:
        row["kid"] = kernel_inception_distance(features.pool, reference_features)
    else:
        row["kid_note"] = NO_REF_FEATURES.format("KID")
    if features.probs is not None:
        row["is"], row["is_std"] = inception_score(features.probs, splits=min(10, n))
    else:
        row["is_note"] = NO_LOGITS.format(weights_name)
    if reference_features is None:
        row["pr_note"] = NO_REF_FEATURES.format("precision/recall")
    elif min(n, n_ref) > pr_k:
        row["precision"], row["recall"] = precision_recall(reference_features, features.pool, k=pr_k)
    else:
        row["pr_note"] = TOO_FEW_FOR_PR.format(pr_k, n, n_ref)
    return row


def load_references(cfg) -> tuple[dict, np.ndarray]:
    """The reference statistics and features of reference_stats, checked against evaluate.mode; exits if stale."""
    stats_path, features_path = ref_stats(cfg), ref_features(cfg)
    reference = load_reference_stats(stats_path)
    if reference["mode"] != cfg.evaluate.mode:
        sys.exit(f"error: {stats_path} was computed in mode {reference['mode']!r}, "
                 f"evaluate.mode is {cfg.evaluate.mode!r}")
    try:
        features = np.load(features_path)
    except (OSError, EOFError, ValueError) as e:
        raise InputError(f"{features_path}: truncated or corrupt ({str(e)[:120]}); re-run reference_stats") from None
    if len(features) != reference.get("feature_count", len(features)):
        sys.exit(f"error: {features_path} does not belong to {stats_path}: run reference_stats again")
    return reference, features


def load_inception(cfg, device) -> InceptionFeatures:
    """The Inception network of evaluate.inception / mode / batch; exits with one line when it cannot be had."""
    e = cfg.evaluate
    try:
        return InceptionFeatures(e.inception, e.mode, device, e.batch, weights_dir=cfg.run.weights_dir)
    except (RuntimeError, ValueError) as err:
        sys.exit(f"error: evaluate.inception: {err}")


def _summary(model: str, key: str, row: dict) -> str:
    pr = "" if row["precision"] is None else f", precision {row['precision']:.3f}, recall {row['recall']:.3f}"
    return f"{model} {key}: FID {row['fid']:.2f}, KID {row['kid']:.4f}{pr} on {row['num_samples']} samples"


SAMPLE_SET = re.compile(r"^(?:(euler|heun)_)?nfe(\d+)$")  # pipeline.sample.sample_key


def sample_sets(path: str) -> list[tuple[str, dict, np.ndarray]]:
    """[(key, row head, images)] of a samples file: the head holds the NFE, the count, the sampling times and,
    for the teacher's few-step rows, the solver ('sampler'); the stage's own sampler first, by NFE."""
    out = []
    with np.load(path) as f:
        for key in f.files:
            if match := SAMPLE_SET.match(key):
                solver, nfe = match.groups()
                sigmas = f[f"sigmas_{key}"].tolist() if f"sigmas_{key}" in f.files else None
                head = {"nfe": int(nfe), "num_samples": len(f[key]), "sigmas": sigmas}
                out.append((key, head | ({"sampler": solver} if solver else {}), f[key]))
    return sorted(out, key=lambda item: ("sampler" in item[1], item[1].get("sampler", ""), item[1]["nfe"]))


def load_mixture(cfg) -> tuple[GaussianMixture, float]:
    """Dataset gmm: the mixture prepare_data drew (its manifest), and the NLL per dimension of the test split's true
    draws, which every sample set's NLL is measured beside."""
    folder = data_dir(cfg)
    mixture = GaussianMixture.from_dict(json.loads((Path(folder) / "manifest.json").read_text())["mixture"])
    test, _ = load_split(folder, "test")
    return mixture, mixture.nll_per_dim(to_model_range(test).double())


def evaluate_mixture(cfg, model: str, sets: list, device) -> dict:
    """Dataset gmm: the exact measures of every sample set (pipeline.gmm; the NLL beside that of the test split's
    true draws), and the model's own error against the exact answer at evaluate.error_sigmas: E||f - f*||^2 / d
    for a consistency model, E||D - D*||^2 / d for the teacher, on noisy true draws."""
    e = cfg.evaluate
    mixture, reference_nll = load_mixture(cfg)
    rows = []
    for key, head, images in sets:
        rows.append(head | mixture.measures(to_model_range(images).double(), reference_nll))
        tracking.log_metrics({f"{name}_{key}": rows[-1][name] for name in MIXTURE_LOGGED})
        print(f"{model} {key}: NLL gap {rows[-1]['nll_gap']:.3f} nats/dim, on-mode {rows[-1]['on_mode']:.3f}, "
              f"mode TV {rows[-1]['mode_tv']:.3f}", file=sys.stderr)
    net = load_model(checkpoint(cfg, model), device, cfg=cfg)
    error = mixture.denoiser_error if model == "teacher" else mixture.consistency_error
    generator = torch.Generator().manual_seed(cfg.sample.seed)
    # f* on 1024 Heun steps: its own error <= 7.5e-6 relative (pipeline.gmm.CONSISTENCY_STEPS), 4x faster than 4096.
    steps = {} if model == "teacher" else {"steps": 1024}
    errors = error(net, e.error_sigmas, e.error_samples, generator, device=device, **steps)
    tracking.log_metrics({f"error_sigma{sigma:g}": value for sigma, value in errors.items()})
    return {"rows": rows, "reference": {"split": "test", "count": cfg.data.gmm.test, "nll": reference_nll},
            "error": {"kind": "denoiser" if model == "teacher" else "consistency", "samples": e.error_samples,
                      "per_sigma": {f"{sigma:g}": value for sigma, value in errors.items()}}}


def main() -> None:
    cfg, args = stage_cli(__doc__, MODELS)
    device = setup_torch(cfg)
    e = cfg.evaluate
    sets = sample_sets(samples(cfg, args.model))
    if cfg.data.dataset == "gmm":
        with tracking.stage_run(f"evaluate_{args.model}", cfg, tags={"model": args.model}) as run:
            result = evaluate_mixture(cfg, args.model, sets, device)
            write_json(metrics(cfg, args.model), {"model": args.model, "dataset": cfg.data.dataset,
                                                  "preset": cfg.preset, "mlflow_run_id": run.info.run_id,
                                                  "training": _training_summary(cfg, args.model)} | result)
            write_json(summary(cfg, args.model), flat(sets, result["rows"], MIXTURE_LOGGED))
        return
    reference, reference_features = load_references(cfg)
    with tracking.stage_run(f"evaluate_{args.model}", cfg, tags={"model": args.model}) as run:
        inception = load_inception(cfg, device)
        rows = []
        for key, head, images in sets:
            row = head | score(inception(images), reference, reference_features, e.pr_k,
                               inception.source.split()[0])
            rows.append(row)
            tracking.log_metrics({f"{name}_{key}": row[name] for name in LOGGED if row[name] is not None})
            print(_summary(args.model, key, row), file=sys.stderr)
        write_json(metrics(cfg, args.model), {
            "model": args.model, "dataset": cfg.data.dataset, "preset": cfg.preset, "rows": rows,
            "mlflow_run_id": run.info.run_id,
            "inception": inception.source, "mode": e.mode, "ref_images": reference["count"],
            "pr_ref_images": len(reference_features), "pr_k": e.pr_k,
            "training": _training_summary(cfg, args.model),
        })
        write_json(summary(cfg, args.model), flat(sets, rows, LOGGED))


def flat(sets: list, rows: list[dict], names) -> dict[str, float]:
    """{'fid_nfe1': 12.3, ...}: one number per (measure, sample set), named as in MLflow, for DVC's metrics."""
    return {f"{name}_{key}": row[name] for (key, _, _), row in zip(sets, rows) for name in names
            if row.get(name) is not None}


def _training_summary(cfg, model: str) -> str:
    """How the model was trained, in a few words, for the table."""
    if model == "teacher":
        return f"EDM, {cfg.teacher.iterations} it"
    section = getattr(cfg, model)
    if model == "ect":
        return f"ECT from the teacher, q={section.q}, c={section.c}, {section.iterations} it"
    extra = f", {section.solver}, N={section.N}" if model == "cd" else f", s1={section.s1}"
    extra += f", {section.schedule}, target {section.target}" if model == "ict" else ""
    return f"{section.metric}{extra}, {section.iterations} it"


if __name__ == "__main__":
    main()
