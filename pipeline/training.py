"""The training loop shared by train_teacher, distill_cd and train_ct.

It owns what the three have in common: batches, optimiser, the evaluated EMA, the progress bar,
MLflow logging, and preemption safety. A resume checkpoint (<output>.resume.pt) is written atomically
every `checkpoint_every` steps and on SIGTERM/SIGINT; a re-run with the same params continues from it
(same MLflow run, same RNG streams). The stage supplies the loss and what happens after each step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import tracking
from pipeline.config import Config
from pipeline.data import Batches, atomic_write, load_split
from pipeline.models import atomic_save, ema_update, frozen_copy
from pipeline.stages import TRAIN_STAGE, checkpoint, data_dir, loss_figure, stages

# (step, images, labels or None) -> (loss, extra logs); labels are None for unconditional models
LossFn = Callable[[int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: run.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def setup_torch(cfg: Config) -> torch.device:
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    return resolve_device(cfg.run.device)


class _Interrupted(Exception):
    pass


class Training:
    """Trains `model` (online weights) and keeps `ema` (the evaluated weights); `extra` holds further
    modules whose state must survive a resume (the target network of CD and CT). `stage` and `output` default
    to the model's training stage and checkpoint (the ablation runs name their own)."""

    def __init__(self, kind: str, cfg: Config, section, model: nn.Module, device: torch.device,
                 optimizer: str = "adam", extra: dict[str, nn.Module] | None = None, stage: str | None = None,
                 output: str | None = None, tags: dict | None = None):
        self.kind, self.cfg, self.section, self.device = kind, cfg, section, device
        self.stage = next(s for s in stages(cfg) if s.name == (stage or TRAIN_STAGE[kind]))
        self.output = Path(output or checkpoint(cfg, kind))
        self.resume_path = self.output.with_suffix(".resume.pt")
        self.tags = {"model": kind, **(tags or {})}
        # Autocast on CUDA only: CPU runs (tests, the demo) stay in fp32 whatever the preset asks.
        precision = cfg.run.mixed_precision if device.type == "cuda" else "none"
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.model = model.to(device).train()
        self.ema = frozen_copy(self.model)
        self.extra = extra or {}
        opt_class = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[optimizer]
        self.optimizer = opt_class(self.model.parameters(), lr=section.lr)
        images, labels = load_split(data_dir(cfg), "train")
        self.conditional = cfg.data.label_dim > 0
        self.batches = Batches(images, labels, section.batch, cfg.data.hflip, seed=cfg.run.seed)
        self.step, self.history, self.evaluations, self.run_id = 0, [], [], None
        self.fingerprint = self.stage.param_values(cfg)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.autocast_dtype)

    # ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "kind": self.kind, "step": self.step, "fingerprint": self.fingerprint,
            "network": self.cfg.raw["network"], "diffusion": self.cfg.raw["diffusion"], "config": self.cfg.raw,
            "shape": {"resolution": self.cfg.data.spec.resolution, "label_dim": self.cfg.data.label_dim},
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "extra": {name: m.state_dict() for name, m in self.extra.items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "batches": self.batches.state_dict(), "torch_rng": torch.get_rng_state(), "history": self.history,
            "evaluations": self.evaluations, "mlflow_run_id": self.run_id,
        }

    def try_resume(self) -> None:
        if not self.resume_path.is_file():
            return
        state = torch.load(self.resume_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            print(f"{self.resume_path}: params changed since it was written; starting afresh", file=sys.stderr)
            return
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        for name, module in self.extra.items():
            module.load_state_dict(state["extra"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history, self.run_id = state["step"], state["history"], state["mlflow_run_id"]
        self.evaluations = state.get("evaluations", [])
        print(f"resuming {self.kind} from step {self.step} ({self.resume_path})", file=sys.stderr)

    # ---------------------------------------------------------------------------------------------
    def fit(self, loss_fn: LossFn, ema_rate: Callable[[int], float],
            after_step: Callable[[int], dict] | None = None,
            lr_at: Callable[[int], float] | None = None) -> None:
        """Run to `section.iterations` steps, then write the checkpoint (model, ema, extra) atomically."""
        self.try_resume()
        total, section = self.section.iterations, self.section
        interrupted = []
        previous = {s: signal.signal(s, lambda signum, frame: interrupted.append(signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
        with tracking.stage_run(self.stage.name, self.cfg, run_id=self.run_id, tags=self.tags) as run:
            self.run_id = run.info.run_id
            bar = tqdm(total=total, initial=self.step, desc=self.stage.name, unit="step", mininterval=1,
                       dynamic_ncols=True)
            window_start, window_images, losses = time.perf_counter(), 0, []
            try:
                while self.step < total:
                    x, labels = self.batches.next()
                    x, labels = x.to(self.device), labels.to(self.device) if self.conditional else None
                    if lr_at is not None:
                        for group in self.optimizer.param_groups:
                            group["lr"] = lr_at(self.step)
                    with self.autocast():
                        loss, logs = loss_fn(self.step, x, labels)
                    if not math.isfinite(loss.item()):
                        raise FloatingPointError(f"{self.stage.name}: loss is {loss.item()} at step {self.step}")
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    ema_update(self.ema, self.model, ema_rate(self.step))
                    logs.update(after_step(self.step) if after_step else {})
                    self.step += 1
                    losses.append(loss.item())
                    window_images += x.shape[0]
                    bar.update(1)
                    if self.step % section.log_every == 0 or self.step == total:
                        elapsed = time.perf_counter() - window_start
                        logs.update(loss=float(np.mean(losses)), img_per_s=window_images / max(elapsed, 1e-9),
                                    lr=self.optimizer.param_groups[0]["lr"])
                        tracking.log_metrics(logs, step=self.step)
                        self.history.append((self.step, logs["loss"]))
                        bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['img_per_s']:.0f}")
                        window_start, window_images, losses = time.perf_counter(), 0, []
                    if self.step % section.checkpoint_every == 0 and self.step < total:
                        atomic_save(self.state(), self.resume_path)
                    if interrupted:
                        raise _Interrupted()
            except _Interrupted:
                atomic_save(self.state(), self.resume_path)
                bar.close()
                print(f"interrupted at step {self.step}: saved {self.resume_path}; re-run to resume",
                      file=sys.stderr)
                raise SystemExit(128 + interrupted[0]) from None
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            bar.close()
            atomic_save(self.state(), self.output)
            self.resume_path.unlink(missing_ok=True)
            if self.output == Path(checkpoint(self.cfg, self.kind)):
                plot = Path(loss_figure(self.cfg, self.kind))
                plot_loss(self.history, plot, f"{self.stage.name} ({self.cfg.preset})")
                tracking.log_artifact(plot)
        print(f"wrote {self.output} after {self.step} steps", file=sys.stderr)


def plot_loss(history: list[tuple[int, float]], path: Path, title: str) -> None:
    """Loss against step, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, values = zip(*history)
        ax.plot(steps, values)
        ax.set_yscale("log" if min(values) > 0 else "linear")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
