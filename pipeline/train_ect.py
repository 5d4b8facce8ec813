"""Stage train_ect: easy consistency tuning (ECT; Geng et al., ICLR 2025), from the teacher's weights.

    python -m pipeline.train_ect [--config params.yaml] [--set ect.q=4]

A diffusion model is a consistency model with r = 0; ECT starts from the teacher (its EMA weights, in both the online
and the sampling EMA weights) and shrinks the gap t - r stage by stage. Each step, per sample (locuslab/ect):
- t continuous: ln t ~ N(P_mean, P_std^2); r = t (1 - q^-(a+1) n(t)), n(t) = 1 + k sigmoid(-b t), a = floor(step /
  stage_iterations), clamped at 0 (pipeline.cm.ect_r);
- one z and one dropout mask for both passes: Delta = f(x + t z, t) - sg f(x + r z, r), the target from the online
  network under no-grad (no target EMA);
- where r = 0 the target is the clean image x: the network is evaluated there too (at sigma 0, where ln sigma is
  -inf, its output may be NaN), its non-finite values are zeroed (torch.nan_to_num) and the row replaced by x, as the
  official loss does;
- loss w (sqrt(||Delta||^2 + c^2) - c), ||.|| over the whole sample, w = 1 / (t - r) (CIFAR-10, c = 0) or
  1/t^2 + 1/sigma_data^2 (ImageNet 64, c = 0.06).
Training uses EDM's scalings (f(x, 0) = x); sampling uses CM scalings with the boundary at ect.eval_sigma_min
(pipeline.models.TunedConsistencyModel).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from pipeline import cm
from pipeline.config import Config, ConsistencyTuning, stage_cli
from pipeline.distributed import Context
from pipeline.models import load_model, model_for
from pipeline.noise import Noise, SharedDropout, TorchNoise
from pipeline.stages import checkpoint, training_io
from pipeline.training import Training, setup_training


def ect_loss(model: Callable, target: Callable, x: torch.Tensor, stage: int, e: ConsistencyTuning,
             sigma_data: float = 0.5, labels: torch.Tensor | None = None, noise: Noise | TorchNoise | None = None,
             dropout: SharedDropout | None = None) -> torch.Tensor:
    """ECT, one batch: the mean over rows of w(t, r) (sqrt(||f(x + t z, t) - sg f(x + r z, r)||^2 + c^2) - c).
    `model` takes the gradient; `target` (the same weights, not wrapped for data parallelism) is called under
    no-grad. `noise` draws ln t (stream 0) and z (stream 1) per row; `dropout` gives both passes one mask."""
    if labels is not None:
        model, target = partial(model, class_labels=labels), partial(target, class_labels=labels)
    noise = noise or TorchNoise(x.shape[0], x.device)
    precision = torch.promote_types(x.dtype, torch.float32)  # t, r and the loss: at least float32 under autocast
    t = (e.p_mean + e.p_std * noise.normal(0).to(x.device, precision)).exp()
    r = cm.ect_r(t, stage, e.q, e.k, e.b, e.mapping)
    shape = (-1, *[1] * (x.ndim - 1))
    z = noise.normal_like(1, x)
    with torch.no_grad():
        if dropout:
            dropout.remember()
        target_out = torch.nan_to_num(target(x + r.reshape(shape).to(x.dtype) * z, r.to(x.dtype)))
        target_out = torch.where(r.reshape(shape) > 0, target_out, x)  # r = 0: the clean image
    if dropout:
        dropout.replay()
    delta = model(x + t.reshape(shape).to(x.dtype) * z, t.to(x.dtype)) - target_out
    distance = (delta.to(precision).square().flatten(1).sum(1) + e.c**2).sqrt() - e.c
    weight = 1 / (t - r) if e.weighting == "inverse_gap" else 1 / t**2 + 1 / sigma_data**2
    return (weight * distance).mean()


def trainer(cfg: Config, e: ConsistencyTuning, ctx: Context, **training_args: Any) -> tuple[Training, dict]:
    """The Training of ECT for the section `e` and the arguments of its fit(); training_args: the DAG's paths and
    fingerprint (pipeline.stages.training_io)."""
    model = model_for("ect", cfg, e.dropout)
    if e.init_from_teacher:
        model.net.load_state_dict(load_model(checkpoint(cfg, "teacher"), weights="ema", cfg=cfg).net.state_dict())
    dropout = SharedDropout("shared", ctx.device)
    training = Training("ect", cfg, e, model, ctx, optimizer=e.optimizer, **training_args)

    def loss_fn(step: int, x: torch.Tensor, labels: torch.Tensor | None, noise: Noise) -> tuple[torch.Tensor, dict]:
        stage = step // e.stage_iterations
        loss = ect_loss(training.online, training.model, x, stage, e, cfg.diffusion.sigma_data, labels, noise,
                        dropout)
        return loss, {"stage": stage, "r_over_t_large_t": 1 - e.q ** -(stage + 1)}

    return training, {"loss_fn": loss_fn, "ema_rate": lambda step: e.ema}


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    training, fit_args = trainer(cfg, cfg.ect, setup_training(cfg), **training_io(cfg, "ect"))
    training.fit(**fit_args)


if __name__ == "__main__":
    main()
