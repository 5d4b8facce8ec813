"""iCT and ECT against independent computations: the curriculum N(k) by hand, the index distribution against
math.erf and a histogram of draws, the pseudo-Huber distance of the whole sample, lambda on the grid, ECT's r(t)
by hand, the no-EMA target that takes no gradient, one dropout mask in both passes, and the stages in the DAG.
(The 1 vs 2 process equality is in test_distributed.py, the micro DAGs in test_experiments.py, the proof rows in
test_proof.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_official_code import MaskOnly  # f(x, t) = dropout(1): its output is its mask
from torch import nn

from pipeline import cm
from pipeline.config import ConfigError, load
from pipeline.models import TunedConsistencyModel, build_model
from pipeline.noise import SharedDropout, TorchNoise
from pipeline.stages import models, stages, table3_stage, teacher_needed
from pipeline.train_ct import _Online, ct_loss, level_index
from pipeline.train_ect import ect_loss

PARAMS = "params.yaml"


# --- iCT ---------------------------------------------------------------------------------------------------------

def test_the_exponential_curriculum_for_400k_steps_doubles_every_50k():
    # K' = floor(400000 / (log2 floor(1280 / 10) + 1)) = floor(400000 / 8) = 50000
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    assert [cm.ict_schedule(k, 400_000) for k in range(0, 400_000, 50_000)] == expected
    for stage, n in enumerate(expected[1:], start=1):  # the boundaries: the last step of a stage, the first of the next
        assert cm.ict_schedule(50_000 * stage - 1, 400_000) == expected[stage - 1]
        assert cm.ict_schedule(50_000 * stage, 400_000) == n
    assert cm.ict_schedule(399_999, 400_000) == 1281  # capped at s1 + 1


def test_the_level_index_follows_the_discretised_lognormal():
    sigmas = cm.karras_sigmas(21)  # descending, float32
    by_hand = []  # iCT: P(i) prop. to erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - ...) ...)
    for big, small in zip(sigmas.tolist(), sigmas.tolist()[1:]):
        by_hand.append(math.erf((math.log(big) + 1.1) / (math.sqrt(2) * 2.0))
                       - math.erf((math.log(small) + 1.1) / (math.sqrt(2) * 2.0)))
    by_hand = np.array(by_hand) / sum(by_hand)
    probs = cm.lognormal_index_probs(sigmas, -1.1, 2.0)
    np.testing.assert_allclose(probs.numpy(), by_hand, rtol=1e-5)
    draws = 400_000
    torch.manual_seed(0)
    counts = np.bincount(level_index(TorchNoise(draws), sigmas, probs).numpy(), minlength=20)
    # Each count is binomial: within 5 standard deviations of its mean (a uniform index is hundreds away).
    np.testing.assert_array_less(np.abs(counts - draws * by_hand), 5 * np.sqrt(draws * by_hand * (1 - by_hand)) + 1)
    uniform = np.bincount(level_index(TorchNoise(draws), sigmas).numpy(), minlength=20)
    assert np.abs(uniform - draws * by_hand).max() > 50 * np.sqrt(draws / 20)


def test_pseudo_huber_is_taken_on_the_whole_sample_with_c_from_its_dimension():
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    assert c == pytest.approx(0.02993, abs=1e-5)  # iCT's CIFAR-10 value
    whole = np.sqrt(((x - y).numpy() ** 2).reshape(4, -1).sum(1) + c**2) - c
    np.testing.assert_allclose(cm.loss_metric("pseudo_huber")(x, y).numpy(), whole, rtol=1e-12)
    per_pixel = (np.sqrt((x - y).numpy() ** 2 + c**2) - c).reshape(4, -1).sum(1)  # what public ports compute
    assert np.abs(per_pixel - whole).min() > 100  # (sum of |d| against the norm of d)
    np.testing.assert_allclose(cm.loss_metric("pseudo_huber", 0.5)(x, y).numpy(),
                               np.sqrt(((x - y).numpy() ** 2).reshape(4, -1).sum(1) + 0.25) - 0.5, rtol=1e-12)


class _Pick:
    """Noise that picks given level pairs and no noise (z = 0)."""

    def __init__(self, n: list[int]):
        self.n = torch.tensor(n)

    def integers(self, stream, high):
        return self.n

    def normal_like(self, stream, x):
        return torch.zeros_like(x)


def test_lambda_is_one_over_the_gap_of_each_rows_levels():
    sigmas = cm.karras_sigmas(11).double()
    picked = [0, 3, 9]
    x = torch.zeros(3, 2, dtype=torch.float64)
    model = lambda x, sigma: x + 1  # noqa: E731  # distance to the target: 1 per dimension
    target = lambda x, sigma: x  # noqa: E731
    l2 = cm.loss_metric("l2")
    weighted = ct_loss(model, target, x, sigmas, l2, noise=_Pick(picked), weighted=True)
    by_hand = np.mean([1 / (sigmas[n].item() - sigmas[n + 1].item()) for n in picked])
    assert weighted.item() == pytest.approx(by_hand, rel=1e-12)
    assert ct_loss(model, target, x, sigmas, l2, noise=_Pick(picked)).item() == 1.0


class _Scale(nn.Module):
    """f(x, sigma) = w x: its gradient by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        return self.w * x


def test_the_online_target_takes_no_gradient():
    torch.manual_seed(0)
    model, sigmas = _Scale(), cm.karras_sigmas(5).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    noise = TorchNoise(6)
    torch.manual_seed(1)
    loss = ct_loss(model, _Online(model, dropout=True), x, sigmas, cm.loss_metric("l2"), noise=noise)
    loss.backward()
    # By hand, with the same draws: d/dw mean_rows mean_dims (w x_t - sg(w x_t2))^2 = mean 2 (w x_t - w x_t2) x_t.
    torch.manual_seed(1)
    n = torch.randint(0, 4, (6,))
    z = torch.randn(6, 4, dtype=torch.float64)
    x_t, x_t2 = x + sigmas[n, None] * z, x + sigmas[n + 1, None] * z
    w = 1.5
    stop_grad = (2 * (w * x_t - w * x_t2) * x_t).mean()
    both = (2 * (w * x_t - w * x_t2) * (x_t - x_t2)).mean()  # what a target that passed its gradient would give
    assert model.w.grad.item() == pytest.approx(stop_grad.item(), rel=1e-12)
    assert abs(stop_grad - both) > 0.1


@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_the_online_target_replays_the_online_pass_dropout_mask(mode):
    x, sigmas, model = torch.zeros(4, 3, 8, 8), cm.karras_sigmas(5), MaskOnly().train()
    torch.manual_seed(0)
    loss = ct_loss(model, _Online(model, dropout=True), x, sigmas, cm.loss_metric("l2"), noise=TorchNoise(4),
                   dropout=SharedDropout(mode, "cpu"))
    assert (loss.item() == 0) == (mode == "shared")  # one mask: the same output in both passes


def test_an_online_target_without_dropout_is_evaluated_in_eval_mode():
    model = MaskOnly().train()
    assert torch.equal(_Online(model, dropout=False)(torch.zeros(2, 3), None), torch.ones(2, 3))
    assert model.training  # back in training mode for the online pass


def test_the_ict_preset_trains_from_scratch_with_its_network_change():
    cfg = load(PARAMS, "ict_cifar10")
    assert models(cfg) == ("ict",) and not teacher_needed(cfg)
    assert [s.name for s in stages(cfg)] == ["prepare_data", "reference_stats", "train_ict", "sample_ict",
                                             "evaluate_ict", "tables", "edit_ict"]
    net = build_model("ict", cfg.raw["network"], cfg.raw["diffusion"], 0.3).net
    assert net.map_noise.freqs.std().item() == pytest.approx(0.02, rel=0.2)  # NCSN++'s scale 16 -> 0.02
    i = cfg.ict
    assert (i.schedule, i.target, i.index, i.weighting, i.metric, i.target_dropout) == (
        "exponential", "online", "lognormal", "inverse_gap", "pseudo_huber", "shared")
    assert load(PARAMS, "ict_imagenet64").network.options == {"scale_shift_norm": False}


# --- ECT ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t, stage, r", [
    (80.0, 0, 40.0),  # n(80) = 1 + 8 sigmoid(-80) = 1: r = t / 2
    (1.0, 0, 0.0),  # n(1) = 3.1515: 1 - n / 2 < 0, clamped: the target is the clean image
    (1.0, 3, 0.8030292893150024),  # 1 - 3.1515 / 16
    (0.1, 1, 0.0),
    (0.1, 7, 0.0981249349608717),  # n(0.1) = 4.8002: 0.1 (1 - 4.8002 / 256)
    (5.0, 2, 4.341535745378576),
])
def test_ect_r_of_t_at_chosen_stages(t, stage, r):
    assert cm.ect_r(torch.tensor([t], dtype=torch.float64), stage).item() == pytest.approx(r, rel=1e-12, abs=1e-15)
    if stage > 0:  # const mapping, n = 1: r = t (1 - 2^-(a+1))
        const = cm.ect_r(torch.tensor([t], dtype=torch.float64), stage, mapping="const").item()
        assert const == pytest.approx(t * (1 - 2.0 ** -(stage + 1)), rel=1e-12)


def _ect(**knobs):
    return load(PARAMS, "ect_cifar10", [f"ect.{k}={v}" for k, v in knobs.items()]).ect


class _NanAtZero(nn.Module):
    """f(x, t) = w x, but NaN at t = 0 (as a network fed ln 0)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.9, dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None):
        out = self.w * x
        return torch.where((sigma == 0).reshape(-1, 1), torch.full_like(out, math.nan), out)


def test_ect_loss_by_hand_with_a_clean_target_where_r_is_zero_and_no_target_gradient():
    torch.manual_seed(0)
    e, model = _ect(), _NanAtZero()
    x = torch.randn(64, 5, dtype=torch.float64)
    torch.manual_seed(1)
    loss = ect_loss(model, model, x, 0, e, noise=TorchNoise(64))
    loss.backward()
    torch.manual_seed(1)  # the same draws, by hand
    t = (-1.1 + 2.0 * torch.randn(64).double()).exp()
    z = torch.randn(64, 5, dtype=torch.float64)
    n = 1 + 8 / (1 + torch.exp(t))  # 1 + k sigmoid(-b t)
    r = (t * (1 - n / 2)).clamp(min=0)
    assert 0 < (r == 0).sum() < 64  # both kinds of rows
    w = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    target = torch.where((r > 0)[:, None], 0.9 * (x + r[:, None] * z), x)  # no gradient through the target
    by_hand = (((w * (x + t[:, None] * z) - target) ** 2).sum(1).sqrt() / (t - r)).mean()  # c = 0, w = 1/(t - r)
    by_hand.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(by_hand.item(), rel=1e-12)
    assert model.w.grad.item() == pytest.approx(w.grad.item(), rel=1e-10)


def test_ect_snr_weighting_and_c():
    torch.manual_seed(0)
    e = _ect(weighting="snr", c=0.06)
    model = _NanAtZero()
    x = torch.randn(16, 5, dtype=torch.float64)
    torch.manual_seed(1)
    loss = ect_loss(model, model, x, 3, e, sigma_data=0.5, noise=TorchNoise(16)).item()
    torch.manual_seed(1)
    t = (-1.1 + 2.0 * torch.randn(16).double()).exp()
    z = torch.randn(16, 5, dtype=torch.float64)
    r = cm.ect_r(t, 3)
    target = torch.where((r > 0)[:, None], 0.9 * (x + r[:, None] * z), x)
    norm2 = ((0.9 * (x + t[:, None] * z) - target) ** 2).sum(1)
    assert loss == pytest.approx(((norm2 + 0.06**2).sqrt() - 0.06).mul(1 / t**2 + 4).mean().item(), rel=1e-12)


def test_ect_gives_both_passes_one_dropout_mask():
    model, e = MaskOnly().train(), _ect(p_mean=3.0, p_std=0.1)  # t near 20: r > 0 in every row
    torch.manual_seed(0)
    for mode in ("shared", "independent"):
        loss = ect_loss(model, model, torch.zeros(8, 3, 4, 4), 7, e, noise=TorchNoise(8),
                        dropout=SharedDropout(mode, "cpu"))
        assert (loss.item() == 0) == (mode == "shared")


def test_the_tuned_model_trains_with_edm_scalings_and_samples_with_the_shifted_boundary():
    class Seven(nn.Module):
        def forward(self, x, c_noise, labels):
            return torch.full_like(x, 7.0)

    model = TunedConsistencyModel(Seven(), 0.5, 0.002, eval_sigma_min=0.003)
    x = torch.randn(2, 3, 4, 4)
    model.train()
    c_skip, c_out, _ = model.scalings(torch.tensor(0.0))
    assert (c_skip.item(), c_out.item()) == (1.0, 0.0)  # f(x, 0) = x: r = 0 is denoising
    model.eval()
    assert torch.allclose(model(x, torch.tensor(0.003)), x)  # the boundary f(x, 0.003) = x (official: eval only)
    assert not torch.allclose(model(x, torch.tensor(0.5)), x)


def test_the_ect_preset_starts_from_the_imported_ddpmpp_teacher():
    cfg = load(PARAMS, "ect_cifar10")
    assert models(cfg) == ("teacher", "ect") and cfg.network.arch == "ddpmpp"
    assert [s.name for s in stages(cfg)][:4] == ["prepare_data", "reference_stats", "import_teacher", "train_ect"]
    e = cfg.ect
    assert (e.batch, e.lr, e.optimizer, e.dropout, e.ema, e.iterations) == (128, 1e-4, "radam", 0.2, 0.9999, 400_000)
    assert (e.q, e.k, e.b, e.c, e.weighting, e.stage_iterations, e.eval_sigma_min) == (
        2.0, 8.0, 1.0, 0.0, "inverse_gap", 25_000, 0.003)


# --- configuration and the DAG --------------------------------------------------------------------------------

def test_run_models_and_edit_model_are_checked_before_any_job():
    with pytest.raises(ConfigError, match="run.models: a non-empty list of distinct models"):
        load(PARAMS, "tiny", ["run.models=[teacher, sCM]"])
    with pytest.raises(ConfigError, match="edit.model: cd is not one of run.models"):
        load(PARAMS, "tiny", ["run.models=[ict]"])
    with pytest.raises(ConfigError, match=r"ect.q: must be > 1"):
        load(PARAMS, "ect_cifar10", ["ect.q=1"])


def test_table3_reads_the_consistency_models_of_each_experiment():
    cfgs = {name: load(PARAMS, name) for name in ("paper_cifar10", "ict_cifar10", "ect_cifar10")}
    stage = table3_stage(cfgs)
    assert stage.cmd == "python -m pipeline.tables --table3 paper_cifar10 ict_cifar10 ect_cifar10"
    assert stage.outs == ["results/tables/table3.csv", "results/tables/table3.md"]
    read = [d.split("/")[-1].split("-")[0] for d in stage.deps if d.startswith("results/metrics/")]
    assert read == ["cd", "ct", "ict", "ect"]  # not the teachers


def test_shared_masks_switch_inductor_to_eager_random_ops_and_replay_under_compile():
    import torch._inductor.config as inductor

    inductor.fallback_random = False
    SharedDropout("independent", "cpu")
    assert inductor.fallback_random is False
    SharedDropout("shared", "cpu")
    assert inductor.fallback_random is True  # the compiled graphs draw through the generator that replay() restores
    model = MaskOnly().train()
    model.compile()
    dropout, x = SharedDropout("shared", "cpu"), torch.zeros(4, 64)
    dropout.remember()
    first = model(x, None)
    dropout.replay()
    assert torch.equal(first, model(x, None))
