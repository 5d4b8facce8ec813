"""Tests for pipeline.import_openai: openai/consistency_models' UNetModel state dicts -> our ADMUNet models.

The reference is tests/fixtures/openai_unet_golden.pt, made once with the official code by
scripts/make_openai_golden.py (its docstring: commit, patches, how to rerun): two narrow official UNetModels with
random weights (class-conditional with scale-shift norm, unconditional without), their outputs D(x, sigma) and
f(x, sigma) through the official KarrasDenoiser.denoise, and the official full-size parameter counts and tensor
shapes. Nothing here imports the official code.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline import import_openai, models
from pipeline.config import InputError
from pipeline.import_openai import (
    IMAGENET64_NETWORK,
    LSUN256_NETWORK,
    RELEASE_URL,
    CheckpointMissingError,
    OpenAIImportError,
    StateMismatchError,
    convert_state_dict,
    import_checkpoint,
    import_state,
    network_config,
    parameter_count,
    write_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "openai_unet_golden.pt"
TOLERANCE = 1e-5  # largest |ours - official| / largest |official|, per sigma
OUTPUT = {"teacher": "D", "cd": "f", "ct": "f"}  # official denoise with distillation False / True


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def official_state(variant: dict) -> dict[str, torch.Tensor]:
    """The official state dict of a fixture variant: offset + (2-bit code - 1.5) * 2**exponent, exact in float32."""
    stored = variant["state"]
    packed = stored["codes"]
    levels = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).flatten().to(torch.float32) - 1.5
    out, start = {}, 0
    for name, shape, exponent, offset in zip(stored["names"], stored["shapes"], stored["exponents"],
                                             stored["offsets"]):
        count = math.prod(shape)
        out[name] = (levels[start:start + count].mul(2.0**exponent) + offset).reshape(shape)
        start += count
    return out


def imported(golden: dict, name: str, kind: str, state: dict | None = None) -> tuple[models.Preconditioned, dict]:
    variant = golden["variants"][name]
    ckpt = import_state(official_state(variant) if state is None else state, kind, variant["args"]["image_size"],
                        sigma_min=golden["sigma_min"], sigma_max=golden["sigma_max"],
                        sigma_data=golden["sigma_data"], num_head_channels=variant["args"]["num_head_channels"])
    return rebuilt(ckpt, ckpt["network"]), ckpt


def rebuilt(ckpt: dict, network: dict) -> models.Preconditioned:
    model = models.build_model(ckpt["kind"], network, ckpt["diffusion"], dropout=0.0, **ckpt["shape"])
    model.load_state_dict(ckpt["ema"])
    return model.eval().requires_grad_(False)


def run(model: nn.Module, golden: dict) -> torch.Tensor:
    labels = golden["labels"] if model.label_dim else None
    with torch.no_grad():
        return model(golden["x_t"], golden["sigmas"], labels)


def relative_differences(ours: torch.Tensor, official: torch.Tensor) -> list[float]:
    """Per sample (= per sigma): max |ours - official| / max |official|."""
    return [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, official)]


VARIANTS = ("imagenet_like", "lsun_like")


@pytest.mark.parametrize("kind", ["teacher", "cd"])  # "ct" is the same ConsistencyModel: the round trip uses it
@pytest.mark.parametrize("name", VARIANTS)
def test_outputs_match_the_official_code(golden: dict, name: str, kind: str) -> None:
    model, ckpt = imported(golden, name, kind)
    assert ckpt["network"]["c_noise"] == "adm" and ckpt["network"]["options"]["norm_groups"] == 32
    assert (ckpt["shape"]["label_dim"] > 0) == (name == "imagenet_like")
    differences = relative_differences(run(model, golden), golden["variants"][name][OUTPUT[kind]])
    sigmas = golden["sigmas"].tolist()
    assert max(differences) <= TOLERANCE, dict(zip(sigmas, differences))


def _heads_first(state: dict, head_channels: int) -> dict:
    """qkv rows read as (heads, three, d) -- guided-diffusion's legacy order -- instead of (three, heads, d)."""
    out = dict(state)
    for key, t in state.items():
        if ".qkv." in key:
            heads = t.shape[0] // 3 // head_channels
            out[key] = t.reshape(heads, 3, head_channels, *t.shape[1:]).movedim(1, 0).reshape(t.shape)
    return out


def test_the_tolerance_catches_layout_and_conditioning_errors(golden: dict) -> None:
    variant = golden["variants"]["imagenet_like"]  # 4 heads of 8 channels
    transposed, _ = imported(golden, "imagenet_like", "teacher",
                             _heads_first(official_state(variant), variant["args"]["num_head_channels"]))
    assert max(relative_differences(run(transposed, golden), variant["D"])) > 100 * TOLERANCE
    _, ckpt = imported(golden, "imagenet_like", "teacher")
    default_groups = rebuilt(ckpt, {**ckpt["network"], "options": {**ckpt["network"]["options"], "norm_groups": None}})
    assert max(relative_differences(run(default_groups, golden), variant["D"])) > 100 * TOLERANCE  # 8 groups, not 32
    _, ckpt = imported(golden, "lsun_like", "cd")
    edm_noise = rebuilt(ckpt, {**ckpt["network"], "c_noise": "edm"})
    assert max(relative_differences(run(edm_noise, golden), golden["variants"]["lsun_like"]["f"])) > 100 * TOLERANCE


def _meta_state(shapes: str) -> dict[str, torch.Tensor]:
    entries = (entry.split("=") for entry in shapes.split(";"))
    return {k: torch.empty([int(s) for s in v.split(",")] if v else [], device="meta") for k, v in entries}


@pytest.mark.parametrize(("name", "resolution", "label_dim", "network"), [
    ("imagenet64", 64, 1000, IMAGENET64_NETWORK), ("lsun256", 256, 0, LSUN256_NETWORK)])
def test_full_size_networks_are_the_official_ones(golden: dict, name: str, resolution: int, label_dim: int,
                                                  network: dict) -> None:
    official = golden["full_size"][name]
    assert parameter_count(network, resolution, label_dim) == official["parameters"]
    # The published shapes infer the table's network and map one to one onto ours (no tensor is allocated).
    state = _meta_state(official["shapes"])
    assert network_config(state, resolution) == network
    ckpt = import_state(state, "ct", resolution)
    assert ckpt["shape"] == {"resolution": resolution, "label_dim": label_dim}
    assert sum(t.numel() for t in ckpt["ema"].values()) == official["parameters"]


def test_round_trip_through_the_checkpoint_loader(golden: dict, tmp_path: Path) -> None:
    variant = golden["variants"]["imagenet_like"]
    source = tmp_path / "tiny_ct.pt"
    torch.save(official_state(variant), source)
    ckpt = import_checkpoint(source, "ct", sigma_min=golden["sigma_min"], sigma_max=golden["sigma_max"],
                             sigma_data=golden["sigma_data"], resolution=variant["args"]["image_size"],
                             num_head_channels=variant["args"]["num_head_channels"])
    assert ckpt["source"]["file"] == "tiny_ct.pt" and len(ckpt["source"]["sha256"]) == 64
    out = write_checkpoint(ckpt, tmp_path / "checkpoints" / "ct.pt")
    loaded = models.load_model(out)
    assert isinstance(loaded, models.ConsistencyModel) and loaded.c_noise == "adm"
    assert models.checkpoint_meta(out)["network"] == ckpt["network"]
    outputs = run(loaded, golden)
    assert torch.equal(outputs, run(rebuilt(ckpt, ckpt["network"]), golden))
    assert max(relative_differences(outputs, variant["f"])) <= TOLERANCE
    assert not list(out.parent.glob(".*"))  # no temporary file left beside it


def test_an_absent_file_names_where_to_download_it(tmp_path: Path) -> None:
    path = tmp_path / "downloads" / "edm_imagenet64_ema.pt"
    with pytest.raises(CheckpointMissingError) as info:
        import_checkpoint(path)
    message = str(info.value)
    assert isinstance(info.value, InputError) and "\n" not in message
    assert f"{RELEASE_URL}edm_imagenet64_ema.pt" in message and str(path) in message
    with pytest.raises(CheckpointMissingError, match="openaipublic.blob.core.windows.net"):
        import_checkpoint(tmp_path / "mine.pt", "teacher", resolution=64)


def test_the_release_table(tmp_path: Path) -> None:
    assert len(import_openai.PUBLISHED) == 12
    assert import_openai.PUBLISHED["ct_bedroom256.pt"].kind == "ct"
    assert import_openai.PUBLISHED["cd_cat256_lpips.pt"].url == RELEASE_URL + "cd_cat256_lpips.pt"
    with pytest.raises(OpenAIImportError, match="is a teacher model, not cd"):
        import_checkpoint(tmp_path / "edm_cat256_ema.pt", "cd")
    with pytest.raises(OpenAIImportError, match="pass kind and resolution"):
        import_checkpoint(tmp_path / "renamed.pt")


def test_published_files_sample_as_launch_sh():
    """The 2-step times launch.sh's grid indices give are the paper's ternary-searched ones (paper-facts: 1.382,
    1.913, 4.366, 3.520, 3.991, 5.249); the EDM teachers run Heun on 40 levels; Cat's CD files have no 2-step line."""
    paper = {"cd_imagenet64_l2.pt": 1.382, "cd_imagenet64_lpips.pt": 1.382, "ct_imagenet64.pt": 1.913,
             "cd_bedroom256_lpips.pt": 4.366, "cd_bedroom256_l2.pt": 3.520, "ct_bedroom256.pt": 3.991,
             "ct_cat256.pt": 5.249}
    for name, sigma in paper.items():
        published = import_openai.PUBLISHED[name]
        (one, two), = [published.sample_section()[f"{published.kind}_schedules"]]
        assert one == [80.0] and two[0] == 80.0 and round(two[1], 3) == sigma, (name, two)
    assert import_openai.PUBLISHED["edm_cat256_ema.pt"].sample_section() == {"teacher_steps": 40}
    assert import_openai.PUBLISHED["cd_cat256_lpips.pt"].sample_section() == {}


def test_a_mismatched_state_dict_is_refused(golden: dict, tmp_path: Path) -> None:
    state = official_state(golden["variants"]["lsun_like"])
    _, ckpt = imported(golden, "lsun_like", "teacher")
    net = models.build_model("teacher", ckpt["network"], ckpt["diffusion"], 0.0, **ckpt["shape"]).net
    exported = import_openai.to_official_state_dict(net)  # the inverse mapping: the official names and shapes
    assert sorted(exported) == sorted(state) and all(exported[k].shape == state[k].shape for k in state)
    converted = convert_state_dict(exported, net)
    assert all(torch.equal(converted[k], v) for k, v in net.state_dict().items())
    cases = {
        "missing tensor middle_block.1.qkv.bias": {k: v for k, v in state.items() if k != "middle_block.1.qkv.bias"},
        "unexpected tensor label_emb.weight": {**state, "label_emb.weight": torch.zeros(10, 128)},
        "out.2.weight has shape (3, 32, 1, 1), expected (3, 32, 3, 3)": {**state, "out.2.weight": torch.zeros(3, 32, 1,
                                                                                                         1)},
    }
    for first, bad in cases.items():
        with pytest.raises(StateMismatchError) as info:
            convert_state_dict(bad, net)
        assert first in str(info.value) and "\n" not in str(info.value)
    # A file under a published name must hold the published network.
    path = tmp_path / "ct_bedroom256.pt"
    torch.save(state, path)
    with pytest.raises(OpenAIImportError, match="not the published"):
        import_checkpoint(path, num_head_channels=16)
    torch.save({"model": state}, path)
    with pytest.raises(OpenAIImportError, match="state dict of tensors"):
        import_checkpoint(path)


class RecordingNet(nn.Module):
    """Stands for F: records what it is given and returns a fixed function of x alone."""

    label_dim = 0

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels=None) -> torch.Tensor:
        self.calls.append((x.clone(), noise_labels.clone()))
        return x.square()


@pytest.mark.parametrize("cls", [models.Denoiser, models.ConsistencyModel])
def test_c_noise_adm_changes_only_the_noise_input(cls: type) -> None:
    x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.002, 0.3, 2.0, 80.0])
    edm, adm = RecordingNet(), RecordingNet()
    out_edm = cls(edm, 0.5, 0.002)(x, sigma)
    out_adm = cls(adm, 0.5, 0.002, c_noise="adm")(x, sigma)
    assert torch.equal(out_edm, out_adm)  # same scalings, same network input
    assert torch.equal(edm.calls[0][0], adm.calls[0][0])
    torch.testing.assert_close(adm.calls[0][1], 1000 * edm.calls[0][1], rtol=1e-6, atol=0)
    torch.testing.assert_close(adm.calls[0][1], 250 * sigma.log(), rtol=1e-6, atol=0)  # official rescaled_t


def test_c_noise_is_read_from_the_network_section() -> None:
    network = {"arch": "adm", "model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}
    diffusion = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sigma_data": 0.5}
    assert models.build_model("teacher", network, diffusion, 0.0, 8).c_noise == "edm"  # older checkpoints
    assert models.build_model("ct", {**network, "c_noise": "adm"}, diffusion, 0.0, 8).c_noise == "adm"
    with pytest.raises(ValueError, match="unknown c_noise"):
        models.build_model("cd", {**network, "c_noise": "ddpm"}, diffusion, 0.0, 8)
    # A stage handed a checkpoint of the other noise input refuses it.
    cfg = SimpleNamespace(data=SimpleNamespace(spec=SimpleNamespace(resolution=8), label_dim=0), preset="micro",
                          raw={"network": {**network, "c_noise": "adm"}})
    models.check_compatible({"shape": {"resolution": 8, "label_dim": 0}, "network": {**network, "c_noise": "adm"}},
                            cfg, "x.pt")
    with pytest.raises(models.CheckpointError, match="network.c_noise edm"):
        models.check_compatible({"shape": {"resolution": 8, "label_dim": 0}, "network": network}, cfg, "x.pt")


# --------------------------------------------------------------------------------------------------
# The DAG: cd.source openai replaces distill_cd by import_cd, whose checkpoint the sampler takes.

ADM_SETS = ["network.arch=adm", "network.model_channels=64", "network.channel_mult=[1, 2]", "network.num_blocks=1",
            "network.attn_resolutions=[16]", "network.options={scale_shift_norm: false, norm_groups: 32}",
            "network.c_noise=adm", "cd.openai_checkpoint=weights/cd_custom.pt"]


@pytest.mark.slow
def test_cd_source_openai_imports_the_file_in_place_of_distillation(tmp_path, monkeypatch):
    import subprocess
    import sys

    from conftest import run, workspace

    from pipeline import config, stages

    ws, env = workspace(tmp_path)
    cfg = config.load(ws / "params.yaml", overrides=ADM_SETS + ["cd.source=openai"])
    names = [s.name for s in stages.stages(cfg)]
    assert "import_cd" in names and "distill_cd" not in names and "train_ct" in names
    monkeypatch.chdir(ws)
    with pytest.raises(config.ConfigError, match=r"cd.openai_checkpoint: weights/cd_custom.pt does not exist; "
                                                 r"download https://openaipublic.blob.core.windows.net/consistency/"):
        config.check_data_source(cfg)  # before any job starts

    torch.manual_seed(0)
    ours = models.build_model("cd", cfg.raw["network"], cfg.raw["diffusion"], 0.0, 32)
    for p in ours.parameters():  # non-zero everywhere (the last layers start at zero)
        nn.init.normal_(p, std=0.05)
    (ws / "weights").mkdir()
    torch.save(import_openai.to_official_state_dict(ours.net), ws / "weights/cd_custom.pt")
    sets = [arg for s in ADM_SETS + ["cd.source=openai"] for arg in ("--set", s)]
    run([sys.executable, "-m", "pipeline.import_openai", "--model", "cd", *sets], ws, env)
    imported = models.load_model(ws / stages.checkpoint(cfg, "cd"), cfg=cfg)
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert torch.equal(imported(x, sigma), ours.eval()(x, sigma))
    run([sys.executable, "-m", "pipeline.prepare_data", *sets], ws, env)
    schedules = "sample.cd_schedules=[[80.0], [80.0, 0.821]]"
    run([sys.executable, "-m", "pipeline.sample", "--model", "cd", *sets, "--set", schedules], ws, env)
    sampled = config.load(ws / "params.yaml", overrides=ADM_SETS + ["cd.source=openai", schedules])
    assert (ws / stages.samples(sampled, "cd")).is_file()
    wrong = subprocess.run([sys.executable, "-m", "pipeline.import_openai", "--model", "cd",
                            "--set", "cd.source=openai", "--set", "cd.openai_checkpoint=weights/cd_custom.pt"],
                           cwd=ws, env=env, capture_output=True, text=True)  # with the preset's NCSN++
    assert wrong.returncode != 0 and "cd.source: 'openai' imports an ADM UNet" in wrong.stderr, wrong.stderr[-2000:]
    other = subprocess.run([sys.executable, "-m", "pipeline.import_openai", "--model", "cd", *sets,
                            "--set", "network.options={scale_shift_norm: true, norm_groups: 32}"],
                           cwd=ws, env=env, capture_output=True, text=True)  # another ADM than the file holds
    assert other.returncode == 1 and other.stderr.startswith("error: "), other.stderr[-2000:]
