"""Tests for pipeline.generate: images reproducible from their seeds alone, from our checkpoints and official
state dicts, with one or two processes.

Networks are tiny (8x8 images): ours built by pipeline.models.build_model with random weights, the official one the
class-conditional "imagenet_like" UNetModel of tests/fixtures/openai_unet_golden.pt (scripts/make_openai_golden.py).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import cm, generate, models
from pipeline.data import uint8_on_device

pytestmark = pytest.mark.usefixtures("one_thread", "cpu_only")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "openai_unet_golden.pt"
NETWORK = {"arch": "ncsnpp", "model_channels": 8, "channel_mult": [1, 1], "num_blocks": 1, "attn_resolutions": [],
           "options": {}}
DIFFUSION = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sigma_data": 0.5}
RESOLUTION = 8


@pytest.fixture
def cpu_only(monkeypatch):
    """generate picks CUDA where there is one; these tests compare bytes with CPU computations."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def tiny_checkpoint(path: Path, kind: str = "cd", label_dim: int = 0) -> Path:
    """A checkpoint in the layout of Training.state() (the fields load_model reads), random weights, and the
    sample section of a training config: a fixed 2-step schedule, none of 3 steps."""
    torch.manual_seed(0)
    model = models.build_model(kind, NETWORK, DIFFUSION, 0.0, RESOLUTION, label_dim)
    sample = {f"{kind}_schedules": [[80.0], [80.0, 0.821]], "teacher_steps": 3, "uint8": "round"}
    models.atomic_save({"kind": kind, "step": 0, "network": NETWORK, "diffusion": DIFFUSION,
                        "config": {"sample": sample}, "shape": {"resolution": RESOLUTION, "label_dim": label_dim},
                        "model": model.state_dict(), "ema": model.state_dict(), "model_options": model.options()},
                       path)
    return path


def official_state(variant: str = "imagenet_like") -> dict[str, torch.Tensor]:
    """A fixture's official UNetModel as a state dict: imagenet_like is class-conditional (10 classes, heads of 8
    channels), lsun_like unconditional with attention over 64 channels in heads of 16 (a guess of 64 would run)."""
    stored = torch.load(FIXTURE, weights_only=True)["variants"][variant]["state"]
    packed = stored["codes"]
    levels = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).flatten().float() - 1.5
    out, start = {}, 0
    for name, shape, exponent, offset in zip(stored["names"], stored["shapes"], stored["exponents"],
                                             stored["offsets"]):
        count = math.prod(shape)
        out[name] = (levels[start:start + count].mul(2.0**exponent) + offset).reshape(shape)
        start += count
    return out


def cli(*args: str | Path) -> None:
    generate.main([str(a) for a in args])


def error_of(*args: str | Path) -> str:
    """The one-line message the command exits with."""
    with pytest.raises(SystemExit) as exit_info:
        cli(*args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def cd_checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "cd.pt")


def test_an_image_depends_on_its_seed_alone(cd_checkpoint, tmp_path):
    """2 steps (the checkpoint's [80, 0.821]): the step's fresh noise too must come from the image's seed."""
    cli("--checkpoint", cd_checkpoint, "--steps", "2", "--seeds", "5", "--batch", "1", "--outdir", tmp_path / "a")
    cli("--checkpoint", cd_checkpoint, "--steps", "2", "--seeds", "5", "--batch", "1", "--outdir", tmp_path / "b")
    cli("--checkpoint", cd_checkpoint, "--steps", "2", "--seeds", "0-7", "--batch", "3", "--outdir", tmp_path / "c")
    alone, again, among = pngs(tmp_path / "a"), pngs(tmp_path / "b"), pngs(tmp_path / "c")
    assert list(alone) == ["000005.png"] and list(among) == [f"{s:06d}.png" for s in range(8)]
    assert alone == again
    assert alone["000005.png"] == among["000005.png"]
    assert len(set(among.values())) == 8  # and other seeds give other images


def test_one_step_is_the_model_at_sigma_max(cd_checkpoint, tmp_path):
    cli("--checkpoint", cd_checkpoint, "--seeds", "3,4", "--npz", tmp_path / "out.npz")
    model = models.load_model(cd_checkpoint)
    z = torch.stack([torch.randn(3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(s))
                     for s in (3, 4)])
    with torch.no_grad():
        expected = uint8_on_device(model(80.0 * z, torch.tensor(80.0))).numpy()
    out = np.load(tmp_path / "out.npz")
    assert out["images"].dtype == np.uint8 and out["images"].shape == (2, RESOLUTION, RESOLUTION, 3)
    np.testing.assert_array_equal(out["images"], expected)
    np.testing.assert_array_equal(out["seeds"], [3, 4])
    np.testing.assert_array_equal(out["labels"], [0, 0])


def test_the_teacher_runs_heun_on_the_karras_grid(tmp_path):
    path = tiny_checkpoint(tmp_path / "teacher.pt", "teacher")
    cli("--checkpoint", path, "--seeds", "1", "--steps", "3", "--outdir", tmp_path)
    model = models.load_model(path)
    z = torch.randn(1, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    expected = uint8_on_device(cm.heun_sample(model, 80.0 * z, cm.karras_sigmas(3))).numpy()[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "000001.png")), expected)


def test_an_official_state_dict_under_a_published_name(tmp_path):
    path = tmp_path / "cd_imagenet64_l2.pt"  # kind cd from the name; the fixture is 8x8 with heads of 8 channels
    torch.save(official_state(), path)
    given = ["--checkpoint", path, "--head-channels", "8", "--resolution", "8", "--seeds", "0-5"]
    cli(*given, "--batch", "4", "--outdir", tmp_path / "png")
    cli(*given, "--npz", tmp_path / "a.npz")
    cli(*given, "--class", "3", "--npz", tmp_path / "b.npz")
    cli(*given, "--steps", "2", "--npz", tmp_path / "two.npz")   # launch.sh's times for this name: 80, level 22/40
    cli(*given, "--ts", f"80,{cm.karras_sigmas(40)[22].item()!r}", "--npz", tmp_path / "ts.npz")
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in pngs(tmp_path / "png").values()]
    drawn, fixed = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert len(images) == 6 and images[0].shape == (8, 8, 3)
    np.testing.assert_array_equal(np.stack(images), drawn["images"])  # the same images either way
    assert set(drawn["labels"]) <= set(range(10)) and len(set(drawn["labels"])) > 1  # a class per seed
    assert list(fixed["labels"]) == [3] * 6
    two, ts = np.load(tmp_path / "two.npz"), np.load(tmp_path / "ts.npz")
    np.testing.assert_array_equal(two["images"], ts["images"])
    assert not np.array_equal(two["images"], drawn["images"])
    # Under its published name the file must hold the published network unless nothing is left to guess.
    assert "not the published" in error_of("--checkpoint", path, "--head-channels", "8", "--outdir", tmp_path)


def test_an_unknown_official_file_needs_head_channels(tmp_path):
    path = tmp_path / "my_consistency_model.pt"
    torch.save(official_state("lsun_like"), path)
    assert "--head-channels" in error_of("--checkpoint", path, "--kind", "cd", "--resolution", "8",
                                         "--outdir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cli("--checkpoint", path, "--kind", "cd", "--resolution", "8", "--head-channels", "16", "--seeds", "0,1",
        "--outdir", tmp_path / "out")
    assert len(pngs(tmp_path / "out")) == 2


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0-x"], "--seeds"),
    (["--seeds", "9-3"], "backwards"),
    (["--ts", "0.821,80"], "decrease"),
    (["--ts", "80,0.0001"], "outside"),
    (["--ts", "100"], "outside"),
    (["--steps", "3"], "--ts"),  # the config has no 3-step schedule
    (["--class", "1"], "unconditional"),
    (["--head-channels", "64"], "official state dicts only"),
    (["--batch", "0"], "at least 1"),
])
def test_errors_are_one_line(cd_checkpoint, tmp_path, args, words):
    assert words in error_of("--checkpoint", cd_checkpoint, "--outdir", tmp_path, *args)
    assert not list(tmp_path.iterdir())


def test_a_missing_checkpoint_is_one_line(tmp_path):
    assert "no such checkpoint" in error_of("--checkpoint", tmp_path / "nothing.pt", "--outdir", tmp_path)
    assert "download https://" in error_of("--checkpoint", tmp_path / "cd_imagenet64_l2.pt", "--outdir", tmp_path)


def test_the_seed_syntax():
    assert generate.parse_seeds("0-3") == [0, 1, 2, 3]
    assert generate.parse_seeds("1,5,10-12") == [1, 5, 10, 11, 12]


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_write_what_one_writes(cd_checkpoint, tmp_path):
    """torchrun, 2 CPU processes (gloo): each writes its seeds' PNGs, rank 0 gathers the .npz; same bytes, same
    arrays as one process."""
    common = ["-m", "pipeline.generate", "--checkpoint", str(cd_checkpoint), "--steps", "2", "--seeds", "0-4",
              "--batch", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cli(*common[2:], "--outdir", tmp_path / "one")
    _run([*torchrun, *common, "--outdir", str(tmp_path / "two")])
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one") and len(pngs(tmp_path / "one")) == 5
    _run([*torchrun, *common, "--npz", str(tmp_path / "two.npz")])
    gathered = np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(gathered["seeds"], range(5))
    for seed, image in zip(gathered["seeds"], gathered["images"]):
        np.testing.assert_array_equal(image, np.asarray(Image.open(tmp_path / "one" / f"{seed:06d}.png")))
