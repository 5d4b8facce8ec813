"""Stage evaluate: FID (and IS where the Inception weights have logits) of one model's samples.

    python -m pipeline.evaluate --model cd [--config params.yaml]

FID against the training-set statistics of reference_stats, with the same Inception weights and
clean-fid mode. Writes results/metrics/<model>.json, one entry per NFE.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pipeline import tracking
from pipeline.config import add_arguments, from_args
from pipeline.data import write_json
from pipeline.metrics import (
    InceptionFeatures,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_reference_stats,
)
from pipeline.stages import DATA, MODELS, metrics, samples
from pipeline.training import setup_torch

NO_LOGITS = "IS unavailable: {} Inception weights have no classifier layer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--model", choices=MODELS, required=True)
    args = parser.parse_args()
    cfg = from_args(args)
    device = setup_torch(cfg)
    e = cfg.evaluate
    reference = load_reference_stats(f"{DATA}/fid_ref.npz")
    if reference["mode"] != e.mode:
        sys.exit(f"error: {DATA}/fid_ref.npz was computed in mode {reference['mode']!r}, evaluate.mode is {e.mode!r}")
    with np.load(samples(args.model)) as f:
        sets = {int(k[3:]): f[k] for k in f.files}
    with tracking.stage_run(f"evaluate_{args.model}", cfg, tags={"model": args.model}) as run:
        try:
            inception = InceptionFeatures(e.inception, e.mode, device, e.batch)
        except (RuntimeError, ValueError) as err:
            sys.exit(f"error: evaluate.inception: {err}")
        rows = []
        for nfe, images in sorted(sets.items()):
            features = inception(images)
            fid = frechet_distance(*feature_statistics(features.pool), reference["mu"], reference["sigma"])
            row = {"nfe": nfe, "fid": fid, "num_samples": len(images), "is": None, "is_std": None, "is_note": ""}
            if features.probs is not None:
                row["is"], row["is_std"] = inception_score(features.probs, splits=min(10, len(images)))
            else:
                row["is_note"] = NO_LOGITS.format(inception.source.split()[0])
            rows.append(row)
            tracking.log_metrics({f"fid_nfe{nfe}": fid} | ({f"is_nfe{nfe}": row["is"]} if row["is"] else {}))
            print(f"{args.model} NFE {nfe}: FID {fid:.2f} on {len(images)} samples", file=sys.stderr)
        write_json(metrics(args.model), {
            "model": args.model, "preset": cfg.preset, "rows": rows, "mlflow_run_id": run.info.run_id,
            "inception": inception.source, "mode": e.mode, "ref_images": reference["count"],
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
