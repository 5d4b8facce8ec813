"""Stage distill_cd: consistency distillation (paper Algorithm 2) from the EDM teacher.

    python -m pipeline.distill_cd [--config params.yaml] [--set cd.solver=euler]

Each step: n ~ U{0..N-2} on the descending Karras grid, t = sigma_n > t2 = sigma_{n+1}; x_t = x + t z;
one teacher ODE step (Euler or Heun) gives x_t2; loss d(f_theta(x_t, t), f_theta-(x_t2, t2)) with
lambda = 1; then theta- <- mu theta- + (1 - mu) theta. The student starts from the teacher's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline import cm
from pipeline.config import stage_cli
from pipeline.lpips import training_distance
from pipeline.models import build_model, ema_update, frozen_copy, load_model
from pipeline.stages import checkpoint
from pipeline.training import Training, setup_torch


def cd_loss(student: Callable, target: Callable, teacher: Callable, x: torch.Tensor, sigmas: torch.Tensor,
            teacher_step: Callable, distance: Callable) -> torch.Tensor:
    """Algorithm 2, one batch: d(f_theta(x_t, t), f_theta-(x_t2, t2)), x_t2 from one teacher ODE step."""
    n = torch.randint(0, len(sigmas) - 1, (x.shape[0],), device=x.device)
    t, t2 = sigmas[n], sigmas[n + 1]
    x_t = x + t.reshape(-1, *[1] * (x.ndim - 1)) * torch.randn_like(x)
    with torch.no_grad():
        x_t2 = teacher_step(teacher, x_t, t, t2)
        target_out = target(x_t2, t2)
    return distance(student(x_t, t), target_out).mean()


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    device = setup_torch(cfg)
    c, d = cfg.cd, cfg.diffusion
    distance = training_distance(c.metric, cfg.lpips, device)  # fails early if LPIPS weights are missing
    teacher = load_model(checkpoint("teacher"), device)
    student = build_model("cd", cfg.raw["network"], cfg.raw["diffusion"], dropout=c.dropout)
    if c.init_from_teacher:
        student.net.load_state_dict(teacher.net.state_dict())
    target = frozen_copy(student).to(device)
    training = Training("cd", cfg, c, student, device, optimizer=c.optimizer, extra={"target": target})
    sigmas = cm.karras_sigmas(c.N, d.sigma_min, d.sigma_max, d.rho).to(device)
    teacher_step = {"euler": cm.euler_step, "heun": cm.heun_step}[c.solver]

    def loss_fn(step: int, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return cd_loss(training.model, target, teacher, x, sigmas, teacher_step, distance), {}

    def after_step(step: int) -> dict:
        ema_update(target, training.model, c.mu)
        return {}

    training.fit(loss_fn, lambda step: c.ema, after_step=after_step)


if __name__ == "__main__":
    main()
