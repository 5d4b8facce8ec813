"""Import NVlabs' published EDM checkpoints (Karras et al., 2022) for CIFAR-10 as this pipeline's teacher.

    python -m pipeline.import_edm edm-cifar10-32x32-uncond-ve.pkl --arch ncsnpp [--out checkpoints/cifar10/teacher.pt]

Files: https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/ -- edm-cifar10-32x32-uncond-ve.pkl is NCSN++ (the
paper's CIFAR-10 teacher, = params.yaml's network), edm-cifar10-32x32-uncond-vp.pkl is DDPM++. Both were trained
with EDM's own preconditioning (EDMPrecond: c_noise = ln(sigma) / 4), which is what `pipeline.models.Denoiser`
does, so they need nothing else. The baseline/ pickles (VPPrecond, VEPrecond) carry other scalings and another
c_noise: they are recorded in the checkpoint's `precond` entry and need the dispatch in `load_model` that
`precond_model` provides; the self-check below refuses to leave a checkpoint that load_model misreads.

The file format. EDM's training loop pickles dict(ema=<EDMPrecond>, loss_fn, augment_pipe, dataset_kwargs) with
NVlabs' `torch_utils.persistence`: every object of a persistent class is written as the call
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta = {type, version, module_src, class_name, state},
where state is the object's __dict__ (for a module: _parameters, _buffers, _modules, ...). `EDMUnpickler` maps
that call to a stand-in keeping class_name, state and the source text -- which is read, never executed -- so
neither NVlabs' code nor `torch_utils`/`dnnlib` is needed, and no code from the file runs: the only callables
it reaches are torch's tensor rebuilders, OrderedDict, numpy scalars and dtypes, and inert stand-ins.

Key mapping, EDM's SongUNet (training/networks.py) -> pipeline.networks.SongUNet; r = 32 >> level, L levels:

    EDM                                     ours
    map_noise.freqs (NCSN++ only)           map_noise.freqs
    map_label.{weight,bias}                 map_label.*              rows: halves swapped (1)
    map_augment.weight                      --                       dropped (3)
    map_layer0.weight / .bias               map_layer0.*             weight columns: halves swapped (1)
    map_layer1.*                            map_layer1.*
    enc.32x32_conv                          stem
    enc.{r}x{r}_down                        enc_down.{level-1}
    enc.{r}x{r}_aux_residual (NCSN++)       enc_aux.{level-1}        (_aux_skip for encoder_type 'skip')
    enc.{r}x{r}_aux_down                    aux_down (shared)        filter buffer only: dropped (2)
    enc.{r}x{r}_block{i}                    enc_blocks.{level}.{i}
    dec.{r}x{r}_in0, _in1 (lowest r)        mid.0, mid.1
    dec.{r}x{r}_up                          dec_up.{L-2-level}
    dec.{r}x{r}_block{i}                    dec_blocks.{L-1-level}.{i}
    dec.{r}x{r}_aux_up                      aux_up (shared)          filter buffer only: dropped (2)
    dec.{r}x{r}_aux_norm / _aux_conv        dec_heads.{k}.0 / .2     k-th head from the lowest resolution
  inside a block (EDM UNetBlock -> our ResidualBlock):
    norm0 conv0 affine norm1 conv1 skip     the same names
    norm2 / qkv / proj                      attn.norm / attn.qkv / attn.proj     qkv rows regrouped (4)
    <conv>.resample_filter (up/down convs)  --                       ours is not persistent: checked, dropped (2)

(1) EDM's SongUNet swaps the halves of the noise embedding ([cos, sin] -> [sin, cos]) before adding map_label
    and applying map_layer0; ours never swaps. Swapping map_layer0's input columns and map_label's output rows
    gives the same map_layer0 output exactly.
(2) The FIR resampling filter is fixed by the arch ([1,1] DDPM++, [1,3,3,1] NCSN++); every stored one is
    checked against ours, which is what tells a DDPM++ file from an NCSN++ network of the same shapes.
(3) The augmentation-label embedding (augment_dim 9, bias-free) is only used when augment_labels are passed,
    never when sampling; dropping it equals conditioning on "not augmented".
(4) EDM reads the qkv conv's 3C outputs as (heads, C/heads, 3) -- q, k, v innermost -- ours as
    (3, heads, C/heads).
The rest matches EDM's source line for line: GroupNorm groups min(32, C // 4) and eps 1e-6, FIR up/down order
and padding, the fused conv-then-downsample of the NCSN++ input pyramid, skip scale 1/sqrt(2) after the residual
and after attention, attention scale 1/sqrt(C/heads), positional frequencies with endpoint, Fourier
2 pi freqs, label scale sqrt(label_dim), decoder concatenation order. Checked by tests/test_import_edm.py
against an independent functional rendering of EDM's forward pass.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import models
from pipeline.data import sha256_file
from pipeline.models import Denoiser, Preconditioned, atomic_save, build_model
from pipeline.networks import SongUNet

RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
DEFAULT_OUT = "checkpoints/cifar10/teacher.pt"

# EDM's train.py settings per --arch (the SongUNet keywords that tell the families apart).
EDM_ARCHS: dict[str, dict[str, Any]] = {
    "ncsnpp": {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
               "decoder_type": "standard", "resample_filter": (1, 3, 3, 1)},
    "ddpmpp": {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
               "decoder_type": "standard", "resample_filter": (1, 1)},
}
PRECOND_TYPES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
# Sampling noise range of EDM for CIFAR-10 (= params.yaml's diffusion section).
EDM_DIFFUSION = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


class EDMImportError(ValueError):
    """A pickle that cannot become this pipeline's teacher; the message says why."""


class StateMismatchError(EDMImportError):
    """EDM tensors and our network's do not correspond one to one."""


# ----------------------------------------------------------------------------------------------------------
# Unpickling without NVlabs' code.


class StandIn:
    """An inert object standing for one the pickle names but we do not import: it keeps what it was given."""

    pickled_module = ""
    pickled_name = ""
    # Class-level defaults: pickle's NEWOBJ creates instances without calling __init__.
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # A stand-in for a dict or list subclass still receives its items.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("listed", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("listed", []).extend(values)

    @property
    def class_name(self) -> str:
        return self.pickled_name

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_module}.{self.pickled_name}>"


class PersistentObject(StandIn):
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` would have built, as data."""

    pickled_module = "torch_utils.persistence"

    def __init__(self, meta: dict):
        super().__init__()
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise EDMImportError(f"unexpected torch_utils.persistence record: {type(meta).__name__} "
                                 f"of type {meta.get('type') if isinstance(meta, dict) else '?'}")
        self.persistent_class = str(meta.get("class_name"))
        self.module_src = meta.get("module_src") or ""  # kept as text to check conventions; never executed
        self.version = meta.get("version")
        self.state = meta.get("state")

    @property
    def class_name(self) -> str:
        return self.persistent_class

    def __repr__(self) -> str:
        return f"<persistent {self.persistent_class}>"


_STAND_IN_CLASSES: dict[tuple[str, str], type] = {}


def _stand_in_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STAND_IN_CLASSES:
        _STAND_IN_CLASSES[key] = type(name, (StandIn,), {"pickled_module": module, "pickled_name": name})
    return _STAND_IN_CLASSES[key]


def _storage_from_bytes(data: bytes) -> Any:
    # torch pickles a storage as torch.save bytes inside the pickle; weights_only keeps that inner load inert.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_multiarray(name: str) -> Any:
    try:  # numpy >= 2 keeps it in numpy._core; pickles written by numpy 1.x name numpy.core
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


_TORCH_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
_PERSISTENCE_MODULES = ("torch_utils.persistence",)
_EASYDICT = {("dnnlib", "EasyDict"), ("dnnlib.util", "EasyDict")}


class EDMUnpickler(pickle.Unpickler):
    """Resolves the names an EDM pickle mentions to tensors, plain containers and stand-ins; imports nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _PERSISTENCE_MODULES and name == "_reconstruct_persistent_obj":
            return PersistentObject
        if (module, name) in _EASYDICT:
            return dict  # EasyDict is a dict with attribute access; the dict is all we read
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in _TORCH_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _storage_from_bytes
        if module == "torch" and (name in ("device", "Size") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
            return _numpy_multiarray(name)
        if module == "numpy" and name in ("dtype", "ndarray"):
            return getattr(np, name)
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        # torch.nn containers (EDM's enc/dec ModuleDict), torch_utils/dnnlib helpers, anything else: inert.
        return _stand_in_class(module, name)


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    # copyreg._reconstructor (pickle protocols 0 and 1), limited to the classes find_class hands out.
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise pickle.UnpicklingError(f"refusing copyreg._reconstructor for {cls!r}")
    return cls()


# ----------------------------------------------------------------------------------------------------------
# Reading a pickle.


@dataclass
class EDMPickle:
    """The parts of an EDM network pickle the import needs."""

    precond_class: str  # EDMPrecond, VPPrecond, ...
    precond_attrs: dict[str, Any]  # its plain attributes: sigma_data, label_dim, beta_d, ...
    network_class: str  # SongUNet, DhariwalUNet
    state: dict[str, torch.Tensor]  # the network's persistent tensors, EDM key names
    module_src: str = ""  # source text of the network's module, as stored (never executed)
    other_keys: list[str] = field(default_factory=list)  # the pickle's other top-level entries


def _module_fields(obj: Any) -> dict | None:
    """The __dict__ of a pickled torch module (persistent or not), or None if obj is not one."""
    state = obj.state if isinstance(obj, StandIn) else None
    return state if isinstance(state, dict) and "_parameters" in state and "_modules" in state else None


def module_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """state_dict() of a pickled module tree: parameters and persistent buffers, dotted names, in module order."""
    fields = _module_fields(obj)
    if fields is None:
        raise EDMImportError(f"{prefix or 'object'}: expected a pickled torch module, got {obj!r}")
    out: dict[str, torch.Tensor] = {}
    non_persistent = set(fields.get("_non_persistent_buffers_set") or ())
    for name, value in list(fields["_parameters"].items()) + list((fields.get("_buffers") or {}).items()):
        if value is not None and name not in non_persistent:
            if not isinstance(value, torch.Tensor):
                raise EDMImportError(f"{prefix}{name}: expected a tensor, got {value!r}")
            out[prefix + name] = value.detach()
    for name, child in fields["_modules"].items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def _plain_attrs(fields: dict) -> dict[str, Any]:
    plain = (bool, int, float, str, type(None), np.generic)
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fields.items()
            if not k.startswith("_") and isinstance(v, plain)}


def read_edm_pickle(path: str | os.PathLike) -> EDMPickle:
    """Unpickle an EDM network pickle (network-snapshot-*.pkl or a published one) without NVlabs' code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (EDM's checkpoints: {RELEASE_URL})")
    try:
        with path.open("rb") as f:
            data = EDMUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise EDMImportError(f"{path}: not an EDM network pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "ema" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise EDMImportError(f"{path}: expected a dict with an 'ema' network, got {keys}")
    ema = data["ema"]
    ema_fields = _module_fields(ema)
    model = (ema_fields or {}).get("_modules", {}).get("model")
    if ema_fields is None or _module_fields(model) is None:
        raise EDMImportError(f"{path}: 'ema' is {ema!r}, not an EDM preconditioner holding a .model network")
    return EDMPickle(precond_class=ema.class_name, precond_attrs=_plain_attrs(ema_fields),
                     network_class=model.class_name, state=module_tensors(model),
                     module_src=getattr(model, "module_src", ""),
                     other_keys=sorted(str(k) for k in data if k != "ema"))


def load_edm_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The EMA network's tensors (EDM key names, e.g. 'enc.32x32_conv.weight') of an EDM pickle."""
    return read_edm_pickle(path).state


def _class_source(module_src: str, name: str) -> str | None:
    match = re.search(rf"^class {name}\b.*?(?=^\S)", module_src + "\n#", flags=re.M | re.S)
    return match.group(0) if match else None


def source_problems(module_src: str) -> list[str]:
    """Conventions the key mapping assumes, looked up in the pickle's own (never executed) source text."""
    song, block = _class_source(module_src, "SongUNet"), _class_source(module_src, "UNetBlock")
    problems = []
    if song is None or block is None:
        return ["the pickle's source has no class SongUNet / UNetBlock"]
    if not re.search(r"\.flip\(\s*1\s*\)", song):
        problems.append("SongUNet does not swap sin/cos of the noise embedding (no .flip(1))")
    if not re.search(r"num_heads\s*,\s*x\.shape\[1\]\s*//\s*self\.num_heads\s*,\s*3\s*,\s*-1\s*\)", block):
        problems.append("UNetBlock does not split qkv as (heads, channels, 3)")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Network hyperparameters, from the tensors themselves.


def _resample_taps(edm_state: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    filters = [t for k, t in edm_state.items() if k.endswith(".resample_filter")]
    if not filters:
        return None
    row = filters[0].reshape(filters[0].shape[-2:])[0].double()  # outer(t, t) / sum(t)^2: row 0 is t0 t / sum^2
    return tuple(int(round(v)) for v in (row / row[0]).tolist())


def infer_network(edm_state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """(arch, network section) of an EDM SongUNet state: sizes from the tensors, family from its signature."""
    stems = [k for k in edm_state if re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k)]
    if len(stems) != 1:
        raise EDMImportError(f"not an EDM SongUNet state: {len(stems)} 'enc.<r>x<r>_conv.weight' tensors")
    resolution = int(re.match(r"enc\.(\d+)x", stems[0]).group(1))
    model_channels = edm_state[stems[0]].shape[0]
    levels = sorted({int(m.group(1)) for k in edm_state if (m := re.match(r"enc\.(\d+)x\1_", k))}, reverse=True)
    channel_mult, num_blocks = [], 0
    for r in levels:
        blocks = {int(m.group(1)) for k in edm_state if (m := re.match(rf"enc\.{r}x{r}_block(\d+)\.", k))}
        num_blocks = len(blocks)
        channel_mult.append(edm_state[f"enc.{r}x{r}_block0.conv0.weight"].shape[0] // model_channels)
    attn = sorted({r for r in levels for k in edm_state if k.startswith(f"enc.{r}x{r}_block") and ".qkv." in k})
    heads = {r for r in levels if f"dec.{r}x{r}_aux_conv.weight" in edm_state}
    signature = {
        "embedding_type": "fourier" if "map_noise.freqs" in edm_state else "positional",
        "channel_mult_noise": edm_state["map_layer0.weight"].shape[1] // model_channels,
        "encoder_type": ("residual" if any("_aux_residual." in k for k in edm_state)
                         else "skip" if any("_aux_skip." in k for k in edm_state) else "standard"),
        "decoder_type": "skip" if len(heads) > 1 else "standard",
        "resample_filter": _resample_taps(edm_state),
    }
    arch = next((a for a, s in EDM_ARCHS.items()
                 if all(signature[k] == v for k, v in s.items() if signature[k] is not None)), None)
    if arch is None:
        raise EDMImportError(f"the network is neither EDM's NCSN++ nor DDPM++: {signature}")
    options: dict[str, Any] = {}
    if edm_state["map_layer0.weight"].shape[0] != 4 * model_channels:
        options["channel_mult_emb"] = edm_state["map_layer0.weight"].shape[0] // model_channels
    if "map_label.weight" in edm_state:
        options["label_dim"] = edm_state["map_label.weight"].shape[1]
    if resolution != models.IMG_RESOLUTION:
        raise EDMImportError(f"the network is for {resolution}x{resolution} images; this pipeline's are "
                             f"{models.IMG_RESOLUTION}x{models.IMG_RESOLUTION} (CIFAR-10)")
    return arch, {"arch": arch, "model_channels": model_channels, "channel_mult": channel_mult,
                  "num_blocks": num_blocks, "attn_resolutions": attn, "options": options}


# ----------------------------------------------------------------------------------------------------------
# The key mapping (see the module docstring) and the two layout changes.


def _module_renames(net: SongUNet) -> dict[str, str]:
    """Our module prefix -> EDM's, for every module of `net` that holds tensors."""
    names = {k: k for k in ("map_noise", "map_label", "map_layer0", "map_layer1")}
    levels = len(net.enc_blocks)
    res = [net.img_resolution >> level for level in range(levels)]
    names["stem"] = f"enc.{res[0]}x{res[0]}_conv"
    aux = {"skip": "aux_skip", "residual": "aux_residual"}.get(net.encoder_type)
    for level in range(levels):
        r = res[level]
        if level > 0:
            names[f"enc_down.{level - 1}"] = f"enc.{r}x{r}_down"
            if aux:
                names[f"enc_aux.{level - 1}"] = f"enc.{r}x{r}_{aux}"
        for i in range(len(net.enc_blocks[level])):
            names[f"enc_blocks.{level}.{i}"] = f"enc.{r}x{r}_block{i}"
    low = res[-1]
    names["mid.0"], names["mid.1"] = f"dec.{low}x{low}_in0", f"dec.{low}x{low}_in1"
    head_levels = list(range(levels - 1, -1, -1)) if net.decoder_type == "skip" else [0]
    for i, level in enumerate(range(levels - 1, -1, -1)):  # decoder index i runs from the lowest resolution up
        r = res[level]
        if i > 0:
            names[f"dec_up.{i - 1}"] = f"dec.{r}x{r}_up"
        for j in range(len(net.dec_blocks[i])):
            names[f"dec_blocks.{i}.{j}"] = f"dec.{r}x{r}_block{j}"
    for k, level in enumerate(head_levels):
        r = res[level]
        names[f"dec_heads.{k}.0"], names[f"dec_heads.{k}.2"] = f"dec.{r}x{r}_aux_norm", f"dec.{r}x{r}_aux_conv"
    return names


_INSIDE_BLOCK = {"attn.norm": "norm2", "attn.qkv": "qkv", "attn.proj": "proj"}


def edm_key_map(net: SongUNet) -> dict[str, str]:
    """Our state-dict key -> the EDM SongUNet key of the same tensor (before the layout changes)."""
    renames = _module_renames(net)
    out = {}
    for key in net.state_dict():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix, rest = ".".join(parts[:n]), ".".join(parts[n:])
            if prefix in renames:
                for ours, edm in _INSIDE_BLOCK.items():
                    if rest.startswith(ours + "."):
                        rest = edm + rest[len(ours):]
                out[key] = f"{renames[prefix]}.{rest}"
                break
        else:
            raise KeyError(f"{key}: no EDM counterpart known (pipeline.networks.SongUNet changed?)")
    return out


def _swap_halves(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = t.shape[dim] // 2
    return torch.cat([t.narrow(dim, half, t.shape[dim] - half), t.narrow(dim, 0, half)], dim=dim)


def qkv_from_edm(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv rows (heads, C/heads, 3) -> (3, heads, C/heads)."""
    rest = t.shape[1:]
    return t.reshape(num_heads, -1, 3, *rest).movedim(2, 0).reshape(t.shape)


def qkv_to_edm(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv rows (3, heads, C/heads) -> (heads, C/heads, 3); the inverse of qkv_from_edm."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).movedim(0, 2).reshape(t.shape)


def _layout_change(net: SongUNet, key: str):
    """(to ours, to EDM) tensor maps for our key, or None where the tensor is the same in both."""
    if key == "map_layer0.weight":
        return (lambda t: _swap_halves(t, 1),) * 2
    if key in ("map_label.weight", "map_label.bias"):
        return (lambda t: _swap_halves(t, 0),) * 2
    if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
        heads = net.get_submodule(key.rsplit(".", 2)[0]).num_heads
        return (lambda t: qkv_from_edm(t, heads)), (lambda t: qkv_to_edm(t, heads))
    return None


def _ignored(edm_key: str) -> bool:
    return edm_key.endswith(".resample_filter") or edm_key.startswith("map_augment.")


def _expected_filter(net: SongUNet) -> torch.Tensor:
    return net.aux_down.resample_filter  # every FIR resampler of a SongUNet shares the arch's filter


def convert_songunet_state(edm_state: dict[str, torch.Tensor], net: SongUNet) -> dict[str, torch.Tensor]:
    """Our state dict for `net` from an EDM SongUNet's tensors; StateMismatchError lists every disagreement."""
    key_map = edm_key_map(net)
    ours = net.state_dict()
    wanted = set(key_map.values())
    missing = [f"{edm} (for {key})" for key, edm in key_map.items() if edm not in edm_state]
    unexpected = [k for k in edm_state if k not in wanted and not _ignored(k)]
    shapes = [f"{edm} {tuple(edm_state[edm].shape)} -> {key} {tuple(ours[key].shape)}"
              for key, edm in key_map.items() if edm in edm_state and edm_state[edm].shape != ours[key].shape]
    expected_filter = _expected_filter(net)
    filters = [f"{k} {edm_state[k].flatten().tolist()} (ours: {expected_filter.flatten().tolist()})"
               for k in edm_state if k.endswith(".resample_filter")
               and not (edm_state[k].shape == expected_filter.shape
                        and torch.allclose(edm_state[k].float(), expected_filter.float()))]
    problems = [(f"{len(missing)} EDM tensor(s) missing", missing),
                (f"{len(unexpected)} EDM tensor(s) with no counterpart", unexpected),
                (f"{len(shapes)} shape mismatch(es)", shapes),
                (f"{len(filters)} resampling filter(s) of another arch", filters)]
    problems = [(title, items) for title, items in problems if items]
    if problems:
        lines = [f"{title}: " + ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
                 for title, items in problems]
        raise StateMismatchError("EDM SongUNet state does not fit the network:\n  " + "\n  ".join(lines))
    out = {}
    for key, edm in key_map.items():
        tensor = edm_state[edm]
        change = _layout_change(net, key)
        out[key] = (change[0](tensor) if change else tensor).to(ours[key].dtype).clone()
    return out


def songunet_to_edm_state(net: SongUNet) -> dict[str, torch.Tensor]:
    """The inverse mapping: `net`'s tensors under EDM's SongUNet names and layouts (for tests and export)."""
    ours, out = net.state_dict(), {}
    for key, edm in edm_key_map(net).items():
        tensor = ours[key]
        change = _layout_change(net, key)
        out[edm] = (change[1](tensor) if change else tensor).clone()
    return out


# ----------------------------------------------------------------------------------------------------------
# Preconditioning. EDMPrecond is our Denoiser; the baselines have their own scalings and c_noise.


class _BaselineDenoiser(Preconditioned):
    """EDM's baseline preconditioners: c_skip, c_out, c_in and c_noise all differ from EDMPrecond."""

    def noise_labels(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        # Preconditioned.forward with noise_labels in place of models.c_noise.
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = self.scalings(sigma)
        return c_skip * x + c_out * self.net(c_in * x, self.noise_labels(sigma).flatten(), class_labels)


class VPDenoiser(_BaselineDenoiser):
    """EDM's VPPrecond: D = x - sigma F(x / sqrt(sigma^2 + 1), (M - 1) t(sigma))."""

    def __init__(self, net: torch.nn.Module, beta_d: float, beta_min: float, M: int, sigma_min: float = 0.002):
        super().__init__(net, sigma_data=0.5, sigma_min=sigma_min)
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, M

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt()

    def noise_labels(self, sigma):
        # t(sigma), the inverse of sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
        t = ((self.beta_min**2 + 2 * self.beta_d * (sigma**2).log1p()).sqrt() - self.beta_min) / self.beta_d
        return (self.M - 1) * t


class VEDenoiser(_BaselineDenoiser):
    """EDM's VEPrecond: D = x + sigma F(x, ln(sigma / 2))."""

    def scalings(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma)

    def noise_labels(self, sigma):
        return (0.5 * sigma).log()


def precond_record(pickled: EDMPickle) -> dict[str, Any]:
    """The checkpoint's `precond` entry: which preconditioning the imported weights were trained under."""
    kind = PRECOND_TYPES.get(pickled.precond_class)
    if kind is None:
        raise EDMImportError(f"preconditioner {pickled.precond_class} is not supported "
                             f"(only {', '.join(PRECOND_TYPES)})")
    attrs = pickled.precond_attrs
    if kind == "edm":
        return {"type": "edm", "sigma_data": float(attrs.get("sigma_data", 0.5))}
    if kind == "vp":
        return {"type": "vp", "beta_d": float(attrs["beta_d"]), "beta_min": float(attrs["beta_min"]),
                "M": int(attrs["M"])}
    return {"type": "ve"}


def precond_model(net: torch.nn.Module, precond: dict, diffusion: dict) -> Preconditioned:
    """The denoiser around `net` for a checkpoint's `precond` entry (absent = EDM's, our Denoiser)."""
    kind = precond.get("type", "edm")
    if kind == "edm":
        return Denoiser(net, diffusion["sigma_data"], diffusion["sigma_min"])
    if kind == "vp":
        return VPDenoiser(net, precond["beta_d"], precond["beta_min"], precond["M"], diffusion["sigma_min"])
    if kind == "ve":
        return VEDenoiser(net, diffusion["sigma_data"], diffusion["sigma_min"])
    raise ValueError(f"unknown precond type {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# The checkpoint.


def teacher_checkpoint(pickled: EDMPickle, arch: str, source: dict | None = None) -> tuple[dict, Preconditioned]:
    """(checkpoint in the layout of Training.state(), the model it holds) for an EDM SongUNet pickle."""
    if pickled.network_class != "SongUNet":
        raise EDMImportError(f"the network is {pickled.network_class}; only SongUNet (NCSN++/DDPM++) is imported")
    detected, network = infer_network(pickled.state)
    if detected != arch:
        raise EDMImportError(f"the pickle holds a {detected} network (--arch {detected}), not --arch {arch}")
    precond = precond_record(pickled)
    diffusion = {**EDM_DIFFUSION, "sigma_data": precond.get("sigma_data", 0.5)}
    model = precond_model(build_model("teacher", network, diffusion, dropout=0.0).net, precond, diffusion)
    model.net.load_state_dict(convert_songunet_state(pickled.state, model.net))
    state = model.state_dict()
    ckpt = {"kind": "teacher", "step": 0, "fingerprint": f"import_edm:{(source or {}).get('sha256', '')}",
            "network": network, "diffusion": diffusion, "precond": precond, "config": None,
            "model": state, "ema": state, "extra": {}, "history": [], "mlflow_run_id": None,
            "source": {**(source or {}), "precond_class": pickled.precond_class,
                       "precond_attrs": pickled.precond_attrs, "network_class": pickled.network_class,
                       "dropped": sorted(k for k in pickled.state if _ignored(k))}}
    return ckpt, model.eval().requires_grad_(False)


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Do two denoisers agree at low, middle and high noise on a fixed random batch?"""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, models.CHANNELS, models.IMG_RESOLUTION, models.IMG_RESOLUTION, generator=generator)
    sigma = torch.tensor([0.002, 0.5, 80.0])
    with torch.no_grad():
        return torch.allclose(a(x * sigma.reshape(-1, 1, 1, 1), sigma), b(x * sigma.reshape(-1, 1, 1, 1), sigma),
                              rtol=1e-5, atol=1e-5)


def import_teacher(pkl: str | os.PathLike, out: str | os.PathLike, arch: str, check_source: bool = True) -> dict:
    """Write `out` from an EDM pickle, after checking that models.load_model reads back the same denoiser."""
    pkl, out = Path(pkl), Path(out)
    pickled = read_edm_pickle(pkl)
    if check_source and pickled.module_src and (problems := source_problems(pickled.module_src)):
        raise EDMImportError("the pickle's source differs from what the key mapping assumes: "
                             + "; ".join(problems))
    if not pickled.module_src and check_source:
        raise EDMImportError("the pickle carries no source text to check the key mapping against")
    label_dim = int(pickled.precond_attrs.get("label_dim", 0) or 0)
    if label_dim:
        raise EDMImportError(f"class-conditional network (label_dim={label_dim}); this pipeline is unconditional: "
                             f"use edm-cifar10-32x32-uncond-*.pkl")
    ckpt, model = teacher_checkpoint(pickled, arch, {"file": pkl.name, "sha256": sha256_file(pkl)})
    staging = out.with_name(f".{out.name}.importing")
    atomic_save(ckpt, staging)
    try:
        if not _same_outputs(models.load_model(staging), model):
            raise EDMImportError(f"pipeline.models.load_model does not read {ckpt['precond']['type']!r} "
                                 "preconditioning (needs the precond dispatch: see pipeline/import_edm.py)")
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pkl", help="EDM network pickle, e.g. edm-cifar10-32x32-uncond-ve.pkl")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"teacher checkpoint to write (default {DEFAULT_OUT})")
    parser.add_argument("--arch", required=True, choices=sorted(EDM_ARCHS),
                        help="ncsnpp for the -ve pickles, ddpmpp for the -vp ones")
    parser.add_argument("--skip-source-check", action="store_true",
                        help="import even if the pickle's stored source differs from the conventions assumed")
    args = parser.parse_args(argv)
    if not Path(args.pkl).is_file():
        print(f"error: {args.pkl}: no such file; download edm-cifar10-32x32-uncond-ve.pkl (NCSN++) or "
              f"-vp.pkl (DDPM++) from {RELEASE_URL}", file=sys.stderr)
        return 2
    try:
        ckpt = import_teacher(args.pkl, args.out, args.arch, check_source=not args.skip_source_check)
    except EDMImportError as e:
        print(f"error: {args.pkl}: {e}", file=sys.stderr)
        return 2
    net = ckpt["network"]
    print(f"wrote {args.out}: {net['arch']} {net['model_channels']}x{net['channel_mult']}, {net['num_blocks']} blocks, "
          f"attention at {net['attn_resolutions']}, {ckpt['source']['precond_class']} "
          f"(precond {ckpt['precond']['type']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
