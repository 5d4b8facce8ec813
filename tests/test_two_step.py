"""The 2-step time search: ternary search over a grid index finds the argmin of unimodal costs, and the
paper's published intermediate times lie on the grids it searches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT

from pipeline import cm
from pipeline.config import load
from pipeline.search_two_step import grid_levels, ternary_search


@pytest.mark.parametrize("lo, hi", [(1, 16), (1, 38), (1, 199), (3, 4), (5, 5)])
def test_ternary_search_finds_the_minimum_of_every_unimodal_cost(lo, hi):
    for best in range(lo, hi + 1):
        for slope in (0.5, 3.0):
            calls = []

            def cost(i: int, best: int = best, slope: float = slope, calls: list = calls) -> float:
                calls.append(i)
                return slope * abs(i - best) + (0.1 if i > best else 0.0)

            found, seen = ternary_search(cost, lo, hi)
            assert found == best and seen[found] == min(seen.values())
            assert len(calls) == len(set(calls))  # each index is probed once
            assert len(calls) <= 2 * np.ceil(np.log(hi - lo + 2) / np.log(1.5)) + 3  # logarithmic, not a scan


def test_ternary_search_on_a_plateau_returns_a_minimiser():
    values = [5, 4, 3, 1, 1, 1, 1, 2, 6]
    found, _ = ternary_search(lambda i: values[i], 0, len(values) - 1)
    assert values[found] == 1


def test_ternary_search_rejects_an_empty_range():
    with pytest.raises(ValueError, match="empty range"):
        ternary_search(lambda i: 0.0, 3, 2)


@pytest.mark.parametrize("preset, model, sigma", [
    ("paper_imagenet64", "cd", 1.382), ("paper_imagenet64", "ct", 1.913),
    ("paper_lsun_bedroom", "cd", 4.366), ("paper_lsun_bedroom", "ct", 3.991), ("paper_lsun_cat", "ct", 5.249),
])
def test_the_papers_two_step_times_lie_on_the_searched_grids(preset, model, sigma):
    cfg = load(ROOT / "params.yaml", preset)
    d = cfg.diffusion
    grid = cm.karras_sigmas(grid_levels(cfg, model), d.sigma_min, d.sigma_max, d.rho).numpy()
    assert np.min(np.abs(grid[1:-1] - sigma)) < 5e-4  # published to 3 decimals
