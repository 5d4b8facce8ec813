"""The knobs where the official code (openai/consistency_models, openai/consistency_models_cifar10) differs from
the paper: each changes exactly its behaviour, and `follow: code` selects the official value per preset.
Also the fp16 overflow step, which must advance nothing."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import bench, cm, config, datasets
from pipeline.data import Batches, to_uint8, uint8_on_device
from pipeline.distill_cd import cd_loss
from pipeline.lpips import LPIPS
from pipeline.models import atomic_save, build_model
from pipeline.noise import SharedDropout, TorchNoise
from pipeline.sample import generate
from pipeline.search_two_step import search_range
from pipeline.stages import checkpoint
from pipeline.train_ct import ct_loss

ROOT = Path(__file__).resolve().parents[1]


def preset(name: str, follow: str = "paper", *sets: str) -> config.Config:
    return config.load(ROOT / "params.yaml", name, [f"follow={follow}", *sets])


# --------------------------------------------------------------------------------------------------
# follow: code, per preset (docs/fidelity.md's table says the same).

CODE_VALUES = {  # preset -> {knob: (paper value, official code's value)}
    "paper_cifar10": {"ct.lr": (4e-4, 2e-4), "cd.init_weights": ("ema", "online"), "data.sampling":
                      ("replacement", "epochs"), "sample.uint8": ("round", "truncate"),
                      "cd.target_dropout": ("none", "shared"), "ct.target_dropout": ("none", "shared"),
                      "ct.schedule": ("paper", "code"), "lpips.pooling": ("max", "max"),
                      "network.c_noise": ("edm", "edm"), "teacher.optimizer": ("adam", "adam")},
    "paper_imagenet64": {"network.c_noise": ("adm", "adm"), "lpips.pooling": ("max", "avg"),
                         "teacher.optimizer": ("adam", "radam"), "sample.teacher_clip": (False, True),
                         "search.indices": ("interior", "all"), "search.num_samples": (10000, 50000),
                         "data.sampling": ("replacement", "epochs"), "sample.uint8": ("round", "truncate"),
                         "ct.lr": (8e-6, 1e-4), "cd.init_weights": ("ema", "ema")},
    "paper_lsun_bedroom": {"data.lsun_resize": ("halve_bicubic", "box"), "network.c_noise": ("adm", "adm"),
                           "lpips.pooling": ("max", "avg"), "cd.batch": (2048, 256), "ct.lr": (1e-5, 5e-5)},
    "paper_lsun_cat": {"data.lsun_resize": ("halve_bicubic", "box"), "teacher.optimizer": ("adam", "radam"),
                       "ct.target_dropout": ("none", "shared")},
}


@pytest.mark.parametrize("name", sorted(CODE_VALUES))
def test_follow_code_selects_the_official_values(name):
    cfgs = {follow: preset(name, follow) for follow in ("paper", "code")}
    for knob, expected in CODE_VALUES[name].items():
        got = tuple(cfgs[f].section(knob) for f in ("paper", "code"))
        assert got == expected, f"{name}: {knob}"


def test_an_openai_source_needs_the_adm_network():
    with pytest.raises(config.ConfigError, match="teacher.source: 'openai' imports an ADM UNet"):
        preset("paper_cifar10", "paper", "teacher.source=openai")
    assert preset("paper_imagenet64", "paper", "cd.source=openai").cd.source == "openai"


# --------------------------------------------------------------------------------------------------
# (b) LPIPS pooling.

def test_lpips_avg_pooling_replaces_only_the_pooling_layers():
    torch.manual_seed(0)
    max_pool = LPIPS()
    avg_pool = LPIPS(pooling="avg")
    avg_pool.load_state_dict(max_pool.state_dict())  # the same weights: pooling has none
    layers = [(a, b) for sa, sb in zip(max_pool.slices, avg_pool.slices) for a, b in zip(sa, sb)]
    changed = [(type(a).__name__, type(b).__name__) for a, b in layers if type(a) is not type(b)]
    assert changed == [("MaxPool2d", "AvgPool2d")] * 4  # the 5th pool of VGG16 comes after relu5_3: not used
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(max_pool(x, x), torch.zeros(2)) and torch.equal(avg_pool(x, x), torch.zeros(2))
    assert not torch.allclose(max_pool(x, y), avg_pool(x, y))
    # relu1_2 comes before any pooling: its term is the same under both
    first = [torch.nn.functional.normalize(max_pool.slices[0]((v - max_pool.shift) / max_pool.scale), dim=1,
                                           eps=1e-10) for v in (x, y)]
    assert max_pool.lins[0]((first[0] - first[1]).square()).mean((1, 2, 3)).abs().sum() > 0
    with pytest.raises(ValueError, match="pooling"):
        LPIPS(pooling="min")


# --------------------------------------------------------------------------------------------------
# (f) uint8 conversion.

def test_uint8_truncates_or_rounds():
    levels = torch.tensor([0.0, 0.4, 0.5, 0.6, 10.6, 254.5, 254.99, 255.0])
    x = (levels / 127.5 - 1).double().reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    rounded, truncated = to_uint8(x)[0, 0, :, 0], to_uint8(x, "truncate")[0, 0, :, 0]
    assert rounded.tolist() == [0, 0, 0, 1, 11, 254, 255, 255]  # round half to even at 0.5 and 254.5
    assert truncated.tolist() == [0, 0, 0, 0, 10, 254, 254, 255]
    assert uint8_on_device(torch.full((1, 3, 1, 1), 7.0)).flatten().tolist() == [255] * 3  # clipped first
    with pytest.raises(ValueError):
        uint8_on_device(x, "floor")


def test_samples_truncated_are_the_rounded_ones_or_one_level_darker():
    model = build_model("cd", {"arch": "ncsnpp", "model_channels": 8, "channel_mult": [1], "num_blocks": 1,
                               "attn_resolutions": []}, {"sigma_data": 0.5, "sigma_min": 0.002}, 0.0, 8)
    for p in model.parameters():  # a non-trivial output: F's last layer starts at zero
        nn.init.normal_(p, std=0.1)
    model.eval()
    run = functools.partial(generate, model, "cd", [80.0], 6, 4, 0, torch.device("cpu"), progress=False)
    rounded, truncated = run()[0].astype(int), run(uint8="truncate")[0].astype(int)
    difference = rounded - truncated
    assert set(np.unique(difference)) <= {0, 1} and 0.3 < difference.mean() < 0.7


# --------------------------------------------------------------------------------------------------
# (g) the search range, and (h) the teacher's clamp.

def test_search_range_all_is_the_official_begin_and_end():
    assert search_range(40, "interior") == (1, 38)
    assert search_range(40, "all") == (0, 39)
    f = lambda x, sigma: x / (1 + sigma.reshape(-1, 1, 1, 1))  # noqa: E731
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 80
    grid = cm.karras_sigmas(40).tolist()
    twice_at_max = cm.multistep_sample(f, x_T, [80.0, grid[0]], torch.Generator().manual_seed(1))
    assert grid[0] == 80.0 and torch.isfinite(twice_at_max).all()
    one_step = cm.multistep_sample(f, x_T, [80.0], torch.Generator().manual_seed(1))
    at_min = cm.multistep_sample(f, x_T, [80.0, grid[-1]], torch.Generator().manual_seed(1))
    expected = f(one_step, torch.full((2,), grid[-1])).clamp(-1, 1)  # no noise at sigma_min: f once more
    assert torch.allclose(at_min, expected, atol=1e-5)  # the grid holds sigma_min in float32
    with pytest.raises(ValueError, match="descending"):
        cm.multistep_sample(f, x_T, [1.0, 2.0])


def test_teacher_clip_clamps_every_denoised_output():
    sigmas = cm.karras_sigmas(4)
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 80
    seen = []

    def denoiser(x, sigma):  # overshoots the data range
        out = 3 * torch.tanh(x)
        seen.append(out.abs().max().item())
        return out

    clipped = cm.heun_sample(denoiser, x_T, sigmas, clip=True)
    plain = cm.heun_sample(denoiser, x_T, sigmas)
    assert clipped.abs().max() <= 1 and plain.abs().max() > 1.5

    def by_hand(x, sigma):
        return denoiser(x, sigma).clamp(-1, 1)

    assert torch.equal(clipped, cm.heun_sample(by_hand, x_T, sigmas))


# --------------------------------------------------------------------------------------------------
# (i) the target network's dropout.

class MaskOnly(nn.Module):
    """f(x, t) = dropout(1): its output is its dropout mask (scaled), whatever x and t."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x, sigma, class_labels=None):
        return self.dropout(torch.ones_like(x))


@pytest.mark.parametrize("loss", ["cd", "ct"])
def test_shared_target_dropout_gives_target_and_online_one_mask(loss):
    x, sigmas = torch.zeros(4, 3, 8, 8), cm.karras_sigmas(5)
    l2 = lambda a, b: (a - b).square().flatten(1).mean(1)  # noqa: E731

    def run(mode: str) -> float:
        online, target = MaskOnly().train(), MaskOnly().train() if mode != "none" else MaskOnly().eval()
        torch.manual_seed(0)
        dropout = SharedDropout(mode, "cpu")
        if loss == "cd":
            value = cd_loss(online, target, lambda x, s: x, x, sigmas, cm.euler_step, l2, noise=TorchNoise(4),
                            dropout=dropout)
        else:
            value = ct_loss(online, target, x, sigmas, l2, noise=TorchNoise(4), dropout=dropout)
        return value.item()

    assert run("shared") == 0  # the same mask: identical outputs
    assert run("independent") > 0.5 and run("none") > 0.5
    after = torch.manual_seed(5).get_state()
    SharedDropout("independent", "cpu").remember()
    assert torch.equal(torch.get_rng_state(), after)  # independent and none leave the generator alone


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench.write_synthetic_workspace(preset("micro"), images=32)
    return lambda kind, *sets: bench.training_step(preset("micro", "paper", *sets), kind)


def test_target_dropout_puts_the_target_in_training_mode(synthetic):
    for mode, training in (("none", False), ("shared", True), ("independent", True)):
        step = synthetic("ct", f"ct.target_dropout={mode}", "ct.dropout=0.2")
        assert step.func.__self__.extra["target"].training is training


# --------------------------------------------------------------------------------------------------
# (d) teacher optimiser, (e) the student's initial weights.

def test_teacher_optimizer_radam(synthetic):
    assert type(synthetic("teacher").func.__self__.optimizer) is torch.optim.Adam
    assert type(synthetic("teacher", "teacher.optimizer=radam").func.__self__.optimizer) is torch.optim.RAdam


@pytest.mark.parametrize("kind", ["cd", "ct"])
def test_student_starts_from_the_teachers_ema_or_online_weights(synthetic, kind):
    cfg = preset("micro")
    teacher = build_model("teacher", cfg.raw["network"], cfg.raw["diffusion"], 0.0, 32)
    online = {k: torch.randn_like(v) for k, v in teacher.state_dict().items()}
    ema = {k: torch.randn_like(v) for k, v in teacher.state_dict().items()}
    atomic_save({"kind": "teacher", "step": 1, "network": cfg.raw["network"], "diffusion": cfg.raw["diffusion"],
                 "shape": {"resolution": 32, "label_dim": 0}, "model": online, "ema": ema},
                checkpoint(cfg, "teacher"))
    sets = ["ct.init_from_teacher=true"] if kind == "ct" else []
    for weights, expected in (("ema", ema), ("online", online)):
        student = synthetic(kind, *sets, f"{kind}.init_weights={weights}").func.__self__.model
        got = student.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), weights


# --------------------------------------------------------------------------------------------------
# (j) LSUN preprocessing.

def test_lsun_box_resize_is_one_box_resize_then_the_centre_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 417, 3), dtype=np.uint8))
    box = datasets.box_resize_crop(image, 64)
    scale = 64 / 300
    by_hand = np.asarray(image.resize((round(417 * scale), 64), resample=Image.Resampling.BOX))
    left = (by_hand.shape[1] - 64) // 2
    assert box.shape == (64, 64, 3) and np.array_equal(box, by_hand[:, left:left + 64])
    halved = datasets.center_crop_resize(image, 64)  # 300 -> 150 -> 75 by BOX, then bicubic to 64
    assert halved.shape == (64, 64, 3) and not np.array_equal(box, halved)
    assert datasets.RESIZES["box"] is datasets.box_resize_crop


def test_lsun_reader_uses_the_chosen_resize(tmp_path):
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("test", 1)):
        (tmp_path / split).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / split / f"{i}.png")
    spec = datasets.DATASETS["lsun_bedroom"]
    for resize, function in datasets.RESIZES.items():
        train = datasets.raw_splits(spec, tmp_path, lsun_resize=resize)["train"]
        images = np.concatenate([chunk[0] for chunk in train.chunks()])
        expected = [function(Image.open(tmp_path / "train" / f"{i}.png"), spec.resolution) for i in range(3)]
        assert np.array_equal(images, np.stack(expected)), resize


# --------------------------------------------------------------------------------------------------
# (k) shuffled epochs.

def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(2, axis=1)
    return images, np.arange(n)


@pytest.mark.parametrize("placement", ["device", "stream"])
def test_epochs_visit_every_image_once_per_pass_and_resume(placement):
    images, labels = _split(23)
    batches = Batches(images, labels, 5, False, seed=4, placement=placement, sampling="epochs")
    seen = [batches.next()[2].tolist() for _ in range(8)]  # 4 batches per pass of 23 (3 dropped), two passes
    for epoch in (seen[:4], seen[4:]):
        rows = sum(epoch, [])
        assert len(rows) == len(set(rows)) == 20
    assert sum(seen[:4], []) != sum(seen[4:], [])  # each pass its own order
    state = batches.state_dict()
    following = [batches.next()[2].tolist() for _ in range(6)]
    resumed = Batches(images, labels, 5, False, seed=99, placement=placement, sampling="epochs")
    resumed.load_state_dict(state)
    assert [resumed.next()[2].tolist() for _ in range(6)] == following
    draws = Batches(images, labels, 5, False, seed=4, placement=placement)  # replacement: repeats within 20 rows
    rows = sum((draws.next()[2].tolist() for _ in range(4)), [])
    assert len(set(rows)) < 20
    with pytest.raises(ValueError, match="does not fit"):
        Batches(images, labels, 24, False, seed=0, sampling="epochs")


# --------------------------------------------------------------------------------------------------
# The fp16 overflow step.

def test_an_fp16_overflow_advances_nothing(synthetic):
    step = synthetic("cd")
    training = step.func.__self__
    training.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # loss scaling as fp16 on CUDA
    loss_fn = step.keywords["loss_fn"]
    overflow = {"now": False}

    def exploding(step_index, x, labels, noise):
        loss, logs = loss_fn(step_index, x, labels, noise)
        return (loss * float("inf") if overflow["now"] else loss), logs

    def snapshot() -> dict:
        return {name: {k: v.clone() for k, v in m.state_dict().items()}
                for name, m in (("model", training.model), ("ema", training.ema),
                                ("target", training.extra["target"]))}

    step(loss_fn=exploding)  # one real step first: EMA and target then differ from the online weights
    overflow["now"] = True
    before, step_count = snapshot(), training.step
    assert any(not torch.equal(before["model"][k], before["ema"][k]) for k in before["model"])
    optimizer_state = {k: {"exp_avg": v["exp_avg"].clone()}
                       for k, v in training.optimizer.state_dict()["state"].items()}
    loss, _ = step(loss_fn=exploding)
    assert loss is None and training.step == step_count and training.skipped == 1
    after = snapshot()
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])
    assert all(torch.equal(v["exp_avg"], optimizer_state[k]["exp_avg"])  # no Adam moment moved
               for k, v in training.optimizer.state_dict()["state"].items())
    assert training.scaler.get_scale() == 2.0**9
    overflow["now"] = False
    loss, _ = step(loss_fn=exploding)
    assert loss is not None and training.step == step_count + 1
    changed = snapshot()
    assert any(not torch.equal(before["model"][k], changed["model"][k]) for k in before["model"])
    assert any(not torch.equal(before["target"][k], changed["target"][k]) for k in before["target"])
