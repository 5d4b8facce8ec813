"""Stage reference_stats: Inception statistics (mu, sigma) of the training set, the reference of FID.

    python -m pipeline.reference_stats [--config params.yaml]

As the paper, FID compares samples with the training set. evaluate.ref_images limits the number of
training images used (CPU runs); null uses all of them.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import tracking
from pipeline.config import add_arguments, from_args
from pipeline.data import load_split
from pipeline.metrics import InceptionFeatures, feature_statistics, save_reference_stats
from pipeline.stages import DATA
from pipeline.training import setup_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    cfg = from_args(parser.parse_args())
    device = setup_torch(cfg)
    e = cfg.evaluate
    images, _ = load_split(f"{DATA}/train.npz")
    images = images[: e.ref_images] if e.ref_images else images
    with tracking.stage_run("reference_stats", cfg):
        try:
            inception = InceptionFeatures(e.inception, e.mode, device, e.batch)
        except (RuntimeError, ValueError) as err:
            sys.exit(f"error: evaluate.inception: {err}")
        features = inception(images)
        mu, sigma = feature_statistics(features.pool)
        save_reference_stats(f"{DATA}/fid_ref.npz", mu, sigma, count=len(images), mode=e.mode,
                             inception=inception.source)
        tracking.log_metrics({"ref_images": len(images)})
    print(f"wrote {DATA}/fid_ref.npz from {len(images)} training images ({inception.source})", file=sys.stderr)


if __name__ == "__main__":
    main()
