"""Stage train_teacher: the EDM denoiser (Karras et al. 2022) that consistency distillation starts from.

    python -m pipeline.train_teacher [--config params.yaml] [--set teacher.iterations=1000]

Denoising score matching with log-normal sigma and EDM's loss weight (EDM eq. 8 and Table 1),
Adam (or RAdam: teacher.optimizer, as the official PyTorch edm_train) with a linear learning-rate warm-up,
and an EMA whose half-life ramps up with images seen.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import Config, Teacher, stage_cli
from pipeline.distributed import Context
from pipeline.models import Denoiser, model_for
from pipeline.noise import Noise, TorchNoise
from pipeline.stages import training_io
from pipeline.training import Training, setup_training


def edm_loss(denoiser: Denoiser, x: torch.Tensor, p_mean: float, p_std: float, sigma_data: float,
             labels: torch.Tensor | None = None, noise: Noise | TorchNoise | None = None) -> torch.Tensor:
    """E[lambda(sigma) ||D(x + sigma n, sigma) - x||^2], ln sigma ~ N(p_mean, p_std^2) (EDM eq. 8).
    `noise` draws sigma (stream 0) and n (stream 1) for x's rows (default: torch's generator)."""
    noise = noise or TorchNoise(x.shape[0], x.device)
    sigma = (noise.normal(0).to(x.device) * p_std + p_mean).exp().reshape(-1, 1, 1, 1)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # lambda(sigma), EDM Table 1
    denoised = denoiser(x + sigma * noise.normal_like(1, x), sigma.flatten(), labels)
    return (weight * (denoised - x).square()).mean()


def ema_rate(step: int, batch: int, halflife_kimg: float, rampup: float | None) -> float:
    """EMA decay per step for a half-life in images, ramped up early in training (EDM's training loop)."""
    halflife_images = halflife_kimg * 1000
    if rampup is not None:
        halflife_images = min(halflife_images, (step + 1) * batch * rampup)
    return 0.5 ** (batch / max(halflife_images, 1e-8))


def trainer(cfg: Config, t: Teacher, ctx: Context, **training_args: Any) -> tuple[Training, dict]:
    """The Training of the EDM teacher for the section `t` and the arguments of its fit(); training_args: the
    DAG's paths and fingerprint (pipeline.stages.training_io)."""
    training = Training("teacher", cfg, t, model_for("teacher", cfg, t.dropout), ctx, optimizer=t.optimizer,
                        **training_args)
    sigma_data = cfg.diffusion.sigma_data

    def loss_fn(step: int, x: torch.Tensor, labels: torch.Tensor | None, noise: Noise) -> tuple[torch.Tensor, dict]:
        return edm_loss(training.online, x, t.p_mean, t.p_std, sigma_data, labels, noise), {}

    def lr_at(step: int) -> float:
        return t.lr * min((step + 1) * t.batch / max(t.lr_rampup_kimg * 1000, 1e-8), 1.0)

    return training, {"loss_fn": loss_fn, "lr_at": lr_at,
                      "ema_rate": lambda step: ema_rate(step, t.batch, t.ema_halflife_kimg, t.ema_rampup)}


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    training, fit_args = trainer(cfg, cfg.teacher, setup_training(cfg), **training_io(cfg, "teacher"))
    training.fit(**fit_args)


if __name__ == "__main__":
    main()
