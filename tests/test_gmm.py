"""pipeline.gmm against independent computations: Monte-Carlo posteriors, autograd, torch.distributions, the
closed-form consistency function of one Gaussian, and sample sets whose measures are known exactly.

Every tolerance is stated where it is asserted, with the reason for its size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import MultivariateNormal

from pipeline import cm
from pipeline.gmm import SIGMA_MIN, GaussianMixture, shape_mixture

ROOT = Path(__file__).resolve().parents[1]

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small() -> GaussianMixture:
    """K = 3 in d = 3x2x2 = 12, overlapping at moderate sigma: cheap for brute-force Monte Carlo."""
    return GaussianMixture.from_means(torch.randn(3, 3, 2, 2, generator=gen(0), dtype=F64), [0.5, 0.3, 0.2], 0.5)


def separated() -> GaussianMixture:
    """K = 4 in d = 3x4x4 = 48, means uniform in [-1, 1] (~5.7 apart), spread 0.05: modes far apart."""
    means = torch.rand(4, 3, 4, 4, generator=gen(1), dtype=F64) * 2 - 1
    return GaussianMixture.from_means(means, [0.4, 0.3, 0.2, 0.1], 0.05)


def noisy(gm: GaussianMixture, sigmas: list[float], per_sigma: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_sigma draws x = x0 + sigma z from p_sigma for every sigma, with the per-sample sigma (B,)."""
    g = gen(seed)
    sigma = torch.tensor(sigmas, dtype=F64).repeat_interleave(per_sigma)
    x0, _ = gm.sample(len(sigma), g)
    return x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g, dtype=F64), sigma


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- denoiser, score, density ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 2.0, 20.0])  # one-hot r_k with shrink 1/2; mixed r_k; r_k ~ pi_k
def test_denoiser_matches_monte_carlo_posterior_mean(sigma):
    # E[x0 | x] = sum_i w_i x0_i / sum_i w_i with w_i = N(x; x0_i, sigma^2 I) over 400k draws x0_i of the mixture.
    gm = small()
    prior, _ = gm.sample(400_000, gen(2))
    prior = prior.flatten(1)
    x, _ = noisy(gm, [sigma], 6, seed=3)
    log_w = -torch.cdist(x.flatten(1), prior).square() / (2 * sigma**2)  # (6, M)
    w = torch.softmax(log_w, dim=1)
    mc = w @ prior
    # Self-normalised importance sampling: SE_j^2 = sum_i w_i^2 (x0_ij - mc_j)^2 for normalised weights.
    se = torch.stack([(wi.square()[:, None] * (prior - mi).square()).sum(0) for wi, mi in zip(w, mc)]).sqrt()
    ess = 1 / w.square().sum(1)
    assert ess.min() > 100, ess  # enough effective draws for the SE to be trustworthy (the fewest here: ~225)
    z = (gm.denoiser(x, sigma).flatten(1) - mc) / se
    # Tolerance: 5 standard errors on each of 72 coordinates (a false alarm has probability ~4e-5).
    assert z.abs().max() < 5, z.abs().max()


@pytest.mark.parametrize("sigma", [0.002, 0.1, 1.0, 80.0])
def test_score_is_autograd_of_log_density_and_tweedie(sigma):
    gm = small()
    x, _ = noisy(gm, [sigma], 16, seed=4)
    x.requires_grad_(True)
    (autograd,) = torch.autograd.grad(gm.log_density(x, sigma).sum(), x)
    score = gm.score(x.detach(), sigma)
    assert relative(score, autograd) < 1e-10  # float64 rounding only
    tweedie = (gm.denoiser(x.detach(), sigma) - x.detach()) / sigma**2
    # D* - x cancels to sigma^2/v of x's size at sigma = 0.002: ~1e-11 relative rounding, so 1e-8.
    assert relative(tweedie, score) < 1e-8


@pytest.mark.parametrize("sigma", [0.0, 0.002, 1.0, 80.0])
def test_log_density_is_a_sum_of_gaussian_densities(sigma):
    gm = small()
    x, _ = noisy(gm, [sigma], 16, seed=5)
    v = gm.spread**2 + sigma**2
    components = [MultivariateNormal(mu.flatten(), v * torch.eye(gm.d, dtype=F64)) for mu in gm.means]
    density = sum(pi * c.log_prob(x.flatten(1)).exp() for pi, c in zip(gm.weights, components))
    # Densities ~e^-10 to e^-60 here: no underflow, so the direct sum is exact to float64 rounding.
    assert torch.allclose(gm.log_density(x, sigma), density.log(), rtol=1e-12, atol=1e-10)


def test_responsibilities_stay_finite_far_from_every_mode_and_dtypes_and_sigmas_broadcast():
    gm = separated()
    far = torch.full((2, 3, 4, 4), 100.0, dtype=F64)  # logits ~ -2e8 at sigma = 0: exp() of them underflows
    log_r = gm.log_responsibilities(far, 0.0)
    assert torch.isfinite(log_r).all() and torch.allclose(log_r.exp().sum(1), torch.ones(2, dtype=F64))
    assert torch.isfinite(gm.denoiser(far, 0.0)).all()
    x, sigma = noisy(gm, [0.01, 1.0, 80.0], 2, seed=6)
    rows = torch.cat([gm.denoiser(x[i : i + 1], float(s)) for i, s in enumerate(sigma)])
    assert torch.allclose(gm.denoiser(x, sigma), rows, rtol=1e-12, atol=0)  # per-sample sigma = a call per row
    out32 = gm.denoiser(x.float(), sigma.float())
    assert out32.dtype == torch.float32 and relative(out32.double(), rows) < 1e-6  # float32 input rounding


# --- consistency function ----------------------------------------------------------------------------------

SIGMAS = [0.002, 0.01, 0.1, 1.0, 10.0, 80.0]


def test_consistency_function_of_one_gaussian_is_the_closed_form():
    mu = torch.rand(1, 3, 4, 4, generator=gen(7), dtype=F64) * 2 - 1
    gm = GaussianMixture.from_means(mu, None, 0.2)
    x, sigma = noisy(gm, SIGMAS, 8, seed=8)
    exact = mu + (x - mu) * ((0.2**2 + SIGMA_MIN**2) / (0.2**2 + sigma**2)).sqrt()[:, None, None, None]  # (G7)
    f = gm.consistency_function(x, sigma)
    for i, s in enumerate(SIGMAS):
        rows = slice(8 * i, 8 * i + 8)
        # Tolerance 1e-6 relative to f* (the target solver error); the spread part f* - mu alone has
        # ~1.1e-6 at s = 0.2 (module notes), so 2e-6 relative to it.
        assert relative(f[rows], exact[rows]) < 1e-6, s
        assert relative(f[rows] - mu, exact[rows] - mu) < 2e-6, s


def test_consistency_function_solver_error_and_boundary():
    gm = separated()
    x, sigma = noisy(gm, [0.0021, *SIGMAS[1:]], 4, seed=9)
    # Doubling the steps changes f* by less than the documented solver error 4.7e-7 (relative RMS).
    assert relative(gm.consistency_function(x, sigma), gm.consistency_function(x, sigma, steps=8192)) < 4.7e-7
    for dtype in (F64, torch.float32):  # f*(x, sigma_min) = x exactly: every step has zero length
        assert torch.equal(gm.consistency_function(x.to(dtype), SIGMA_MIN), x.to(dtype))


def test_consistency_function_lands_on_modes_where_one_denoising_step_lands_on_the_mean():
    gm = separated()
    x, _ = noisy(gm, [80.0], 200, seed=10)
    f = gm.consistency_function(x, 80.0)
    assert gm.on_mode_fraction(f) == 1.0  # f* pushes p_80 to p_0.002, whose draws are all on a mode
    assert gm.mode_coverage_tv(f) < 0.1  # and in the right proportions (200 draws: TV noise ~0.05)
    euler = cm.euler_step(gm.denoiser, x, 80.0, SIGMA_MIN)  # = D*(x, 80) + (0.002/80)(x - D*)
    assert gm.on_mode_fraction(euler) == 0.0
    m, _ = gm.mean_and_covariance()
    # Within 0.1 per pixel of the mean of the means (0.03 here), while every mean sits >= 0.39 per pixel from it.
    assert ((euler.flatten(1) - m).norm(dim=1) / math.sqrt(gm.d)).max() < 0.1


# --- measures of sample sets -------------------------------------------------------------------------------


def test_true_samples_measure_as_perfect():
    gm = separated()
    y, k = gm.sample(4000, gen(11))
    per_sample = -gm.log_density(y, 0.0) / gm.d
    gap = gm.nll_gap(y, 4000, gen(12))
    # Two independent means of 4000 per-sample NLLs: tolerance 4 standard errors of their difference (~0.1).
    assert abs(gap) < 4 * per_sample.std().item() * math.sqrt(2 / 4000), gap
    # Modes 5.7 apart with spread 0.05: the most likely component is the one drawn from, so the histogram
    # is the drawn counts exactly; their multinomial noise is ~0.01.
    drawn = torch.bincount(k, minlength=4).double() / 4000
    assert gm.mode_coverage_tv(y) == pytest.approx(0.5 * float((drawn - gm.weights).abs().sum()), abs=1e-12)
    assert gm.mode_coverage_tv(y) < 0.03
    # ||z|| > sqrt(48) + 3.1 has probability 1.4e-5 per draw (chi^2_48 tail): ~0.05 of 4000 expected off-mode,
    # this seed has 1; tolerance 4 of 4000.
    assert gm.on_mode_fraction(y) >= 0.999
    _, s = gm.mean_and_covariance()
    # Finite-sample bias of the Frechet distance: tr(S)/n (mean) + ~s^2 d^2/(4n) (covariance) ~ 0.003 (0.0039
    # here); tolerance 0.02, against >= 17 for sets drawn from one mode (next test) and tr(S) = 10.5.
    assert gm.frechet_to_truth(y) < 0.02


def test_mode_collapse_measures_exactly():
    gm = separated()
    m, s = gm.mean_and_covariance()
    for k in range(4):  # every sample from one component: TV = 1 - pi_k, exactly
        y = gm.means[k] + gm.spread * torch.randn(100, 3, 4, 4, generator=gen(13 + k), dtype=F64)
        assert gm.mode_coverage_tv(y) == pytest.approx(1 - gm.weights[k].item(), abs=1e-12)
        assert gm.on_mode_fraction(y) == 1.0  # on a mode, just not spread over all of them
        assert gm.frechet_to_truth(y) > float(s.trace())  # 17 to 25 against tr(S) = 10.5
    mean_of_means = m.reshape(1, 3, 4, 4).expand(100, 3, 4, 4)
    assert gm.on_mode_fraction(mean_of_means) == 0.0
    # -ln p_0 / d at the mean of the means is ~ distance^2 / (2 s^2 d) ~ 30 nats/dim above true draws (29.4 here)
    assert gm.nll_gap(mean_of_means, 1000, gen(17)) > 10
    # Zero covariance and the exact mean: the Frechet distance is tr(S) (sqrtm(0 S) = 0), to sqrtm's rounding.
    assert gm.frechet_to_truth(mean_of_means) == pytest.approx(float(s.trace()), rel=1e-9)


def test_frechet_to_truth_of_the_exact_moments_is_zero():
    gm = small()
    m, s = gm.mean_and_covariance()
    # n points whose sample mean is m and unbiased sample covariance is S exactly: m + sqrt(n-1) Q L^T, where
    # Q (n x d) has orthonormal columns orthogonal to the ones vector and L L^T = S.
    n = 50
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=F64), torch.randn(n, gm.d, generator=gen(18),
                                                                                     dtype=F64)], 1))
    y = m + math.sqrt(n - 1) * basis[:, 1:] @ torch.linalg.cholesky(s).T
    assert torch.allclose(y.mean(0), m) and torch.allclose(torch.cov(y.T), s)
    assert abs(gm.frechet_to_truth(y.reshape(n, 3, 2, 2))) < 1e-9 * float(s.trace())  # sqrtm rounding


def test_errors_of_a_denoiser_and_of_a_consistency_function_by_closed_form():
    mu = torch.rand(1, 3, 4, 4, generator=gen(19), dtype=F64) * 2 - 1
    gm = GaussianMixture.from_means(mu, None, 0.2)
    assert gm.denoiser_error(gm.denoiser, [0.1, 80.0], 100, gen(20), dtype=F64) == {0.1: 0.0, 80.0: 0.0}
    # K = 1: the identity misses D* by (1 - c)(x - mu), c = s^2/v, so E||x - D*||^2 / d = sigma^4 / v; it misses
    # f* by (1 - a)(x - mu), a = sqrt((s^2 + eps^2)/v), so (1 - a)^2 v. Tolerance 5%: ~5 standard errors of a
    # mean of 500 x 48 squared Gaussians.
    identity = lambda x, sigma: x
    for sigma, error in gm.denoiser_error(identity, [0.1, 1.0], 500, gen(21)).items():
        assert error == pytest.approx(sigma**4 / (0.04 + sigma**2), rel=0.05)
    for sigma, error in gm.consistency_error(identity, [1.0, 80.0], 500, gen(22)).items():
        v = 0.04 + sigma**2
        assert error == pytest.approx((1 - math.sqrt((0.04 + SIGMA_MIN**2) / v)) ** 2 * v, rel=0.05)


def test_to_dict_round_trips_through_json():
    gm = separated()
    back = GaussianMixture.from_dict(json.loads(json.dumps(gm.to_dict())))
    assert torch.equal(back.weights, gm.weights) and torch.equal(back.means, gm.means)
    assert back.spread == gm.spread and back.means.dtype == F64 and back.d == 48


# --- the generated dataset (data.dataset: gmm), its samplers, measures and the proof table's claims ----------


def test_the_generated_mixture_is_one_a_one_step_denoiser_cannot_sample():
    gm = shape_mixture(8, 0.1)
    assert gm.means.shape == (8, 3, 8, 8) and gm.d == 192
    assert torch.all(gm.weights[1:] > gm.weights[:-1])  # unequal: pi_k proportional to k + 1
    assert gm.means.min() >= -0.6 and gm.means.max() <= 0.6  # 4 spreads inside [-1, 1]: clipping ~3e-5 per pixel
    distances = torch.cdist(gm.means.flatten(1), gm.means.flatten(1))
    assert distances[~torch.eye(8, dtype=torch.bool)].min() > 4  # distinct shapes: 7.0 apart at least (s = 0.1)
    m, _ = gm.mean_and_covariance()
    assert gm.on_mode_fraction(m.reshape(1, 3, 8, 8)) == 0.0
    x = 80.0 * torch.randn(500, 3, 8, 8, generator=gen(30), dtype=F64)
    one_step = cm.euler_sample(gm.denoiser, x, torch.tensor([80.0, SIGMA_MIN], dtype=F64))
    assert torch.allclose(one_step, gm.denoiser(x, 80.0), atol=0.002 * 5)  # + (0.002/80)(x - D*), |x| < 400
    assert gm.on_mode_fraction(one_step) == 0.0  # the exact denoiser's 1-step Euler sample: on no mode
    # EDM's Heun with the exact D* on 18 levels lands on the modes: the teacher's sampler can be near exact.
    heun = cm.heun_sample(gm.denoiser, x, cm.karras_sigmas(18).double())
    assert gm.on_mode_fraction(heun) > 0.98 and gm.mode_coverage_tv(heun) < 0.06  # 500 draws: TV noise ~0.04


def test_prepare_data_draws_the_mixture_and_records_it_in_the_manifest(tmp_path, monkeypatch):
    from pipeline.config import load
    from pipeline.data import load_split, to_model_range
    from pipeline.prepare_data import prepare
    from pipeline.stages import data_dir

    cfg = load(ROOT / "params.yaml", "proof", ["data.gmm.train=300", "data.gmm.test=2000"])
    monkeypatch.chdir(tmp_path)
    manifest = prepare(cfg)
    folder = tmp_path / data_dir(cfg)
    gm = GaussianMixture.from_dict(json.loads((folder / "manifest.json").read_text())["mixture"])
    assert torch.equal(gm.means, shape_mixture(8, 0.1).means) and manifest["source"] == "generated"
    assert manifest["splits"]["train"]["count"] == 300 and manifest["splits"]["test"]["count"] == 2000
    images, labels = load_split(folder, "test")
    assert images.shape == (2000, 8, 8, 3) and images.dtype == "uint8"
    y = to_model_range(images).double()
    # uint8 rounding adds 1/127.5-wide uniform noise (std 0.0023 against s = 0.1): draws stay draws of the mixture.
    assert torch.equal(torch.as_tensor(labels), gm.log_responsibilities(y, 0.0).argmax(1))  # labels: the component
    assert gm.on_mode_fraction(y) == 1.0 and gm.mode_coverage_tv(y) < 0.05  # 2000 draws: TV noise ~0.02
    assert abs(gm.nll_per_dim(y) - gm.nll_per_dim(gm.sample(2000, gen(31))[0])) < 0.02  # rounding: ~3e-4


def test_sample_sets_of_a_samples_file_are_named_by_solver_and_nfe(tmp_path):
    from pipeline.evaluate import sample_sets

    images = {key: np.zeros((n, 8, 8, 3), np.uint8) for key, n in (("nfe35", 4), ("euler_nfe1", 2), ("heun_nfe3", 3),
                                                                    ("euler_nfe4", 5))}
    sigmas = {f"sigmas_{key}": np.arange(3.0) for key in images}
    np.savez(tmp_path / "teacher.npz", labels=np.zeros(4), **images, **sigmas)
    heads = [head for _, head, _ in sample_sets(tmp_path / "teacher.npz")]
    assert heads == [{"nfe": 35, "num_samples": 4, "sigmas": [0.0, 1.0, 2.0]},
                     {"nfe": 1, "num_samples": 2, "sigmas": [0.0, 1.0, 2.0], "sampler": "euler"},
                     {"nfe": 4, "num_samples": 5, "sigmas": [0.0, 1.0, 2.0], "sampler": "euler"},
                     {"nfe": 3, "num_samples": 3, "sigmas": [0.0, 1.0, 2.0], "sampler": "heun"}]


def proof_table(changes: dict | None = None) -> pd.DataFrame:
    """A proof table where every claim holds; changes: {(model, sampler, nfe): {measure: value}}."""
    rows = {("teacher", "Euler", 1): 3.7, ("teacher", "Euler", 2): 3.6, ("teacher", "EDM Heun", 35): 0.17,
            ("exact D*", "Euler", 1): 6.0, ("exact D*", "EDM Heun", 35): 0.10, ("CD", "Alg. 1", 1): 0.3,
            ("CD", "Alg. 1", 2): 0.25, ("CT", "Alg. 1", 1): 0.5, ("CT", "Alg. 1", 2): 0.4}
    table = []
    for (model, sampler, nfe), gap in rows.items():
        row = {"model": model, "sampler": sampler, "nfe": nfe, "nll_gap": gap, "on_mode": 0.0 if gap > 1 else 0.9,
               "mode_tv": 0.04, "frechet": 10 * gap}
        table.append(row | (changes or {}).get((model, sampler, nfe), {}))
    return pd.DataFrame(table)


def test_each_claim_of_the_proof_table_fails_when_its_numbers_break_it():
    from pipeline import proof

    assert [c.holds for c in proof.claims(proof_table(), 35)] == [True] * 5  # (i), (ii) CD, (ii) CT, (iii), (iv)
    broken = {  # one change per claim, just past its margin, and which claims it must fail
        "(i) CD's Frechet only 4.9x better": ({("CD", "Alg. 1", 1): {"frechet": 36 / 4.9}}, [0]),
        "(i) CD's NLL gap not 0.2 better": ({("CD", "Alg. 1", 1): {"nll_gap": 3.6 - 0.199}}, [0]),
        "(ii) CD 2 steps worse": ({("CD", "Alg. 1", 2): {"nll_gap": 0.3 + 0.051}}, [1]),
        "(ii) CT 2 steps drop a mode": ({("CT", "Alg. 1", 2): {"mode_tv": 0.04 + 0.051}}, [2]),
        "(iii) CT far from CD": ({("CT", "Alg. 1", 1): {"nll_gap": 0.3 + 6.0 / 3 + 0.001}}, [3]),
        "(iii) CT drops a mode": ({("CT", "Alg. 1", 1): {"mode_tv": 0.04 + 0.051}}, [3]),
        "(iv) teacher off": ({("teacher", "EDM Heun", 35): {"nll_gap": 0.10 + 0.101}}, [4]),
        "(iv) teacher drops a mode": ({("teacher", "EDM Heun", 35): {"mode_tv": 0.101}}, [4]),
    }
    for name, (change, failing) in broken.items():
        holds = [c.holds for c in proof.claims(proof_table(change), 35)]
        assert [i for i, h in enumerate(holds) if not h] == failing, name


@pytest.mark.parametrize(("override", "message"), [
    ("data.hflip=true", "data.hflip: must be false for dataset gmm"),
    ("data.gmm.spread=0.5", "data.gmm.spread: must be in [0.02, 0.1]"),
    ("data.gmm.components=1", "data.gmm.components: must be >= 2"),
    ("sample.teacher_heun_nfe=[2]", "sample.teacher_heun_nfe: EDM's Heun takes 2 n - 1"),
    ("network.attn_resolutions=[4]", None),  # valid here; build_network refuses it for the MLP (test_networks)
])
def test_the_proof_preset_validates_and_bad_mixture_knobs_are_named(override, message):
    from pipeline.config import ConfigError, load

    assert load(ROOT / "params.yaml", "proof").data.dataset == "gmm"
    if message is None:
        load(ROOT / "params.yaml", "proof", [override])
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(ROOT / "params.yaml", "proof", [override])
