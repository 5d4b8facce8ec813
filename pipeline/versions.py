"""Datasets, checkpoints and results, versioned with DVC and shared through a remote (params.yaml dvc.remote).

    python -m pipeline.versions push     # record the outputs in dvc.lock, send them to the remote (make push)
    python -m pipeline.versions pull     # fetch them into this clone; Snakemake and DVC both see nothing to do
    python -m pipeline.versions status   # what DVC and Snakemake would re-run

push first records what Snakemake built (`dvc commit`: each stage's deps, params and outs into dvc.lock, nothing
re-run), then `dvc push`. Commit dvc.lock with git; a fresh clone then runs `pull`: `dvc pull` restores every
output with its content hash checked, and `snakemake --touch --forceall` gives Snakemake the same view (DVC
writes files without their original mtimes, which Snakemake would read as stale; touching records its metadata,
so a later change of one param re-runs exactly its dependants under either tool).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import Config, add_arguments, from_args

REMOTE_NAME = "store"


def remote_url(cfg: Config) -> str:
    """dvc.remote as DVC takes it: URLs as they are, folders made absolute (relative to the repository root)."""
    remote = cfg.dvc.remote
    return remote if "://" in remote else str(Path(remote).expanduser().resolve())


def _dvc(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        sys.exit(f"error: dvc {' '.join(args)}: {lines[-1] if lines else 'failed'}")
    return result


def configure_remote(cfg: Config, must_exist: bool) -> str:
    """Point DVC's default remote at dvc.remote (in .dvc/config.local: the URL is this machine's business). A
    folder must exist to pull from it; to push, its parent must."""
    url = remote_url(cfg)
    if "://" not in url:
        folder = Path(url)
        if must_exist and not folder.is_dir():
            sys.exit(f"error: dvc.remote: {folder} does not exist: nothing was pushed there (run `make push` where "
                     "the pipeline ran, or set dvc.remote to the store)")
        if not folder.parent.is_dir():
            sys.exit(f"error: dvc.remote: {folder}: its parent folder does not exist")
        folder.mkdir(exist_ok=True)
    if not Path(".dvc").is_dir():
        _dvc("init", "-q", *([] if Path(".git").exists() else ["--no-scm"]))
    _dvc("remote", "add", "--local", "--default", "--force", REMOTE_NAME, url)
    return url


def locked_stages() -> dict[str, list[str]]:
    """{stage: its outputs} of every stage dvc.lock records (the ones built and pushed)."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: [out["path"] for out in stage.get("outs", [])] for name, stage in stages.items()}


def locked_outputs() -> list[str]:
    return [out for outs in locked_stages().values() for out in outs]


def push(cfg: Config) -> None:
    url = configure_remote(cfg, must_exist=False)
    if not Path("dvc.yaml").is_file():
        sys.exit("error: dvc.yaml: missing; run `make dvc.yaml` (python -m pipeline.stages --dvc)")
    built = [stage for stage, outs in _stage_outputs().items() if all(Path(o).exists() for o in outs)]
    if built:
        _dvc("commit", "--force", "--quiet", *built)  # what Snakemake built, recorded without re-running it
    _dvc("push", "--quiet")
    print(f"pushed the outputs of {len(locked_outputs())} files in dvc.lock to {url}; commit dvc.lock with git",
          file=sys.stderr)


def _stage_outputs() -> dict[str, list[str]]:
    stages = (yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {})
    return {name: [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", [])]
            for name, stage in stages.items()}


def pull(cfg: Config) -> None:
    url = configure_remote(cfg, must_exist=True)
    outputs = locked_outputs()
    if not outputs:
        sys.exit("error: dvc.lock: missing or empty; pull needs the dvc.lock that `make push` wrote, committed "
                 "with git")
    _dvc("pull", "--quiet", *locked_stages())
    # Snakemake's view: every output up to date, its params, code and inputs recorded as they are now.
    result = subprocess.run([sys.executable, "-m", "snakemake", *outputs, "--touch", "--forceall", "--rerun-incomplete",
                             "--cores", "1", "--quiet"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: snakemake --touch: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
    print(f"pulled {len(outputs)} files from {url}; dvc status and snakemake -n see nothing to do", file=sys.stderr)


def status() -> None:
    print(_dvc("status").stdout.strip())
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules"], capture_output=True, text=True)
    print((dry.stdout + dry.stderr).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("action", choices=("push", "pull", "status"))
    args = parser.parse_args()
    cfg = from_args(args)
    {"push": lambda: push(cfg), "pull": lambda: pull(cfg), "status": status}[args.action]()


if __name__ == "__main__":
    main()
