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

from pipeline.config import Config, ConfigError, add_arguments, from_args

DATA = "data/cifar10"
REF_STATS = f"{DATA}/fid_ref.npz"  # Inception mu, sigma of the training set (FID)
REF_FEATURES = f"{DATA}/ref_features.npy"  # pool features of a subset of it (KID, precision/recall)
MODELS = ("teacher", "cd", "ct")
TRAIN_STAGE = {"teacher": "train_teacher", "cd": "distill_cd", "ct": "train_ct"}
CORE = ["pipeline/config.py", "pipeline/cm.py", "pipeline/networks.py", "pipeline/models.py"]
TRAIN_CODE = CORE + ["pipeline/training.py", "pipeline/tracking.py", "pipeline/data.py"]


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: list[str]  # files: inputs and the code that makes the outputs
    outs: list[str]
    params: list[str]  # dotted keys of params.yaml whose values the outputs depend on
    resources: str  # key of params.yaml's `resources` section

    def param_values(self, cfg: Config) -> str:
        """The resolved values of this stage's params, as stable JSON (Snakemake reruns when it changes)."""
        return json.dumps({key: cfg.section(key) for key in self.params}, sort_keys=True)


def checkpoint(model: str) -> str:
    return f"checkpoints/{model}.pt"


def loss_figure(model: str) -> str:
    return f"results/figures/loss_{model}.png"


def samples(model: str) -> str:
    return f"samples/{model}.npz"


def metrics(model: str) -> str:
    return f"results/metrics/{model}.json"


TABLES = ["results/tables/table1.csv", "results/tables/table1.md"]
EDIT_TASKS = ("inpainting", "colorization", "super_resolution", "stroke_guided", "denoising", "interpolation")


def edit_outputs(model: str) -> list[str]:
    return [f"results/figures/editing_{task}.png" for task in EDIT_TASKS] + [f"results/metrics/editing_{model}.json"]


def stages(cfg: Config) -> list[Stage]:
    """All stages for a resolved config (CT depends on the teacher only when it starts from it)."""
    out = [
        Stage("prepare_data", "python -m pipeline.prepare_data",
              ["pipeline/prepare_data.py", "pipeline/data.py", "pipeline/config.py"],
              [f"{DATA}/train.npz", f"{DATA}/test.npz", f"{DATA}/manifest.json"],
              ["data.dataset", "data.source", "data.max_train"], "prepare_data"),
        Stage("reference_stats", "python -m pipeline.reference_stats",
              [f"{DATA}/train.npz", "pipeline/reference_stats.py", "pipeline/metrics.py"],
              [REF_STATS, REF_FEATURES],
              ["evaluate.ref_images", "evaluate.pr_ref_images", "evaluate.mode", "evaluate.inception"], "evaluate"),
        Stage("train_teacher", "python -m pipeline.train_teacher",
              [f"{DATA}/train.npz", "pipeline/train_teacher.py"] + TRAIN_CODE,
              [checkpoint("teacher"), loss_figure("teacher")],
              ["run.seed", "data.hflip", "diffusion", "network", "teacher"], "train_teacher"),
        Stage("distill_cd", "python -m pipeline.distill_cd",
              [f"{DATA}/train.npz", checkpoint("teacher"), "pipeline/distill_cd.py", "pipeline/lpips.py"]
              + TRAIN_CODE,
              [checkpoint("cd"), loss_figure("cd")],
              ["run.seed", "data.hflip", "diffusion", "network", "cd", "lpips"], "distill_cd"),
        Stage("train_ct", "python -m pipeline.train_ct",
              [f"{DATA}/train.npz"] + ([checkpoint("teacher")] if cfg.ct.init_from_teacher else [])
              + ["pipeline/train_ct.py", "pipeline/lpips.py"] + TRAIN_CODE,
              [checkpoint("ct"), loss_figure("ct")],
              ["run.seed", "data.hflip", "diffusion", "network", "ct", "lpips"], "train_ct"),
    ]
    sampler_params = {"teacher": "sample.teacher_steps", "cd": "sample.cd_schedules", "ct": "sample.ct_schedules"}
    for model in MODELS:
        out.append(Stage(f"sample_{model}", f"python -m pipeline.sample --model {model}",
                         [checkpoint(model), "pipeline/sample.py"] + CORE,
                         [samples(model), f"results/figures/samples_{model}.png"],
                         ["diffusion", "sample.num_samples", "sample.batch", "sample.seed", "sample.grid",
                          sampler_params[model]], "sample"))
    for model in MODELS:
        out.append(Stage(f"evaluate_{model}", f"python -m pipeline.evaluate --model {model}",
                         [samples(model), REF_STATS, REF_FEATURES, "pipeline/evaluate.py", "pipeline/metrics.py"],
                         [metrics(model)],
                         ["evaluate.pr_k", "evaluate.mode", "evaluate.inception"], "evaluate"))
    out.append(Stage("tables", "python -m pipeline.tables",
                     [metrics(m) for m in MODELS] + ["pipeline/tables.py"],
                     TABLES, [], "tables"))
    edited = cfg.edit.model
    out.append(Stage(f"edit_{edited}", "python -m pipeline.edit",
                     [checkpoint(edited), f"{DATA}/test.npz", REF_STATS, "pipeline/edit.py",
                      "pipeline/editing.py", "pipeline/metrics.py", "pipeline/data.py"] + CORE,
                     edit_outputs(edited),
                     ["diffusion", "edit", "evaluate.mode", "evaluate.inception"], "sample"))
    return out


def targets(cfg: Config) -> list[str]:
    """What `snakemake` with no target builds: the table and the editing figures."""
    return TABLES + edit_outputs(cfg.edit.model)


def dvc_yaml(cfg: Config, params_file: dict) -> str:
    """dvc.yaml text: every stage, tracking its params under the defaults and under every preset."""
    doc: dict = {"stages": {}}
    presets = params_file.get("presets", {}) or {}
    for stage in stages(cfg):
        tracked = ["preset"]
        for key in stage.params:
            tracked.append(key)
            for name, body in presets.items():
                node = body or {}
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None:
                    tracked.append(f"presets.{name}.{key}")
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
