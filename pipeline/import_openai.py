"""Import openai/consistency_models' published PyTorch checkpoints (Song et al., 2023) as this pipeline's models.

The .pt files at https://openaipublic.blob.core.windows.net/consistency/ are plain state dicts of the official
`cm.unet.UNetModel` (torch.save), read here with torch.load(weights_only=True): no code from the file runs and the
official code is not needed. Each becomes a checkpoint in the layout of `Training.state()` that
`pipeline.models.load_model` reads: the EDM teachers (edm_*_ema.pt) as a "teacher" (Denoiser), the consistency
models (cd_*, ct_*) as "cd" / "ct" (ConsistencyModel), with the network {arch: adm, ..., c_noise: adm}: the
official code feeds its network rescaled_t = 1000 * 0.25 * ln(sigma), and the scalings (EDM's for the teachers,
the boundary-condition ones for CD/CT, sigma_data 0.5, sigma_min 0.002) are ours already.

    from pipeline import import_openai
    ckpt = import_openai.import_checkpoint("downloads/cd_imagenet64_lpips.pt")   # kind "cd" from the table
    import_openai.write_checkpoint(ckpt, "checkpoints/imagenet64/cd.pt")

Key mapping, official UNetModel (resblock_updown True, learn_sigma False) -> pipeline.networks.ADMUNet. n = blocks
per level, L levels; the official input_blocks run stem, then per level n blocks and (but the last) a down block:

    official                                        ours
    time_embed.0 / time_embed.2                     map_layer0 / map_layer1
    label_emb.weight [classes, E] (nn.Embedding)    map_label.weight [E, classes] (bias-free Linear): transposed
    input_blocks.0.0                                stem
    input_blocks.{1 + l(n+1) + i}.0 / .1            enc_blocks.{l}.{i} / its .attn
    input_blocks.{(l+1)(n+1)}.0                     enc_down.{l}        (the down block closing level l)
    middle_block.0 / .1 / .2                        mid.0 / mid.0.attn / mid.1
    output_blocks.{k(n+1) + j}.0 / .1               dec_blocks.{k}.{j} / its .attn   (k = L-1-level)
    output_blocks.{k(n+1) + n}.{1 or 2}             dec_up.{k}          (official: last layer of level k; ours:
                                                                         first block of level k+1, same order)
    out.0 / out.2                                   out_norm / out_conv
  inside a ResBlock / AttentionBlock:
    in_layers.0 in_layers.2 emb_layers.1            norm0 conv0 affine
    out_layers.0 out_layers.3 skip_connection       norm1 conv1 skip
    norm qkv proj_out                               attn.norm attn.qkv attn.proj
  qkv and proj_out are 1x1 conv2d in this repository (conv_nd(dims=2)), like ours; guided-diffusion's conv1d
  weights [O, I, 1] are accepted too.

The rest matches the official code operation for operation: [cos, sin] timestep features with frequencies
10000^(-i/half), SiLU between the two time-embedding layers and before every block's emb_layers, the class
embedding added before that SiLU; average-pool / nearest up-down sampling applied to both branches after
norm+SiLU; the 1x1 skip conv only where channels change; scale-shift h * (1 + scale) + shift after GroupNorm or a
bias added before it; qkv read as (three, heads, d) -- the layout of the official QKVFlashAttention and of this
repository's QKVAttentionLegacy ("b (three h d) s"), which the published models ran -- with softmax(q k^T / sqrt(d))
over keys; heads = channels / 64. GroupNorm: the official GroupNorm32 always has 32 groups (eps 1e-5), ours up to
32 with >= 4 channels each: the same for every published network (>= 192 channels); narrower test networks get
options.norm_groups 32. The official code runs attention in float16 (qkv.half() / flash attention) and GroupNorm
in float32; ours follows the run's dtype. Checked against outputs of the official code by tests/test_import_openai.py
(fixture made by scripts/make_openai_golden.py).
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import cm, models
from pipeline.config import OPENAI_RELEASE_URL, InputError
from pipeline.data import sha256_file
from pipeline.networks import ADMUNet

RELEASE_URL = OPENAI_RELEASE_URL
OFFICIAL_REPO = "https://github.com/openai/consistency_models"
# KarrasDenoiser's defaults, used by every published model (cm/script_util.py).
OFFICIAL_DIFFUSION = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sigma_data": 0.5}
HEAD_CHANNELS = 64  # --num_head_channels of every model in scripts/launch.sh
OFFICIAL_GROUPS = 32  # cm/nn.py normalization(): GroupNorm32(32, channels)
# scripts/launch.sh's samplers: the EDM teachers run Heun on 40 levels; the consistency models' 2-step lines run
# `--ts 0,<index>,<last> --steps <levels>`, i.e. times 80 and the Karras level <index> of <levels> (the paper's
# ternary-searched 2-step times: 1.382, 1.913, 4.366, 3.520, 3.991, 5.249). launch.sh has no 2-step line for
# LSUN Cat's CD files.
TEACHER_STEPS = 40
TWO_STEP_LEVEL = {"cd_imagenet64_l2.pt": (22, 40), "cd_imagenet64_lpips.pt": (22, 40), "ct_imagenet64.pt": (106, 201),
                  "cd_bedroom256_l2.pt": (18, 40), "cd_bedroom256_lpips.pt": (17, 40), "ct_bedroom256.pt": (67, 151),
                  "ct_cat256.pt": (62, 151)}

# scripts/launch.sh: ImageNet 64 (class-conditional) and LSUN 256 (bedroom and cat), as our network sections.
IMAGENET64_NETWORK = {"arch": "adm", "model_channels": 192, "channel_mult": [1, 2, 3, 4], "num_blocks": 3,
                      "attn_resolutions": [32, 16, 8], "options": {"scale_shift_norm": True}, "c_noise": "adm"}
LSUN256_NETWORK = {"arch": "adm", "model_channels": 256, "channel_mult": [1, 1, 2, 2, 4, 4], "num_blocks": 2,
                   "attn_resolutions": [32, 16, 8], "options": {"scale_shift_norm": False}, "c_noise": "adm"}


@dataclass(frozen=True)
class PublishedModel:
    """One file of the official release."""

    file: str
    kind: str  # "teacher" (EDM denoiser), "cd" or "ct" (consistency model)
    dataset: str  # pipeline.config Data.dataset
    resolution: int
    label_dim: int
    network: dict

    @property
    def url(self) -> str:
        return RELEASE_URL + self.file

    def sample_section(self) -> dict[str, Any]:
        """launch.sh's sampling of this file, as a training config's `sample` section (what generate reads)."""
        if self.kind == "teacher":
            return {"teacher_steps": TEACHER_STEPS}
        if self.file not in TWO_STEP_LEVEL:
            return {}
        index, levels = TWO_STEP_LEVEL[self.file]
        d = OFFICIAL_DIFFUSION
        sigma = cm.karras_sigmas(levels, d["sigma_min"], d["sigma_max"], d["rho"])[index].item()
        return {f"{self.kind}_schedules": [[d["sigma_max"]], [d["sigma_max"], sigma]]}


def _published() -> dict[str, PublishedModel]:
    out = {}
    for dataset, resolution, label_dim, network, stem in (
            ("imagenet64", 64, 1000, IMAGENET64_NETWORK, "imagenet64"),
            ("lsun_bedroom", 256, 0, LSUN256_NETWORK, "bedroom256"),
            ("lsun_cat", 256, 0, LSUN256_NETWORK, "cat256")):
        for file, kind in ((f"edm_{stem}_ema.pt", "teacher"), (f"cd_{stem}_l2.pt", "cd"),
                           (f"cd_{stem}_lpips.pt", "cd"), (f"ct_{stem}.pt", "ct")):
            out[file] = PublishedModel(file, kind, dataset, resolution, label_dim, network)
    return out


PUBLISHED: dict[str, PublishedModel] = _published()  # the 12 files listed in the official README


class OpenAIImportError(InputError):
    """An official checkpoint that cannot become one of ours; the message (one line) says why."""


class CheckpointMissingError(OpenAIImportError, FileNotFoundError):
    """The file is not there; the message says where to download it and where to put it."""


class StateMismatchError(OpenAIImportError):
    """The official tensors and our network's do not correspond one to one."""


# ----------------------------------------------------------------------------------------------------------
# Reading the file.


def missing_file_message(path: str | os.PathLike) -> str:
    path = Path(path)
    published = PUBLISHED.get(path.name)
    if published:
        return f"{path}: no such file; download {published.url} and save it as {path}"
    return (f"{path}: no such file; the published checkpoints ({', '.join(PUBLISHED)}) are at {RELEASE_URL}<name> "
            f"(see {OFFICIAL_REPO}#pre-trained-models)")


def load_official_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official .pt file, as data only (weights_only: no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMissingError(missing_file_message(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise OpenAIImportError(f"{path}: not a readable state dict ({type(e).__name__}: {first}); download it "
                                f"again from {RELEASE_URL}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OpenAIImportError(f"{path}: expected a state dict of tensors (torch.save(model.state_dict())), got "
                                f"{type(state).__name__}")
    return dict(state)


# ----------------------------------------------------------------------------------------------------------
# The network: inferred from tensor shapes.


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise StateMismatchError(f"not an official UNetModel state dict: no tensor {key}")
    return tuple(state[key].shape)


def _block_indices(state: Mapping[str, torch.Tensor], group: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in state if k.startswith(group + ".")})


def label_dim(official_state: Mapping[str, torch.Tensor]) -> int:
    """Number of classes of a class-conditional network (label_emb rows), 0 for an unconditional one."""
    return _shape(official_state, "label_emb.weight")[0] if "label_emb.weight" in official_state else 0


def network_config(official_state: Mapping[str, torch.Tensor], resolution: int,
                   num_head_channels: int = HEAD_CHANNELS) -> dict[str, Any]:
    """Our `network` section {arch: adm, ..., c_noise: adm} for an official UNetModel state dict of images of
    `resolution` (the only thing shapes cannot tell; attention sits at resolutions). num_head_channels is not
    in the shapes either: 64 in every published model."""
    state = official_state
    model_channels = _shape(state, "time_embed.0.weight")[1]
    in_channels, out_channels = _shape(state, "input_blocks.0.0.weight")[1], _shape(state, "out.2.weight")[0]
    if (in_channels, out_channels) != (models.CHANNELS, models.CHANNELS):
        raise OpenAIImportError(f"the network maps {in_channels} to {out_channels} channels; only RGB to RGB "
                                "(learn_sigma False) is supported")
    if any(".op." in k or k.endswith(".conv.weight") for k in state):
        raise OpenAIImportError("the network resamples with Downsample/Upsample layers (resblock_updown False); "
                                "only resblock_updown True, as in every published model, is supported")

    def resblocks(j: int) -> list[int]:  # positions of the ResBlocks inside output_blocks.j
        return [p for p in range(3) if f"output_blocks.{j}.{p}.in_layers.0.weight" in state]

    outputs = _block_indices(state, "output_blocks")
    upsamplers = [j for j in outputs if len(resblocks(j)) == 2]
    # The first upsampler closes the lowest level: it sits in that level's last (n + 1-th) output block.
    num_blocks = upsamplers[0] if upsamplers else len(outputs) - 1
    levels = len(outputs) // (num_blocks + 1)
    inputs = _block_indices(state, "input_blocks")
    if not outputs or len(outputs) != levels * (num_blocks + 1) or len(inputs) != len(outputs):
        raise StateMismatchError(f"{len(inputs)} input and {len(outputs)} output blocks do not form a UNetModel of "
                                 f"{levels} levels with {num_blocks} blocks each")
    channel_mult, attn_resolutions = [], []
    for level in range(levels):
        first = 1 + level * (num_blocks + 1)  # input block index of the level's first ResBlock
        channels = _shape(state, f"input_blocks.{first}.0.out_layers.3.weight")[0]
        if channels % model_channels:
            raise OpenAIImportError(f"level {level} has {channels} channels, not a whole multiple of "
                                    f"{model_channels} (fractional channel_mult is not supported)")
        channel_mult.append(channels // model_channels)
        if f"input_blocks.{first}.1.qkv.weight" in state:
            if channels % num_head_channels:
                raise OpenAIImportError(f"attention over {channels} channels is not divisible into heads of "
                                        f"{num_head_channels}")
            attn_resolutions.append(resolution >> level)
    emb_rows = _shape(state, "input_blocks.1.0.emb_layers.1.weight")[0]
    options: dict[str, Any] = {"scale_shift_norm": emb_rows == 2 * model_channels * channel_mult[0]}
    if num_head_channels != HEAD_CHANNELS:
        options["attn_head_channels"] = num_head_channels
    if model_channels * min(channel_mult) < 4 * OFFICIAL_GROUPS:  # where our default would use fewer groups
        options["norm_groups"] = OFFICIAL_GROUPS
    return {"arch": "adm", "model_channels": model_channels, "channel_mult": channel_mult, "num_blocks": num_blocks,
            "attn_resolutions": attn_resolutions, "options": options, "c_noise": "adm"}


# ----------------------------------------------------------------------------------------------------------
# Tensor names and layouts.

_RESBLOCK = {"norm0": "in_layers.0", "conv0": "in_layers.2", "affine": "emb_layers.1", "norm1": "out_layers.0",
             "conv1": "out_layers.3", "skip": "skip_connection"}
_ATTENTION = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
_TOP_LEVEL = {"map_layer0": "time_embed.0", "map_layer1": "time_embed.2", "map_label": "label_emb",
              "stem": "input_blocks.0.0", "out_norm": "out.0", "out_conv": "out.2"}


def _block_keys(out: dict[str, str], block: torch.nn.Module, ours: str, resblock: str, attention: str | None) -> None:
    for name in block.state_dict():
        module, _, param = name.partition(".")
        if module == "attn":
            sub, _, param = param.partition(".")
            out[f"{ours}.{name}"] = f"{attention}.{_ATTENTION[sub]}.{param}"
        else:
            out[f"{ours}.{name}"] = f"{resblock}.{_RESBLOCK[module]}.{param}"


def official_key_map(net: ADMUNet) -> dict[str, str]:
    """Our state-dict key -> the official UNetModel key of the same tensor (before the layout changes)."""
    out = {f"{ours}.{param}": f"{official}.{param}" for ours, official in _TOP_LEVEL.items()
           if getattr(net, ours, None) is not None for param in getattr(net, ours).state_dict()}
    index = 1
    for level, blocks in enumerate(net.enc_blocks):
        for i, block in enumerate(blocks):
            _block_keys(out, block, f"enc_blocks.{level}.{i}", f"input_blocks.{index}.0", f"input_blocks.{index}.1")
            index += 1
        if level < len(net.enc_blocks) - 1:
            _block_keys(out, net.enc_down[level], f"enc_down.{level}", f"input_blocks.{index}.0", None)
            index += 1
    _block_keys(out, net.mid[0], "mid.0", "middle_block.0", "middle_block.1")
    _block_keys(out, net.mid[1], "mid.1", "middle_block.2", None)
    index = 0
    for k, blocks in enumerate(net.dec_blocks):
        for j, block in enumerate(blocks):
            _block_keys(out, block, f"dec_blocks.{k}.{j}", f"output_blocks.{index}.0", f"output_blocks.{index}.1")
            index += 1
        if k < len(net.dec_blocks) - 1:  # the upsampler follows the level's last block (and its attention)
            position = 1 if blocks[-1].attn is None else 2
            _block_keys(out, net.dec_up[k], f"dec_up.{k}", f"output_blocks.{index - 1}.{position}", None)
    return out


def _to_ours(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if key == "map_label.weight":
        return tensor.t()  # nn.Embedding rows are classes; our Linear's columns are
    if key.endswith(("attn.qkv.weight", "attn.proj.weight")) and tensor.ndim == 3:
        return tensor[..., None]  # guided-diffusion's conv1d over flattened pixels [O, I, 1] = a 1x1 conv2d
    return tensor


def _to_official(key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if key == "map_label.weight" else tensor


def _mismatches(official_state: Mapping[str, torch.Tensor], net: ADMUNet,
                key_map: dict[str, str]) -> list[str]:
    ours = net.state_dict()
    wanted = {official: key for key, official in key_map.items()}
    problems = [f"unexpected tensor {k}" for k in official_state if k not in wanted]
    problems += [f"missing tensor {official} (for our {key})" for key, official in key_map.items()
                 if official not in official_state]
    for key, official in key_map.items():
        if official in official_state:
            have = tuple(_to_ours(key, official_state[official]).shape)
            if have != tuple(ours[key].shape):
                want = tuple(_to_official(key, ours[key]).shape)
                problems.append(f"{official} has shape {tuple(official_state[official].shape)}, expected {want}")
    return problems


def convert_state_dict(official_state: Mapping[str, torch.Tensor], net: ADMUNet) -> dict[str, torch.Tensor]:
    """Our state dict for `net` (an ADMUNet of the official network's config) from an official UNetModel state
    dict. StateMismatchError (one line) names the first tensor that does not correspond, and how many do not."""
    key_map = official_key_map(net)
    problems = _mismatches(official_state, net, key_map)
    if problems:
        more = f" ({len(problems) - 1} more mismatch(es))" if len(problems) > 1 else ""
        raise StateMismatchError(f"the official state dict does not fit the network: {problems[0]}{more}")
    ours = net.state_dict()
    return {key: _to_ours(key, official_state[official]).to(ours[key].dtype).contiguous()
            for key, official in key_map.items()}


def to_official_state_dict(net: ADMUNet) -> dict[str, torch.Tensor]:
    """The inverse: `net`'s tensors under the official UNetModel names and layouts (tests, export)."""
    ours = net.state_dict()
    return {official: _to_official(key, ours[key]).clone() for key, official in official_key_map(net).items()}


# ----------------------------------------------------------------------------------------------------------
# The checkpoint.


def import_state(official_state: Mapping[str, torch.Tensor], kind: str, resolution: int,
                 sigma_min: float = OFFICIAL_DIFFUSION["sigma_min"], sigma_max: float = OFFICIAL_DIFFUSION["sigma_max"],
                 sigma_data: float = OFFICIAL_DIFFUSION["sigma_data"], rho: float = OFFICIAL_DIFFUSION["rho"],
                 num_head_channels: int = HEAD_CHANNELS, source: dict | None = None) -> dict[str, Any]:
    """A checkpoint in our layout (what models.load_model reads) from an official state dict in memory."""
    if kind not in models.MODEL_CLASS:
        raise ValueError(f"kind must be one of {sorted(models.MODEL_CLASS)}, got {kind!r}")
    network = network_config(official_state, resolution, num_head_channels)
    diffusion = {"sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "sigma_data": sigma_data}
    shape = {"resolution": resolution, "label_dim": label_dim(official_state)}
    with torch.device("meta"):  # shapes only: the tensors come from the file (a full LSUN net is 2 GB)
        model = models.build_model(kind, network, diffusion, dropout=0.0, **shape)
    model.net.load_state_dict(convert_state_dict(official_state, model.net), strict=True, assign=True)
    state = model.state_dict()
    return {"kind": kind, "step": 0, "fingerprint": f"import_openai:{(source or {}).get('sha256', '')}",
            "network": network, "diffusion": diffusion, "config": None, "shape": shape,
            "model": state, "ema": state, "extra": {}, "history": [], "mlflow_run_id": None,
            "source": {"repository": OFFICIAL_REPO, **(source or {})}}


def import_checkpoint(path: str | os.PathLike, kind: str | None = None,
                      sigma_min: float = OFFICIAL_DIFFUSION["sigma_min"],
                      sigma_max: float = OFFICIAL_DIFFUSION["sigma_max"],
                      sigma_data: float = OFFICIAL_DIFFUSION["sigma_data"], rho: float = OFFICIAL_DIFFUSION["rho"],
                      resolution: int | None = None, num_head_channels: int = HEAD_CHANNELS) -> dict[str, Any]:
    """Our checkpoint from an official .pt file. kind ("teacher", "cd", "ct") and resolution default to the
    release table for the published file names; other files need both."""
    path = Path(path)
    published = PUBLISHED.get(path.name)
    kind = kind or (published.kind if published else None)
    resolution = resolution or (published.resolution if published else None)
    if kind is None or resolution is None:
        raise OpenAIImportError(f"{path}: not a published file name ({', '.join(PUBLISHED)}): pass kind and "
                                "resolution")
    if published and kind != published.kind:
        raise OpenAIImportError(f"{path}: {path.name} is a {published.kind} model, not {kind}")
    state = load_official_state(path)
    source = {"file": path.name, "sha256": sha256_file(path), "url": published.url if published else None}
    try:
        ckpt = import_state(state, kind, resolution, sigma_min, sigma_max, sigma_data, rho, num_head_channels, source)
    except OpenAIImportError as e:
        raise type(e)(f"{path}: {e}") from None
    if published and (ckpt["network"], ckpt["shape"]["label_dim"]) != (published.network, published.label_dim):
        raise OpenAIImportError(f"{path}: holds network {ckpt['network']} with {ckpt['shape']['label_dim']} "
                                f"classes, not the published {published.network} with {published.label_dim}")
    return ckpt


def write_checkpoint(ckpt: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write an imported checkpoint atomically (models.atomic_save: never a torn file under `out`)."""
    out = Path(out)
    models.atomic_save(ckpt, out)
    return out


def parameter_count(network: Mapping[str, Any], resolution: int, label_dim: int = 0) -> int:
    """Parameters of our network for a `network` section (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = models.build_model("teacher", dict(network), dict(OFFICIAL_DIFFUSION), 0.0, resolution, label_dim)
    return sum(p.numel() for p in model.net.parameters())



def main() -> None:
    """Stage import_<model>: `python -m pipeline.import_openai --model cd` converts <model>.openai_checkpoint into
    the model's checkpoint (what its training stage would write), for the sample, search, evaluate, edit and
    tables stages. The published file must fit the preset: its network, resolution and classes."""
    from pipeline.config import stage_cli
    from pipeline.stages import checkpoint

    cfg, args = stage_cli(main.__doc__, tuple(models.MODEL_CLASS))
    source, d = getattr(cfg, args.model).openai_checkpoint, cfg.diffusion
    published = PUBLISHED.get(Path(source).name)
    if published is not None and published.dataset != cfg.data.dataset:
        raise OpenAIImportError(f"{args.model}.openai_checkpoint: {source} is a {published.dataset} model; "
                                f"this run's dataset is {cfg.data.dataset}")
    ckpt = import_checkpoint(source, args.model, d.sigma_min, d.sigma_max, d.sigma_data, d.rho,
                             resolution=cfg.data.spec.resolution)
    out = checkpoint(cfg, args.model)
    models.check_compatible(ckpt, cfg, source)  # before writing: a file for another network stops here
    write_checkpoint(ckpt, out)
    net = ckpt["network"]
    print(f"wrote {out}: {args.model} from {source} ({net['arch']} {net['model_channels']}x{net['channel_mult']}, "
          f"{parameter_count(net, ckpt['shape']['resolution'], ckpt['shape']['label_dim']):,} parameters)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
