"""The DAG, defined once. The Snakefile builds its rules from `stages()`; dvc.yaml is generated from it.

    python -m pipeline.stages            # print the stages
    python -m pipeline.stages --dvc      # (re)write dvc.yaml for the preset that params.yaml selects
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import TRAIN_STAGE, Config, ConfigError, add_arguments, from_args, unwritable
from pipeline.datasets import split_files

MODELS = ("teacher", "cd", "ct")
CORE = ["pipeline/config.py", "pipeline/cm.py", "pipeline/networks.py", "pipeline/models.py"]
TRAIN_CODE = CORE + ["pipeline/training.py", "pipeline/tracking.py", "pipeline/data.py", "pipeline/noise.py",
                     "pipeline/distributed.py", "pipeline/launch.py"]
# The run knobs that change a training result (compile, channels_last, data_placement and resources only move work).
TRAIN_PARAMS = ["run.seed", "run.mixed_precision", "run.dtype", "run.tf32", "data", "diffusion", "network"]
EVAL_CODE = ["pipeline/metrics.py", "pipeline/evaluate.py"]
TABLES = ["results/tables/table1.csv", "results/tables/table1.md", "results/tables/table2.csv",
          "results/tables/table2.md"]
EDIT_TASKS = ("inpainting", "colorization", "super_resolution", "stroke_guided", "denoising", "interpolation")


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: list[str]  # files: inputs and the code that makes the outputs
    outs: list[str]
    params: list[str]  # dotted keys of params.yaml whose values the outputs depend on
    resources: str  # key of params.yaml's `resources` section
    training: bool = False  # data-parallel: launched by pipeline.launch on the processes `resources` asks for

    def param_values(self, cfg: Config) -> str:
        """The resolved values of this stage's params, as stable JSON (Snakemake reruns when it changes)."""
        return json.dumps({key: cfg.section(key) for key in self.params}, sort_keys=True)


# Every path carries the dataset, so runs of several presets can share a workspace.
def data_dir(cfg: Config) -> str:
    return f"data/{cfg.data.dataset}"


def split_paths(cfg: Config, split: str) -> list[str]:
    return [str(p) for p in split_files(data_dir(cfg), split)]


def ref_stats(cfg: Config) -> str:
    """Inception mu, sigma of the training set (FID), cached per dataset (and so per resolution)."""
    return f"{data_dir(cfg)}/fid_ref.npz"


def ref_features(cfg: Config) -> str:
    """Pool features of a subset of the training set (KID, precision/recall)."""
    return f"{data_dir(cfg)}/ref_features.npy"


def checkpoint(cfg: Config, model: str) -> str:
    return f"checkpoints/{cfg.data.dataset}/{model}.pt"


def figure(cfg: Config, name: str) -> str:
    return f"results/figures/{cfg.data.dataset}/{name}.png"


def loss_figure(cfg: Config, model: str) -> str:
    return figure(cfg, f"loss_{model}")


def samples(cfg: Config, model: str) -> str:
    return f"samples/{cfg.data.dataset}/{model}.npz"


def metrics(cfg: Config, model: str) -> str:
    return f"results/metrics/{cfg.data.dataset}/{model}.json"


def two_step(cfg: Config, model: str) -> str:
    """The searched 2-step intermediate time of a consistency model."""
    return f"results/metrics/{cfg.data.dataset}/two_step_{model}.json"


def ablation_result(cfg: Config, run: str) -> str:
    return f"results/ablations/{cfg.data.dataset}/{run}.json"


def ablation_checkpoint(cfg: Config, run: str) -> str:
    return f"checkpoints/{cfg.data.dataset}/ablations/{run}.pt"


def figure3(cfg: Config) -> list[str]:
    return [figure(cfg, f"figure3_{panel}") for panel in cfg.ablation.panels]


def edit_outputs(cfg: Config, model: str) -> list[str]:
    return [figure(cfg, f"editing_{task}") for task in EDIT_TASKS] + [metrics(cfg, f"editing_{model}")]


def searched(cfg: Config, model: str) -> bool:
    """Does some sampling schedule of this model use the searched 2-step time?"""
    return model != "teacher" and any("search" in s for s in getattr(cfg.sample, f"{model}_schedules"))


def launched(resources: str, module: str) -> str:
    """A training stage's command: pipeline.launch starts `module` as one process, under torchrun or srun, as
    resources.<key> says. The command does not name the GPU count, so changing it re-runs nothing."""
    return f"python -m pipeline.launch {resources} {module}"


def training_io(cfg: Config, kind: str, stage: str | None = None, output: str | None = None) -> dict:
    """What the training loop takes from the DAG, as plain keyword arguments of pipeline.training.Training:
    the stage's name, checkpoint, data folder, params fingerprint, loss figure and micro-batch."""
    name = stage or TRAIN_STAGE[kind]
    definition = next(s for s in stages(cfg) if s.name == name)
    own = output is None  # the model's own training stage (ablation runs name their checkpoint and draw no loss)
    return {"stage": name, "output": output or checkpoint(cfg, kind), "data": data_dir(cfg),
            "fingerprint": definition.param_values(cfg), "loss_plot": loss_figure(cfg, kind) if own else None,
            "micro_batch": cfg.resources[definition.resources].micro_batch}


def slurm_resources(cfg: Config, stage: Stage) -> dict:
    """The Snakemake resources of a stage, as snakemake-executor-plugin-slurm turns them into sbatch options.

    One node: --gpus=G and one task (torchrun starts the processes inside it). Several nodes (or launch: srun):
    an `mpi` job of --nodes=N --ntasks-per-node=P with --gres=gpu:G per node; the command runs srun itself.
    Training jobs ask for SIGURG cluster.warn_seconds before their time limit, checkpoint and requeue; their log
    keeps every leg of the chain (--open-mode=append)."""
    r = cfg.resources[stage.resources]
    out = {"mem_mb": r.mem_mb, "runtime": r.runtime}
    if stage.training and r.launcher == "srun":
        out |= {"mpi": "srun", "nodes": r.nodes, "cpus_per_task": max(r.cpus // r.per_node, 1)}
        out |= {"tasks_per_node": r.per_node} if r.per_node > 1 else {"tasks": r.world_size}
        out |= {"gres": f"gpu:{r.gpu}"} if r.gpu else {}
    else:
        out |= {"cpus_per_task": r.cpus} | ({"gpu": r.gpu} if r.gpu else {})
    if stage.training:
        out["slurm_extra"] = f"--signal=URG@{cfg.cluster.warn_seconds} --open-mode=append"
    return out


@dataclass(frozen=True)
class Partition:
    """What the largest node of a SLURM partition offers (sinfo), and how many nodes it has."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int
    nodes: int


def read_partitions(sinfo: str) -> dict[str, Partition]:
    """Partitions from `sinfo -h -o '%P|%c|%m|%G|%D'` (one line per node group; the default partition ends in '*'),
    with the default one also under the key ''."""
    out: dict[str, Partition] = {}
    for line in sinfo.strip().splitlines():
        name, cpus, mem, gres, nodes = line.strip().split("|")
        default, name = name.endswith("*"), name.rstrip("*")
        gpus = sum(int(part.split("(")[0].split(":")[-1]) for part in gres.split(",") if part.startswith("gpu:"))
        seen = out.get(name, Partition(name, 0, 0, 0, 0))
        out[name] = Partition(name, max(seen.cpus, int(cpus.rstrip("+"))), max(seen.mem_mb, int(mem.rstrip("+"))),
                              max(seen.gpus, gpus), seen.nodes + int(nodes))
        if default:
            out[""] = out[name]
    return out


def misfit(cfg: Config, partition: Partition) -> str | None:
    """The first stage whose request no node of the partition can ever meet (SLURM would keep it pending with
    reason PartitionConfig, and Snakemake wait in silence), named with the resources key to change."""
    for stage in stages(cfg):
        r = cfg.resources[stage.resources]
        for key, asked, has, what in (("cpus", r.cpus, partition.cpus, "CPUs per node"),
                                      ("mem_mb", r.mem_mb, partition.mem_mb, "MB of memory per node"),
                                      ("gpu", r.gpu, partition.gpus, "GPUs per node"),
                                      ("nodes", r.nodes, partition.nodes, "nodes")):
            if asked > has:
                return (f"resources.{stage.resources}.{key}: {stage.name} asks for {asked} {what}, and partition "
                        f"'{partition.name}' has {has}: SLURM would never start it; lower it in params.yaml")
    return None


def openai_stage(cfg: Config, model: str) -> Stage:
    """Import one of OpenAI's published checkpoints (<model>.openai_checkpoint) in place of training the model."""
    source = getattr(cfg, model).openai_checkpoint
    return Stage(f"import_{model}", f"python -m pipeline.import_openai --model {model}",
                 [source, "pipeline/import_openai.py"] + CORE, [checkpoint(cfg, model)],
                 [f"{model}.source", f"{model}.openai_checkpoint", "network", "diffusion", "data.dataset"],
                 "prepare_data")


def teacher_stage(cfg: Config) -> Stage:
    """Train the EDM teacher, or import NVlabs' (teacher.source: import) or OpenAI's (openai) published one."""
    if cfg.teacher.source == "openai":
        return openai_stage(cfg, "teacher")
    if cfg.teacher.source == "import":
        return Stage("import_teacher",
                     f"python -m pipeline.import_edm {cfg.teacher.edm_pickle} --arch {cfg.network.arch} "
                     f"--out {checkpoint(cfg, 'teacher')}",
                     [cfg.teacher.edm_pickle, "pipeline/import_edm.py"] + CORE,
                     [checkpoint(cfg, "teacher")], ["teacher.edm_pickle", "network.arch"], "prepare_data")
    return Stage("train_teacher", launched("train_teacher", "pipeline.train_teacher"),
                 split_paths(cfg, "train") + ["pipeline/train_teacher.py"] + TRAIN_CODE,
                 [checkpoint(cfg, "teacher"), loss_figure(cfg, "teacher")],
                 TRAIN_PARAMS + ["teacher"],
                 "train_teacher", training=True)


def manifest(cfg: Config) -> str:
    return f"{data_dir(cfg)}/manifest.json"


def mixture(cfg: Config) -> bool:
    """Dataset gmm: exact measures (pipeline.gmm) instead of Inception, and the proof table instead of Tables 1-2."""
    return cfg.data.dataset == "gmm"


def stages(cfg: Config) -> list[Stage]:
    """All stages for a resolved config (CT depends on the teacher only when it starts from it)."""
    train = split_paths(cfg, "train")
    data_params = ["data.dataset", "data.source", "data.max_train", "data.class_conditional", "data.lsun_resize"]
    data_params += ["data.gmm"] if mixture(cfg) else []
    train_params = TRAIN_PARAMS
    refs = [ref_stats(cfg), ref_features(cfg)]
    teacher = [checkpoint(cfg, "teacher")]
    out = [
        Stage("prepare_data", "python -m pipeline.prepare_data",
              ["pipeline/prepare_data.py", "pipeline/datasets.py", "pipeline/data.py", "pipeline/config.py"]
              + (["pipeline/gmm.py"] if mixture(cfg) else []),
              train + split_paths(cfg, "test") + [manifest(cfg)], data_params, "prepare_data"),
        *([] if mixture(cfg) else [
            Stage("reference_stats", "python -m pipeline.reference_stats",
                  train + ["pipeline/reference_stats.py", "pipeline/metrics.py"], refs,
                  data_params + ["evaluate.ref_images", "evaluate.pr_ref_images", "evaluate.mode",
                                 "evaluate.inception"], "evaluate")]),
        teacher_stage(cfg),
        openai_stage(cfg, "cd") if cfg.cd.source == "openai" else
        Stage("distill_cd", launched("distill_cd", "pipeline.distill_cd"),
              train + teacher + ["pipeline/distill_cd.py", "pipeline/lpips.py"] + TRAIN_CODE,
              [checkpoint(cfg, "cd"), loss_figure(cfg, "cd")], train_params + ["cd", "lpips"], "distill_cd",
              training=True),
        openai_stage(cfg, "ct") if cfg.ct.source == "openai" else
        Stage("train_ct", launched("train_ct", "pipeline.train_ct"),
              train + (teacher if cfg.ct.init_from_teacher else []) + ["pipeline/train_ct.py", "pipeline/lpips.py"]
              + TRAIN_CODE,
              [checkpoint(cfg, "ct"), loss_figure(cfg, "ct")], train_params + ["ct", "lpips"], "train_ct",
              training=True),
    ]
    sample_params = ["diffusion", "sample.num_samples", "sample.batch", "sample.seed", "sample.grid", "sample.uint8"]
    for model in ("cd", "ct"):
        if searched(cfg, model):
            scored = [manifest(cfg)] + split_paths(cfg, "test") + ["pipeline/gmm.py"] if mixture(cfg) else refs
            out.append(Stage(f"search_{model}", f"python -m pipeline.search_two_step --model {model}",
                             [checkpoint(cfg, model)] + scored + ["pipeline/search_two_step.py", "pipeline/sample.py"]
                             + EVAL_CODE + CORE,
                             [two_step(cfg, model), figure(cfg, f"two_step_{model}")],
                             ["diffusion", "search", "cd.N" if model == "cd" else "ct.s1", "sample.batch",
                              "sample.uint8", "evaluate.mode", "evaluate.inception"], "evaluate"))
    sampler_params = {"teacher": ["sample.teacher_steps", "sample.teacher_clip", "sample.teacher_euler_nfe",
                                  "sample.teacher_heun_nfe"],
                      "cd": ["sample.cd_schedules"], "ct": ["sample.ct_schedules"]}
    for model in MODELS:
        out.append(Stage(f"sample_{model}", f"python -m pipeline.sample --model {model}",
                         [checkpoint(cfg, model)] + ([two_step(cfg, model)] if searched(cfg, model) else [])
                         + ["pipeline/sample.py"] + CORE,
                         [samples(cfg, model), figure(cfg, f"samples_{model}")],
                         sample_params + sampler_params[model], "sample"))
    if mixture(cfg):
        return out + mixture_stages(cfg)
    for model in MODELS:
        out.append(Stage(f"evaluate_{model}", f"python -m pipeline.evaluate --model {model}",
                         [samples(cfg, model)] + refs + EVAL_CODE, [metrics(cfg, model)],
                         ["evaluate.pr_k", "evaluate.mode", "evaluate.inception"], "evaluate"))
    out.append(Stage("tables", "python -m pipeline.tables",
                     [metrics(cfg, m) for m in MODELS] + ["pipeline/tables.py"], TABLES, ["data.dataset"], "tables"))
    edited = cfg.edit.model
    out.append(Stage(f"edit_{edited}", "python -m pipeline.edit",
                     [checkpoint(cfg, edited)] + split_paths(cfg, "test") + [ref_stats(cfg), "pipeline/edit.py",
                      "pipeline/editing.py", "pipeline/metrics.py", "pipeline/data.py"] + CORE,
                     edit_outputs(cfg, edited),
                     ["diffusion", "edit", "sample.uint8", "evaluate.mode", "evaluate.inception"], "sample"))
    runs = cfg.ablation.used_runs()
    for run in runs:
        model = cfg.ablation.runs[run]["model"]
        needs_teacher = model == "cd" or cfg.ct.init_from_teacher
        out.append(Stage(f"ablate_{run}", launched(TRAIN_STAGE[model], f"pipeline.ablation --run {run}"),
                         train + (teacher if needs_teacher else []) + refs
                         + ["pipeline/ablation.py", f"pipeline/{TRAIN_STAGE[model]}.py", "pipeline/lpips.py"]
                         + TRAIN_CODE + EVAL_CODE,
                         [ablation_result(cfg, run), ablation_checkpoint(cfg, run)],
                         train_params + [model, "lpips", f"ablation.runs.{run}", "ablation.iterations",
                                         "ablation.eval_every", "ablation.num_samples", "sample.batch",
                                         "sample.uint8", "evaluate.mode", "evaluate.inception"], TRAIN_STAGE[model],
                         training=True))
    if runs:
        out.append(Stage("figure3", "python -m pipeline.ablation --figure",
                         [ablation_result(cfg, run) for run in runs] + ["pipeline/ablation.py"], figure3(cfg),
                         ["ablation.panels"], "tables"))
    return out


def mixture_stages(cfg: Config) -> list[Stage]:
    """Dataset gmm, after sampling: each model's exact measures and error, then the proof table and figure."""
    out = []
    for model in MODELS:
        out.append(Stage(f"evaluate_{model}", f"python -m pipeline.evaluate --model {model}",
                         [samples(cfg, model), checkpoint(cfg, model), manifest(cfg)] + split_paths(cfg, "test")
                         + EVAL_CODE + ["pipeline/gmm.py"] + CORE, [metrics(cfg, model)],
                         ["evaluate.error_sigmas", "evaluate.error_samples", "sample.seed"], "evaluate"))
    out.append(Stage("proof", "python -m pipeline.proof",
                     [metrics(cfg, m) for m in MODELS] + [samples(cfg, m) for m in MODELS]
                     + [manifest(cfg)] + split_paths(cfg, "train") + ["pipeline/proof.py", "pipeline/gmm.py"],
                     proof_outputs(cfg), ["diffusion", "sample"], "evaluate"))
    return out


def proof_outputs(cfg: Config) -> list[str]:
    return ["results/tables/proof.csv", "results/tables/proof.md", figure(cfg, "proof")]


def check_writable(cfg: Config) -> None:
    """Every output folder of the DAG can be written, checked before any job starts."""
    folder = unwritable([out for stage in stages(cfg) for out in stage.outs])
    if folder is not None:
        raise ConfigError(f"{folder}: not writable, and the pipeline writes its outputs there; fix its permissions "
                          "or run from a folder you own")


def targets(cfg: Config) -> list[str]:
    """What `snakemake` with no target builds: the tables and the editing figures (Figure 3: target figure3); for
    dataset gmm, the proof table and its figure."""
    if mixture(cfg):
        return proof_outputs(cfg)
    return TABLES + edit_outputs(cfg, cfg.edit.model)


def dvc_yaml(cfg: Config, params_file: dict) -> str:
    """dvc.yaml text: every stage, tracking its params under the defaults and under every preset."""
    doc: dict = {"stages": {}}
    presets = params_file.get("presets", {}) or {}
    for stage in stages(cfg):
        tracked = ["preset"] + (["follow"] if "follow" in params_file else [])
        for key in stage.params:
            tracked.append(key)
            for name, body in presets.items():
                for where, block in ((f"presets.{name}", body), (f"presets.{name}.code", (body or {}).get("code"))):
                    node = block or {}
                    for part in key.split("."):
                        node = node.get(part) if isinstance(node, dict) else None
                    if node is not None:
                        tracked.append(f"{where}.{key}")
        doc["stages"][stage.name] = {"cmd": stage.cmd, "deps": stage.deps, "params": tracked, "outs": stage.outs}
    header = (f"# Generated by `python -m pipeline.stages --dvc` from pipeline/stages.py for preset '{cfg.preset}'.\n"
              "# Do not edit: change pipeline/stages.py or params.yaml, then regenerate (make dvc.yaml).\n")
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--dvc", action="store_true", help="write dvc.yaml next to the params file")
    args = parser.parse_args()
    cfg = from_args(args)
    if args.dvc:
        try:
            params_file = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(str(e)) from None
        target = Path(args.config).with_name("dvc.yaml")
        target.write_text(dvc_yaml(cfg, params_file))
        print(f"wrote {target} for preset '{cfg.preset}'")
        return
    for stage in stages(cfg):
        print(f"{stage.name:16s} {stage.cmd}\n{'':16s} -> {', '.join(stage.outs)}")


if __name__ == "__main__":
    sys.exit(main())
