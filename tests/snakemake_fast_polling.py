"""`python -m snakemake` for the SLURM tests, asking sacct about running jobs every POLL_SECONDS throughout.

The SLURM plugin waits 10 s longer after each status check that finds no job finished (init, init + 10,
init + 20, ... up to 180 s), so a job of 40 s was seen at 72 s and most of a SLURM test's time went to waiting.
Users keep the plugin's back-off (it spares a busy slurmctld); the tests poll their private cluster steadily.
Everything else is the real Snakemake, plugin and cluster.
"""

from __future__ import annotations

import snakemake_executor_plugin_slurm as slurm
from snakemake.cli import main

POLL_SECONDS = 2
check_active_jobs = slurm.Executor.check_active_jobs


async def check_steadily(self, active_jobs):
    async for job in check_active_jobs(self, active_jobs):
        yield job
    self.next_seconds_between_status_checks = POLL_SECONDS


slurm.Executor.check_active_jobs = check_steadily

if __name__ == "__main__":
    main()
