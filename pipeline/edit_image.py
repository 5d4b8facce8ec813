"""Edit one image with a trained consistency model, zero-shot (paper Algorithm 4, Appendix D).

    python -m pipeline.edit_image INPUT OUTPUT --task TASK --checkpoint CKPT [options]

    --task inpainting        INPUT: 32x32 image. --mask: a PNG/JPEG of the same size (white = fill in,
                             black = keep) or one of center, left_half, random_pixels.
    --task colorization      INPUT: 32x32 image; its grey (0.2989 R + 0.5870 G + 0.1140 B) is kept.
    --task super_resolution  INPUT: the low-resolution image, (32/p)x(32/p); --factor p (default 2).
    --task stroke_guided     INPUT: 32x32 stroke painting; --times the SDEdit times (default 5.38 2.24).
    --task denoising         INPUT: 32x32 noisy image; --sigma its noise std in the model's [-1, 1] units
                             (default 0.2, i.e. 25.5 on [0, 255]).

OUTPUT receives the 32x32 result as a PNG. Inpainting, colorization and super-resolution run Algorithm 4
over the Karras grid of --steps levels (default 18, as params.yaml's edit.steps: 17 evaluations); --seed
fixes the noise. Interpolation is not an edit of an image (it interpolates latents): the `edit` stage
shows it. The model's resolution is 32x32 (CIFAR-10). Bad input (an unreadable file, a wrong size, a
mask of another size, an unknown task, a missing checkpoint) is reported in one line on stderr, exit code 2.

Examples:
    python -m pipeline.edit_image photo.png out.png --task inpainting --mask center --checkpoint CKPT
    python -m pipeline.edit_image small16.png out.png --task super_resolution --factor 2 --checkpoint CKPT

CKPT: a CD or CT checkpoint; `python -m pipeline.stages` prints where params.yaml's experiment keeps them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline import editing
from pipeline.data import atomic_write, to_model_range, to_uint8
from pipeline.models import IMG_RESOLUTION, checkpoint_meta, load_model
from pipeline.stages import CONSISTENCY

TASKS = ("inpainting", "colorization", "super_resolution", "stroke_guided", "denoising")


class BadInput(Exception):
    """A problem with the user's input; its message is the one line printed."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not usage text plus the error."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def read_image(path: str, what: str = "image") -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise BadInput(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"{what} {path}: cannot read it as an image ({type(e).__name__})") from None


def read_rgb(path: str, size: int, why: str) -> torch.Tensor:
    """A (1, 3, size, size) image in [-1, 1]; BadInput if the file is not a size x size image."""
    image = read_image(path)
    if image.size != (size, size):
        raise BadInput(f"image {path} is {image.size[0]}x{image.size[1]}; {why} takes {size}x{size} images")
    return to_model_range(np.array(image.convert("RGB"))[None])


def read_mask(spec: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """Omega (1, 1, size, size), 1 = fill in: a named mask, or an image file (white = fill in, black = keep)."""
    if spec in editing.MASKS:
        return editing.inpainting_mask(spec, 1, size, generator)
    image = read_image(spec, "mask")
    if image.size != (size, size):
        raise BadInput(f"mask {spec} is {image.size[0]}x{image.size[1]} but the image is {size}x{size}")
    return torch.from_numpy(np.array(image.convert("L")) >= 128).float()[None, None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m pipeline.edit_image", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the image to edit (PNG, JPEG, ...)")
    parser.add_argument("output", help="where to write the edited image (PNG)")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--checkpoint", required=True, help="a CD or CT checkpoint (python -m pipeline.stages)")
    parser.add_argument("--mask", help="inpainting: mask image (white = fill in) or " + ", ".join(editing.MASKS))
    parser.add_argument("--factor", type=int, help="super-resolution factor p, a divisor of 32 (default 2)")
    parser.add_argument("--steps", type=int, default=18, help="Karras grid size of Algorithm 4 (steps - 1 NFE)")
    parser.add_argument("--times", type=float, nargs="+", default=list(editing.SDEDIT_TIMES),
                        help="stroke guidance: descending SDEdit times")
    parser.add_argument("--sigma", type=float, default=0.2, help="denoising: the noise std in [-1, 1] units")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    if args.mask is not None and args.task != "inpainting":
        raise BadInput(f"--mask applies to inpainting, not {args.task}")
    if args.task == "inpainting" and args.mask is None:
        raise BadInput(f"inpainting needs --mask (an image file or one of {', '.join(editing.MASKS)})")
    if args.factor is not None and args.task != "super_resolution":
        raise BadInput(f"--factor applies to super_resolution, not {args.task}")
    args.factor = 2 if args.factor is None else args.factor
    if args.factor < 2 or IMG_RESOLUTION % args.factor:
        raise BadInput(f"--factor {args.factor}: must be a divisor >= 2 of the resolution {IMG_RESOLUTION}")
    if args.steps < 2:
        raise BadInput(f"--steps {args.steps}: must be >= 2")
    if args.sigma <= 0:
        raise BadInput(f"--sigma {args.sigma}: must be > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {args.device}: no CUDA device is available")
    if min(args.times) <= 0 or any(b >= a for a, b in zip(args.times, args.times[1:])):
        raise BadInput(f"--times {args.times}: must be positive and strictly descending")


def load_consistency_model(path: str, device: str) -> tuple[torch.nn.Module, dict]:
    """The EMA consistency model of a CD or CT checkpoint and its `diffusion` section."""
    if not Path(path).is_file():
        raise BadInput(f"checkpoint {path}: no such file")
    try:
        meta = checkpoint_meta(path)
        f = load_model(path, device)
    except Exception as e:  # a file that is not a checkpoint of this project
        raise BadInput(f"checkpoint {path}: cannot load it ({type(e).__name__})") from None
    if meta.get("kind") not in CONSISTENCY:
        raise BadInput(f"checkpoint {path}: holds a {meta.get('kind')!r} model, not a consistency model "
                       f"({', '.join(CONSISTENCY)})")
    return f, meta["diffusion"]


def edit(args: argparse.Namespace) -> np.ndarray:
    """The edited image, uint8 (H, W, 3). Input problems raise BadInput before the model is loaded."""
    check_options(args)
    generator = torch.Generator().manual_seed(args.seed)
    if args.task == "super_resolution":
        image = read_rgb(args.input, IMG_RESOLUTION // args.factor,
                         f"super-resolution by {args.factor} to the model's {IMG_RESOLUTION}x{IMG_RESOLUTION}")
    else:
        image = read_rgb(args.input, IMG_RESOLUTION, f"{args.task} with the {IMG_RESOLUTION}x{IMG_RESOLUTION} model")
    size = image.shape[-1]
    mask = read_mask(args.mask, size, generator) if args.task == "inpainting" else None
    f, diffusion = load_consistency_model(args.checkpoint, args.device)
    times = editing.editing_times(args.steps, diffusion["sigma_min"], diffusion["sigma_max"], diffusion["rho"])
    options = {"generator": generator, "sigma_min": diffusion["sigma_min"]}
    x = image.to(args.device)
    if args.task == "inpainting":
        result = editing.inpaint(f, x, mask.to(x), times, **options)
    elif args.task == "colorization":
        result = editing.colorize(f, editing.grey(x), times, **options)
    elif args.task == "super_resolution":
        result = editing.super_resolve(f, x, args.factor, times, **options)
    elif args.task == "stroke_guided":
        result = editing.stroke_guided(f, x, args.times, **options)
    else:
        result = editing.denoise(f, x, args.sigma)
    return to_uint8(result.cpu())[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = edit(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with atomic_write(Path(args.output)) as tmp:
        Image.fromarray(result).save(tmp, format="PNG")
    print(f"wrote {args.output} ({args.task})", file=sys.stderr)


if __name__ == "__main__":
    main()
