"""Tests for pipeline.import_edm: NVlabs EDM pickles -> our SongUNet teacher, without NVlabs' code.

The real pickles cannot be downloaded here, so the tests write stand-ins in the same format: a module tree
pickled through a `torch_utils.persistence` that exists only while the file is written. Two independent
renderings of EDM's SongUNet, written here from its published construction and forward pass, check the
importer: `edm_spec` (every tensor name and shape, layer order, resampling) and `edm_forward` (the output,
computed straight from EDM-named tensors). Neither uses the importer's key mapping.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import pickle
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline import import_edm, models
from pipeline.import_edm import (
    EDMImportError,
    StandIn,
    StateMismatchError,
    convert_songunet_state,
    edm_key_map,
    infer_network,
    load_edm_pickle,
    read_edm_pickle,
    songunet_to_edm_state,
)
from pipeline.networks import build_network

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = {"model_channels": 16, "channel_mult": (1, 2, 2), "num_blocks": 1, "attn_resolutions": (16,)}
CIFAR = {"model_channels": 128, "channel_mult": (2, 2, 2), "num_blocks": 4, "attn_resolutions": (16,)}
FAMILY = {  # EDM train.py's --arch settings
    "ncsnpp": {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
               "decoder_type": "standard", "taps": (1, 3, 3, 1)},
    "ddpmpp": {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
               "decoder_type": "standard", "taps": (1, 1)},
}
# What the importer looks for in the stored source (EDM's sin/cos swap and qkv split); the first line proves
# that the source is never executed.
MODULE_SRC = """raise RuntimeError("the pickled source code must never run")
class SongUNet(torch.nn.Module):
    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1) # swap sin/cos
class UNetBlock(torch.nn.Module):
    def forward(self, x, emb):
        q, k, v = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1)
"""
SKIP_SCALE = math.sqrt(0.5)


# ---------------------------------------------------------------------------------------------------
# EDM's SongUNet, independently: names, shapes, order (EDM's __init__) and the forward pass.


@dataclass
class EDMSpec:
    shapes: dict[str, tuple] = field(default_factory=dict)  # every tensor but resample filters and map_augment
    enc: list[str] = field(default_factory=list)  # layer names of the `enc` ModuleDict, in order
    dec: list[str] = field(default_factory=list)
    resampling: dict[str, str] = field(default_factory=dict)  # conv name -> up | down | fused_down


def edm_spec(model_channels: int, channel_mult: tuple, num_blocks: int, attn_resolutions: tuple,
             embedding_type: str, channel_mult_noise: int, encoder_type: str, decoder_type: str,
             label_dim: int = 0, resolution: int = 32, channels: int = 3, **_) -> EDMSpec:
    spec = EDMSpec()
    emb_ch, noise_ch = 4 * model_channels, channel_mult_noise * model_channels

    def tensor(name: str, *shape: int) -> None:
        spec.shapes[name] = shape

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        tensor(f"{name}.weight", fan_out, fan_in)
        tensor(f"{name}.bias", fan_out)

    def conv(name: str, cin: int, cout: int, kernel: int, resample: str | None = None) -> None:
        if kernel:
            tensor(f"{name}.weight", cout, cin, kernel, kernel)
            tensor(f"{name}.bias", cout)
        if resample:
            spec.resampling[name] = resample

    def norm(name: str, ch: int) -> None:
        tensor(f"{name}.weight", ch)
        tensor(f"{name}.bias", ch)

    def block(name: str, cin: int, cout: int, attention: bool = False, resample: str | None = None) -> int:
        norm(f"{name}.norm0", cin)
        conv(f"{name}.conv0", cin, cout, 3, resample)
        linear(f"{name}.affine", emb_ch, cout)
        norm(f"{name}.norm1", cout)
        conv(f"{name}.conv1", cout, cout, 3)
        if cin != cout or resample:
            conv(f"{name}.skip", cin, cout, 1, resample)
        if attention:
            norm(f"{name}.norm2", cout)
            conv(f"{name}.qkv", cout, 3 * cout, 1)
            conv(f"{name}.proj", cout, cout, 1)
        return cout

    if embedding_type == "fourier":
        tensor("map_noise.freqs", noise_ch // 2)
    if label_dim:
        linear("map_label", label_dim, noise_ch)
    linear("map_layer0", noise_ch, emb_ch)
    linear("map_layer1", emb_ch, emb_ch)

    cout, caux, skips = channels, channels, []
    for level, mult in enumerate(channel_mult):
        tag = f"{resolution >> level}x{resolution >> level}"
        if level == 0:
            spec.enc.append(f"{tag}_conv")
            conv(f"enc.{tag}_conv", cout, model_channels, 3)
            cout = model_channels
        else:
            spec.enc.append(f"{tag}_down")
            block(f"enc.{tag}_down", cout, cout, resample="down")
            if encoder_type == "skip":
                spec.enc += [f"{tag}_aux_down", f"{tag}_aux_skip"]
                conv(f"enc.{tag}_aux_down", caux, caux, 0, "down")
                conv(f"enc.{tag}_aux_skip", caux, cout, 1)
            if encoder_type == "residual":
                spec.enc.append(f"{tag}_aux_residual")
                conv(f"enc.{tag}_aux_residual", caux, cout, 3, "fused_down")
                caux = cout
        skips.append(cout)
        for idx in range(num_blocks):
            spec.enc.append(f"{tag}_block{idx}")
            cout = block(f"enc.{tag}_block{idx}", cout, model_channels * mult,
                         attention=(resolution >> level) in attn_resolutions)
            skips.append(cout)

    for level, mult in reversed(list(enumerate(channel_mult))):
        res = resolution >> level
        tag = f"{res}x{res}"
        if level == len(channel_mult) - 1:
            spec.dec += [f"{tag}_in0", f"{tag}_in1"]
            block(f"dec.{tag}_in0", cout, cout, attention=True)
            block(f"dec.{tag}_in1", cout, cout)
        else:
            spec.dec.append(f"{tag}_up")
            block(f"dec.{tag}_up", cout, cout, resample="up")
        for idx in range(num_blocks + 1):
            spec.dec.append(f"{tag}_block{idx}")
            cout = block(f"dec.{tag}_block{idx}", cout + skips.pop(), model_channels * mult,
                         attention=idx == num_blocks and res in attn_resolutions)
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                spec.dec.append(f"{tag}_aux_up")
                conv(f"dec.{tag}_aux_up", channels, channels, 0, "up")
            spec.dec += [f"{tag}_aux_norm", f"{tag}_aux_conv"]
            norm(f"dec.{tag}_aux_norm", cout)
            conv(f"dec.{tag}_aux_conv", cout, channels, 3)
    return spec


def _conv(s: dict, name: str, x: torch.Tensor, resample: str | None = None) -> torch.Tensor:
    w, b, f = s.get(f"{name}.weight"), s.get(f"{name}.bias"), s.get(f"{name}.resample_filter")
    w_pad = 0 if w is None else w.shape[-1] // 2
    f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
    if resample == "fused_down":
        x = F.conv2d(x, w, padding=w_pad + f_pad)
        x = F.conv2d(x, f.tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2)
    else:
        if resample == "up":
            x = F.conv_transpose2d(x, (4 * f).tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=f_pad)
        if resample == "down":
            x = F.conv2d(x, f.tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
    return x if b is None else x + b.reshape(1, -1, 1, 1)


def _norm(s: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, min(32, x.shape[1] // 4), s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-6)


def _block(s: dict, spec: EDMSpec, name: str, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = _conv(s, f"{name}.conv0", F.silu(_norm(s, f"{name}.norm0", x)), spec.resampling.get(f"{name}.conv0"))
    h = h + F.linear(emb, s[f"{name}.affine.weight"], s[f"{name}.affine.bias"])[:, :, None, None]
    h = _conv(s, f"{name}.conv1", F.silu(_norm(s, f"{name}.norm1", h)))
    if f"{name}.skip.weight" in s:
        x = _conv(s, f"{name}.skip", x, spec.resampling.get(f"{name}.skip"))
    x = (h + x) * SKIP_SCALE
    if f"{name}.qkv.weight" in s:  # one head, as in EDM's SongUNet; q, k, v innermost in the channel axis
        b, c, height, width = x.shape
        q, k, v = _conv(s, f"{name}.qkv", _norm(s, f"{name}.norm2", x)).reshape(b, c, 3, -1).unbind(2)
        weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
        attended = torch.einsum("nqk,nck->ncq", weights, v).reshape(b, c, height, width)
        x = (_conv(s, f"{name}.proj", attended) + x) * SKIP_SCALE
    return x


def edm_forward(s: dict, spec: EDMSpec, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's SongUNet.forward, evaluated from EDM-named tensors (augment_labels None, eval mode)."""
    if "map_noise.freqs" in s:
        angles = noise_labels.outer(2 * np.pi * s["map_noise.freqs"])
    else:
        half = s["map_layer0.weight"].shape[1] // 2
        angles = noise_labels.outer((1 / 10000) ** (torch.arange(half, dtype=torch.float32) / (half - 1)))
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # EDM's order after its swap
    if "map_label.weight" in s:
        emb = emb + F.linear(class_labels * math.sqrt(class_labels.shape[1]), s["map_label.weight"],
                             s["map_label.bias"])
    emb = F.silu(F.linear(emb, s["map_layer0.weight"], s["map_layer0.bias"]))
    emb = F.silu(F.linear(emb, s["map_layer1.weight"], s["map_layer1.bias"]))
    skips, aux = [], x
    for layer in spec.enc:
        name = f"enc.{layer}"
        if layer.endswith("_aux_down"):
            aux = _conv(s, name, aux, "down")
        elif layer.endswith("_aux_skip"):
            x = skips[-1] = x + _conv(s, name, aux)
        elif layer.endswith("_aux_residual"):
            x = skips[-1] = aux = (x + _conv(s, name, aux, "fused_down")) / math.sqrt(2)
        else:
            x = _conv(s, name, x) if layer.endswith("_conv") else _block(s, spec, name, x, emb)
            skips.append(x)
    aux = tmp = None
    for layer in spec.dec:
        name = f"dec.{layer}"
        if layer.endswith("_aux_up"):
            aux = _conv(s, name, aux, "up")
        elif layer.endswith("_aux_norm"):
            tmp = _norm(s, name, x)
        elif layer.endswith("_aux_conv"):
            tmp = _conv(s, name, F.silu(tmp))
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != s[f"{name}.norm0.weight"].shape[0]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = _block(s, spec, name, x, emb)
    return aux


# ---------------------------------------------------------------------------------------------------
# Writing a pickle in torch_utils.persistence's format.


@contextlib.contextmanager
def nvlabs_modules():
    """torch_utils.persistence and dnnlib.util, only as pickle needs them to write names; removed afterwards."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("loading must not reach NVlabs' code")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    fakes = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    fakes["torch_utils"].persistence, fakes["dnnlib"].util = persistence, util
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield util.EasyDict
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Persistent:
    """Pickles as torch_utils.persistence pickles an instance of a persistent class."""

    def __init__(self, class_name: str, state: dict, module_src: str = MODULE_SRC):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": self.module_src, "class_name": self.class_name,
                "state": self.state}
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def module_fields(params: dict | None = None, buffers: dict | None = None, children: dict | None = None,
                  **attrs) -> dict:
    """A torch module's __dict__, as persistence stores it."""
    hooks = ("_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
             "_load_state_dict_pre_hooks")
    return {"training": False, "_non_persistent_buffers_set": set(), **{h: OrderedDict() for h in hooks},
            "_parameters": OrderedDict((k, torch.nn.Parameter(v, requires_grad=False))
                                       for k, v in (params or {}).items()),
            "_buffers": OrderedDict(buffers or {}), "_modules": OrderedDict(children or {}),
            "_init_args": (), **attrs}


def _subtree(flat: dict, prefix: str, src: str) -> Persistent:
    """The module holding flat[prefix.*], its children built the same way."""
    direct = {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + ".") and
              "." not in k[len(prefix) + 1:]}
    child_names = list(dict.fromkeys(k[len(prefix) + 1:].split(".")[0] for k in flat
                                     if k.startswith(prefix + ".") and "." in k[len(prefix) + 1:]))
    children = {name: _subtree(flat, f"{prefix}.{name}", src) for name in child_names}
    buffers = {k: v for k, v in direct.items() if k in ("freqs", "resample_filter")}
    params = {k: v for k, v in direct.items() if k not in buffers}
    kind = ("UNetBlock" if "norm0" in children else "GroupNorm" if "norm" in prefix.rsplit(".", 1)[-1]
            else "Linear" if params.get("weight", torch.zeros(1, 1, 1)).ndim == 2 else "Conv2d")
    kwargs = {"skip_scale": np.sqrt(0.5), "eps": 1e-6} if kind == "UNetBlock" else {}
    return Persistent(kind, module_fields(params, buffers, children, _init_kwargs=kwargs), src)


def edm_pickle(path: Path, flat: dict, spec: EDMSpec, precond: str = "EDMPrecond", label_dim: int = 0,
               module_src: str = MODULE_SRC, **precond_attrs) -> Path:
    """Write an EDM network pickle (dict(ema=..., loss_fn, augment_pipe, dataset_kwargs)) holding `flat`."""
    with nvlabs_modules() as easydict:
        song = OrderedDict()
        noise = "FourierEmbedding" if "map_noise.freqs" in flat else "PositionalEmbedding"
        song["map_noise"] = Persistent(noise, _subtree(flat, "map_noise", module_src).state, module_src)
        for name in ("map_label", "map_augment", "map_layer0", "map_layer1"):
            if f"{name}.weight" in flat:
                song[name] = _subtree(flat, name, module_src)
        for part, layers in (("enc", spec.enc), ("dec", spec.dec)):
            container = torch.nn.ModuleDict()  # EDM's enc/dec are plain torch ModuleDicts, pickled natively
            container.__dict__["_modules"] = OrderedDict(
                (layer, _subtree(flat, f"{part}.{layer}", module_src)) for layer in layers)
            song[part] = container
        network = Persistent("SongUNet", module_fields(children=song, label_dropout=0), module_src)
        attrs = {"img_resolution": 32, "img_channels": 3, "label_dim": label_dim, "use_fp16": False,
                 **precond_attrs}
        ema = Persistent(precond, module_fields(children={"model": network}, **attrs), module_src)
        data = {"ema": ema,
                "loss_fn": Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}),
                "augment_pipe": Persistent("AugmentPipe", {"p": 0.12, "kwargs": easydict(xflip=1e8)}),
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10.zip"}}
        with path.open("wb") as f:
            pickle.dump(data, f, protocol=4)
    return path


# ---------------------------------------------------------------------------------------------------
# Fixtures: a randomised micro network of ours and its EDM-named tensors.


def micro_net(arch: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(arch, 32, 3, 3, **{**MICRO, **overrides}).eval()
    with torch.no_grad():  # move the (near-)zero initialised layers off zero so every tensor shows up
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def edm_tensors(net: torch.nn.Module, spec: EDMSpec, taps: tuple) -> dict[str, torch.Tensor]:
    """net's tensors under EDM names, plus what only EDM stores: resampling filters and map_augment."""
    flat = songunet_to_edm_state(net)
    t = torch.tensor(taps, dtype=torch.float32)
    for conv in spec.resampling:
        flat[f"{conv}.resample_filter"] = (t.outer(t) / t.sum().square())[None, None]
    flat["map_augment.weight"] = torch.randn(flat["map_layer0.weight"].shape[1], 9)
    return flat


def setup(arch: str, **overrides):
    net = micro_net(arch, **overrides)
    family = {**FAMILY[arch], **overrides}
    spec = edm_spec(**{**MICRO, **family})
    return net, spec, edm_tensors(net, spec, FAMILY[arch]["taps"])


def inputs(label_dim: int = 0):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    noise = torch.tensor([-1.2, 0.7])  # ln(sigma) / 4 at sigma ~ 0.008 and ~ 16
    labels = F.one_hot(torch.tensor([3, 7]), label_dim).float() if label_dim else None
    return x, noise, labels


VARIANTS = {"ncsnpp": ("ncsnpp", {}), "ddpmpp": ("ddpmpp", {}),
            "skip-skip-cond": ("ncsnpp", {"encoder_type": "skip", "decoder_type": "skip", "label_dim": 10})}


# ---------------------------------------------------------------------------------------------------
# The key mapping against EDM's construction.


@pytest.mark.parametrize("arch", ["ncsnpp", "ddpmpp"])
def test_cifar10_tensor_names_and_shapes_are_edms(arch):
    with torch.device("meta"):
        net = build_network(arch, 32, 3, 3, **CIFAR)
        ours = {k: tuple(v.shape) for k, v in songunet_to_edm_state(net).items()}
    assert ours == edm_spec(**CIFAR, **FAMILY[arch]).shapes
    assert len(edm_key_map(net)) == len(set(edm_key_map(net).values()))  # one to one


@pytest.mark.parametrize("variant", VARIANTS)
def test_micro_tensor_names_and_shapes_are_edms(variant):
    arch, overrides = VARIANTS[variant]
    net, spec, _ = setup(arch, **overrides)
    assert {k: tuple(v.shape) for k, v in songunet_to_edm_state(net).items()} == spec.shapes


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_network_computes_edms_forward(variant):
    arch, overrides = VARIANTS[variant]
    net, spec, flat = setup(arch, **overrides)
    fresh = build_network(arch, 32, 3, 3, **{**MICRO, **overrides}).eval()
    fresh.load_state_dict(convert_songunet_state(flat, fresh))
    x, noise, labels = inputs(overrides.get("label_dim", 0))
    with torch.no_grad():
        expected = edm_forward(flat, spec, x, noise, labels)
        torch.testing.assert_close(fresh(x, noise, labels), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("layout", ["_swap_halves", "qkv_from_edm"])
def test_each_layout_change_is_needed(monkeypatch, layout):
    """Without the sin/cos swap or the qkv regrouping the converted network no longer computes EDM's output."""
    net, spec, flat = setup("ncsnpp")
    monkeypatch.setattr(import_edm, layout, lambda t, *args: t)
    fresh = build_network("ncsnpp", 32, 3, 3, **MICRO).eval()
    fresh.load_state_dict(convert_songunet_state(flat, fresh))
    x, noise, _ = inputs()
    with torch.no_grad():
        expected = edm_forward(flat, spec, x, noise)
        assert (fresh(x, noise) - expected).abs().max() > 1e-2 * expected.abs().max()


@pytest.mark.parametrize("arch", ["ncsnpp", "ddpmpp"])
def test_network_section_is_read_from_the_tensors(arch):
    _, _, flat = setup(arch)
    detected, network = infer_network(flat)
    assert detected == arch
    assert network == {"arch": arch, "model_channels": 16, "channel_mult": [1, 2, 2], "num_blocks": 1,
                       "attn_resolutions": [16], "options": {}}


# ---------------------------------------------------------------------------------------------------
# Reading the pickle.


def test_pickle_loads_without_nvlabs_code_and_never_runs_it(tmp_path):
    _, spec, flat = setup("ncsnpp")
    path = edm_pickle(tmp_path / "edm.pkl", flat, spec)
    assert "torch_utils" not in sys.modules and importlib.util.find_spec("torch_utils") is None
    assert "dnnlib" not in sys.modules and importlib.util.find_spec("dnnlib") is None
    state = load_edm_pickle(path)
    assert set(state) == set(flat)
    assert all(torch.equal(state[k], flat[k]) for k in flat)
    pickled = read_edm_pickle(path)
    assert (pickled.precond_class, pickled.network_class) == ("EDMPrecond", "SongUNet")
    assert pickled.precond_attrs["img_resolution"] == 32 and pickled.module_src == MODULE_SRC
    assert pickled.other_keys == ["augment_pipe", "dataset_kwargs", "loss_fn"]


def test_unknown_globals_become_inert_stand_ins():
    payload = b"cos\nsystem\n(S'echo never'\ntR."  # protocol 0: os.system('echo never')
    loaded = import_edm.EDMUnpickler(io.BytesIO(payload)).load()
    assert isinstance(loaded, StandIn) and loaded.args == ("echo never",)


def test_not_a_pickle_is_named(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(EDMImportError, match="not an EDM network pickle"):
        read_edm_pickle(path)
    torch.save({"ema": 1}, tmp_path / "other.pt")
    with pytest.raises(EDMImportError, match=r"other\.pt"):
        read_edm_pickle(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------------
# Errors of the conversion.


def test_key_mismatch_lists_every_disagreement():
    net, _, flat = setup("ncsnpp")
    flat = dict(flat)
    del flat["enc.16x16_block0.qkv.weight"]
    flat["enc.16x16_block0.extra.weight"] = torch.zeros(1)
    flat["dec.32x32_aux_conv.bias"] = torch.zeros(5)
    flat["enc.16x16_aux_residual.resample_filter"] = torch.full((1, 1, 2, 2), 0.25)
    with pytest.raises(StateMismatchError) as error:
        convert_songunet_state(flat, net)
    message = str(error.value)
    assert "enc.16x16_block0.qkv.weight (for enc_blocks.1.0.attn.qkv.weight)" in message
    assert "enc.16x16_block0.extra.weight" in message
    assert "dec.32x32_aux_conv.bias (5,) -> dec_heads.0.2.bias (3,)" in message
    assert "enc.16x16_aux_residual.resample_filter [0.25, 0.25, 0.25, 0.25]" in message


def test_other_sizes_do_not_fit():
    _, _, flat = setup("ncsnpp")
    wider = build_network("ncsnpp", 32, 3, 3, **{**MICRO, "model_channels": 32})
    with pytest.raises(StateMismatchError, match="shape mismatch"):
        convert_songunet_state(flat, wider)


# ---------------------------------------------------------------------------------------------------
# The command.


def sigma_inputs():
    generator = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.01, 1.5])
    return torch.randn(2, 3, 32, 32, generator=generator) * (1 + sigma.reshape(-1, 1, 1, 1)), sigma


def run_cli(args: list, capsys) -> tuple[int, str]:
    code = import_edm.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_writes_a_teacher_that_load_model_reads(tmp_path, capsys):
    _, spec, flat = setup("ncsnpp")
    pkl = edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-ve.pkl", flat, spec, sigma_min=0,
                     sigma_max=float("inf"), sigma_data=0.5)
    out = tmp_path / "checkpoints" / "teacher.pt"
    code, err = run_cli([pkl, "--out", out, "--arch", "ncsnpp"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.pt"]
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["kind"] == "teacher" and ckpt["step"] == 0 and ckpt["precond"] == {"type": "edm", "sigma_data": 0.5}
    assert ckpt["network"] == {"arch": "ncsnpp", "model_channels": 16, "channel_mult": [1, 2, 2], "num_blocks": 1,
                               "attn_resolutions": [16], "options": {}}
    assert ckpt["diffusion"] == {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sigma_data": 0.5}
    assert ckpt["source"]["dropped"] == sorted(k for k in flat if k.endswith("resample_filter") or "augment" in k)
    teacher = models.load_model(out)
    x, sigma = sigma_inputs()
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), 0.5 * s / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    with torch.no_grad():  # EDMPrecond, sigma_data 0.5: c_noise = ln(sigma) / 4
        expected = c_skip * x + c_out * edm_forward(flat, spec, c_in * x, sigma.log() / 4)
        torch.testing.assert_close(teacher(x, sigma), expected, rtol=1e-4, atol=1e-4)


def test_cli_missing_file_says_where_to_get_it(tmp_path, capsys):
    code, err = run_cli([tmp_path / "edm-cifar10-32x32-uncond-ve.pkl", "--arch", "ncsnpp"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert import_edm.RELEASE_URL in err and "no such file" in err


def test_cli_refuses_the_wrong_arch(tmp_path, capsys):
    _, spec, flat = setup("ddpmpp")
    pkl = edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", flat, spec, sigma_data=0.5)
    code, err = run_cli([pkl, "--out", tmp_path / "teacher.pt", "--arch", "ncsnpp"], capsys)
    assert code == 2 and "ddpmpp network (--arch ddpmpp), not --arch ncsnpp" in err
    assert not (tmp_path / "teacher.pt").exists()


def test_cli_refuses_conditional_networks(tmp_path, capsys):
    _, spec, flat = setup("ncsnpp", label_dim=10)
    pkl = edm_pickle(tmp_path / "edm-cifar10-32x32-cond-ve.pkl", flat, spec, label_dim=10, sigma_data=0.5)
    code, err = run_cli([pkl, "--arch", "ncsnpp", "--out", tmp_path / "teacher.pt"], capsys)
    assert code == 2 and "class-conditional network (label_dim=10)" in err


def test_cli_checks_the_stored_source(tmp_path, capsys):
    _, spec, flat = setup("ncsnpp")
    pkl = edm_pickle(tmp_path / "edm.pkl", flat, spec, module_src=MODULE_SRC.replace(".flip(1)", ""),
                     sigma_data=0.5)
    code, err = run_cli([pkl, "--arch", "ncsnpp", "--out", tmp_path / "teacher.pt"], capsys)
    assert code == 2 and "sin/cos" in err
    code, err = run_cli([pkl, "--arch", "ncsnpp", "--out", tmp_path / "teacher.pt", "--skip-source-check"], capsys)
    assert code == 0, err


def load_model_with_precond(path, device="cpu", weights="ema"):
    """pipeline.models.load_model with the precond dispatch proposed for it (see import_edm's docstring)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = models.build_model(ckpt["kind"], ckpt["network"], ckpt["diffusion"], dropout=0.0)
    precond = ckpt.get("precond") or {"type": "edm"}
    if precond["type"] != "edm":
        model = import_edm.precond_model(model.net, precond, ckpt["diffusion"])
    model.load_state_dict(ckpt[weights])
    return model.to(device).eval().requires_grad_(False)


BASELINES = {  # EDM's VPPrecond and VEPrecond: (pickle attributes, c_skip, c_out, c_in, c_noise)
    "VPPrecond": ({"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
                  lambda s: 1, lambda s: -s, lambda s: 1 / (s**2 + 1).sqrt(),
                  lambda s: 999 * ((0.1**2 + 2 * 19.9 * (1 + s**2).log()).sqrt() - 0.1) / 19.9),
    "VEPrecond": ({"sigma_min": 0.02, "sigma_max": 100},
                  lambda s: 1, lambda s: s, lambda s: 1, lambda s: (0.5 * s).log()),
}


@pytest.mark.parametrize("precond", BASELINES)
def test_baseline_preconditioning_needs_the_load_model_dispatch(tmp_path, capsys, monkeypatch, precond):
    attrs, c_skip, c_out, c_in, c_noise = BASELINES[precond]
    _, spec, flat = setup("ncsnpp")
    pkl = edm_pickle(tmp_path / "baseline.pkl", flat, spec, precond=precond, **attrs)
    out = tmp_path / "teacher.pt"
    code, err = run_cli([pkl, "--arch", "ncsnpp", "--out", out], capsys)  # today's load_model: refused, no file
    assert code == 2 and "precond dispatch" in err and list(tmp_path.iterdir()) == [pkl]
    monkeypatch.setattr(models, "load_model", load_model_with_precond)
    code, err = run_cli([pkl, "--arch", "ncsnpp", "--out", out], capsys)
    assert code == 0, err
    teacher = models.load_model(out)
    x, sigma = sigma_inputs()
    s = sigma.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        expected = c_skip(s) * x + c_out(s) * edm_forward(flat, spec, c_in(s) * x, c_noise(sigma))
        torch.testing.assert_close(teacher(x, sigma), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_teacher_source_import_replaces_the_training_stage(tmp_path):
    """teacher.source: import puts import_teacher in the DAG; its command writes the checkpoint CD reads."""
    import shlex
    import subprocess
    from pathlib import Path

    from pipeline.config import load
    from pipeline.stages import checkpoint, stages

    _, spec, flat = setup("ncsnpp")
    pkl = edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-ve.pkl", flat, spec, sigma_data=0.5)
    root = Path(__file__).resolve().parents[1]
    cfg = load(root / "params.yaml", "tiny", ["teacher.source=import", f"teacher.edm_pickle={pkl}"])
    by_name = {s.name: s for s in stages(cfg)}
    assert "train_teacher" not in by_name and str(pkl) in by_name["import_teacher"].deps
    assert checkpoint(cfg, "teacher") in by_name["distill_cd"].deps
    command = shlex.split(by_name["import_teacher"].cmd)
    assert command[:3] == ["python", "-m", "pipeline.import_edm"]
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert result.returncode == 0, result.stderr
    teacher = models.load_model(tmp_path / checkpoint(cfg, "teacher"))
    assert teacher.net.img_resolution == 32 and teacher.label_dim == 0
