"""Stage reference_stats: Inception statistics (mu, sigma) of the training set, the reference of FID,
and the pool features of a subset of it, the reference of KID and precision/recall.

    python -m pipeline.reference_stats [--config params.yaml]

As the paper, FID compares samples with the training set. evaluate.ref_images limits the number of
training images used (CPU runs); null uses all of them. The first evaluate.pr_ref_images of those keep
their features (float32, as the ADM evaluator's reference batch of 10,000), from the same Inception pass.
That pass is streamed: mu and sigma are accumulated batch by batch (FeatureMoments), so the stage holds one
chunk of features, the 2048 x 2048 sums and the kept features, never all N x 2048 (ImageNet 64: 1.28M images).
"""

from __future__ import annotations

import sys

import numpy as np

from pipeline import tracking
from pipeline.config import stage_cli
from pipeline.data import atomic_write, load_split
from pipeline.evaluate import load_inception
from pipeline.metrics import FEATURE_DIM, FeatureMoments, InceptionFeatures, save_reference_stats
from pipeline.stages import data_dir, ref_features, ref_stats
from pipeline.training import setup_torch


def feature_count(pr_ref_images: int | None, available: int) -> int:
    """How many reference features to keep: pr_ref_images, clamped to the images in the statistics."""
    if pr_ref_images is None:
        return available
    if pr_ref_images > available:
        print(f"evaluate.pr_ref_images={pr_ref_images} > the {available} reference images: keeping {available}",
              file=sys.stderr)
    return min(pr_ref_images, available)


def save_features(path: str, pool: np.ndarray) -> None:
    """Pool features as a float32 .npy, written atomically (half the size; k-NN and KID need no more)."""
    with atomic_write(path) as tmp:
        np.save(tmp, np.asarray(pool, np.float32))


def reference_features(inception: InceptionFeatures, images: np.ndarray,
                       kept: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One streamed Inception pass: (mu, sigma) of the pool features of all images, as feature_statistics, and the
    first `kept` features (float32), in O(batch x 2048 + 2048^2 + kept x 2048) memory rather than O(N x 2048)."""
    moments = FeatureMoments(FEATURE_DIM)
    first = np.empty((kept, FEATURE_DIM), np.float32)
    filled = 0
    for pool, _ in inception.batches(images):
        moments.add(pool)
        take = min(len(pool), kept - filled)
        first[filled:filled + take] = pool[:take]
        filled += take
    mu, sigma = moments.statistics()
    return mu, sigma, first


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    device = setup_torch(cfg)
    e = cfg.evaluate
    images, _ = load_split(data_dir(cfg), "train")
    images = images[: e.ref_images] if e.ref_images else images  # stored shuffled: a prefix is a random sample
    kept = feature_count(e.pr_ref_images, len(images))
    with tracking.stage_run("reference_stats", cfg):
        inception = load_inception(cfg, device)
        mu, sigma, features = reference_features(inception, images, kept)
        save_reference_stats(ref_stats(cfg), mu, sigma, count=len(images), mode=e.mode, inception=inception.source,
                             feature_count=kept)
        save_features(ref_features(cfg), features)
        tracking.log_metrics({"ref_images": len(images), "pr_ref_images": kept})
    print(f"wrote {ref_stats(cfg)} from {len(images)} training images and {ref_features(cfg)} from the first {kept} "
          f"({inception.source})", file=sys.stderr)


if __name__ == "__main__":
    main()
