"""Start a training stage on the processes its resources ask for.

    python -m pipeline.launch distill_cd pipeline.distill_cd [--config F] [--preset P] [--set KEY=VALUE ...]

The first argument names the entry of params.yaml's `resources`, the second the stage's module; the rest go to
the stage. One process: the module itself. P processes on one node: `torchrun --standalone
--nproc_per_node=P -m MODULE`. Several nodes (or launch: srun): `srun` with one task per process, each task
reading its rank from SLURM's variables, inside the job's allocation. The Snakefile and dvc.yaml run this
command, which does not name the GPU count: changing it never re-runs a stage (nor changes its result).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from pipeline.config import Resources, add_arguments, from_args


def command(r: Resources, module: str, args: list[str], python: str = sys.executable) -> list[str]:
    """The argv that starts `module` on the processes of `r`."""
    if r.launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={r.per_node}",
                "-m", module, *args]
    if r.launcher == "srun":
        gres = [f"--gres=gpu:{r.gpu}"] if r.gpu else []
        return ["srun", f"--nodes={r.nodes}", f"--ntasks-per-node={r.per_node}",
                f"--cpus-per-task={max(r.cpus // r.per_node, 1)}", *gres, "--kill-on-bad-exit=1",
                python, "-m", module, *args]
    return [python, "-m", module, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("resources", help="the entry of params.yaml's resources: train_teacher, distill_cd, train_ct")
    parser.add_argument("module", help="the stage to start, e.g. pipeline.distill_cd")
    args, rest = parser.parse_known_args()
    stage_args = argparse.ArgumentParser(add_help=False)
    add_arguments(stage_args)
    known, _ = stage_args.parse_known_args(rest)
    cfg = from_args(known)
    if args.resources not in cfg.resources:
        sys.exit(f"error: resources.{args.resources}: not in params.yaml ({', '.join(cfg.resources)})")
    r = cfg.resources[args.resources]
    if r.launcher == "srun" and not (os.environ.get("SLURM_JOB_ID") and shutil.which("srun")):
        sys.exit(f"error: resources.{args.resources}: {r.nodes} node(s) x {r.per_node} processes start with srun, "
                 "inside a SLURM allocation: run `snakemake --profile slurm`, or this command under sbatch/salloc")
    argv = command(r, args.module, rest)
    if r.world_size > 1:  # each process its share of the CPUs (torchrun would otherwise set 1)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(r.cpus // r.per_node, 1)))
    print(f"launch ({r.world_size} process{'es' if r.world_size > 1 else ''}): {shlex.join(argv)}",
          file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
