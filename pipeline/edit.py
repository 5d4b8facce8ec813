"""Stage edit: zero-shot editing (paper Algorithm 4, Appendix D) of held-out test images.

    python -m pipeline.edit [--config params.yaml] [--set edit.model=ct]

The consistency model named by `edit.model` (checkpoints/<dataset>/<model>.pt) edits edit.num_images
held-out images, drawn at random (seed edit.seed) from the test split of data/<dataset>, in the six ways of
pipeline.editing (a class-conditional model is given each test image's label; interpolation, random ones):

    inpainting        the edit.inpaint_mask region removed, then filled in (17 NFE by default)
    colorization      from the grey image
    super_resolution  from the edit.sr_factor times smaller image (patch means)
    stroke_guided     from a stroke painting simulated from the test image (4 x 4 block colours, 4 levels
                      per channel), SDEdit with the times edit.sdedit_times
    denoising         from the image plus Gaussian noise of std edit.denoise_sigma, one evaluation
    interpolation     slerp between pairs of latents, one evaluation per frame

Writes results/figures/<dataset>/editing_<task>.png (rows: input, result, ground truth; for interpolation
one row per pair of latents) and results/metrics/<dataset>/editing_<model>.json: per task the mean PSNR and
SSIM of the results against the ground truth (and of the inputs, as a baseline); for inpainting also the FID
of the completed images against data/<dataset>/fid_ref.npz (evaluate.inception / mode / batch). Interpolation has
no ground truth. All numbers and figures are logged to the MLflow run edit_<model>.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline import editing, tracking
from pipeline.cm import ConsistencyFn
from pipeline.config import Config, stage_cli
from pipeline.data import atomic_write, load_split, to_model_range, to_uint8, write_json
from pipeline.evaluate import load_inception
from pipeline.metrics import feature_statistics, frechet_distance, load_reference_stats
from pipeline.models import Preconditioned, checkpoint_meta, load_model
from pipeline.stages import checkpoint, data_dir, edit_figure, edit_outputs, ref_stats
from pipeline.training import setup_torch

TASKS = ("inpainting", "colorization", "super_resolution", "stroke_guided", "denoising", "interpolation")
FIGURE_COLUMNS = 8
STROKE_BLOCK, STROKE_LEVELS = 4, 4


def figure_path(cfg: Config, task: str) -> Path:
    return Path(edit_figure(cfg, task))


def metrics_path(cfg: Config, model: str) -> Path:
    return Path(edit_outputs(cfg, model)[-1])


def stroke_painting(x: torch.Tensor, block: int = STROKE_BLOCK, levels: int = STROKE_LEVELS) -> torch.Tensor:
    """A stand-in for a user's strokes: block-mean colours quantised to `levels` values per channel."""
    coarse = editing.patch_means(x, block)
    coarse = ((coarse + 1) / 2 * (levels - 1)).round() / (levels - 1) * 2 - 1
    return editing.upsample(coarse, block)


def in_batches(fn: Callable[..., torch.Tensor], batch: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over consecutive slices of `batch` rows of every tensor, concatenated."""
    return torch.cat([fn(*(t[i:i + batch] for t in tensors)) for i in range(0, len(tensors[0]), batch)])


def conditioned(model: ConsistencyFn, labels: torch.Tensor | None) -> ConsistencyFn:
    """f(x, sigma) of a model, given the labels of the batch when it is class-conditional."""
    return model if labels is None else (lambda x, sigma: model(x, sigma, labels))


def run_tasks(model: ConsistencyFn, truth: torch.Tensor, cfg: Config,
              labels: torch.Tensor | None = None) -> dict[str, dict]:
    """{task: {'input', 'result', 'truth' (images NCHW in [-1, 1] or None), 'settings'}}; labels: the classes
    of the truth images for a class-conditional model (None: unconditional)."""
    e, d = cfg.edit, cfg.diffusion
    device = truth.device
    times = editing.editing_times(e.steps, d.sigma_min, d.sigma_max, d.rho)
    n, p, resolution = len(truth), e.sr_factor, truth.shape[-1]
    generator = torch.Generator().manual_seed(e.seed)  # noise drawn on the CPU: the same on every device
    options = {"generator": generator, "sigma_min": d.sigma_min}
    # Every batch carries its labels (a dummy column when unconditional), so `f` sees the right classes.
    c = labels if labels is not None else torch.zeros(n, device=device)

    def f(batch_labels: torch.Tensor) -> ConsistencyFn:
        return conditioned(model, batch_labels if labels is not None else None)

    out = {}
    mask = editing.inpainting_mask(e.inpaint_mask, n, resolution, generator).to(device)
    damaged = truth * (1 - mask)  # the unknown pixels read as mid-grey
    result = in_batches(lambda y, m, k: editing.inpaint(f(k), y, m, times, **options), e.batch, damaged, mask, c)
    out["inpainting"] = {"input": damaged, "result": result, "truth": truth,
                         "settings": {"mask": e.inpaint_mask, "nfe": len(times)}}

    grey = editing.grey(truth)
    result = in_batches(lambda g, k: editing.colorize(f(k), g, times, **options), e.batch, grey, c)
    out["colorization"] = {"input": grey.expand(-1, 3, -1, -1), "result": result, "truth": truth,
                           "settings": {"nfe": len(times)}}

    low_res = editing.patch_means(truth, p)
    result = in_batches(lambda y, k: editing.super_resolve(f(k), y, p, times, **options), e.batch, low_res, c)
    out["super_resolution"] = {"input": editing.upsample(low_res, p), "result": result, "truth": truth,
                               "settings": {"factor": p, "nfe": len(times)}}

    strokes = stroke_painting(truth)
    result = in_batches(lambda s, k: editing.stroke_guided(f(k), s, e.sdedit_times, **options), e.batch, strokes, c)
    out["stroke_guided"] = {"input": strokes, "result": result, "truth": truth,
                            "settings": {"times": e.sdedit_times, "nfe": len(e.sdedit_times),
                                         "strokes": f"{STROKE_BLOCK}x{STROKE_BLOCK} blocks, {STROKE_LEVELS} levels"}}

    noise = torch.randn(truth.shape, generator=generator).to(device)
    noisy = truth + e.denoise_sigma * noise  # x_sigma = x + sigma z
    result = in_batches(lambda x, k: editing.denoise(f(k), x, e.denoise_sigma), e.batch, noisy, c)
    out["denoising"] = {"input": noisy, "result": result, "truth": truth,
                        "settings": {"sigma": e.denoise_sigma, "nfe": 1}}

    shape = (e.interp_pairs, *truth.shape[1:])
    z1, z2 = (torch.randn(shape, generator=generator).to(device) for _ in range(2))
    alphas = np.linspace(0, 1, e.interp_frames).tolist()
    pair_labels = None if labels is None else labels[: e.interp_pairs]
    frames = editing.interpolate(conditioned(model, pair_labels), z1, z2, alphas, d.sigma_max)
    out["interpolation"] = {"input": None, "result": frames, "truth": None,
                            "settings": {"pairs": e.interp_pairs, "alphas": alphas, "nfe": 1}}
    return out


def quality(images: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Mean PSNR (None if infinite: identical images) and SSIM over the images."""
    psnr = float(np.mean(editing.psnr(images, truth)))
    return {"psnr": psnr if math.isfinite(psnr) else None, "ssim": float(np.mean(editing.ssim(images, truth)))}


def inpainting_fid(images: np.ndarray, cfg: Config, device: torch.device) -> dict:
    """FID of the completed images against the training-set statistics of reference_stats."""
    e = cfg.evaluate
    reference = load_reference_stats(ref_stats(cfg))
    if reference["mode"] != e.mode:
        sys.exit(f"error: {ref_stats(cfg)} was computed in mode {reference['mode']!r}, evaluate.mode is {e.mode!r}")
    inception = load_inception(cfg, device)
    mu, sigma = feature_statistics(inception(images).pool)
    fid = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    return {"fid": fid, "fid_images": len(images), "inception": inception.source, "mode": e.mode}


def _strip(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> one row of images separated by 2 white pixels."""
    gap = np.full((images.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([part for image in images for part in (image, gap)][:-1], axis=1)


def save_rows(rows: list[tuple[str, np.ndarray]], path: Path, title: str, xlabels: list[str] | None = None) -> None:
    """A figure of labelled rows of images (uint8 NHWC each), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.0 + 0.9 * columns, 0.4 + 1.0 * len(rows)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        ax.imshow(_strip(images), interpolation="nearest")
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
    if xlabels:
        size = rows[0][1].shape[2]
        axes[-1, 0].set_xticks([(size + 2) * i + size / 2 for i in range(columns)], xlabels)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def figure_rows(task: str, outcome: dict, columns: int) -> tuple[list[tuple[str, np.ndarray]], list[str] | None]:
    """The labelled rows of one task's figure (and column labels for interpolation)."""
    if task == "interpolation":
        frames = outcome["result"]
        rows = [(f"pair {i + 1}", to_uint8(frames[i].cpu())) for i in range(len(frames))]
        return rows, [f"{alpha:.2f}" for alpha in outcome["settings"]["alphas"]]
    input_label = {"inpainting": "masked input", "colorization": "grey input",
                   "super_resolution": "low-res input", "stroke_guided": "strokes (input)",
                   "denoising": "noisy input"}[task]
    truth_label = "source image" if task == "stroke_guided" else "ground truth"
    rows = [(input_label, outcome["input"]), ("result", outcome["result"]), (truth_label, outcome["truth"])]
    return [(label, to_uint8(x[:columns].cpu())) for label, x in rows], None


TITLES = {
    "inpainting": "Inpainting (A = I)", "colorization": "Colorization (grey channel known)",
    "super_resolution": "Super-resolution x{factor} (patch means known)",
    "stroke_guided": "Stroke-guided generation (SDEdit, t = {times})", "denoising": "Denoising (sigma = {sigma})",
    "interpolation": "Interpolation: slerp of latents, alpha from 0 to 1",
}


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    device = setup_torch(cfg)
    model = cfg.edit.model
    f: Preconditioned = load_model(checkpoint(cfg, model), device, cfg=cfg)
    images, labels = load_split(data_dir(cfg), "test")
    chosen = np.random.default_rng(cfg.edit.seed).permutation(len(images))[: cfg.edit.num_images]
    truth_uint8 = np.asarray(images[chosen])
    resolution = cfg.data.spec.resolution
    if len(truth_uint8) < 2 or truth_uint8.shape[1:3] != (resolution, resolution):
        sys.exit(f"error: {data_dir(cfg)}/test_images.npy: need >= 2 images of {resolution}x{resolution}, "
                 f"got {truth_uint8.shape}")
    truth_labels = torch.as_tensor(labels[chosen], device=device) if f.label_dim else None
    with tracking.stage_run(f"edit_{model}", cfg, tags={"model": model}) as run:
        outcomes = run_tasks(f, to_model_range(truth_uint8).to(device), cfg, truth_labels)
        report = {"model": model, "dataset": cfg.data.dataset, "preset": cfg.preset,
                  "checkpoint_step": checkpoint_meta(checkpoint(cfg, model))["step"],
                  "num_images": len(truth_uint8), "figure_test_indices": chosen.tolist()[:FIGURE_COLUMNS],
                  "mlflow_run_id": run.info.run_id, "tasks": {}}
        for task in TASKS:
            outcome = outcomes[task]
            entry = dict(outcome["settings"])
            if outcome["truth"] is None:
                entry.update(psnr=None, ssim=None, note="no ground truth: new images from latents")
            else:
                result = to_uint8(outcome["result"].cpu(), cfg.sample.uint8)
                entry.update(quality(result, truth_uint8))
                baseline = quality(to_uint8(outcome["input"].cpu(), cfg.sample.uint8), truth_uint8)
                entry.update(psnr_input=baseline["psnr"], ssim_input=baseline["ssim"])
                if task == "inpainting":
                    entry.update(inpainting_fid(result, cfg, device))
            report["tasks"][task] = entry
            tracking.log_metrics({f"{task}_{k}": v for k, v in entry.items()
                                  if k in ("psnr", "ssim", "psnr_input", "ssim_input", "fid") and v is not None})
            rows, xlabels = figure_rows(task, outcome, FIGURE_COLUMNS)
            title = f"{TITLES[task].format(**outcome['settings'])}, {model.upper()}"
            save_rows(rows, figure_path(cfg, task), title, xlabels)
            tracking.log_artifact(figure_path(cfg, task))
            summary = ", ".join(f"{k} {entry[k]:.3f}" for k in ("psnr", "ssim", "fid") if entry.get(k) is not None)
            print(f"edit {model} {task}: {summary or 'see figure'}", file=sys.stderr)
        write_json(metrics_path(cfg, model), report)
        tracking.log_artifact(metrics_path(cfg, model))


if __name__ == "__main__":
    main()
