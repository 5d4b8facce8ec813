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
            noise: Noise | TorchNoise | None = None, dropout: SharedDropout | None = None,
            index_probs: torch.Tensor | None = None, weighted: bool = False) -> torch.Tensor:
    """Algorithm 3, one batch: lambda(t) d(f_theta(x + t z, t), f_theta-(x + t2 z, t2)) with the same z, t = sigmas[n]
    > t2 = sigmas[n+1]. `noise` draws n (stream 0) and z (stream 1) for x's rows (default: torch's generator);
    `dropout` may give target and model one mask. index_probs: P(n) (iCT's discretised log-normal; None: uniform);
    weighted: lambda = 1 / (t - t2) (iCT), else 1."""
    if labels is not None:
        model, target = partial(model, class_labels=labels), partial(target, class_labels=labels)
    noise = noise or TorchNoise(x.shape[0], x.device)
    n = level_index(noise, sigmas, index_probs)
    t, t2 = sigmas[n], sigmas[n + 1]
    shape = (-1, *[1] * (x.ndim - 1))
    z = noise.normal_like(1, x)
    with torch.no_grad():
        if dropout:
            dropout.remember()
        target_out = target(x + t2.reshape(shape) * z, t2)
    if dropout:
        dropout.replay()
    loss = distance(model(x + t.reshape(shape) * z, t), target_out)
    if weighted:
        loss = loss / (t - t2).to(loss.dtype)  # iCT: lambda(sigma_n) = 1 / (sigma_n - sigma_{n+1})
    return loss.mean()


def level_index(noise: Noise | TorchNoise, sigmas: torch.Tensor,
                index_probs: torch.Tensor | None = None) -> torch.Tensor:
    """The level pair n of each row (stream 0): uniform on {0..N-2}, or drawn from P(n) by its inverse CDF."""
    if index_probs is None:
        return noise.integers(0, len(sigmas) - 1).to(sigmas.device)
    u = noise.uniform(0).to(sigmas.device, index_probs.dtype)
    return torch.searchsorted(index_probs.cumsum(0), u).clamp(max=len(sigmas) - 2)  # u above the float32 sum's end


def schedule(c: ConsistencyTraining, step: int) -> tuple[int, float]:
    """(N, mu) at a step: the adaptive curriculum of App. C, iCT's exponential one (mu = mu0), or fixed N = s1 + 1
    and mu = mu0."""
    if c.schedule == "fixed":
        return c.s1 + 1, c.mu0
    if c.schedule == "exponential":
        return cm.ict_schedule(step, c.iterations, c.s0, c.s1), c.mu0
    return cm.ct_schedule(step, c.iterations, c.s0, c.s1, c.mu0, variant=c.schedule)


class _Online(torch.nn.Module):
    """The target of target: online (iCT): the online network itself, called under no-grad by ct_loss; with
    target_dropout none it is evaluated without dropout."""

    def __init__(self, model: torch.nn.Module, dropout: bool):
        super().__init__()
        self.model, self.dropout = [model], dropout  # a list: not a submodule (no second copy in checkpoints)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        model = self.model[0]
        if self.dropout:
            return model(*args, **kwargs)
        model.eval()
        try:
            return model(*args, **kwargs)
        finally:
            model.train()


def trainer(cfg: Config, c: ConsistencyTraining, ctx: Context, kind: str = "ct",
            **training_args: Any) -> tuple[Training, dict]:
    """The Training of Algorithm 3 for the section `c` (cfg.ct, cfg.ict or an ablation run's) and the arguments of
    its fit(); training_args: the DAG's paths and fingerprint (pipeline.stages.training_io)."""
    d, device = cfg.diffusion, ctx.device
    distance = (cm.loss_metric("pseudo_huber", c.pseudo_huber_c) if c.metric == "pseudo_huber"
                else training_distance(c.metric, cfg.lpips, device))
    model = model_for(kind, cfg, c.dropout)
    if c.init_from_teacher:
        weights = "ema" if c.init_weights == "ema" else "model"
        model.net.load_state_dict(load_model(checkpoint(cfg, "teacher"), weights=weights, cfg=cfg).net.state_dict())
    extra = {}
    if c.target == "ema":
        target = extra["target"] = frozen_copy(model).to(device)
        if c.target_dropout != "none":  # the target's dropout layers draw masks too (both official codes)
            target.train()
    dropout = SharedDropout(c.target_dropout, device)
    training = Training(kind, cfg, c, model, ctx, optimizer=c.optimizer, extra=extra, **training_args)
    if c.target == "online":  # theta- = stop-grad(theta): no copy; ct_loss calls it under no-grad
        target = _Online(training.model, c.target_dropout != "none")

    @lru_cache(maxsize=4)
    def grid(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        sigmas = cm.karras_sigmas(n, d.sigma_min, d.sigma_max, d.rho).to(device)
        probs = cm.lognormal_index_probs(sigmas, c.p_mean, c.p_std) if c.index == "lognormal" else None
        return sigmas, probs

    def loss_fn(step: int, x: torch.Tensor, labels: torch.Tensor | None, noise: Noise) -> tuple[torch.Tensor, dict]:
        n_steps, mu = schedule(c, step)
        sigmas, probs = grid(n_steps)
        loss = ct_loss(training.online, target, x, sigmas, distance, labels, noise, dropout, probs,
                       c.weighting == "inverse_gap")
        return loss, {"N": n_steps} | ({"mu": mu} if c.target == "ema" else {})

    def after_step(step: int) -> dict:
        if c.target == "ema":
            ema_update(target, training.model, schedule(c, step)[1])
        return {}

    return training, {"loss_fn": loss_fn, "ema_rate": lambda step: c.ema, "after_step": after_step}


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    training, fit_args = trainer(cfg, cfg.ct, setup_training(cfg), **training_io(cfg, "ct"))
    training.fit(**fit_args)


if __name__ == "__main__":
    main()
