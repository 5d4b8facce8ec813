"""pipeline.cm against independent truths: the paper's numbers and the closed forms of Gaussian data.

For data x0 ~ N(0, s_d^2) the exact denoiser is D(x, s) = s_d^2 / (s^2 + s_d^2) x, and the
probability-flow ODE dx/ds = (x - D)/s = x s / (s^2 + s_d^2) maps x at sigma to
x sqrt(eps^2 + s_d^2) / sqrt(sigma^2 + s_d^2) at eps: that map is the exact consistency function.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline import cm
from pipeline.distill_cd import cd_loss
from pipeline.models import ConsistencyModel, ema_update, frozen_copy
from pipeline.train_ct import ct_loss

SD, EPS, T = 0.5, 0.002, 80.0


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return SD**2 / (sigma**2 + SD**2) * x


def exact_consistency_scale(sigma: torch.Tensor | float) -> torch.Tensor:
    return math.sqrt(EPS**2 + SD**2) / (torch.as_tensor(sigma, dtype=torch.float64) ** 2 + SD**2).sqrt()


def exact_consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    scale = exact_consistency_scale(torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]))
    return x * scale.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))


# --- noise levels and scalings ------------------------------------------------------------------


def test_karras_sigmas_match_the_paper_grid():
    paper = [80, 57.59, 40.79, 28.37, 19.35, 12.91, 8.40, 5.32, 3.26, 1.92, 1.09, 0.585, 0.296,
             0.140, 0.060, 0.023, 0.0075, 0.002]  # notes/paper-facts.md, N = 18
    sigmas = cm.karras_sigmas(18)
    assert sigmas[0].item() == 80.0 and sigmas[-1].item() == pytest.approx(0.002, abs=1e-9)
    for ours, theirs in zip(sigmas.tolist(), paper):
        assert ours == pytest.approx(theirs, rel=6e-3, abs=1e-4)
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_karras_sigmas_rejects_fewer_than_two():
    with pytest.raises(ValueError, match="n >= 2"):
        cm.karras_sigmas(1)


def test_consistency_scalings_boundary_and_closed_form():
    c_skip, c_out, c_in = cm.consistency_scalings(torch.tensor(EPS), SD, EPS)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    s = torch.tensor(3.0, dtype=torch.float64)
    c_skip, c_out, c_in = cm.consistency_scalings(s, SD, EPS)
    assert c_skip.item() == pytest.approx(0.25 / ((3 - EPS) ** 2 + 0.25))
    assert c_out.item() == pytest.approx((3 - EPS) * 0.5 / math.sqrt(9.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(9.25))


def test_edm_scalings_give_unit_variance_input_and_training_target():
    # EDM's derivation (App. B.6): Var[c_in (x0 + n)] = 1 and Var[(x0 - c_skip (x0 + n)) / c_out] = 1, for
    # x0 with variance s_d^2 and n ~ N(0, s^2); and c_skip alone is the exact Gaussian denoiser.
    for s in (0.01, 0.5, 7.0, 80.0):
        c_skip, c_out, c_in = (v.item() for v in cm.edm_scalings(torch.tensor(s, dtype=torch.float64), SD))
        assert c_in**2 * (SD**2 + s**2) == pytest.approx(1, rel=1e-12)
        assert ((1 - c_skip) ** 2 * SD**2 + c_skip**2 * s**2) / c_out**2 == pytest.approx(1, rel=1e-12)
        assert c_skip == pytest.approx(SD**2 / (s**2 + SD**2), rel=1e-12)


def test_consistency_model_is_identity_at_eps_for_any_network():
    class Noise(nn.Module):
        def forward(self, x, c_noise, class_labels=None):
            return torch.randn_like(x) * 100

    f = ConsistencyModel(Noise(), SD, EPS)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(f(x, torch.full((4,), EPS)), x)


# --- ODE solvers converge to the exact probability-flow map at their orders ----------------------


@pytest.mark.parametrize("step, order", [(cm.euler_step, 1), (cm.heun_step, 2)])
def test_solver_converges_to_exact_pf_ode_at_its_order(step, order):
    x0 = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * T
    exact = exact_consistency(x0, torch.tensor(T))
    errors = []
    for n in (32, 64, 128):
        sigmas = cm.karras_sigmas(n, EPS, T).double()
        x = x0.clone()
        for t, t_next in zip(sigmas[:-1], sigmas[1:]):
            x = step(exact_denoiser, x, t, t_next)
        errors.append((x - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    for ratio in ratios:  # halving the step divides the error by 2^order
        assert 2**order * 0.85 < ratio < 2**order * 1.2, (errors, ratios)


def test_heun_sampler_uses_two_n_minus_one_evaluations_and_converges_to_the_data_variance():
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return exact_denoiser(x, sigma)

    x_T = torch.randn(50_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * T
    variances = {}
    for n in (18, 64):
        calls.clear()
        variances[n] = cm.heun_sample(counting, x_T, cm.karras_sigmas(n).double()).var().item()
        assert len(calls) == 2 * n - 1  # 35 NFE for EDM's 18 CIFAR-10 steps
    # 18 steps leave a few percent of discretisation error on this problem; 64 steps almost none.
    assert variances[18] == pytest.approx(SD**2, rel=0.15)
    assert variances[64] == pytest.approx(SD**2, rel=0.02)
    assert abs(variances[64] - SD**2) < abs(variances[18] - SD**2)


# --- the CT schedule --------------------------------------------------------------------------


def test_ct_schedule_end_points_paper():
    assert cm.ct_schedule(0, 800_000, 2, 150, 0.9) == (2, pytest.approx(0.9))
    n, mu = cm.ct_schedule(800_000, 800_000, 2, 150, 0.9)
    assert n == 151 and mu == pytest.approx(math.exp(2 * math.log(0.9) / 151))


def test_ct_schedule_end_points_code_variant():
    assert cm.ct_schedule(0, 800_000, 2, 150, 0.9, variant="code") == (2, pytest.approx(0.81))
    n, mu = cm.ct_schedule(800_000, 800_000, 2, 150, 0.9, variant="code")
    assert n == 151 and mu == pytest.approx(math.exp(2 * math.log(0.9) / 150))


def test_the_ct_stage_walks_the_curriculum_forwards():
    # train_ct's own call of the schedule: N(0) = s0 at the first step, N(K) = s1 + 1 at the last, never shrinking.
    import dataclasses
    from pathlib import Path

    from pipeline.config import load
    from pipeline.train_ct import schedule

    c = dataclasses.replace(load(Path(__file__).parents[1] / "params.yaml", "proof").ct, iterations=1000)
    ns = [schedule(c, k)[0] for k in range(0, 1001, 50)]
    assert ns[0] == c.s0 and ns[-1] == c.s1 + 1 and ns == sorted(ns)
    assert schedule(dataclasses.replace(c, schedule="fixed"), 0) == (c.s1 + 1, c.mu0)


def test_ct_schedule_grows_monotonically():
    ns = [cm.ct_schedule(k, 1000, 2, 150, 0.9)[0] for k in range(0, 1001, 50)]
    assert ns == sorted(ns) and ns[0] == 2 and ns[-1] == 151


# --- Algorithm 1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [[T], [T, 0.821], [T, 5.0, 0.5]])
def test_multistep_sampling_of_exact_consistency_function_has_data_variance(sigmas):
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(200_000, 1, generator=g, dtype=torch.float64) * T
    x = cm.multistep_sample(exact_consistency, x_T, sigmas, generator=g, clip=False)
    # Var = s_d^2 + eps^2 up to s_d^2 / T^2; the standard error of a variance is var sqrt(2/n) = 0.3%.
    assert x.var().item() == pytest.approx(SD**2 + EPS**2, rel=0.015)


def test_multistep_sampling_clips_to_data_range_and_rejects_ascending_times():
    x_T = torch.randn(100, 3, 4, 4) * T
    assert cm.multistep_sample(lambda x, s: 5 * x, x_T, [T, 1.0]).abs().max() <= 1
    with pytest.raises(ValueError, match="descending"):
        cm.multistep_sample(exact_consistency, x_T, [1.0, T])


def test_loss_metrics():
    x, y = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert cm.loss_metric("l2")(x, 2 * y).tolist() == [4.0, 4.0]
    assert cm.loss_metric("l1")(x, 2 * y).tolist() == [2.0, 2.0]
    c = 0.00054 * math.sqrt(48)
    assert cm.loss_metric("pseudo_huber")(x, y)[0].item() == pytest.approx(math.sqrt(48 + c**2) - c)


# --- CD from the analytic teacher learns the exact consistency function ---------------------------


class GridStudent(nn.Module):
    """f(x, s) = (c_skip + c_out c_in a_i) x with one free scalar a_i per grid time s_i: any scale on the
    grid is representable, so the test measures the fixed point of the objective, not a network's fit."""

    def __init__(self, sigmas: torch.Tensor):
        super().__init__()
        self.sigmas = sigmas
        self.a = nn.Parameter(torch.zeros(len(sigmas)))

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        index = (sigma.reshape(-1, 1) - self.sigmas.reshape(1, -1)).abs().argmin(1)
        c_skip, c_out, c_in = cm.consistency_scalings(sigma, SD, EPS)
        return c_skip + c_out * c_in * self.a[index]

    def forward(self, x, sigma):
        scale = self.scale(torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]))
        return scale.reshape(-1, *[1] * (x.ndim - 1)) * x


def _train(loss_of_batch, student, steps, mu=0.9):
    torch.manual_seed(0)
    target = frozen_copy(student)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    for _ in range(steps):
        loss = loss_of_batch(student, target, torch.randn(512, 8) * SD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(target, student, mu)
    with torch.no_grad():
        return student.scale(student.sigmas).double()


def cd_fixed_point(sigmas: torch.Tensor, step) -> torch.Tensor:
    """The scale s_i that CD converges to on this grid: s_i = s_{i+1} * (one teacher step from t_i to t_{i+1})."""
    scales = [torch.tensor(1.0, dtype=torch.float64)]
    one = torch.ones(1, 1, dtype=torch.float64)
    for t, t2 in zip(sigmas.double().flip(0)[1:], sigmas.double().flip(0)[:-1]):  # ascending from eps
        scales.append(scales[-1] * step(exact_denoiser, one, t, t2).squeeze())
    return torch.stack(scales).flip(0)


def ct_fixed_point(sigmas: torch.Tensor) -> torch.Tensor:
    """CT's l2 optimum: s_i = s_{i+1} E[x + t2 z | x + t z = y] / y = s_{i+1} (s_d^2 + t t2) / (s_d^2 + t^2)."""
    scales = [torch.tensor(1.0, dtype=torch.float64)]
    for t, t2 in zip(sigmas.double().flip(0)[1:], sigmas.double().flip(0)[:-1]):
        scales.append(scales[-1] * (SD**2 + t * t2) / (SD**2 + t**2))
    return torch.stack(scales).flip(0)


@pytest.mark.parametrize("solver, exact_tolerance", [("heun", 0.08), ("euler", 0.35)])
def test_cd_from_analytic_teacher_learns_exact_consistency_function(solver, exact_tolerance):
    sigmas = cm.karras_sigmas(18)
    step = {"heun": cm.heun_step, "euler": cm.euler_step}[solver]
    l2 = cm.loss_metric("l2")
    learned = _train(lambda s, tgt, x: cd_loss(s, tgt, exact_denoiser, x, sigmas, step, l2), GridStudent(sigmas), 800)
    # CD finds the fixed point of its own teacher steps to within training noise ...
    assert torch.allclose(learned, cd_fixed_point(sigmas, step), rtol=0.01), learned
    # ... which is the exact map up to the solver's error on the 18-level grid (Heun 2nd order: ~6%).
    assert torch.allclose(learned, exact_consistency_scale(sigmas), rtol=exact_tolerance), learned


def test_cd_fixed_point_converges_to_exact_map_as_n_grows():
    errors = [((cd_fixed_point(cm.karras_sigmas(n), cm.heun_step) / exact_consistency_scale(cm.karras_sigmas(n)))
               - 1).abs().max().item() for n in (18, 36, 72)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.005


def test_ct_on_gaussian_data_learns_exact_consistency_function():
    sigmas = cm.karras_sigmas(18)
    l2 = cm.loss_metric("l2")
    learned = _train(lambda s, tgt, x: ct_loss(s, tgt, x, sigmas, l2), GridStudent(sigmas), 800)
    # CT's targets are single-sample estimates: its optimum is the conditional expectation above.
    assert torch.allclose(learned, ct_fixed_point(sigmas), rtol=0.03), torch.stack([learned, ct_fixed_point(sigmas)], 1)
    # As N grows (the curriculum), that optimum tends to the exact consistency function.
    fine = cm.karras_sigmas(400)
    assert torch.allclose(ct_fixed_point(fine), exact_consistency_scale(fine), rtol=0.02)
