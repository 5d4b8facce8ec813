"""Preconditioned models around a raw network F, and their checkpoints.

Denoiser (EDM):          D(x, sigma) = c_skip x + c_out F(c_in x, c_noise(sigma))   (EDM eq. 7)
ConsistencyModel (CM):   f(x, sigma) = c_skip x + c_out F(c_in x, c_noise(sigma))   (paper eq. 3, App. C)
Both use EDM's c_noise = ln(sigma) / 4 (so a student can start from its teacher's weights), or with network
c_noise "adm" that of OpenAI's PyTorch code, 1000 ln(sigma) / 4, which its published ADM checkpoints were trained with.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import cm
from pipeline.config import InputError
from pipeline.data import atomic_write
from pipeline.networks import build_network

IMG_RESOLUTION, CHANNELS = 32, 3  # CIFAR-10, and checkpoints written before the shape was stored


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's noise conditioning of F: ln(sigma) / 4."""
    return sigma.log() / 4  # EDM Table 1, c_noise


def c_noise_adm(sigma: torch.Tensor) -> torch.Tensor:
    """The noise conditioning of F in openai/consistency_models (PyTorch): 1000 ln(sigma) / 4."""
    return 1000 * sigma.log() / 4  # cm/karras_diffusion.py KarrasDenoiser.denoise, rescaled_t = 1000 * 0.25 * ln(sigma)


# network["c_noise"] -> the function; absent means "edm" (checkpoints written before the key existed).
C_NOISE = {"edm": c_noise, "adm": c_noise_adm}


class Preconditioned(nn.Module):
    """x -> c_skip x + c_out F(c_in x, c_noise(sigma)); subclasses choose the scalings."""

    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float, c_noise: str = "edm"):
        super().__init__()
        if c_noise not in C_NOISE:
            raise ValueError(f"unknown c_noise {c_noise!r}; expected one of {sorted(C_NOISE)}")
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min
        self.c_noise = c_noise

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def options(self) -> dict:
        """The constructor's further keywords, stored in checkpoints (model_options) to rebuild the model."""
        return {}

    @property
    def label_dim(self) -> int:
        return getattr(self.net, "label_dim", 0)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """class_labels: integer classes (B,) or one-hot rows (B, label_dim); None for unconditional networks."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        if class_labels is not None and class_labels.ndim == 1:
            class_labels = nn.functional.one_hot(class_labels.long(), self.label_dim).to(x.dtype)
        c_skip, c_out, c_in = self.scalings(sigma)
        return c_skip * x + c_out * self.net(c_in * x, C_NOISE[self.c_noise](sigma).flatten(), class_labels)


class Denoiser(Preconditioned):
    def scalings(self, sigma):
        return cm.edm_scalings(sigma, self.sigma_data)


class ConsistencyModel(Preconditioned):
    def scalings(self, sigma):
        return cm.consistency_scalings(sigma, self.sigma_data, self.sigma_min)


class TunedConsistencyModel(Preconditioned):
    """ECT's model: EDM's scalings while training (f(x, 0) = x, so r = 0 is plain denoising, and the teacher's weights
    start as f = D), CM scalings with the boundary at eval_sigma_min in eval mode (the official ECMPrecond: 0.003 on
    CIFAR-10; 0 keeps EDM's)."""

    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float, c_noise: str = "edm",
                 eval_sigma_min: float = 0.0):
        super().__init__(net, sigma_data, sigma_min, c_noise)
        self.eval_sigma_min = eval_sigma_min

    def scalings(self, sigma):
        if self.training or self.eval_sigma_min == 0:
            return cm.edm_scalings(sigma, self.sigma_data)
        return cm.consistency_scalings(sigma, self.sigma_data, self.eval_sigma_min)

    def options(self) -> dict:
        return {"eval_sigma_min": self.eval_sigma_min}


MODEL_CLASS = {"teacher": Denoiser, "cd": ConsistencyModel, "ct": ConsistencyModel, "ict": ConsistencyModel,
               "ect": TunedConsistencyModel}


def build_model(kind: str, network: dict, diffusion: dict, dropout: float, resolution: int = IMG_RESOLUTION,
                label_dim: int = 0, **model_options) -> Preconditioned:
    """A fresh teacher Denoiser or consistency model from the `network` and `diffusion` sections, for images
    of resolution x resolution, conditioned on label_dim classes (0: unconditional)."""
    options = dict(network.get("options") or {})
    net = build_network(
        network["arch"], resolution, CHANNELS, CHANNELS, label_dim=label_dim,
        model_channels=network["model_channels"], channel_mult=tuple(network["channel_mult"]),
        num_blocks=network["num_blocks"], attn_resolutions=tuple(network["attn_resolutions"]),
        dropout=dropout, **options,
    )
    return MODEL_CLASS[kind](net, diffusion["sigma_data"], diffusion["sigma_min"], network.get("c_noise", "edm"),
                             **model_options)


def model_for(kind: str, cfg: Any, dropout: float) -> Preconditioned:
    """A fresh model of the configured network, dataset shape and class conditioning."""
    options = {"eval_sigma_min": cfg.ect.eval_sigma_min} if kind == "ect" else {}
    return build_model(kind, cfg.raw["network"], cfg.raw["diffusion"], dropout, cfg.data.spec.resolution,
                       cfg.data.label_dim, **options)


def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model in one fused multi-tensor lerp (a few kernels for all parameters,
    no host sync); buffers are copied."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - rate)
        buffers = list(ema.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))


def compile_module(module: nn.Module, enabled: bool = True) -> nn.Module:
    """torch.compile `module` in place when enabled (its state_dict keys stay as they are, unlike torch.compile's
    wrapper). Shapes that change (the last, smaller batch of a sampler) compile once more, then dynamically."""
    if enabled:
        module.compile()
    return module


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy that never receives gradients (EMA and target networks)."""
    out = copy.deepcopy(model).eval()
    out.requires_grad_(False)
    return out


class CheckpointError(InputError):
    """A checkpoint that cannot be used: truncated, corrupt, carrying code, or not written for lack of space."""


def previous(path: str | os.PathLike) -> Path:
    """Where atomic_save(keep_previous=True) keeps the file it replaced: x.resume.pt -> x.resume.prev.pt."""
    path = Path(path)
    return path.with_suffix(".prev" + path.suffix)


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk and read back before it is renamed: a crash,
    a full disk or a failed write never leaves a torn file under the name. keep_previous: the file it replaces
    stays as previous(path) (resume checkpoints: one good file exists at every moment)."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            load_checkpoint(tmp, mmap=True)  # complete and readable as data
            if keep_previous and path.exists():
                os.replace(path, previous(path))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        kept = f"{path} is still the last good one" if path.exists() else "nothing was written"
        raise CheckpointError(f"{path}: no space left on the device while writing it ({kept}); free space "
                              "and re-run") from None


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A checkpoint's contents as data only: torch.load(weights_only=True) rebuilds tensors and plain containers
    and never runs code from the file. A truncated, corrupt or code-carrying file raises CheckpointError, one line
    naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (run the training stage first)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain containers, whose "
            f"loading could run code ({str(e).strip().splitlines()[0][:160]}); use checkpoints this pipeline wrote, "
            "or convert EDM pickles with pipeline.import_edm") from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: truncated or corrupt ({str(e).strip().splitlines()[0][:120]}); delete it "
                              "and re-run the stage that writes it (or `dvc pull` it)") from None


SHAPE_KEYS = ("arch", "model_channels", "channel_mult", "num_blocks", "attn_resolutions", "options")


def check_compatible(ckpt: dict, cfg: Any, path: str | os.PathLike) -> None:
    """A checkpoint handed to a stage must hold the network and image shape that stage's config describes (a
    file from another preset or network would otherwise be sampled, distilled from or scored silently)."""
    shape = ckpt.get("shape", {"resolution": IMG_RESOLUTION, "label_dim": 0})
    want = {"resolution": cfg.data.spec.resolution, "label_dim": cfg.data.label_dim}
    differences = [f"{k} {shape.get(k)} (config: {v})" for k, v in want.items() if shape.get(k) != v]
    have, wanted = ckpt.get("network", {}), cfg.raw["network"]
    differences += [f"network.{k} {have.get(k)} (config: {wanted.get(k)})" for k in SHAPE_KEYS
                    if json.dumps(have.get(k) or None) != json.dumps(wanted.get(k) or None)]
    if have.get("c_noise", "edm") != wanted.get("c_noise", "edm"):  # same weights, another noise input: garbage
        differences.append(f"network.c_noise {have.get('c_noise', 'edm')} (config: {wanted.get('c_noise', 'edm')})")
    if differences:
        trained = (ckpt.get("config") or {}).get("preset")
        made_for = f"preset {trained}" if trained else "another network"
        raise CheckpointError(f"{path}: {', '.join(differences)}: it was made for {made_for}, not this run's "
                              f"preset {cfg.preset}; re-run the stage that writes it, or run with its preset")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "ema",
               cfg: Any = None) -> Preconditioned:
    """The model stored in a checkpoint, in eval mode; weights 'ema' (evaluated) or 'model' (online). With cfg,
    the checkpoint must hold the network and image shape cfg describes (check_compatible)."""
    ckpt = load_checkpoint(path)
    if cfg is not None:
        check_compatible(ckpt, cfg, path)
    shape = ckpt.get("shape", {})
    model = build_model(ckpt["kind"], ckpt["network"], ckpt["diffusion"], dropout=0.0,
                        resolution=shape.get("resolution", IMG_RESOLUTION), label_dim=shape.get("label_dim", 0),
                        **ckpt.get("model_options", {}))
    model.load_state_dict(ckpt[weights])
    return model.to(device).eval().requires_grad_(False)


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The non-tensor fields of a checkpoint (kind, step, configs, MLflow run id)."""
    ckpt = load_checkpoint(path)
    return {k: v for k, v in ckpt.items() if not isinstance(v, dict) or k in ("network", "diffusion", "config")}
