"""The training loop shared by train_teacher, distill_cd, train_ct and the Figure 3 ablations.

It owns what they have in common: batches, optimiser, the evaluated EMA, the progress bar, MLflow logging,
data parallelism and preemption safety. The stage supplies the loss, what happens after each step, and (as
plain arguments) where the data and the checkpoint live and the params fingerprint.

Data parallel: `batch` is the global batch. Every process draws the same global batch (rows, flips) and
computes the rows [rank * B / W, (rank + 1) * B / W) in micro-batches of `micro_batch`; the random numbers of
each row (noise z, sigma, index n) depend only on (seed, step, row), so 1 process, W processes and gradient
accumulation follow the same trajectory up to float rounding, and a run may resume on another number of GPUs.

Preemption: a resume checkpoint (<output>.resume.pt) is written atomically by rank 0 every
`checkpoint_every` steps and on SIGTERM/SIGINT, and on SLURM's warning signal (SIGURG, or SIGUSR1), after
which the job requeues itself. A re-run with the same params continues from it (same MLflow run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline import distributed, tracking
from pipeline.config import Config, split_batch, unwritable
from pipeline.data import Batches, atomic_write, choose_placement, load_split, training_images
from pipeline.distributed import Context
from pipeline.models import (
    CheckpointError,
    atomic_save,
    compile_module,
    ema_update,
    frozen_copy,
    load_checkpoint,
    previous,
)
from pipeline.noise import Noise

# (step, images, labels or None, noise of those rows) -> (loss, extra logs); labels None when unconditional
LossFn = Callable[[int, torch.Tensor, torch.Tensor | None, Noise], tuple[torch.Tensor, dict]]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WARNING_SIGNALS = (signal.SIGURG, signal.SIGUSR1)  # SLURM's "time limit ahead" (sbatch --signal): requeue
_received: list[int] = []  # signals seen since setup_training(); the loop stops at the next step boundary
_original: dict = {}  # the handlers before the first _catch_signals(), restored when training ends
MAX_SKIPPED_IN_A_ROW = 50  # fp16 overflows in a row before training stops (the loss scale fell by 2^50)
LOSS_PASSES = 1.5  # a step's memory per row over one pass with gradients: the no-grad teacher / target passes
MEMORY_MARGIN = 0.85  # of the free GPU memory a step may plan for: fragmentation, cuDNN workspaces, NCCL buffers


def _catch_signals() -> None:
    """Record stop and warning signals instead of dying of them."""
    for s in STOP_SIGNALS + WARNING_SIGNALS:
        previous = signal.signal(s, lambda signum, frame: _received.append(signum))
        _original.setdefault(s, previous)


def _threads_and_seed(cfg: Config) -> None:
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    # TF32 for the fp32 matmuls and convolutions on Ampere and later (no effect on the CPU).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    torch.manual_seed(cfg.run.seed)  # in training: the same initial weights on every rank


def autocast_dtype(precision: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.dtype | None:
    """The autocast dtype of run.mixed_precision on a device: fp16 on CUDA only (it needs loss scaling, and CPU
    runs of the paper presets stay fp32); bf16 on CUDA and CPU; never for float64 weights."""
    if dtype != torch.float32 or precision == "none" or (precision == "fp16" and device.type != "cuda"):
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def setup_torch(cfg: Config) -> torch.device:
    """Threads, seed and device of a single-process stage (sampling, evaluation, editing)."""
    _threads_and_seed(cfg)
    return distributed.device(cfg.run.device)


def setup_training(cfg: Config) -> Context:
    """Threads, seed and the process group the launcher set up (one process: a trivial context). Signals are
    caught from here on, so that a warning that arrives while the models load is not lost."""
    _catch_signals()
    _threads_and_seed(cfg)
    return distributed.init(cfg.run.device, cfg.cluster.timeout_minutes, cfg.cluster.network_interface)


class _Stop(Exception):
    pass


def replica_checksum(modules: dict[str, nn.Module]) -> str:
    """SHA-256 of every parameter and buffer, bit for bit (equal on every rank unless replicas diverged)."""
    digest = hashlib.sha256()
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tracked_run(stage: str, cfg: Config, kind: str, section, run_id: str | None = None, tags: dict | None = None,
                extra_params: dict | None = None) -> contextlib.AbstractContextManager:
    """The MLflow run of a training (run_id: resume it). Its params are the config as trained: cfg's with the
    values of `section` that differ from cfg's own section (an ablation run's knobs), not the base section's."""
    base = getattr(cfg, kind)
    own = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
           if getattr(section, f.name) != getattr(base, f.name)}
    return tracking.stage_run(stage, cfg, run_id=run_id, tags={"model": kind, **(tags or {})},
                              extra_params=extra_params, config=cfg.raw | {kind: cfg.raw[kind] | own})


class Training:
    """Trains `model` (online weights) and keeps `ema` (the evaluated weights); `extra` holds further
    modules whose state must survive a resume (the target network of CD and CT).

    stage, output, data, fingerprint, loss_plot: the stage's name, checkpoint, prepared-data folder, params
    fingerprint (a resume checkpoint from other params is not used) and loss figure (None: no figure);
    micro_batch: the most rows one process computes at once (None: its whole share of the batch)."""

    def __init__(self, kind: str, cfg: Config, section, model: nn.Module, ctx: Context, *, stage: str, output: str,
                 data: str, fingerprint: str, loss_plot: str | None = None, micro_batch: int | None = None,
                 resources: str = "",
                 optimizer: str = "adam", extra: dict[str, nn.Module] | None = None, tags: dict | None = None):
        self.kind, self.cfg, self.section, self.ctx, self.device = kind, cfg, section, ctx, ctx.device
        self.stage, self.output, self.fingerprint = stage, Path(output), fingerprint
        self.resources = resources or stage  # the resources: entry that sets micro_batch (named in an OOM's hint)
        self.loss_plot = Path(loss_plot) if loss_plot else None
        self.resume_path = self.output.with_suffix(".resume.pt")
        if ctx.main and (folder := unwritable([output])) is not None:  # before hours of training, not after
            raise SystemExit(f"error: {stage}: {folder}: not writable; the checkpoint goes there")
        self.tags = tags or {}
        try:
            self.micro_batch, self.accumulation = split_batch(section.batch, ctx.world_size, micro_batch)
        except ValueError as e:
            raise SystemExit(f"error: {stage}: {e}") from None
        self.rank_rows = section.batch // ctx.world_size
        self.dtype = getattr(torch, cfg.run.dtype)
        self.autocast_dtype = autocast_dtype(cfg.run.mixed_precision, self.device, self.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.skipped = 0  # fp16 steps whose gradients overflowed (not taken), and how many of them in a row
        self.memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        self.model = model.to(self.device, self.dtype, memory_format=self.memory_format).train()
        self.ema = frozen_copy(self.model)
        self.extra = {name: module.to(self.device, self.dtype, memory_format=self.memory_format)
                      for name, module in (extra or {}).items()}
        if ctx.world_size > 1:  # gradients averaged over ranks; rank 0's initial weights broadcast
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.online: nn.Module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.online = self.model
        for module in (self.online, *self.extra.values()):  # in place: checkpoints keep their keys
            compile_module(module, cfg.run.compile)
        cuda = self.device.type == "cuda"
        if optimizer == "adam":  # fused on CUDA: one kernel for all parameters, its step counters on the device
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=section.lr, fused=cuda or None)
        else:  # no fused RAdam; PyTorch picks its multi-tensor (foreach) kernels on CUDA
            self.optimizer = torch.optim.RAdam(self.model.parameters(), lr=section.lr)
        images, labels = load_split(data, "train")
        self.conditional = cfg.data.label_dim > 0
        first = ctx.rank * self.rank_rows
        self.placement = choose_placement(cfg.run.data_placement, images.nbytes, self.device)
        self.batches = Batches(images, labels, section.batch, cfg.data.hflip, seed=cfg.run.seed,
                               rows=slice(first, first + self.rank_rows), device=self.device,
                               placement=self.placement, sampling=cfg.data.sampling)
        self.step, self.history, self.evaluations, self.run_id, self.skipped_in_a_row = 0, [], [], None, 0
        if self.device.type == "cuda":
            self._fit_memory(configured=micro_batch)
        torch.manual_seed(cfg.run.seed + 1_000_003 * ctx.rank)  # dropout: each rank its own masks

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.autocast_dtype)

    def say(self, message: str) -> None:
        if self.ctx.main:
            print(message, file=sys.stderr, flush=True)

    # ---------------------------------------------------------------------------------------------
    def _pass_memory(self, rows: int) -> int:
        """Peak bytes one forward and backward pass of `rows` random images allocates over what is held already
        (its gradients included), measured on the device."""
        resolution, device = self.cfg.data.spec.resolution, self.device
        x = torch.randn(rows, 3, resolution, resolution, device=device, dtype=self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        labels = torch.zeros(rows, dtype=torch.long, device=device) if self.conditional else None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        with self.autocast():  # forward(), not the compiled __call__: no compilation for two throw-away shapes
            self.model.forward(x, torch.ones(rows, device=device), labels).float().square().mean().backward()
        peak = torch.cuda.max_memory_allocated(device) - held
        self.model.zero_grad(set_to_none=True)
        return peak

    def _fit_memory(self, configured: int | None) -> None:
        """Before step 1, from passes of 2 and 4 rows measured on this GPU (the training split, when placed on it,
        already counted in what is free): with micro_batch null, the largest micro-batch that fits is chosen; a set
        micro_batch that will not fit is named in a warning. Not even one image fitting is an error."""
        small, large = self._pass_memory(2), self._pass_memory(4)
        per_row = (large - small) / 2 * LOSS_PASSES
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # held over a step besides activations: the gradients (measured), Adam's or RAdam's two moments, DDP's buckets
        fixed = small - (large - small) + params * (2 + (self.ctx.world_size > 1))
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        fits = -distributed.max_over_ranks(self.ctx, -fitting_micro_batch(self.rank_rows, fixed, per_row, free))
        if fits >= self.micro_batch:
            return
        key = f"resources.{self.resources}.micro_batch"
        on_gpu = self.placement == "device"
        message = (f"{self.stage}: {self.micro_batch} images per process at once need about "
                   f"{(fixed + self.micro_batch * per_row) / 1e9:.1f} GB of GPU memory, {free / 1e9:.1f} GB are free"
                   + (" with the training split on the GPU" if on_gpu else ""))
        if fits == 0:
            raise SystemExit(f"error: {message}; not even one image fits"
                             + ("; set run.data_placement: stream" if on_gpu else "; use a smaller network"))
        if configured is None:
            self.micro_batch, self.accumulation = fits, self.rank_rows // fits
            self.say(f"{message}: micro_batch {fits} chosen (accumulation {self.accumulation}, same global batch); "
                     f"set {key} to choose it yourself")
        else:
            self.say(f"warning: {message}; {key}: {fits} would fit")

    def rng_state(self) -> dict:
        """This rank's generators that draw dropout masks: the CPU's, and on a GPU the device's."""
        cuda = self.device.type == "cuda"
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def state(self, rngs: list[dict] | None = None) -> dict:
        return {
            "kind": self.kind, "step": self.step, "fingerprint": self.fingerprint,
            "world_size": self.ctx.world_size, "micro_batch": self.micro_batch,
            "network": self.cfg.raw["network"], "diffusion": self.cfg.raw["diffusion"], "config": self.cfg.raw,
            "shape": {"resolution": self.cfg.data.spec.resolution, "label_dim": self.cfg.data.label_dim},
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "model_options": self.model.options(),
            "extra": {name: m.state_dict() for name, m in self.extra.items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "batches": self.batches.state_dict(), "rng": rngs or [self.rng_state()], "history": self.history,
            "skipped": self.skipped,
            "evaluations": self.evaluations, "mlflow_run_id": self.run_id,
        }

    def save(self, path: Path) -> None:
        """Check that every rank holds the same weights, then write the checkpoint from rank 0."""
        sums = distributed.gather(self.ctx, replica_checksum({"model": self.model, "ema": self.ema, **self.extra}))
        rngs = distributed.gather(self.ctx, self.rng_state())  # every rank's, in rank order
        if len(set(sums)) > 1:
            bad = [rank for rank, s in enumerate(sums) if s != sums[0]]
            raise SystemExit(f"error: {self.stage}: at step {self.step} the weights of rank(s) {bad} (online, EMA "
                             f"or target) differ from rank 0's: the replicas diverged; no checkpoint written")
        if self.ctx.main:
            atomic_save(self.state(rngs), path, keep_previous=path == self.resume_path)
        distributed.barrier(self.ctx)

    def _resume_state(self) -> tuple[dict, Path] | None:
        """The newest usable resume checkpoint: <output>.resume.pt, or the one before it when that is torn."""
        for path in (self.resume_path, previous(self.resume_path)):
            if not path.is_file():
                continue
            try:
                return load_checkpoint(path), path
            except CheckpointError as e:
                self.say(f"warning: {e}; trying the resume checkpoint before it")
        return None

    def try_resume(self) -> None:
        found = self._resume_state()
        if found is None:
            return
        state, path = found
        if state.get("fingerprint") != self.fingerprint:
            self.say(f"{path}: params changed since it was written; starting afresh")
            return
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        for name, module in self.extra.items():
            module.load_state_dict(state["extra"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.batches.load_state_dict(state["batches"])
        if state.get("world_size", 1) == self.ctx.world_size:  # the same layout: each rank's masks continue exactly
            self._set_rng_state(state)
        self.step, self.history, self.run_id = state["step"], state["history"], state["mlflow_run_id"]
        self.evaluations, self.skipped = state.get("evaluations", []), state.get("skipped", 0)
        was = state.get("world_size", 1)
        self.say(f"resuming {self.kind} from step {self.step} ({path})"
                 + (f", written by {was} processes, now {self.ctx.world_size}" if was != self.ctx.world_size else ""))

    def _set_rng_state(self, state: dict) -> None:
        if "rng" not in state:  # written before per-rank generators were kept: one process's CPU generator
            if self.ctx.world_size == 1:
                torch.set_rng_state(state["torch_rng"])
            return
        mine = state["rng"][self.ctx.rank]
        torch.set_rng_state(mine["cpu"])
        if self.device.type == "cuda" and mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    # ---------------------------------------------------------------------------------------------
    def _step(self, loss_fn: LossFn) -> tuple[torch.Tensor, dict, bool]:
        """One optimiser step over this rank's rows of the global batch; returns their summed loss (on the device:
        nothing here waits for the GPU unless fp16 loss scaling must know whether the step was taken) and whether
        the optimiser stepped."""
        images, flip, all_labels = self.batches.next()
        first = self.ctx.rank * self.rank_rows
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, logs = torch.zeros((), device=self.device), {}
        for k in range(self.accumulation):
            rows = slice(k * self.micro_batch, (k + 1) * self.micro_batch)
            x = training_images(images[rows], flip[rows]).to(self.dtype, memory_format=self.memory_format)
            labels = all_labels[rows] if self.conditional else None
            noise = Noise(self.cfg.run.seed, self.step, first + rows.start, self.micro_batch, self.device)
            sync = k == self.accumulation - 1 or self.ctx.world_size == 1
            with (contextlib.nullcontext() if sync else self.online.no_sync()), self.autocast():
                loss, logs = loss_fn(self.step, x, labels, noise)
            # The gradient of this rank's mean; DDP then averages the ranks: the global batch's mean.
            self.scaler.scale(loss * (self.micro_batch / self.rank_rows)).backward()
            loss_sum += loss.detach().float() * self.micro_batch
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)  # skips the optimiser step when a gradient is inf or NaN
        self.scaler.update()  # ... and then, only then, lowers the scale
        return loss_sum, logs, scale is None or self.scaler.get_scale() >= scale

    def _out_of_memory(self) -> SystemExit:
        """What to change when a step does not fit the GPU: a smaller micro-batch keeps the global batch and the
        result (gradient accumulation); a training split on the GPU can move to host memory."""
        smaller = max(self.micro_batch // 2, 1)
        hint = (f"error: {self.stage}: out of GPU memory at step {self.step} with {self.micro_batch} images per "
                f"process at once (global batch {self.section.batch} over {self.ctx.world_size} process(es), "
                f"accumulation {self.accumulation}); set resources.{self.resources}.micro_batch: {smaller} (the global "
                f"batch and the result stay the same)")
        if self.placement == "device":
            hint += "; or run.data_placement: stream, which keeps the training images off the GPU"
        return SystemExit(hint)

    def train_step(self, loss_fn: LossFn, ema_rate: Callable[[int], float],
                   after_step: Callable[[int], dict] | None = None,
                   lr_at: Callable[[int], float] | None = None) -> tuple[torch.Tensor, dict]:
        """One step of the algorithm: learning rate, optimiser step, EMA, the stage's after_step (target update);
        returns this rank's summed loss (on the device) and the step's logs. When fp16 gradients overflow, nothing
        advances (no optimiser step, EMA, target update or step count, as the official fp16 loop) and the loss is
        None; the step is retried on the next batch at the lowered loss scale."""
        if lr_at is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step)
        try:
            loss_sum, logs, stepped = self._step(loss_fn)
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory() from None
        if not stepped:
            self.skipped, self.skipped_in_a_row = self.skipped + 1, self.skipped_in_a_row + 1
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(f"{self.stage}: fp16 gradients overflowed in {self.skipped_in_a_row} steps "
                                         f"in a row at step {self.step} (loss scale now {self.scaler.get_scale():g})")
            return None, logs
        self.skipped_in_a_row = 0
        ema_update(self.ema, self.model, ema_rate(self.step))
        logs.update(after_step(self.step) if after_step else {})
        self.step += 1
        return loss_sum, logs

    def fit(self, loss_fn: LossFn, ema_rate: Callable[[int], float],
            after_step: Callable[[int], dict] | None = None,
            lr_at: Callable[[int], float] | None = None) -> None:
        """Run to `section.iterations` steps, then write the checkpoint (model, ema, extra) atomically."""
        self.try_resume()
        total, section, main = self.section.iterations, self.section, self.ctx.main
        received = _received
        _catch_signals()
        # SLURM may send its warning up to a minute early, before this process could catch it: the job's end time
        # stands in for a lost signal.
        end = distributed.slurm_end_time() if self.cfg.cluster.requeue else None
        warn_at = end - self.cfg.cluster.warn_seconds if end is not None else math.inf
        parallel = {"world_size": self.ctx.world_size, "micro_batch": self.micro_batch,
                    "accumulation": self.accumulation}
        run_context = tracked_run(self.stage, self.cfg, self.kind, self.section, run_id=self.run_id, tags=self.tags,
                                  extra_params=parallel) if main else contextlib.nullcontext()
        with run_context as run:
            self.run_id = run.info.run_id if main else None
            if main:
                tracking.log_metrics({"world_size": self.ctx.world_size}, step=self.step)
            bar = tqdm(total=total, initial=self.step, desc=self.stage, unit="step", mininterval=1,
                       dynamic_ncols=True, disable=not main)
            window_start, window_first = time.perf_counter(), self.step
            window_loss = torch.zeros((), device=self.device)
            try:
                while self.step < total:
                    loss_sum, logs = self.train_step(loss_fn, ema_rate, after_step, lr_at)
                    if loss_sum is not None:  # None: an fp16 overflow; nothing advanced
                        window_loss += loss_sum
                        bar.update(1)
                        if self.step % section.log_every == 0 or self.step == total:
                            window_loss = self._log(window_loss, window_first, window_start, logs, bar)
                            window_start, window_first = time.perf_counter(), self.step
                        if self.step % section.checkpoint_every == 0 and self.step < total:
                            self.save(self.resume_path)
                    if not received and time.time() >= warn_at:
                        received.append(signal.SIGURG)
                    signum = distributed.max_over_ranks(self.ctx, received[0] if received else 0)
                    if signum:
                        raise _Stop()
            except _Stop:
                self.save(self.resume_path)
                bar.close()
                self._stopped(signum)
            finally:
                for s, handler in _original.items():
                    signal.signal(s, handler)
            bar.close()
            self.save(self.output)
            if main:
                self.resume_path.unlink(missing_ok=True)
                previous(self.resume_path).unlink(missing_ok=True)
                if self.loss_plot is not None:
                    plot_loss(self.history, self.loss_plot, f"{self.stage} ({self.cfg.preset})")
                    tracking.log_artifact(self.loss_plot)
        self.say(f"wrote {self.output} after {self.step} steps")

    def _log(self, window_loss: torch.Tensor, first: int, started: float, logs: dict, bar: tqdm) -> torch.Tensor:
        """Mean loss of the window's global batches (the one host sync of the window), img/s, MLflow."""
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(window_loss)
        steps = self.step - first
        loss = window_loss.item() / (steps * self.section.batch)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{self.stage}: loss is {loss} in steps {first + 1}..{self.step}")
        elapsed = time.perf_counter() - started
        if self.ctx.main:
            logs.update(loss=loss, img_per_s=steps * self.section.batch / max(elapsed, 1e-9),
                        lr=self.optimizer.param_groups[0]["lr"])
            if self.scaler.is_enabled():
                logs.update(loss_scale=self.scaler.get_scale(), fp16_skipped_steps=self.skipped)
            tracking.log_metrics(logs, step=self.step)
            self.history.append((self.step, loss))
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{logs['img_per_s']:.0f}")
        return torch.zeros((), device=self.device)

    def _stopped(self, signum: int) -> None:
        """After the resume checkpoint: requeue on SLURM's warning signal, else exit for a later re-run."""
        if signum in WARNING_SIGNALS and self.cfg.cluster.requeue:
            if self.ctx.main:
                why = distributed.requeue_slurm_job()
                self.say(f"time limit ahead at step {self.step}: saved {self.resume_path}; "
                         + ("requeued this SLURM job, which resumes from it" if why is None
                            else f"could not requeue ({why}); re-run to resume"))
        else:
            self.say(f"interrupted at step {self.step}: saved {self.resume_path}; re-run to resume")
        raise SystemExit(128 + signum)


def fitting_micro_batch(rows: int, fixed_bytes: float, bytes_per_row: float, free_bytes: float) -> int:
    """The largest divisor m of `rows` (one process's share of the batch, so that accumulation keeps the global
    batch) with fixed + m * per_row within MEMORY_MARGIN of the free memory; 0 when not even one row fits."""
    budget = MEMORY_MARGIN * free_bytes - fixed_bytes
    return max((m for m in range(1, rows + 1) if rows % m == 0 and m * bytes_per_row <= budget), default=0)


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
