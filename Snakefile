# The pipeline's DAG for Snakemake. The rules are built from pipeline/stages.py, the same definitions
# that generate dvc.yaml, and run the same CLIs a user runs. params.yaml is validated (and the LPIPS
# weights checked when a metric needs them) before any job starts. It imports no torch: every job step of a
# cluster run parses it again.
#
#   snakemake --cores 2                                  # local, the preset params.yaml selects
#   snakemake --cores 2 --config preset=proof            # another preset (here: Does it work? see README)
#   snakemake --cores 2 --config experiment=tiny_l1      # a named experiment of params.yaml
#   snakemake --cores 2 --config preset=tiny set='["cd.N=9"]' name=tiny_N9   # a variant named on the command line
#   snakemake --cores 2 results/tables/compare.csv       # the experiments of params.yaml's compare:, side by side
#   snakemake --cores 2 results/tables/table3.csv        # CD, CT, iCT, ECT of params.yaml's table3: experiments
#                                                        # (--config table3='["micro", ...]' names others)
#   snakemake --profile slurm results/tables/table1.csv  # on a SLURM cluster (see slurm/config.yaml)
import os
import shutil
import subprocess
import sys

from snakemake.exceptions import WorkflowError

from pipeline import tracking
from pipeline.config import (ConfigError, LpipsWeightsMissing, check_data_source, check_lpips_weights, compare_names,
                             experiment, selected)
from pipeline.stages import (check_writable, compare_stage, misfit, old_layout, publish_stage, read_partitions,
                             slurm_resources, stages, table3_stage, targets)

# The experiment: params.yaml's, or --config experiment=NAME | preset=NAME [set='["key=value", ...]' name=NAME]. Its stages
# and those of the experiments in params.yaml's compare: are rules; stages two experiments agree on (same outputs:
# the same params and inputs) are one rule, run once.
# Table 3's experiments (params.yaml's table3:, or --config table3=[...]) are rules too; their inputs (an EDM pickle,
# ImageNet) are checked in onstart, and only when this call runs one of their jobs.
try:
    options = {k: v for k, v in config.items() if k != "table3"}
    TABLE3 = config.get("table3") or compare_names("params.yaml", "table3")
    TABLE3 = [TABLE3] if isinstance(TABLE3, str) else [str(n) for n in TABLE3]
    SELECTED = selected("params.yaml", options)
    EXPERIMENTS = {SELECTED.name: SELECTED} | {n: experiment("params.yaml", n) for n in compare_names("params.yaml")}
    CHECKED = set(EXPERIMENTS)  # checked now; table3's others when they run
    EXPERIMENTS |= {n: experiment("params.yaml", n) for n in TABLE3 if n not in EXPERIMENTS}
    CFGS = {}
    for name, chosen in EXPERIMENTS.items():
        try:
            CFGS[name] = cfg = chosen.load("params.yaml")
        except ConfigError as e:
            raise ConfigError(f"experiment {name}: {e}") from None
        if name in CHECKED:
            check_data_source(cfg)
            check_writable(cfg)
            check_lpips_weights(cfg)
except (ConfigError, LpipsWeightsMissing) as e:
    raise WorkflowError(str(e)) from None
CFG = CFGS[SELECTED.name]
for line in old_layout(CFG):
    print(f"warning: {line}", file=sys.stderr)

SERVER = []  # the MLflow server of run.tracking_server, stopped when the workflow ends
RULES = {}  # first output -> (rule name, stage, experiment)
for name, cfg in CFGS.items():
    own = stages(cfg) + ([publish_stage(cfg)] if name == SELECTED.name else [])
    for stage in own:
        if stage.outs[0] in RULES:
            continue  # the same stage of an experiment seen before: one rule
        suffix = "" if name == SELECTED.name else "__" + "".join(c if c.isalnum() else "_" for c in name)
        RULES[stage.outs[0]] = (stage.name + suffix, stage, EXPERIMENTS[name], cfg)
COMPARE = compare_stage({n: CFGS[n] for n in compare_names("params.yaml")})
RULES[COMPARE.outs[0]] = ("compare", COMPARE, SELECTED, CFG)
TABLE3_STAGE = table3_stage({n: CFGS[n] for n in TABLE3})
RULES[TABLE3_STAGE.outs[0]] = ("table3", TABLE3_STAGE, SELECTED, CFG)


rule all:
    input:
        targets(CFG),


for rule_name, stage, chosen, cfg in RULES.values():
    request = cfg.resources[stage.resources]
    slurm = slurm_resources(cfg, stage)  # nodes, tasks, GPUs, warning signal (see pipeline/stages.py)

    rule:
        name:
            rule_name
        input:
            stage.deps,
        output:
            stage.outs,
        params:
            values=stage.param_values(cfg) if stage.params else stage.key,  # a change of a tracked knob re-runs it
            cmd=stage.cmd,  # bound now: `shell:` runs after the loop
        threads: request.cpus
        conda:
            "envs/pipeline.yaml"  # used with --software-deployment-method conda (cluster nodes without our venv)
        resources:
            # The experiment's --preset/--set: a string resource, not a param, because Snakemake re-runs a rule whose
            # params change, and a stage two experiments share must not re-run when the other one asks for it.
            experiment=chosen.cli_args() or " ",
            **slurm,
        shell:
            "{params.cmd}{resources.experiment}"


onstart:
    # Training on several nodes starts with srun: it needs the SLURM executor, or a SLURM allocation around us.
    executor = workflow.executor_plugin.name if workflow.executor_plugin else "local"
    planned = {job.rule.name for job in workflow.dag.needrun_jobs()}  # what this call runs, of every experiment
    jobs = [(stage, chosen.name, cfg) for rule_name, stage, chosen, cfg in RULES.values() if rule_name in planned]
    for name in {owner for _, owner, _ in jobs} - CHECKED:  # table3's experiments, when this call runs their jobs
        try:
            check_data_source(CFGS[name])
            check_writable(CFGS[name])
            check_lpips_weights(CFGS[name])
        except (ConfigError, LpipsWeightsMissing) as e:
            raise WorkflowError(f"experiment {name}: {e}") from None
    if executor != "slurm" and not os.environ.get("SLURM_JOB_ID"):
        for stage, _, cfg in jobs:
            request = cfg.resources[stage.resources]
            if stage.training and request.launcher == "srun":
                raise WorkflowError(f"resources.{stage.resources}: {request.nodes} node(s) x {request.per_node} "
                                    f"processes start with srun: run with --profile slurm (or inside salloc), not "
                                    f"the {executor} executor")
    if executor == "slurm" and shutil.which("sinfo"):
        # A job no node can run pends forever (PartitionConfig): name it before anything is submitted. The partition
        # is SBATCH_PARTITION's (the profile's way to choose one), else the cluster's default.
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%D"], capture_output=True, text=True).stdout
        partition = read_partitions(sinfo).get(os.environ.get("SBATCH_PARTITION", ""))
        for name, cfg in CFGS.items():
            names = {stage.name for stage, owner, _ in jobs if owner == name}
            if partition is not None and names and (problem := misfit(cfg, partition, names)):
                raise WorkflowError(problem)
    serve = CFG.run.tracking == "mlflow" and CFG.run.tracking_server and not os.environ.get("MLFLOW_TRACKING_URI")
    tracking.parent_run(CFG)  # the store, the experiment and its parent run, once, before parallel jobs race to
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
