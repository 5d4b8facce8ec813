# The pipeline's DAG for Snakemake. The rules are built from pipeline/stages.py, the same definitions
# that generate dvc.yaml, and run the same CLIs a user runs. params.yaml is validated (and the LPIPS
# weights checked when a metric needs them) before any job starts.
#
#   snakemake --cores 2                                  # local, the preset params.yaml selects
#   snakemake --profile slurm results/tables/table1.csv  # on a SLURM cluster (see slurm/config.yaml)
from snakemake.exceptions import WorkflowError

from pipeline import tracking
from pipeline.config import ConfigError, check_data_source, load
from pipeline.lpips import LpipsWeightsMissing, preflight
from pipeline.stages import stages, targets

try:
    CFG = load("params.yaml")
    check_data_source(CFG)
    preflight(CFG)
except (ConfigError, LpipsWeightsMissing) as e:
    raise WorkflowError(str(e)) from None


rule all:
    input:
        targets(CFG),


for stage in stages(CFG):
    request = CFG.resources[stage.resources]

    rule:
        name:
            stage.name
        input:
            stage.deps,
        output:
            stage.outs,
        params:
            values=stage.param_values(CFG),  # a change of any tracked knob re-runs the rule
            cmd=stage.cmd,  # bound now: `shell:` is evaluated when the job runs, after the loop ended
        threads: request.cpus
        resources:
            mem_mb=request.mem_mb,
            runtime=request.runtime,
            cpus_per_task=request.cpus,
            **({"gpu": request.gpu} if request.gpu else {}),
        shell:
            "{params.cmd}"


onstart:
    tracking.setup(CFG)  # create the MLflow store once, before parallel jobs race to do it
