"""Make tests/fixtures/openai_unet_golden.pt with openai/consistency_models' own code (run once; tests never need it).

What it makes. Two small official `cm.unet.UNetModel`s with random weights, as launched by the repository's
scripts/launch.sh but narrow (resblock_updown True, learn_sigma False, dropout 0, eval mode, float32):

* "imagenet_like": class-conditional (nn.Embedding, 10 classes), use_scale_shift_norm True, attention at 8 and 4.
* "lsun_like": unconditional, use_scale_shift_norm False, attention at 4.

Both: image_size 8, num_channels 32, channel_mult (1, 1) / (1, 2), num_res_blocks 1, num_head_channels 8 / 16 (4
heads). The second needs its 64-channel level: with one channel per GroupNorm group (32 channels) the time
embedding, a per-channel bias before the norm without scale-shift, would cancel out (checked below). For each,
the official `KarrasDenoiser.denoise` gives D(x, sigma) (distillation=False: EDM scalings) and f(x, sigma)
(distillation=True: the boundary-condition scalings), both with its rescaled_t = 1000 * 0.25 * ln(sigma), at the
sigmas 0.002, 0.05, 0.5, 2 and 80 (one sample per sigma, fixed x_t and labels). It also stores the parameter counts
and the tensor names and shapes of the two full-size models of launch.sh (ImageNet 64: 192 channels, mult 1,2,3,4,
3 blocks, class-conditional, scale-shift; LSUN 256: 256 channels, mult 1,1,2,2,4,4, 2 blocks, no scale-shift; both
attention at 32,16,8 with 64 channels per head), built on the meta device.

Weights. Every layer is re-drawn with PyTorch's default init (undoing the official zero_module of the output convs,
which would make the outputs trivial), GroupNorm affines and biases non-zero, then rounded to four levels per
tensor, offset + (code - 1.5) * 2**exponent with a 2-bit code (offset 1 for GroupNorm scales, else 0): the stored
tensors are exactly what the official model ran with (the levels are exact in float32), at a quarter of a byte per
parameter, which keeps the fixture at a few hundred kB.

Deviations from running the official code unchanged, all at generation time:

1. Stub modules for mpi4py, blobfile and piq: cm.dist_util and cm.karras_diffusion import them for distributed
   training and the LPIPS loss; nothing used here touches them.
2. `AttentionBlock`'s default attention_type "flash" -> "legacy" (its __defaults__): the flash path needs the
   CUDA-only flash_attn package. Both read qkv as "b (three h d) s" (einops) and compute softmax(q k^T / sqrt(d)) v.
3. The one line `qkv = qkv.half()` of `QKVAttentionLegacy.forward` becomes `qkv = qkv` (its source, patched
   after checking that the line occurs exactly once, compiled in cm.unet's namespace): the reference runs in float32.
   Nothing else of the official code is changed.

Made with openai/consistency_models commit e32b69ee436d518377db86fb2127a3972d0d8716 (stored in the fixture). Rerun:

    git clone https://github.com/openai/consistency_models /tmp/official/cm
    .venv/bin/pip install --target /tmp/official/deps einops
    .venv/bin/python scripts/make_openai_golden.py --official /tmp/official/cm --deps /tmp/official/deps \\
        --out tests/fixtures/openai_unet_golden.pt
"""

from __future__ import annotations

import argparse
import inspect
import math
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

SIGMAS = (0.002, 0.05, 0.5, 2.0, 80.0)
SIGMA_DATA, SIGMA_MIN, SIGMA_MAX = 0.5, 0.002, 80.0
IMAGE_SIZE = 8
# UNetModel keyword arguments; attention_resolutions are downsampling rates (image_size // resolution).
VARIANTS: dict[str, dict[str, Any]] = {
    "imagenet_like": {"image_size": IMAGE_SIZE, "in_channels": 3, "model_channels": 32, "out_channels": 3,
                      "num_res_blocks": 1, "attention_resolutions": (1, 2), "dropout": 0.0, "channel_mult": (1, 1),
                      "num_classes": 10, "num_head_channels": 8, "use_scale_shift_norm": True,
                      "resblock_updown": True},
    "lsun_like": {"image_size": IMAGE_SIZE, "in_channels": 3, "model_channels": 32, "out_channels": 3,
                  "num_res_blocks": 1, "attention_resolutions": (2,), "dropout": 0.0, "channel_mult": (1, 2),
                  "num_classes": None, "num_head_channels": 16, "use_scale_shift_norm": False,
                  "resblock_updown": True},
}
LABELS = (0, 3, 7, 9, 5)
# scripts/launch.sh flags of the published models, as cm.script_util.create_model takes them.
FULL_SIZE: dict[str, dict[str, Any]] = {
    "imagenet64": {"image_size": 64, "num_channels": 192, "num_res_blocks": 3, "attention_resolutions": "32,16,8",
                   "class_cond": True, "use_scale_shift_norm": True, "num_head_channels": 64,
                   "resblock_updown": True, "dropout": 0.0},
    "lsun256": {"image_size": 256, "num_channels": 256, "num_res_blocks": 2, "attention_resolutions": "32,16,8",
                "class_cond": False, "use_scale_shift_norm": False, "num_head_channels": 64,
                "resblock_updown": True, "dropout": 0.0},
}
HALF_CAST = "qkv = qkv.half()"


def load_official(official: Path, deps: Path) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """(cm.unet, cm.karras_diffusion, cm.script_util) with the three generation-time patches of the docstring."""
    sys.path[:0] = [str(official), str(deps)]
    for name in ("mpi4py", "blobfile", "piq"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["mpi4py"].MPI = types.ModuleType("mpi4py.MPI")
    sys.modules["piq"].LPIPS = None  # only KarrasDenoiser(loss_norm="lpips") instantiates it
    from cm import karras_diffusion, script_util, unet

    defaults = list(unet.AttentionBlock.__init__.__defaults__)
    defaults[defaults.index("flash")] = "legacy"
    unet.AttentionBlock.__init__.__defaults__ = tuple(defaults)

    source = textwrap.dedent(inspect.getsource(unet.QKVAttentionLegacy.forward))
    if source.count(HALF_CAST) != 1:
        raise SystemExit(f"QKVAttentionLegacy.forward no longer holds exactly one {HALF_CAST!r}: check the patch")
    namespace: dict[str, Any] = {}
    exec(compile(source.replace(HALF_CAST, "qkv = qkv  # float32 reference: was qkv.half()"),
                 f"{unet.__file__} (QKVAttentionLegacy.forward, half cast removed)", "exec"), vars(unet), namespace)
    unet.QKVAttentionLegacy.forward = namespace["forward"]
    return unet, karras_diffusion, script_util


def quantise(t: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """2-bit codes c in 0..3, exponent e and offset o with t ~ o + (c - 1.5) * 2**e: never zero, exact in float32.

    o is the tensor's mean rounded to an integer (1 for GroupNorm scales, else 0); the four levels span its range."""
    offset = float(t.mean().round())
    peak = (t - offset).abs().max().item()
    exponent = math.ceil(math.log2(peak / 1.5)) if peak > 0 else 0
    codes = ((t - offset) / 2.0**exponent + 2).floor().clamp(0, 3)  # nearest of the levels -1.5, -0.5, 0.5, 1.5
    return codes.to(torch.uint8), exponent, offset


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Four 2-bit codes per byte, the first in the lowest bits."""
    flat = codes.flatten()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 4)]).reshape(-1, 4)
    return flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)


def unpack(state: dict) -> dict[str, torch.Tensor]:
    """The float32 state dict of a stored {names, shapes, exponents, offsets, codes} record
    (tests/test_import_openai.py reads it the same way)."""
    packed = state["codes"]
    levels = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).flatten().to(torch.float32) - 1.5
    out, start = {}, 0
    for name, shape, exponent, offset in zip(state["names"], state["shapes"], state["exponents"], state["offsets"]):
        count = math.prod(shape)
        out[name] = (levels[start:start + count].mul(2.0**exponent) + offset).reshape(shape)
        start += count
    return out


def randomise_(model: nn.Module, generator: torch.Generator) -> dict:
    """Draw every tensor afresh (none zero), round it to the 2-bit grid and load it; returns the stored record.

    One packed blob for all tensors: a tensor per entry would cost ~300 bytes of zip overhead each."""
    torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator)))  # reset_parameters draws globally
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)):
                module.reset_parameters()  # PyTorch default init, non-zero biases; undoes zero_module
            elif isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
        state = {"names": [], "shapes": [], "exponents": [], "offsets": []}
        all_codes = []
        for name, tensor in model.state_dict().items():
            codes, exponent, offset = quantise(tensor)
            state["names"].append(name)
            state["shapes"].append(list(tensor.shape))
            state["exponents"].append(exponent)
            state["offsets"].append(offset)
            all_codes.append(codes.flatten())
        state["codes"] = pack(torch.cat(all_codes))
        model.load_state_dict(unpack(state))
    return state


def sensitivity(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, kwargs: dict) -> dict[str, float]:
    """Relative change of the raw output when the noise input or the labels change: a fixture whose network
    ignored them (GroupNorm over 1 channel per group cancels a per-channel time bias) would test nothing."""
    with torch.no_grad():
        base = model(x, timesteps, **kwargs)
        changed = {"timesteps": model(x, timesteps.flip(0), **kwargs)}
        if "y" in kwargs:
            changed["labels"] = model(x, timesteps, y=kwargs["y"].flip(0))
    return {k: ((v - base).abs().max() / base.abs().max()).item() for k, v in changed.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="clone of openai/consistency_models")
    parser.add_argument("--deps", type=Path, default=Path("/tmp/official/deps"),
                        help="folder holding einops (pip install --target)")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/openai_unet_golden.pt"))
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(args.official), "log", "-1", "--format=%H"], check=True,
                            capture_output=True, text=True).stdout.strip()
    unet, karras_diffusion, script_util = load_official(args.official, args.deps)

    generator = torch.Generator().manual_seed(20230302)  # the paper's arXiv date
    sigmas = torch.tensor(SIGMAS)
    x_clean = torch.rand(len(SIGMAS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    x_t = x_clean + sigmas.reshape(-1, 1, 1, 1) * torch.randn(x_clean.shape, generator=generator)
    labels = torch.tensor(LABELS)

    variants = {}
    for name, kwargs in VARIANTS.items():
        model = unet.UNetModel(**kwargs).eval()
        assert all(isinstance(m.attention, unet.QKVAttentionLegacy)
                   for m in model.modules() if isinstance(m, unet.AttentionBlock))
        packed = randomise_(model, generator)
        model_kwargs = {"y": labels} if kwargs["num_classes"] else {}
        outputs = {}
        with torch.no_grad():
            for key, distillation in (("D", False), ("f", True)):
                diffusion = karras_diffusion.KarrasDenoiser(sigma_data=SIGMA_DATA, sigma_max=SIGMA_MAX,
                                                            sigma_min=SIGMA_MIN, distillation=distillation,
                                                            weight_schedule="uniform", loss_norm="l2")
                _, outputs[key] = diffusion.denoise(model, x_t, sigmas, **model_kwargs)
        rescaled_t = 1000 * 0.25 * torch.log(sigmas)
        changes = sensitivity(model, x_t, rescaled_t, model_kwargs)
        if min(changes.values()) < 1e-2:
            raise SystemExit(f"{name}: the network barely depends on its conditioning ({changes}): widen it")
        variants[name] = {"args": kwargs, "state": packed, **outputs,
                          "parameters": sum(p.numel() for p in model.parameters())}
        peaks = ", ".join(f"{k} {outputs[k].abs().max():.3g}" for k in outputs)
        print(f"{name}: {variants[name]['parameters']} parameters, max |output|: {peaks}, relative change of F "
              f"with the conditioning: {changes}")

    full_size = {}
    for name, flags in FULL_SIZE.items():
        with torch.device("meta"):
            model = script_util.create_model(**flags)
        full_size[name] = {"flags": flags, "parameters": sum(p.numel() for p in model.parameters()),
                           "shapes": ";".join(f"{k}={','.join(map(str, v.shape))}"
                                              for k, v in model.state_dict().items())}
        print(f"{name}: official UNetModel has {full_size[name]['parameters']} parameters")

    fixture = {"official_commit": commit, "torch": str(torch.__version__), "sigmas": sigmas, "x_t": x_t,
               "labels": labels, "sigma_data": SIGMA_DATA, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX,
               "variants": variants, "full_size": full_size,
               "patches": ["stubs: mpi4py, blobfile, piq", "AttentionBlock attention_type default flash -> legacy",
                           f"QKVAttentionLegacy.forward: {HALF_CAST!r} -> 'qkv = qkv' (float32)"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB), official commit {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
