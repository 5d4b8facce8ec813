"""Stage train_ct: consistency training (paper Algorithm 3), no teacher.

    python -m pipeline.train_ct [--config params.yaml] [--set ct.schedule=fixed]

As distill_cd, but the point at t2 comes from the same data and noise: x_t2 = x + t2 z. The grid size
N(k) and target rate mu(k) follow the adaptive schedule of Appendix C (pipeline.cm.ct_schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

import torch

from pipeline import cm
from pipeline.config import Config, ConsistencyTraining, stage_cli
from pipeline.distributed import Context
from pipeline.lpips import training_distance
from pipeline.models import ema_update, frozen_copy, load_model, model_for
from pipeline.noise import Noise, SharedDropout, TorchNoise
from pipeline.stages import checkpoint, training_io
from pipeline.training import Training, setup_training


def ct_loss(model: Callable, target: Callable, x: torch.Tensor, sigmas: torch.Tensor,
            distance: Callable, labels: torch.Tensor | None = None,
            noise: Noise | TorchNoise | None = None, dropout: SharedDropout | None = None) -> torch.Tensor:
    """Algorithm 3, one batch: d(f_theta(x + t z, t), f_theta-(x + t2 z, t2)) with the same z. `noise` draws
    n (stream 0) and z (stream 1) for x's rows (default: torch's generator); `dropout` may give target and
    model one mask."""
    if labels is not None:
        model, target = partial(model, class_labels=labels), partial(target, class_labels=labels)
    noise = noise or TorchNoise(x.shape[0], x.device)
    n = noise.integers(0, len(sigmas) - 1).to(sigmas.device)
    t, t2 = sigmas[n], sigmas[n + 1]
    shape = (-1, *[1] * (x.ndim - 1))
    z = noise.normal_like(1, x)
    with torch.no_grad():
        if dropout:
            dropout.remember()
        target_out = target(x + t2.reshape(shape) * z, t2)
    if dropout:
        dropout.replay()
    return distance(model(x + t.reshape(shape) * z, t), target_out).mean()


def schedule(c: ConsistencyTraining, step: int) -> tuple[int, float]:
    """(N, mu) at a step: the adaptive curriculum of App. C, or fixed N = s1 + 1 and mu = mu0."""
    if c.schedule == "fixed":
        return c.s1 + 1, c.mu0
    return cm.ct_schedule(step, c.iterations, c.s0, c.s1, c.mu0, variant=c.schedule)


def trainer(cfg: Config, c: ConsistencyTraining, ctx: Context, **training_args: Any) -> tuple[Training, dict]:
    """The Training of Algorithm 3 for the section `c` and the arguments of its fit(); training_args: the
    DAG's paths and fingerprint (pipeline.stages.training_io)."""
    d, device = cfg.diffusion, ctx.device
    distance = training_distance(c.metric, cfg.lpips, device)
    model = model_for("ct", cfg, c.dropout)
    if c.init_from_teacher:
        weights = "ema" if c.init_weights == "ema" else "model"
        model.net.load_state_dict(load_model(checkpoint(cfg, "teacher"), weights=weights, cfg=cfg).net.state_dict())
    target = frozen_copy(model).to(device)
    if c.target_dropout != "none":  # the target's dropout layers draw masks too (both official codes)
        target.train()
    dropout = SharedDropout(c.target_dropout, device)
    training = Training("ct", cfg, c, model, ctx, optimizer=c.optimizer, extra={"target": target},
                        **training_args)

    @lru_cache(maxsize=4)
    def grid(n: int) -> torch.Tensor:
        return cm.karras_sigmas(n, d.sigma_min, d.sigma_max, d.rho).to(device)

    def loss_fn(step: int, x: torch.Tensor, labels: torch.Tensor | None, noise: Noise) -> tuple[torch.Tensor, dict]:
        n_steps, mu = schedule(c, step)
        return (ct_loss(training.online, target, x, grid(n_steps), distance, labels, noise, dropout),
                {"N": n_steps, "mu": mu})

    def after_step(step: int) -> dict:
        ema_update(target, training.model, schedule(c, step)[1])
        return {}

    return training, {"loss_fn": loss_fn, "ema_rate": lambda step: c.ema, "after_step": after_step}


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    training, fit_args = trainer(cfg, cfg.ct, setup_training(cfg), **training_io(cfg, "ct"))
    training.fit(**fit_args)


if __name__ == "__main__":
    main()
