"""Named experiments in one workspace: stage keys, --config selection, outputs that coexist, shared stages run once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import copy_workspace, run, set_training_resources, workspace
from test_slurm import FAST_POLLING, PROFILE, _snakemake_cmd, slurm_cluster  # noqa: F401 (a fixture)

from pipeline.config import ConfigError, Experiment, experiment, load, selected
from pipeline.stages import checkpoint, data_dir, layout, metrics, old_layout, stages, tables_dir

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def keys(cfg) -> dict[str, str]:
    return {s.name: s.key for s in stages(cfg)}


def test_a_cd_knob_changes_the_keys_of_cd_and_what_reads_it_only():
    tiny, l1 = keys(load(PARAMS, "tiny")), keys(load(PARAMS, "tiny", ["cd.metric=l1", "run.name=tiny_l1"]))
    changed = {name for name in tiny if tiny[name] != l1[name]}
    ablations_of_cd = {n for n in tiny if n.startswith("ablate_cd_")}
    assert changed == {"distill_cd", "sample_cd", "evaluate_cd", "edit_cd", "figure3", "tables"} | (
        ablations_of_cd)  # ablation runs start from the cd section; tables: named by the experiment
    assert not ({"prepare_data", "reference_stats", "train_teacher", "train_ct", "sample_ct"} & changed)


def test_a_teacher_knob_reaches_everything_that_reads_the_teacher_and_the_data_source_nothing():
    base = keys(load(PARAMS, "tiny"))
    teacher = keys(load(PARAMS, "tiny", ["teacher.lr=1e-3"]))
    assert {n for n in base if base[n] != teacher[n]} >= {"train_teacher", "distill_cd", "train_ct", "sample_teacher",
                                                          "evaluate_cd", "edit_cd"}
    assert teacher["prepare_data"] == base["prepare_data"] and teacher["reference_stats"] == base["reference_stats"]
    assert keys(load(PARAMS, "tiny", ["data.source=/elsewhere", "data.workers=7"])) == base  # where, not what
    assert keys(load(PARAMS, "tiny", ["data.max_train=100"]))["prepare_data"] != base["prepare_data"]


def test_keys_are_a_sha256_of_the_stage_params_and_upstream_keys():
    cfg = load(PARAMS, "tiny")
    at = layout(cfg)
    assert len(at.keys["distill_cd"]) == 8 and int(at.keys["distill_cd"], 16) >= 0
    assert checkpoint(cfg, "cd") == f"checkpoints/cifar10/cd-{at.keys['distill_cd']}.pt"
    assert data_dir(cfg) == f"data/cifar10/{at.keys['prepare_data']}"
    assert tables_dir(cfg) == "results/tiny/tables"
    named = load(PARAMS, "tiny", ["run.paths=named", "run.name=mine"])
    assert checkpoint(named, "cd") == "checkpoints/mine/cd.pt" and data_dir(named) == "data/mine"
    assert metrics(named, "cd") == "results/mine/metrics/cd.json"


def test_every_output_of_two_experiments_is_either_shared_whole_or_apart():
    """Two stages of different experiments never write one file unless they are the same stage (same key)."""
    by_path: dict[str, tuple] = {}
    for name in ("tiny", "tiny_l1", "micro", "proof"):
        cfg = experiment(PARAMS, name).load(PARAMS)
        for stage in stages(cfg):
            for out in stage.outs:
                seen = by_path.setdefault(out, (stage.name, stage.key, stage.outs))
                assert seen == (stage.name, stage.key, stage.outs), out


def test_config_selects_an_experiment_a_preset_or_a_named_variant():
    assert selected(PARAMS, {}) == Experiment("tiny", None)
    assert selected(PARAMS, {"preset": "proof"}) == Experiment("proof", "proof")
    assert selected(PARAMS, {"experiment": "tiny_l1"}) == Experiment("tiny_l1", "tiny", ("cd.metric=l1",
                                                                                          "run.name=tiny_l1"))
    variant = selected(PARAMS, {"preset": "micro", "set": ["cd.N=9", "ct.lr=1e-4"], "name": "micro_N9"})
    assert variant.cli_args() == " --preset micro --set cd.N=9 --set ct.lr=1e-4 --set run.name=micro_N9"
    cfg = variant.load(PARAMS)
    assert (cfg.name, cfg.cd.N, cfg.ct.lr, cfg.preset) == ("micro_N9", 9, 1e-4, "micro")
    with pytest.raises(ConfigError, match="name this variant with name=NAME"):
        selected(PARAMS, {"set": ["cd.N=9"]})
    with pytest.raises(ConfigError, match="--config cd: unknown"):
        selected(PARAMS, {"cd": "x"})
    with pytest.raises(ConfigError, match="experiment=NAME selects a whole experiment"):
        selected(PARAMS, {"experiment": "tiny_l1", "set": ["cd.N=9"]})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        selected(PARAMS, {"set": ["cd.N"], "name": "x"})


def test_experiment_entries_and_names_are_checked(tmp_path):
    text = PARAMS.read_text()
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace("tiny_l1: {preset: tiny, set: {cd.metric: l1}}", "tiny_l1: {preset: tiny, knobs: 1}"))
    with pytest.raises(ConfigError, match=r"experiments.tiny_l1: expected \{preset: <name>, set:"):
        experiment(bad, "tiny_l1")
    with pytest.raises(ConfigError, match="run.name: letters, digits"):
        load(PARAMS, "tiny", ["run.name=a/b"])
    with pytest.raises(ConfigError, match="run.name: letters, digits"):
        load(PARAMS, "tiny", ["run.name=tables"])


def test_a_checkpoint_of_the_old_layout_gets_one_line_saying_where_it_now_goes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(PARAMS, "tiny")
    assert old_layout(cfg) == []
    (tmp_path / "checkpoints/cifar10").mkdir(parents=True)
    (tmp_path / "checkpoints/cifar10/cd.pt").write_bytes(b"x")
    assert old_layout(cfg) == [f"checkpoints/cifar10/cd.pt: a checkpoint of the layout before named experiments; "
                               f"experiment tiny now reads and writes {checkpoint(cfg, 'cd')} (mv it there to keep it "
                               "if its params are this experiment's; samples and metrics are recomputed)"]


def _env_without_slurm(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_", "SNAKEMAKE_"))}


@pytest.mark.slow
def test_a_named_variant_beside_the_preset_shares_its_upstream_stages_and_keeps_both(micro_dag, tmp_path):
    """micro (built by conftest.micro_dag) and micro with CD's metric l1, named micro_l1, in one workspace."""
    ws, env = copy_workspace(*micro_dag, tmp_path / "two")
    base = load(ws / "params.yaml", "micro")
    variant = load(ws / "params.yaml", "micro", ["cd.metric=l1", "run.name=micro_l1"])
    shared = [p for s in stages(base) if s.name in ("prepare_data", "reference_stats", "train_teacher", "train_ct",
                                                     "sample_teacher", "sample_ct", "evaluate_teacher", "evaluate_ct")
              for p in s.outs]
    before = {p: (ws / p).stat().st_mtime_ns for p in shared}
    config = ["--config", "preset=micro", 'set=["cd.metric=l1"]', "name=micro_l1"]
    target = f"{tables_dir(variant)}/table1.csv"
    out = run([sys.executable, "-m", "snakemake", "--cores", "2", target, *config], ws, env)  # --config: last
    ran = {line.split()[1].rstrip(":") for line in out.stderr.splitlines() if line.startswith(("rule ", "localrule "))}
    assert ran == {"distill_cd", "search_cd", "sample_cd", "evaluate_cd", "tables"}, out.stderr[-3000:]
    assert {p: (ws / p).stat().st_mtime_ns for p in shared} == before  # the teacher, CT, data: not touched
    # Both CD checkpoints, trained with their own metric (the --set reached the job), and both tables.
    mine, theirs = (torch.load(ws / checkpoint(c, "cd"), map_location="cpu", weights_only=False)
                    for c in (variant, base))
    assert mine["config"]["cd"]["metric"] == "l1" and theirs["config"]["cd"]["metric"] == "l2"
    assert mine["config"]["run"]["name"] == "micro_l1"
    t_base, t_variant = (pd.read_csv(ws / tables_dir(c) / "table1.csv") for c in (base, variant))
    assert t_base.fid[0] == t_variant.fid[0] and t_base.fid[3] == t_variant.fid[3]  # one teacher, one CT
    assert t_base.fid[1] != t_variant.fid[1]  # two CDs
    again = run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", target, *config], ws, env)
    assert "Nothing to be done" in again.stdout + again.stderr  # a re-run re-does nothing
    first = run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", f"{tables_dir(base)}/table1.csv"], ws, env)
    assert "Nothing to be done" in first.stdout + first.stderr  # and the preset's own outputs are still current
    # MLflow: the variant's runs carry the values they used, under the variant's name.
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["consistency-models"])
    every = runs[runs["tags.experiment"] == "micro_l1"]
    parent, mine = every[every["tags.role"] == "experiment"], every[every["tags.role"] != "experiment"]
    mine = mine.set_index("tags.stage")
    assert len(parent) == 1 and set(mine.index) == ran  # the variant's runs, under its own parent run
    assert (mine["tags.mlflow.parentRunId"] == parent.run_id.iloc[0]).all()
    assert mine.loc["distill_cd", "params.cd.metric"] == "l1"
    assert json.loads((ws / metrics(variant, "cd")).read_text())["mlflow_run_id"] == mine.loc["evaluate_cd", "run_id"]


@pytest.mark.slow
def test_the_micro_dags_of_ict_and_ect_train_on_two_processes_and_fill_table3_beside_micro(micro_dag, tmp_path):
    """ict_cifar10 and ect_cifar10 at micro size beside micro (conftest.micro_dag) in one workspace: Table 3 of the
    three experiments, iCT and ECT trained by 2 processes; the data and reference statistics are micro's."""
    ws, env = copy_workspace(*micro_dag, tmp_path / "beyond")
    set_training_resources(ws, stages=("train_ict", "train_ect"), processes=2)
    names = ["micro", "ict_cifar10+micro", "ect_cifar10+micro"]
    cfgs = {n: load(ws / "params.yaml", n) for n in names}
    shared = [p for s in stages(cfgs["micro"]) if s.name in ("prepare_data", "reference_stats") for p in s.outs]
    before = {p: (ws / p).stat().st_mtime_ns for p in shared}
    config = ["--config", "table3=" + json.dumps(names)]
    out = run([sys.executable, "-m", "snakemake", "--cores", "2", "results/tables/table3.csv", *config], ws, env)
    ran = {line.split()[1].rstrip(":") for line in out.stderr.splitlines() if line.startswith(("rule ", "localrule "))}
    assert ran == {"train_ict__ict_cifar10_micro", "sample_ict__ict_cifar10_micro", "evaluate_ict__ict_cifar10_micro",
                   "train_teacher__ect_cifar10_micro", "train_ect__ect_cifar10_micro",
                   "sample_teacher__ect_cifar10_micro", "sample_ect__ect_cifar10_micro",
                   "evaluate_teacher__ect_cifar10_micro", "evaluate_ect__ect_cifar10_micro", "table3"}, ran
    assert {p: (ws / p).stat().st_mtime_ns for p in shared} == before  # micro's data and reference statistics
    for name, kind in (("ict_cifar10+micro", "ict"), ("ect_cifar10+micro", "ect")):
        ckpt = torch.load(ws / checkpoint(cfgs[name], kind), map_location="cpu", weights_only=False)
        assert (ckpt["kind"], ckpt["world_size"], ckpt["step"]) == (kind, 2, 3)
    teacher = torch.load(ws / checkpoint(cfgs["ect_cifar10+micro"], "teacher"), map_location="cpu", weights_only=False)
    assert teacher["network"]["arch"] == "ddpmpp"  # ECT's own (DDPM++) teacher
    table = pd.read_csv(ws / "results/tables/table3.csv")
    cifar = table[table.dataset == "CIFAR-10 32x32"].set_index(["method", "nfe"])
    assert list(cifar.index) == [(m, n) for m in ("CD", "CT", "iCT", "ECT") for n in (1, 2)]
    assert cifar.fid.notna().all() and (cifar.published_fid > 0).all()  # ours beside each published FID
    assert cifar.loc[("ECT", 2), "published_fid"] == 2.11 and cifar.loc[("iCT", 1), "published_fid"] == 2.83
    assert set(cifar.preset) == {"micro", "ict_cifar10+micro", "ect_cifar10+micro"}
    imagenet = table[table.dataset == "ImageNet 64x64"]
    assert imagenet.fid.isna().all() and imagenet.notes.str.startswith("not run here").all()
    again = run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "results/tables/table3.csv", *config],
                ws, env)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_config_reaches_a_job_submitted_through_slurm(slurm_cluster, tmp_path):  # noqa: F811
    ws, env = workspace(tmp_path)
    small = load(ws / "params.yaml", "micro", ["data.max_train=5", "run.name=micro_small"])
    manifest = f"{data_dir(small)}/manifest.json"
    assert manifest != f"{data_dir(load(ws / 'params.yaml', 'micro'))}/manifest.json"
    proc = subprocess.run([*_snakemake_cmd(), "--profile", str(PROFILE), "--slurm-no-account", *FAST_POLLING,
                           manifest, "--config", "preset=micro", 'set=["data.max_train=5"]', "name=micro_small"],
                          cwd=ws, capture_output=True, text=True, timeout=600, env=_env_without_slurm(env))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "submitted with SLURM jobid" in log, log[-3000:]
    assert json.loads((ws / manifest).read_text())["splits"]["train"]["count"] == 5
