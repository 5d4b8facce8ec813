"""The DAG, defined once. The Snakefile builds its rules from `stages()`; dvc.yaml is generated from it.

    python -m pipeline.stages            # print the stages
    python -m pipeline.stages --dvc      # (re)write dvc.yaml for the preset that params.yaml selects
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import MODELS, TRAIN_STAGE, Config, ConfigError, add_arguments, from_args, unwritable
from pipeline.datasets import split_files

CONSISTENCY = ("cd", "ct", "ict", "ect")  # the consistency models (sampled by Alg. 1, searched, edited)
CORE = ["pipeline/config.py", "pipeline/cm.py", "pipeline/networks.py", "pipeline/models.py"]
TRAIN_CODE = CORE + ["pipeline/training.py", "pipeline/tracking.py", "pipeline/data.py", "pipeline/noise.py",
                     "pipeline/distributed.py", "pipeline/launch.py"]
# The run knobs that change a training result (compile, channels_last, data_placement and resources only move work).
TRAIN_PARAMS = ["run.seed", "run.mixed_precision", "run.dtype", "run.tf32", "data", "diffusion", "network"]
EVAL_CODE = ["pipeline/metrics.py", "pipeline/evaluate.py"]
TABLES = ["results/tables/table1.csv", "results/tables/table1.md", "results/tables/table2.csv",
          "results/tables/table2.md"]
COMPARE = ["results/tables/compare.csv", "results/tables/compare.md"]
TABLE3 = ["results/tables/table3.csv", "results/tables/table3.md"]
PROOF = ["results/tables/proof.csv", "results/tables/proof.md", "results/tables/proof.png"]
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
    key: str = ""  # in the names of its outputs (see stage_key)

    def param_values(self, cfg: Config) -> str:
        """The resolved values of this stage's params, as stable JSON (Snakemake reruns when it changes)."""
        return json.dumps({key: cfg.section(key) for key in self.params}, sort_keys=True)


# Where outputs live. run.paths keyed: a stage's files carry its key, a fingerprint of its params and of the keys of
# the stages it reads (checkpoints/cifar10/cd-1a2b3c4d.pt), so experiments that agree on a stage share its outputs
# and the others never overwrite them. run.paths named: everything of experiment E under E (checkpoints/E/cd.pt).
# Only an experiment's tables are named in both: results/<name>/tables/.
UNKEYED = ("data.source", "data.workers")  # where the same images come from, and how fast: not part of a key


def stage_key(cfg: Config, name: str, params: list[str], upstream: list[str]) -> str:
    """The key of stage `name`: the experiment's name (paths named), or 8 hex digits of the SHA-256 of the stage's
    name, its param values and its upstream stages' keys (paths keyed)."""
    if cfg.run.paths == "named":
        return cfg.name
    values = {key: cfg.section(key) for key in params}
    for dotted in UNKEYED:
        section, _, knob = dotted.partition(".")
        if isinstance(values.get(section), dict):
            values[section] = {k: v for k, v in values[section].items() if k != knob}
        values.pop(dotted, None)
    text = json.dumps({"stage": name, "params": values, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _file(cfg: Config, folder: str, named_folder: str, stem: str, key: str, suffix: str) -> str:
    """keyed: <folder>/<dataset>/<stem>-<key><suffix>; named: <named_folder>/<name>/<stem><suffix>."""
    if cfg.run.paths == "named":
        return f"{named_folder}/{key}/{stem}{suffix}"
    return f"{folder}/{cfg.data.dataset}/{stem}-{key}{suffix}"


@dataclass(frozen=True)
class Layout:
    """The keys of one experiment's stages, and from them every output path."""

    cfg: Config
    keys: dict[str, str]  # stage name -> key

    def data_dir(self) -> str:
        key = self.keys["prepare_data"]
        return f"data/{key}" if self.cfg.run.paths == "named" else f"data/{self.cfg.data.dataset}/{key}"

    def ref_stats(self) -> str:
        return _file(self.cfg, "data", "data", "fid_ref", self.keys["reference_stats"], ".npz")

    def ref_features(self) -> str:
        return _file(self.cfg, "data", "data", "ref_features", self.keys["reference_stats"], ".npy")

    def checkpoint(self, model: str) -> str:
        return _file(self.cfg, "checkpoints", "checkpoints", model, self.keys[model], ".pt")

    def figure(self, stage: str, name: str) -> str:
        return _file(self.cfg, "results/figures", "results", f"figures/{name}" if self.cfg.run.paths == "named"
                     else name, self.keys[stage], ".png")

    def samples(self, model: str) -> str:
        return _file(self.cfg, "samples", "samples", model, self.keys[f"sample_{model}"], ".npz")

    def metrics(self, model: str) -> str:
        return self._result("metrics", model, self.keys[f"evaluate_{model}"])

    def summary(self, model: str) -> str:
        """The flat metrics DVC reads (dvc metrics show/diff, dvc exp show)."""
        return self._result("metrics", f"{model}_summary", self.keys[f"evaluate_{model}"])

    def two_step(self, model: str) -> str:
        return self._result("metrics", f"two_step_{model}", self.keys[f"search_{model}"])

    def edit_metrics(self, model: str) -> str:
        return self._result("metrics", f"editing_{model}", self.keys[f"edit_{model}"])

    def ablation_result(self, run: str) -> str:
        return self._result("ablations", run, self.keys[f"ablate_{run}"])

    def ablation_curve(self, run: str) -> str:
        """FID against iteration as CSV rows (dvc plots)."""
        return self._result("ablations", run, self.keys[f"ablate_{run}"], ".csv")

    def ablation_checkpoint(self, run: str) -> str:
        return _file(self.cfg, "checkpoints", "checkpoints", f"ablations/{run}", self.keys[f"ablate_{run}"], ".pt")

    def _result(self, kind: str, stem: str, key: str, suffix: str = ".json") -> str:
        return _file(self.cfg, f"results/{kind}", "results", f"{kind}/{stem}" if self.cfg.run.paths == "named"
                     else stem, key, suffix)


def tables_dir(cfg: Config) -> str:
    """An experiment's tables (both layouts); results/tables/ holds the selected experiment's copy (publish)."""
    return f"results/{cfg.name}/tables"


def layout(cfg: Config) -> Layout:
    """Every output path of the experiment (its stages' keys computed once)."""
    b = _Builder(cfg)
    stages(cfg, b)
    return b.at


def data_dir(cfg: Config) -> str:
    return layout(cfg).data_dir()


def split_paths(cfg: Config, split: str) -> list[str]:
    return [str(p) for p in split_files(data_dir(cfg), split)]


def ref_stats(cfg: Config) -> str:
    """Inception mu, sigma of the training set (FID)."""
    return layout(cfg).ref_stats()


def ref_features(cfg: Config) -> str:
    """Pool features of a subset of the training set (KID, precision/recall)."""
    return layout(cfg).ref_features()


def checkpoint(cfg: Config, model: str) -> str:
    return layout(cfg).checkpoint(model)


def samples(cfg: Config, model: str) -> str:
    return layout(cfg).samples(model)


def metrics(cfg: Config, model: str) -> str:
    return layout(cfg).metrics(model)


def two_step(cfg: Config, model: str) -> str:
    """The searched 2-step intermediate time of a consistency model."""
    return layout(cfg).two_step(model)


def ablation_result(cfg: Config, run: str) -> str:
    return layout(cfg).ablation_result(run)


def ablation_checkpoint(cfg: Config, run: str) -> str:
    return layout(cfg).ablation_checkpoint(run)


def ablation_curve(cfg: Config, run: str) -> str:
    return layout(cfg).ablation_curve(run)


def summary(cfg: Config, model: str) -> str:
    return layout(cfg).summary(model)


def loss_figure(cfg: Config, model: str) -> str:
    return layout(cfg).figure(model, f"loss_{model}")


def sample_grid(cfg: Config, model: str) -> str:
    return layout(cfg).figure(f"sample_{model}", f"samples_{model}")


def search_figure(cfg: Config, model: str) -> str:
    return layout(cfg).figure(f"search_{model}", f"two_step_{model}")


def edit_figure(cfg: Config, task: str) -> str:
    return layout(cfg).figure(f"edit_{cfg.edit.model}", f"editing_{task}")


def edit_outputs(cfg: Config, model: str) -> list[str]:
    at = layout(cfg)
    return [at.figure(f"edit_{model}", f"editing_{task}") for task in EDIT_TASKS] + [at.edit_metrics(model)]


def figure3(cfg: Config) -> list[str]:
    at = layout(cfg)
    return [at.figure("figure3", f"figure3_{panel}") for panel in cfg.ablation.panels]


def models(cfg: Config) -> tuple[str, ...]:
    """The experiment's models (run.models), in the pipeline's order: what it samples, scores and tables."""
    return tuple(m for m in MODELS if m in cfg.run.models)


def teacher_needed(cfg: Config) -> bool:
    """Is the teacher trained (or imported)? When it is a model of the experiment, or a model starts from it or
    distils it, or an ablation run does."""
    own = models(cfg)
    starts = [m for m in ("ct", "ict", "ect") if m in own and getattr(cfg, m).init_from_teacher
              and _source(cfg, m) == "train"]
    runs = [cfg.ablation.runs[r]["model"] for r in ablation_runs(cfg)]
    return ("teacher" in own or ("cd" in own and cfg.cd.source == "train") or bool(starts) or "cd" in runs
            or ("ct" in runs and cfg.ct.init_from_teacher))


def _source(cfg: Config, model: str) -> str:
    """train, or openai: a published checkpoint imported (ECT has no published one, and no such knob)."""
    return getattr(getattr(cfg, model), "source", "train")


def ablation_runs(cfg: Config) -> list[str]:
    """Figure 3's runs, when the experiment has the models they vary (else none: no figure3 stage)."""
    runs = cfg.ablation.used_runs()
    return runs if all(cfg.ablation.runs[r]["model"] in models(cfg) for r in runs) else []


SEARCH_GRID = {"cd": "cd.N", "ct": "ct.s1", "ict": "ict.s1", "ect": "search.grid"}  # the knob of the default grid


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
    definition = next((s for s in stages(cfg) if s.name == name), None)
    if definition is None:
        raise SystemExit(f"error: {name}: experiment {cfg.name} does not train {kind} (run.models: "
                         f"{cfg.run.models}); add it, e.g. --set 'run.models=[{', '.join(cfg.run.models + [kind])}]'")
    own = output is None  # the model's own training stage (ablation runs name their checkpoint and draw no loss)
    return {"stage": name, "output": output or checkpoint(cfg, kind), "data": data_dir(cfg),
            "fingerprint": definition.param_values(cfg), "loss_plot": loss_figure(cfg, kind) if own else None,
            "micro_batch": cfg.resources[definition.resources].micro_batch, "resources": definition.resources}


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


def misfit(cfg: Config, partition: Partition, names: set[str] | None = None) -> str | None:
    """The first stage (of `names`; None: all) whose request no node of the partition can ever meet (SLURM would
    keep it pending with reason PartitionConfig, and Snakemake wait in silence), named with the resources key."""
    for stage in stages(cfg):
        if names is not None and stage.name not in names:
            continue
        r = cfg.resources[stage.resources]
        for key, asked, has, what in (("cpus", r.cpus, partition.cpus, "CPUs per node"),
                                      ("mem_mb", r.mem_mb, partition.mem_mb, "MB of memory per node"),
                                      ("gpu", r.gpu, partition.gpus, "GPUs per node"),
                                      ("nodes", r.nodes, partition.nodes, "nodes")):
            if asked > has:
                return (f"resources.{stage.resources}.{key}: {stage.name} asks for {asked} {what}, and partition "
                        f"'{partition.name}' has {has}: SLURM would never start it; lower it in params.yaml")
    return None


def manifest(cfg: Config) -> str:
    return f"{data_dir(cfg)}/manifest.json"


def mixture(cfg: Config) -> bool:
    """Dataset gmm: exact measures (pipeline.gmm) instead of Inception, and the proof table instead of Tables 1-2."""
    return cfg.data.dataset == "gmm"


class _Builder:
    """Collects the stages in order: each one's key comes from its params and the keys of the stages it reads, and
    its output paths from its key."""

    def __init__(self, cfg: Config):
        self.cfg, self.keys, self.out = cfg, {}, []
        self.at = Layout(cfg, self.keys)

    def add(self, name: str, cmd: str, deps, outs, params: list[str], resources: str, upstream: list[str],
            training: bool = False, model: str | None = None) -> None:
        """deps and outs: callables of the Layout, called once this stage's key is known."""
        key = stage_key(self.cfg, name, params, [self.keys[u] for u in upstream])
        self.keys[name] = key
        if model is not None:
            self.keys[model] = key
        cmd = cmd(self.at) if callable(cmd) else cmd
        self.out.append(Stage(name, cmd, deps(self.at), outs(self.at), params, resources, training, key))

    def splits(self, *names: str) -> list[str]:
        return [str(p) for name in names for p in split_files(self.at.data_dir(), name)]


def _teacher(b: _Builder) -> None:
    """Train the EDM teacher, or import NVlabs' (teacher.source: import) or OpenAI's (openai) published one."""
    cfg = b.cfg
    if cfg.teacher.source == "openai":
        return _openai(b, "teacher")
    if cfg.teacher.source == "import":
        command = (lambda at: f"python -m pipeline.import_edm {cfg.teacher.edm_pickle} --arch {cfg.network.arch} "
                   f"--out {at.checkpoint('teacher')}")
        return b.add("import_teacher", command, lambda at: [cfg.teacher.edm_pickle, "pipeline/import_edm.py"] + CORE,
                     lambda at: [at.checkpoint("teacher")], ["teacher.edm_pickle", "network.arch"], "prepare_data",
                     [], model="teacher")
    b.add("train_teacher", launched("train_teacher", "pipeline.train_teacher"),
          lambda at: b.splits("train") + ["pipeline/train_teacher.py"] + TRAIN_CODE,
          lambda at: [at.checkpoint("teacher"), at.figure("teacher", "loss_teacher")],
          TRAIN_PARAMS + ["teacher"], "train_teacher", ["prepare_data"], training=True, model="teacher")


def _openai(b: _Builder, model: str) -> None:
    """Import one of OpenAI's published checkpoints (<model>.openai_checkpoint) in place of training the model."""
    source = getattr(b.cfg, model).openai_checkpoint
    b.add(f"import_{model}", f"python -m pipeline.import_openai --model {model}",
          lambda at: [source, "pipeline/import_openai.py"] + CORE, lambda at: [at.checkpoint(model)],
          [f"{model}.source", f"{model}.openai_checkpoint", "network", "diffusion", "data.dataset"], "prepare_data",
          [], model=model)


def stages(cfg: Config, b: _Builder | None = None) -> list[Stage]:
    """All stages of one experiment, in order (CT reads the teacher only when it starts from it)."""
    b = b or _Builder(cfg)
    data_params = ["data.dataset", "data.source", "data.max_train", "data.class_conditional", "data.lsun_resize"]
    data_params += ["data.gmm"] if mixture(cfg) else []
    b.add("prepare_data", "python -m pipeline.prepare_data",
          lambda at: ["pipeline/prepare_data.py", "pipeline/datasets.py", "pipeline/data.py", "pipeline/config.py"]
          + (["pipeline/gmm.py"] if mixture(cfg) else []),
          lambda at: b.splits("train", "test") + [f"{at.data_dir()}/manifest.json"], data_params, "prepare_data", [])
    refs = [] if mixture(cfg) else ["reference_stats"]
    if not mixture(cfg):
        b.add("reference_stats", "python -m pipeline.reference_stats",
              lambda at: b.splits("train") + ["pipeline/reference_stats.py", "pipeline/metrics.py"],
              lambda at: [at.ref_stats(), at.ref_features()],
              data_params + ["evaluate.ref_images", "evaluate.pr_ref_images", "evaluate.mode", "evaluate.inception"],
              "evaluate", ["prepare_data"])
    own = models(cfg)
    if teacher_needed(cfg):
        _teacher(b)
    teacher = lambda at: [at.checkpoint("teacher")]  # noqa: E731
    if "cd" in own and cfg.cd.source == "openai":
        _openai(b, "cd")
    elif "cd" in own:
        b.add("distill_cd", launched("distill_cd", "pipeline.distill_cd"),
              lambda at: b.splits("train") + teacher(at) + ["pipeline/distill_cd.py", "pipeline/lpips.py"]
              + TRAIN_CODE, lambda at: [at.checkpoint("cd"), at.figure("cd", "loss_cd")],
              TRAIN_PARAMS + ["cd", "lpips"], "distill_cd", ["prepare_data", "teacher"], training=True, model="cd")
    for model in ("ct", "ict", "ect"):
        if model not in own:
            continue
        if _source(cfg, model) == "openai":
            _openai(b, model)
            continue
        stage, from_teacher = TRAIN_STAGE[model], getattr(cfg, model).init_from_teacher
        code = [f"pipeline/{stage}.py"] + (["pipeline/train_ct.py"] if model == "ict" else [])
        b.add(stage, launched(stage, f"pipeline.{stage}"),
              lambda at, t=from_teacher, c=code: b.splits("train") + (teacher(at) if t else []) + c
              + ["pipeline/lpips.py"] + TRAIN_CODE,
              lambda at, m=model: [at.checkpoint(m), at.figure(m, f"loss_{m}")],
              TRAIN_PARAMS + [model] + (["lpips"] if model != "ect" else []), stage,
              ["prepare_data"] + (["teacher"] if from_teacher else []), training=True, model=model)
    refs_of = (lambda at: [at.ref_stats(), at.ref_features()]) if refs else (lambda at: [])
    scored = ((lambda at: [f"{at.data_dir()}/manifest.json"] + b.splits("test") + ["pipeline/gmm.py"])
              if mixture(cfg) else refs_of)
    for model in CONSISTENCY:
        if model in own and searched(cfg, model):
            b.add(f"search_{model}", f"python -m pipeline.search_two_step --model {model}",
                  lambda at, m=model: [at.checkpoint(m)] + scored(at) + ["pipeline/search_two_step.py",
                                                                        "pipeline/sample.py"] + EVAL_CODE + CORE,
                  lambda at, m=model: [at.two_step(m), at.figure(f"search_{m}", f"two_step_{m}")],
                  ["diffusion", "search", SEARCH_GRID[model], "sample.batch", "sample.uint8",
                   "evaluate.mode", "evaluate.inception"], "evaluate",
                  [model] + (["prepare_data"] if mixture(cfg) else refs))
    sample_params = ["diffusion", "sample.num_samples", "sample.batch", "sample.seed", "sample.grid", "sample.uint8"]
    sampler_params = {"teacher": ["sample.teacher_steps", "sample.teacher_clip", "sample.teacher_euler_nfe",
                                  "sample.teacher_heun_nfe"],
                      **{m: [f"sample.{m}_schedules"] for m in CONSISTENCY}}
    for model in own:
        search = [f"search_{model}"] if searched(cfg, model) else []
        b.add(f"sample_{model}", f"python -m pipeline.sample --model {model}",
              lambda at, m=model, s=search: [at.checkpoint(m)] + [at.two_step(m) for _ in s] + ["pipeline/sample.py"]
              + CORE, lambda at, m=model: [at.samples(m), at.figure(f"sample_{m}", f"samples_{m}")],
              sample_params + sampler_params[model], "sample", [model] + search)
    if mixture(cfg):
        return _mixture_stages(b)
    for model in own:
        b.add(f"evaluate_{model}", f"python -m pipeline.evaluate --model {model}",
              lambda at, m=model: [at.samples(m)] + refs_of(at) + EVAL_CODE,
              lambda at, m=model: [at.metrics(m), at.summary(m)],
              ["evaluate.pr_k", "evaluate.mode", "evaluate.inception"], "evaluate", [f"sample_{model}"] + refs)
    _tables(b, "tables", "python -m pipeline.tables", TABLES + TABLE3)  # results/tables/ gets 1 and 2 (publish)
    edited = cfg.edit.model
    b.add(f"edit_{edited}", "python -m pipeline.edit",
          lambda at: [at.checkpoint(edited)] + b.splits("test") + [at.ref_stats(), "pipeline/edit.py",
                                                                   "pipeline/editing.py", "pipeline/metrics.py",
                                                                   "pipeline/data.py"] + CORE,
          lambda at: [at.figure(f"edit_{edited}", f"editing_{task}") for task in EDIT_TASKS]
          + [at.edit_metrics(edited)],
          ["diffusion", "edit", "sample.uint8", "evaluate.mode", "evaluate.inception"], "sample",
          [edited, "prepare_data"] + refs)
    runs = ablation_runs(cfg)
    for run in runs:
        model = cfg.ablation.runs[run]["model"]
        needs_teacher = model == "cd" or cfg.ct.init_from_teacher
        b.add(f"ablate_{run}", launched(TRAIN_STAGE[model], f"pipeline.ablation --run {run}"),
              lambda at, m=model, t=needs_teacher: b.splits("train") + (teacher(at) if t else []) + refs_of(at)
              + ["pipeline/ablation.py", f"pipeline/{TRAIN_STAGE[m]}.py", "pipeline/lpips.py"] + TRAIN_CODE
              + EVAL_CODE,
              lambda at, r=run: [at.ablation_result(r), at.ablation_curve(r), at.ablation_checkpoint(r)],
              TRAIN_PARAMS + [model, "lpips", f"ablation.runs.{run}", "ablation.iterations", "ablation.eval_every",
                              "ablation.num_samples", "sample.batch", "sample.uint8", "evaluate.mode",
                              "evaluate.inception"], TRAIN_STAGE[model],
              ["prepare_data"] + (["teacher"] if needs_teacher else []) + refs, training=True)
    if runs:
        b.add("figure3", "python -m pipeline.ablation --figure",
              lambda at: [at.ablation_result(r) for r in runs] + ["pipeline/ablation.py"],
              lambda at: [at.figure("figure3", f"figure3_{panel}") for panel in cfg.ablation.panels],
              ["ablation.panels"], "tables", [f"ablate_{r}" for r in runs])
    return b.out


def _tables(b: _Builder, name: str, cmd: str, outs: list[str], extra=lambda at: []) -> None:
    """An experiment's tables: named by the experiment in both layouts (results/<name>/tables/)."""
    folder = tables_dir(b.cfg)
    own = models(b.cfg)
    b.add(name, cmd, lambda at: [at.metrics(m) for m in own] + extra(at) + [f"pipeline/{cmd.split('.')[-1]}.py"],
          lambda at: [f"{folder}/{Path(o).name}" for o in outs], ["data.dataset"], "tables",
          [f"evaluate_{m}" for m in own])
    b.keys[name] = b.cfg.name


def _mixture_stages(b: _Builder) -> list[Stage]:
    """Dataset gmm, after sampling: each model's exact measures and error, then the proof table and figure."""
    for model in models(b.cfg):
        b.add(f"evaluate_{model}", f"python -m pipeline.evaluate --model {model}",
              lambda at, m=model: [at.samples(m), at.checkpoint(m), f"{at.data_dir()}/manifest.json"]
              + b.splits("test") + EVAL_CODE + ["pipeline/gmm.py"] + CORE,
              lambda at, m=model: [at.metrics(m), at.summary(m)],
              ["evaluate.error_sigmas", "evaluate.error_samples", "sample.seed"], "evaluate",
              [f"sample_{model}", model, "prepare_data"])
    _tables(b, "proof", "python -m pipeline.proof", PROOF,
            lambda at: [at.samples(m) for m in models(b.cfg)] + [f"{at.data_dir()}/manifest.json"] + b.splits("train")
            + ["pipeline/gmm.py"])
    return b.out


def compare_stage(cfgs: dict[str, Config]) -> Stage:
    """results/tables/compare.{csv,md}: the measures of several experiments side by side (params.yaml compare:)."""
    deps = [at.metrics(m) for cfg in cfgs.values() for at in [layout(cfg)] for m in models(cfg)]
    return Stage("compare", "python -m pipeline.tables --compare", deps + ["pipeline/tables.py"], COMPARE, [],
                 "tables", key="+".join(cfgs))


def table3_stage(cfgs: dict[str, Config]) -> Stage:
    """results/tables/table3.{csv,md}: CD, CT, iCT and ECT of these experiments beside the published FIDs."""
    import shlex

    deps = [at.metrics(m) for cfg in cfgs.values() for at in [layout(cfg)] for m in models(cfg) if m in CONSISTENCY]
    names = " ".join(shlex.quote(n) for n in cfgs)
    return Stage("table3", f"python -m pipeline.tables --table3 {names}", deps + ["pipeline/tables.py"], TABLE3, [],
                 "tables", key="+".join(cfgs))


def old_layout(cfg: Config) -> list[str]:
    """One line per checkpoint of the layout before named experiments (checkpoints/<dataset>/<model>.pt), saying
    where this experiment now expects it."""
    out = []
    for model in models(cfg):
        old = Path(f"checkpoints/{cfg.data.dataset}/{model}.pt")
        if old.is_file() and str(old) != checkpoint(cfg, model):
            out.append(f"{old}: a checkpoint of the layout before named experiments; experiment {cfg.name} now reads "
                       f"and writes {checkpoint(cfg, model)} (mv it there to keep it if its params are this "
                       "experiment's; samples and metrics are recomputed)")
    return out


def proof_outputs(cfg: Config) -> list[str]:
    """The proof's table and figure of this experiment (dataset gmm)."""
    return [f"{tables_dir(cfg)}/{Path(o).name}" for o in PROOF]


def publish_stage(cfg: Config) -> Stage:
    """results/tables/: a copy of the selected experiment's tables, the paths the README and the guide name."""
    own = proof_outputs(cfg) if mixture(cfg) else [f"{tables_dir(cfg)}/{Path(t).name}" for t in TABLES]
    return Stage("publish", "python -m pipeline.tables --publish", own + ["pipeline/tables.py"],
                 PROOF if mixture(cfg) else TABLES, ["preset", "run.name"], "tables", key=cfg.name)


def check_writable(cfg: Config) -> None:
    """Every output folder of the DAG can be written, checked before any job starts."""
    folder = unwritable([out for stage in stages(cfg) for out in stage.outs])
    if folder is not None:
        raise ConfigError(f"{folder}: not writable, and the pipeline writes its outputs there; fix its permissions "
                          "or run from a folder you own")


def targets(cfg: Config) -> list[str]:
    """What `snakemake` with no target builds: the selected experiment's tables in results/tables/ and its editing
    figures (Figure 3: target figure3); for dataset gmm, the proof table and its figure."""
    if mixture(cfg):
        return PROOF
    return TABLES + edit_outputs(cfg, cfg.edit.model)


def dvc_yaml(cfg: Config, params_file: dict) -> str:
    """dvc.yaml text: every stage (and publish), tracking its params under the defaults and under every preset; each
    model's flat metrics as `metrics` and the Figure 3 curves as `plots` (dvc metrics/plots/exp show them)."""
    doc: dict = {"stages": {}}
    presets = params_file.get("presets", {}) or {}
    curves = {}
    for stage in stages(cfg) + [publish_stage(cfg)]:
        tracked = ["preset"] + (["follow"] if "follow" in params_file else [])
        for key in stage.params:
            tracked.append(key) if key not in tracked else None
            for name, body in presets.items():
                for where, block in ((f"presets.{name}", body), (f"presets.{name}.code", (body or {}).get("code"))):
                    node = block or {}
                    for part in key.split("."):
                        node = node.get(part) if isinstance(node, dict) else None
                    if node is not None:
                        tracked.append(f"{where}.{key}")
        flat = [o for o in stage.outs if o.endswith(".json") and "_summary" in Path(o).stem]
        plotted = [o for o in stage.outs if o.endswith(".csv") and stage.name.startswith("ablate_")]
        entry = {"cmd": stage.cmd, "deps": stage.deps, "params": tracked,
                 "outs": [o for o in stage.outs if o not in flat + plotted]}
        if flat:
            entry["metrics"] = flat  # cached, as every output: dvc push/pull and `dvc exp show` read them
        if plotted:
            entry["plots"] = plotted
            curves[stage.name.removeprefix("ablate_")] = plotted[0]
        doc["stages"][stage.name] = entry
    if curves:
        doc["plots"] = [{f"figure3_{panel}": {"title": f"Figure 3, {panel}: FID (1 step) against iteration",
                                              "x": "iteration", "y": {curves[run]: "fid_1step" for run in runs}}}
                        for panel, runs in cfg.ablation.panels.items()]
    header = (f"# Generated by `python -m pipeline.stages --dvc` from pipeline/stages.py for experiment '{cfg.name}'"
              f" (paths {cfg.run.paths}).\n"
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
        print(f"wrote {target} for experiment '{cfg.name}' (paths {cfg.run.paths})")
        return
    for stage in stages(cfg):
        print(f"{stage.name:16s} {stage.cmd}\n{'':16s} -> {', '.join(stage.outs)}")


if __name__ == "__main__":
    sys.exit(main())
