"""Tests for pipeline.networks: paper parameter counts, shapes, gradient flow, resampling, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from pipeline.networks import ADMUNet, Conv2d, SongUNet, build_network, count_parameters

# Micro widths keep every forward pass well under a second on CPU.
MICRO_SONG = {"model_channels": 16, "channel_mult": (1, 2, 2), "num_blocks": 1, "attn_resolutions": (16,)}
MICRO_ADM = {"model_channels": 16, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (32,)}
# Narrower still, at 16x16, for the tests that run backward / forward-mode AD.
NANO_SONG = {"model_channels": 8, "channel_mult": (1, 2, 2), "num_blocks": 1, "attn_resolutions": (8,)}
NANO_ADM = {"model_channels": 8, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (16, 8)}
LSUN256 = {"model_channels": 256, "channel_mult": (1, 1, 2, 2, 4, 4), "num_blocks": 2,
           "attn_resolutions": (32, 16, 8), "scale_shift_norm": False}


def randomise_(net: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so the (near-)zero initialised layers stop hiding the signal."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * std)
    return net


@pytest.mark.parametrize(("arch", "resolution", "kwargs", "expected"), [
    ("ncsnpp", 32, {}, 56.4e6),                        # CIFAR-10 NCSN++ (EDM: ~56M)
    ("ddpmpp", 32, {}, 55.7e6),                        # CIFAR-10 DDPM++
    ("adm", 64, {"label_dim": 1000}, 296e6),           # ImageNet 64, class-conditional
    ("adm", 256, LSUN256, 526e6),                      # LSUN 256
])
def test_paper_parameter_counts(arch: str, resolution: int, kwargs: dict, expected: float) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = build_network(arch, resolution, 3, 3, **kwargs)
    assert abs(count_parameters(net) - expected) / expected < 0.02


def test_lsun_scale_shift_norm_is_what_separates_526m_from_553m() -> None:
    with torch.device("meta"):
        net = build_network("adm", 256, 3, 3, **{**LSUN256, "scale_shift_norm": True})
    assert abs(count_parameters(net) - 552.8e6) / 552.8e6 < 0.01


@pytest.mark.parametrize(("arch", "resolution", "kwargs"), [
    ("ncsnpp", 32, MICRO_SONG),
    ("ddpmpp", 32, MICRO_SONG),
    ("ncsnpp", 32, {**MICRO_SONG, "encoder_type": "skip", "decoder_type": "skip"}),
    ("adm", 64, {**MICRO_ADM, "label_dim": 10}),
    ("adm", 256, {"model_channels": 4, "channel_mult": (1, 1, 2, 2, 4, 4), "num_blocks": 1,
                  "attn_resolutions": (32, 16, 8), "scale_shift_norm": False}),
    ("mlp", 8, {"model_channels": 16, "channel_mult": (1, 2), "num_blocks": 2, "label_dim": 3}),
])
def test_output_shape_and_dtype(arch: str, resolution: int, kwargs: dict) -> None:
    torch.manual_seed(0)
    net = build_network(arch, resolution, 3, 3, **kwargs).eval()
    batch = 1 if resolution > 64 else 2
    x = torch.randn(batch, 3, resolution, resolution)
    labels = None
    if kwargs.get("label_dim"):
        labels = F.one_hot(torch.arange(batch) % kwargs["label_dim"], kwargs["label_dim"]).float()
    with torch.no_grad():
        y = net(x, torch.randn(batch), labels)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


def test_out_channels_can_differ_from_in_channels() -> None:
    net = build_network("ncsnpp", 16, 1, 2, model_channels=8, channel_mult=(1, 1), num_blocks=1)
    assert net(torch.randn(3, 1, 16, 16), torch.zeros(3)).shape == (3, 2, 16, 16)


@pytest.mark.parametrize("arch", ["ncsnpp", "ddpmpp", "adm", "mlp"])
def test_initial_output_is_near_zero(arch: str) -> None:
    # The output conv is zero/1e-5 initialised, so an untrained F starts at ~0 (identity-like denoiser); the MLP's
    # input gain starts at 0 too.
    kwargs = {"adm": NANO_ADM, "mlp": {"model_channels": 16, "attn_resolutions": ()}}.get(arch, NANO_SONG)
    net = build_network(arch, 16, 3, 3, **kwargs).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 3, 16, 16), torch.randn(2))
    assert y.abs().max() < 1e-3


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("ncsnpp", {**NANO_SONG, "label_dim": 4}),
    ("ncsnpp", {**NANO_SONG, "encoder_type": "skip", "decoder_type": "skip"}),
    ("ddpmpp", NANO_SONG),
    ("adm", {**NANO_ADM, "label_dim": 4}),
    ("adm", {**NANO_ADM, "scale_shift_norm": False}),
    ("mlp", {"model_channels": 16, "channel_mult": (1, 2), "num_blocks": 2, "attn_resolutions": (), "label_dim": 4,
             "embedding_type": "positional"}),
])
def test_gradients_reach_every_parameter(arch: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    net = randomise_(build_network(arch, 16, 3, 3, dropout=0.0, **kwargs).train())
    labels = F.one_hot(torch.arange(2) % 4, 4).float() if kwargs.get("label_dim") else None
    net(torch.randn(2, 3, 16, 16), torch.randn(2), labels).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_mlp_has_no_attention_to_give() -> None:
    with pytest.raises(ValueError, match="attn_resolutions must be"):
        build_network("mlp", 8, 3, 3, model_channels=16, attn_resolutions=(4,))


def test_forward_mode_ad_through_attention() -> None:
    # Continuous-time consistency training differentiates the network with torch.func.jvp.
    net = build_network("adm", 16, 3, 3, **NANO_ADM).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.ones(1)
    _, tangent = torch.func.jvp(lambda z: net(z, t), (x,), (torch.randn_like(x),))
    assert tangent.shape == x.shape


def test_attention_scales_q_and_k_before_their_product() -> None:
    from pipeline.networks import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(64, 1, eps=1e-6, skip_scale=1.0, init_qkv={}, init_zero={}).eval()
    x = torch.randn(2, 64, 4, 4)

    def divided_after(x: torch.Tensor) -> torch.Tensor:  # the textbook form: (q . k) / sqrt(d)
        b, c, h, w = x.shape
        q, k, v = attention.qkv(attention.norm(x)).reshape(b, 3, 1, c, h * w).unbind(1)
        logits = torch.einsum("bncq,bnck->bnqk", q, k) / math.sqrt(c)
        a = torch.einsum("bnqk,bnck->bncq", logits.softmax(dim=-1), v)
        return x + attention.proj(a.reshape(b, c, h, w))

    with torch.no_grad():
        assert torch.allclose(attention(x), divided_after(x), rtol=1e-5, atol=1e-5)  # the same in fp32
        # Under fp16 autocast the product runs in fp16 (max 65504). Weights scaled so that the largest q . k is
        # 3 x 65504: it overflows there, while (q / 8^(1/2)) . (k / 8^(1/2)) peaks at 3 x 65504 / 8.
        b, c = x.shape[:2]
        q, k, _ = attention.qkv(attention.norm(x)).reshape(b, 3, 1, c, -1).unbind(1)
        largest = torch.einsum("bncq,bnck->bnqk", q, k).abs().max()
        attention.qkv.weight.mul_(math.sqrt(3 * 65504 / largest))
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(divided_after(x)).all()
            assert torch.isfinite(attention(x)).all()


def test_label_dropout_one_makes_output_label_independent() -> None:
    torch.manual_seed(0)
    net = build_network("ncsnpp", 16, 3, 3, label_dim=5, label_dropout=1.0, dropout=0.0, **NANO_SONG)
    randomise_(net)
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    eye = torch.eye(5)
    torch.testing.assert_close(net(x, t, eye[:2]), net(x, t, eye[2:4]))
    net.eval()  # no label dropout at evaluation
    assert not torch.allclose(net(x, t, eye[:2]), net(x, t, eye[2:4]))


def test_noise_embedding_changes_output() -> None:
    torch.manual_seed(0)
    net = randomise_(build_network("ncsnpp", 16, 3, 3, dropout=0.0, **NANO_SONG).eval())
    with torch.no_grad():
        x = torch.randn(1, 3, 16, 16)
        assert not torch.allclose(net(x, torch.tensor([0.1])), net(x, torch.tensor([2.0])))


def test_fir_resampling_matches_known_operators() -> None:
    x = torch.randn(2, 4, 8, 8)
    box_down = Conv2d(4, 4, kernel=0, down=True, resample_filter=(1, 1))
    box_up = Conv2d(4, 4, kernel=0, up=True, resample_filter=(1, 1))
    torch.testing.assert_close(box_down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(box_up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    # The (1, 3, 3, 1) filter has unit DC gain: a constant image stays constant away from the border.
    const = torch.ones(1, 4, 8, 8)
    for conv in (Conv2d(4, 4, kernel=0, down=True, resample_filter=(1, 3, 3, 1)),
                 Conv2d(4, 4, kernel=0, up=True, resample_filter=(1, 3, 3, 1))):
        y = conv(const)
        torch.testing.assert_close(y[..., 1:-1, 1:-1], torch.ones_like(y[..., 1:-1, 1:-1]))
    fused = Conv2d(4, 6, kernel=3, down=True, fused_down=True, resample_filter=(1, 3, 3, 1))
    assert fused(x).shape == (2, 6, 4, 4)


def test_build_network_family_defaults_and_overrides() -> None:
    with torch.device("meta"):
        ncsnpp = build_network("ncsnpp", 32, 3, 3, **MICRO_SONG)
        ddpmpp = build_network("ddpmpp", 32, 3, 3, **MICRO_SONG)
        custom = build_network("ncsnpp", 32, 3, 3, encoder_type="standard", **MICRO_SONG)
        adm = build_network("adm", 32, 3, 3, **MICRO_ADM)
    assert isinstance(ncsnpp, SongUNet) and isinstance(ddpmpp, SongUNet) and isinstance(adm, ADMUNet)
    assert ncsnpp.encoder_type == "residual" and ddpmpp.encoder_type == "standard"
    assert custom.encoder_type == "standard"


def test_unknown_arch_raises() -> None:
    with pytest.raises(ValueError, match="unknown arch 'unet3000'"):
        build_network("unet3000", 32, 3, 3)


def test_unknown_keyword_raises() -> None:
    with pytest.raises(ValueError, match="unknown keyword.*'num_res_blocks'.*'ncsnpp'"):
        build_network("ncsnpp", 32, 3, 3, num_res_blocks=2)
    with pytest.raises(ValueError, match="'embedding_type'"):
        build_network("adm", 64, 3, 3, embedding_type="fourier")  # a SongUNet-only option


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"embedding_type": "sinusoid"}, "embedding_type"),
    ({"encoder_type": "pyramid"}, "encoder_type"),
    ({"decoder_type": "residual"}, "decoder_type"),
    ({"channel_mult": (1,) * 7}, "not divisible"),
])
def test_bad_option_values_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_network("ncsnpp", 32, 3, 3, **kwargs)


def test_class_label_checks() -> None:
    net = build_network("adm", 16, 3, 3, label_dim=3, **NANO_ADM).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    with pytest.raises(ValueError, match="class_labels is None"):
        net(x, t)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        net(x, t, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="noise_labels must have shape"):
        net(x, torch.randn(3), torch.zeros(2, 3))
    assert net(x, torch.tensor(0.5), torch.zeros(2, 3)).shape == x.shape  # scalar noise label broadcasts
    assert net(x, torch.tensor([1, 2]), torch.zeros(2, 3)).dtype == x.dtype  # integer labels are fine
