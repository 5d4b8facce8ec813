# The pipeline's DAG for Snakemake. The rules are built from pipeline/stages.py, the same definitions
# that generate dvc.yaml, and run the same CLIs a user runs. params.yaml is validated (and the LPIPS
# weights checked when a metric needs them) before any job starts. It imports no torch: every job step of a
# cluster run parses it again.
#
#   snakemake --cores 2                                  # local, the preset params.yaml selects
#   snakemake --cores 2 --config preset=proof            # another preset (here: Does it work? see README)
#   snakemake --profile slurm results/tables/table1.csv  # on a SLURM cluster (see slurm/config.yaml)
import os
import shutil
import subprocess
import sys

from snakemake.exceptions import WorkflowError

from pipeline import tracking
from pipeline.config import ConfigError, LpipsWeightsMissing, check_data_source, check_lpips_weights, load
from pipeline.stages import check_writable, misfit, read_partitions, slurm_resources, stages, targets

# `snakemake --config preset=proof` runs another preset than params.yaml's (every stage command gets --preset).
PRESET = config.get("preset")
if set(config) - {"preset"}:
    raise WorkflowError(f"--config: only preset=<name> is read (got {', '.join(sorted(config))}); every other knob "
                        "lives in params.yaml")
try:
    CFG = load("params.yaml", preset=PRESET)
    check_data_source(CFG)
    check_writable(CFG)
    check_lpips_weights(CFG)
except (ConfigError, LpipsWeightsMissing) as e:
    raise WorkflowError(str(e)) from None

SERVER = []  # the MLflow server of run.tracking_server, stopped when the workflow ends

rule all:
    input:
        targets(CFG),


for stage in stages(CFG):
    request = CFG.resources[stage.resources]
    slurm = slurm_resources(CFG, stage)  # nodes, tasks, GPUs, warning signal (see pipeline/stages.py)

    rule:
        name:
            stage.name
        input:
            stage.deps,
        output:
            stage.outs,
        params:
            values=stage.param_values(CFG),  # a change of any tracked knob re-runs the rule
            cmd=stage.cmd + (f" --preset {PRESET}" if PRESET else ""),  # bound now: `shell:` runs after the loop
        threads: request.cpus
        conda:
            "envs/pipeline.yaml"  # used with --software-deployment-method conda (cluster nodes without our venv)
        resources:
            **slurm,
        shell:
            "{params.cmd}"


onstart:
    # Training on several nodes starts with srun: it needs the SLURM executor, or a SLURM allocation around us.
    executor = workflow.executor_plugin.name if workflow.executor_plugin else "local"
    if executor != "slurm" and not os.environ.get("SLURM_JOB_ID"):
        for stage in stages(CFG):
            request = CFG.resources[stage.resources]
            if stage.training and request.launcher == "srun":
                raise WorkflowError(f"resources.{stage.resources}: {request.nodes} node(s) x {request.per_node} "
                                    f"processes start with srun: run with --profile slurm (or inside salloc), not "
                                    f"the {executor} executor")
    if executor == "slurm" and shutil.which("sinfo"):
        # A job no node can run pends forever (PartitionConfig): name it before anything is submitted. The partition
        # is SBATCH_PARTITION's (the profile's way to choose one), else the cluster's default.
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%D"], capture_output=True, text=True).stdout
        partition = read_partitions(sinfo).get(os.environ.get("SBATCH_PARTITION", ""))
        if partition is not None and (problem := misfit(CFG, partition)):
            raise WorkflowError(problem)
    serve = CFG.run.tracking_server and not os.environ.get("MLFLOW_TRACKING_URI")  # a user's server wins
    tracking.setup(CFG)  # create the MLflow store once, before parallel jobs race to do it
    if serve:
        # Jobs inherit the environment: they log through the server, which alone writes the SQLite file.
        server, url = tracking.start_server(CFG.run.tracking_uri)
        os.environ["MLFLOW_TRACKING_URI"] = url
        SERVER.append(server)
        print(f"MLflow: jobs log through {url} (run.tracking_server)", file=sys.stderr)


onsuccess:
    for server in SERVER:
        tracking.stop_server(server)


onerror:
    for server in SERVER:
        tracking.stop_server(server)
