"""Stage distill_cd: consistency distillation (paper Algorithm 2) from the EDM teacher.

    python -m pipeline.distill_cd [--config params.yaml] [--set cd.solver=euler]

Each step: n ~ U{0..N-2} on the descending Karras grid, t = sigma_n > t2 = sigma_{n+1}; x_t = x + t z;
one teacher ODE step (Euler or Heun) gives x_t2; loss d(f_theta(x_t, t), f_theta-(x_t2, t2)) with
lambda = 1; then theta- <- mu theta- + (1 - mu) theta. The student starts from the teacher's EMA weights
(cd.init_weights: ema, the PyTorch code) or its online ones (online, the JAX code).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from pipeline import cm
from pipeline.config import Config, Distill, stage_cli
from pipeline.distributed import Context
from pipeline.lpips import training_distance
from pipeline.models import compile_module, ema_update, frozen_copy, load_model, model_for
from pipeline.noise import Noise, SharedDropout, TorchNoise
from pipeline.stages import checkpoint, training_io
from pipeline.training import Training, setup_training


def cd_loss(student: Callable, target: Callable, teacher: Callable, x: torch.Tensor, sigmas: torch.Tensor,
            teacher_step: Callable, distance: Callable, labels: torch.Tensor | None = None,
            noise: Noise | TorchNoise | None = None, dropout: SharedDropout | None = None) -> torch.Tensor:
    """Algorithm 2, one batch: d(f_theta(x_t, t), f_theta-(x_t2, t2)), x_t2 from one teacher ODE step.
    Class-conditional models see the image's label in all three networks. `noise` draws n (stream 0) and
    z (stream 1) for x's rows (default: torch's generator); `dropout` may give target and student one mask."""
    if labels is not None:
        student, target, teacher = (partial(m, class_labels=labels) for m in (student, target, teacher))
    noise = noise or TorchNoise(x.shape[0], x.device)
    n = noise.integers(0, len(sigmas) - 1).to(sigmas.device)
    t, t2 = sigmas[n], sigmas[n + 1]
    x_t = x + t.reshape(-1, *[1] * (x.ndim - 1)) * noise.normal_like(1, x)
    with torch.no_grad():
        x_t2 = teacher_step(teacher, x_t, t, t2)
        if dropout:
            dropout.remember()
        target_out = target(x_t2, t2)
    if dropout:
        dropout.replay()
    return distance(student(x_t, t), target_out).mean()


def trainer(cfg: Config, c: Distill, ctx: Context, **training_args: Any) -> tuple[Training, dict]:
    """The Training of Algorithm 2 for the section `c` and the arguments of its fit(); training_args: the
    DAG's paths and fingerprint (pipeline.stages.training_io)."""
    d, device = cfg.diffusion, ctx.device
    distance = training_distance(c.metric, cfg.lpips, device)  # fails early if LPIPS weights are missing
    teacher = load_model(checkpoint(cfg, "teacher"), device, cfg=cfg).to(getattr(torch, cfg.run.dtype))
    if cfg.run.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    compile_module(teacher, cfg.run.compile)
    student = model_for("cd", cfg, c.dropout)
    if c.init_from_teacher:
        start = teacher if c.init_weights == "ema" else load_model(checkpoint(cfg, "teacher"), weights="model")
        student.net.load_state_dict(start.net.state_dict())
    target = frozen_copy(student).to(device)
    if c.target_dropout != "none":  # the target's dropout layers draw masks too (both official codes)
        target.train()
    dropout = SharedDropout(c.target_dropout, device)
    training = Training("cd", cfg, c, student, ctx, optimizer=c.optimizer, extra={"target": target},
                        **training_args)
    sigmas = cm.karras_sigmas(c.N, d.sigma_min, d.sigma_max, d.rho).to(device)
    teacher_step = {"euler": cm.euler_step, "heun": cm.heun_step}[c.solver]

    def loss_fn(step: int, x: torch.Tensor, labels: torch.Tensor | None, noise: Noise) -> tuple[torch.Tensor, dict]:
        return cd_loss(training.online, target, teacher, x, sigmas, teacher_step, distance, labels, noise,
                       dropout), {}

    def after_step(step: int) -> dict:
        ema_update(target, training.model, c.mu)
        return {}

    return training, {"loss_fn": loss_fn, "ema_rate": lambda step: c.ema, "after_step": after_step}


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    training, fit_args = trainer(cfg, cfg.cd, setup_training(cfg), **training_io(cfg, "cd"))
    training.fit(**fit_args)


if __name__ == "__main__":
    main()
