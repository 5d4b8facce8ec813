"""Process groups for data-parallel training: one process per GPU (or a few on a CPU), wherever they come from.

Launchers: none (one process), torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR set by it), or srun with one
task per GPU (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the address is the allocation's first node).
NCCL on CUDA, gloo on CPU; a gloo group carries the small control messages (stop flags, checksums) so that
they never wait on the GPU.
"""

from __future__ import annotations

import atexit
import datetime
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: Any = None  # the gloo process group (None with one process)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else srun's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        os.environ.setdefault("MASTER_ADDR", _first_node(os.environ["SLURM_STEP_NODELIST"]))
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
        return rank, world, int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def _first_node(nodelist: str) -> str:
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """run.device ('auto', 'cpu' or 'cuda') for the process of this local rank (its own GPU on a node)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: run.device is 'cuda' but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def init(device_name: str = "auto", timeout_minutes: float = 30.0, interface: str | None = None) -> Context:
    """Join the process group the launcher describes (nothing to join for one process). A collective that waits
    longer than timeout_minutes raises instead of hanging the allocation; `interface` names the network interface
    of gloo and NCCL (else gloo picks the one of the hostname's address, often not the fast one between nodes)."""
    rank, world, local_rank = _launch_env()
    where = device(device_name, local_rank)
    cuda = where.type == "cuda"
    if world == 1:
        return Context(0, 1, 0, where)
    if interface:
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, interface)  # the job's own setting wins
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    atexit.register(dist.destroy_process_group)
    control = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    return Context(rank, world, local_rank, where, control)


def max_over_ranks(ctx: Context, value: int) -> int:
    """The largest of the ranks' values, on every rank (e.g. a signal that reached one process first)."""
    if ctx.world_size == 1:
        return value
    out = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=ctx.control)
    return int(out.item())


def gather(ctx: Context, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), on every rank, in rank order."""
    if ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.control)
    return out


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier(group=ctx.control)


def slurm_end_time() -> float | None:
    """When SLURM ends this job (seconds since the epoch), or None outside SLURM or without a time limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30)
        return time.mktime(time.strptime(out.stdout.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def requeue_slurm_job() -> str | None:
    """Ask SLURM to requeue this job (it restarts from its batch script, which resumes training); None when
    that worked, else why not."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a SLURM job"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr.strip() or f"scontrol exited {result.returncode}")
