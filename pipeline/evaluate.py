"""Stage evaluate: FID, KID, IS (where the Inception weights have logits) and precision/recall of one
model's samples, all from one Inception pass per NFE.

    python -m pipeline.evaluate --model cd [--config params.yaml]

FID against the training-set statistics of reference_stats; KID and precision/recall (k-NN manifolds,
k = evaluate.pr_k, as the ADM evaluator) against its reference features; same Inception weights and
clean-fid mode. Writes results/metrics/<dataset>/<model>.json, one entry per NFE.
"""

from __future__ import annotations

import sys

import numpy as np

from pipeline import tracking
from pipeline.config import InputError, stage_cli
from pipeline.data import write_json
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
from pipeline.stages import MODELS, metrics, ref_features, ref_stats, samples
from pipeline.training import setup_torch

NO_LOGITS = "IS unavailable: {} Inception weights have no classifier layer"
TOO_FEW_FOR_PR = "precision/recall unavailable: k={} needs more than k samples and reference images (got {} and {})"
LOGGED = ("fid", "kid", "is", "precision", "recall")  # MLflow metrics <name>_nfe<nfe>


def score(features: FeatureSet, reference_stats: dict, reference_features: np.ndarray, pr_k: int,
          weights_name: str = "these") -> dict:
    """Every metric of one sample set from its Inception features; None plus a note where one cannot be had.

    reference_stats: {'mu', 'sigma'} of the training set; reference_features: pool features (N, 2048) of a
    subset of it; weights_name: the Inception weights, named in the note when they have no logits.
    """
    n, n_ref = len(features), len(reference_features)
    row = {"fid": frechet_distance(*feature_statistics(features.pool), reference_stats["mu"], reference_stats["sigma"]),
           "kid": kernel_inception_distance(features.pool, reference_features),
           "is": None, "is_std": None, "precision": None, "recall": None, "is_note": "", "pr_note": ""}
    if features.probs is not None:
        row["is"], row["is_std"] = inception_score(features.probs, splits=min(10, n))
    else:
        row["is_note"] = NO_LOGITS.format(weights_name)
    if min(n, n_ref) > pr_k:
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
        return InceptionFeatures(e.inception, e.mode, device, e.batch)
    except (RuntimeError, ValueError) as err:
        sys.exit(f"error: evaluate.inception: {err}")


def _summary(model: str, nfe: int, row: dict) -> str:
    pr = "" if row["precision"] is None else f", precision {row['precision']:.3f}, recall {row['recall']:.3f}"
    return f"{model} NFE {nfe}: FID {row['fid']:.2f}, KID {row['kid']:.4f}{pr} on {row['num_samples']} samples"


def main() -> None:
    cfg, args = stage_cli(__doc__, MODELS)
    device = setup_torch(cfg)
    e = cfg.evaluate
    reference, reference_features = load_references(cfg)
    with np.load(samples(cfg, args.model)) as f:
        sets = {int(k[3:]): f[k] for k in f.files if k.startswith("nfe")}
        sigmas = {int(k[len("sigmas_nfe"):]): f[k].tolist() for k in f.files if k.startswith("sigmas_nfe")}
    with tracking.stage_run(f"evaluate_{args.model}", cfg, tags={"model": args.model}) as run:
        inception = load_inception(cfg, device)
        rows = []
        for nfe, images in sorted(sets.items()):
            row = {"nfe": nfe, "num_samples": len(images), "sigmas": sigmas.get(nfe)}
            row |= score(inception(images), reference, reference_features, e.pr_k, inception.source.split()[0])
            rows.append(row)
            tracking.log_metrics({f"{name}_nfe{nfe}": row[name] for name in LOGGED if row[name] is not None})
            print(_summary(args.model, nfe, row), file=sys.stderr)
        write_json(metrics(cfg, args.model), {
            "model": args.model, "dataset": cfg.data.dataset, "preset": cfg.preset, "rows": rows,
            "mlflow_run_id": run.info.run_id,
            "inception": inception.source, "mode": e.mode, "ref_images": reference["count"],
            "pr_ref_images": len(reference_features), "pr_k": e.pr_k,
            "training": _training_summary(cfg, args.model),
        })


def _training_summary(cfg, model: str) -> str:
    """How the model was trained, in a few words, for the table."""
    if model == "teacher":
        return f"EDM, {cfg.teacher.iterations} it"
    section = getattr(cfg, model)
    extra = f", {cfg.cd.solver}, N={cfg.cd.N}" if model == "cd" else f", s1={cfg.ct.s1}"
    return f"{section.metric}{extra}, {section.iterations} it"


if __name__ == "__main__":
    main()
