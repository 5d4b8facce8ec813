"""The whole DAG at micro size, in a temporary directory: Snakemake, DVC and MLflow for real."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import copy_workspace, make_class_folders, run, set_training_resources, workspace
from PIL import Image

from pipeline.config import compare_names, experiment, load
from pipeline.prepare_data import read_class_folders
from pipeline.stages import (
    EDIT_TASKS,
    ablation_result,
    checkpoint,
    dvc_yaml,
    edit_figure,
    figure3,
    loss_figure,
    metrics,
    ref_features,
    ref_stats,
    sample_grid,
    search_figure,
    stages,
    summary,
    tables_dir,
    two_step,
)

ROOT = Path(__file__).resolve().parents[1]


def test_class_folders_and_tarball_round_trip(tmp_path):
    originals = make_class_folders(tmp_path / "cifar", {"train": 3, "test": 2})
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar", arcname="CIFAR-10-images")
    for source in (tmp_path / "cifar", archive):
        splits = read_class_folders(source)
        for split in ("train", "test"):
            images, labels = splits[split]
            np.testing.assert_array_equal(images, originals[split])  # PNG is lossless
            assert labels.tolist() == [c for c in range(10) for _ in range({"train": 3, "test": 2}[split])]


def test_unknown_class_folder_is_named(tmp_path):
    make_class_folders(tmp_path, {"train": 1, "test": 1})
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "train" / "unicorn").mkdir()
    (tmp_path / "train" / "unicorn" / "0.png").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="unknown class folder 'unicorn'"):
        read_class_folders(tmp_path)


def test_committed_dvc_yaml_is_generated_from_the_stages():
    cfg = load(ROOT / "params.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(cfg, params), "regenerate it: make dvc.yaml"


def test_snakefile_rules_are_the_stages():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--list-rules"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "CIFAR10_SOURCE": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    rules = set(result.stdout.split())
    expected, seen = {"all", "publish", "compare", "table3"}, set()
    # tiny (selected), compare:'s tiny_l1, then table3:'s experiments; a stage seen before is the same rule
    for name in ["tiny", "tiny_l1", *compare_names(ROOT / "params.yaml", "table3")]:
        for s in stages(experiment(ROOT / "params.yaml", name).load(ROOT / "params.yaml")):
            if s.outs[0] not in seen:
                seen.add(s.outs[0])
                expected.add(s.name if name == "tiny" else f"{s.name}__{name}")
    assert rules == expected
    assert "distill_cd__tiny_l1" in rules and "train_teacher__tiny_l1" not in rules
    assert "train_ict__ict_cifar10" in rules and "import_teacher__ect_cifar10" in rules


# --- end to end ---------------------------------------------------------------------------------


def dry_run_jobs(ws: Path, env: dict) -> set[str]:
    out = run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], ws, env)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()} - {"all"}


def check_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    assert list(zip(table.method, table.nfe)) == [("EDM teacher", 5), ("CD", 1), ("CD", 2), ("CT", 1), ("CT", 2)]
    assert all(math.isfinite(v) and v > 0 for v in table.fid)
    assert table.paper_fid.tolist() == [2.04, 3.55, 2.93, 8.70, 5.83]
    assert table.mlflow_run_id.str.fullmatch(r"[0-9a-f]{32}").all()
    assert table["is"].isna().all() and table.is_note.str.contains("IS unavailable").all()  # offline weights
    assert table.kid.notna().all() and table.precision.between(0, 1).all() and table.recall.between(0, 1).all()
    return table


def check_table2_explains_what_was_not_run(path: Path) -> None:
    table = pd.read_csv(path)
    assert set(table.dataset) == {"ImageNet 64x64", "LSUN Bedroom 256x256", "LSUN Cat 256x256"}
    assert table.paper_fid.notna().all() and table.paper_precision.notna().all()
    assert table.fid.isna().all() and table.notes.str.contains("not run here: run the preset paper_").all()


@pytest.mark.slow
def test_snakemake_runs_the_whole_dag_into_tables_figures_and_the_two_step_search(micro_dag):
    """The micro DAG is built once by Snakemake (conftest.micro_dag); this test and the two below read it."""
    ws, _ = micro_dag
    cfg = load(ws / "params.yaml", "micro")
    table = check_table(ws / "results/tables/table1.csv")
    assert (ws / "results/tables/table1.md").read_text().count("| method | nfe | fid |") == 1
    assert (ws / "results/tables/table1.md").read_bytes() == (ws / tables_dir(cfg) / "table1.md").read_bytes()
    check_table2_explains_what_was_not_run(ws / "results/tables/table2.csv")
    reference = np.load(ws / ref_stats(cfg))
    features = np.load(ws / ref_features(cfg))  # the same Inception pass as mu (micro: 16 and 16)
    assert features.shape == (16, 2048) and np.allclose(features.mean(axis=0), reference["mu"], atol=1e-5)
    figures = ([sample_grid(cfg, m) for m in ("teacher", "cd", "ct")] + [loss_figure(cfg, m) for m in
               ("teacher", "cd", "ct")] + [search_figure(cfg, m) for m in ("cd", "ct")]
               + [edit_figure(cfg, task) for task in EDIT_TASKS] + figure3(cfg))
    assert len(figure3(cfg)) == 3
    for figure in figures:
        assert (ws / figure).stat().st_size > 1000
    # The 2-step rows use the searched time: a level of the CD grid (N = 18), chosen among the probes.
    search = json.loads((ws / two_step(cfg, "cd")).read_text())
    assert 1 <= search["index"] <= 16 and search["fid"] == min(p["fid"] for p in search["probes"])
    assert table.sigmas[2] == f"80.0, {search['sigma']:.4g}"


@pytest.mark.slow
def test_a_second_run_reruns_nothing_and_a_changed_param_only_its_stages(micro_dag, tmp_path):
    ws, env = micro_dag
    assert dry_run_jobs(ws, env) == set()  # a second run re-runs nothing
    ws, env = copy_workspace(ws, env, tmp_path / "changed")
    params = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(params.replace("ct: {iterations: 3, batch: 4,", "ct: {iterations: 3, batch: 5,"))
    assert dry_run_jobs(ws, env) == {"train_ct", "search_ct", "sample_ct", "evaluate_ct", "tables", "publish"}


@pytest.mark.slow
def test_mlflow_holds_every_stage_run_with_its_params_metrics_and_the_figure3_history(micro_dag):
    import mlflow

    ws, env = micro_dag
    table = pd.read_csv(ws / "results/tables/table1.csv")
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    every = mlflow.search_runs(experiment_names=["consistency-models"])
    parent = every[every["tags.role"] == "experiment"]
    runs = every[every["tags.role"] != "experiment"]
    assert parent["tags.mlflow.runName"].tolist() == ["micro"]  # one parent run holds the experiment's runs
    assert (runs["tags.mlflow.parentRunId"] == parent.run_id.iloc[0]).all()
    assert (runs["tags.experiment"] == "micro").all() and (runs["tags.dataset"] == "cifar10").all()
    assert sorted(runs["tags.stage"]) == sorted(s.name for s in stages(load(ws / "params.yaml", "micro")))
    assert (runs["status"] == "FINISHED").all() and (runs["tags.preset"] == "micro").all()
    own = runs[runs["tags.ablation"] != "figure3"]  # the ablation runs log their own knobs (below)
    assert (own["params.ct.s1"] == "10").all() and (own["params.cd.solver"] == "heun").all()
    by_stage = runs.set_index("tags.stage")
    assert by_stage.loc["evaluate_cd", "metrics.fid_nfe2"] == pytest.approx(table.fid[2], abs=1e-3)
    assert by_stage.loc["evaluate_cd", "metrics.recall_nfe2"] == pytest.approx(table.recall[2], abs=1e-4)
    assert by_stage.loc["evaluate_cd", "metrics.kid_nfe2"] == pytest.approx(table.kid[2], abs=1e-6)
    assert by_stage.loc["train_ct", "metrics.loss"] > 0 and by_stage.loc["train_ct", "metrics.N"] >= 2
    assert set(table.mlflow_run_id) <= set(runs.run_id)
    # Figure 3: one MLflow run per ablation run, tagged so the UI groups them; FID logged per iteration.
    ablations = runs[runs["tags.ablation"] == "figure3"].set_index("tags.stage")
    assert set(ablations.index) == {"ablate_cd_l1", "ablate_cd_l2", "ablate_cd_euler_N9", "ablate_ct_fixed_N18",
                                    "ablate_ct_adaptive", "figure3"}
    assert ablations.loc["ablate_cd_euler_N9", "tags.knob.solver"] == "euler"
    # Each logs the values it trained with: the compare view lines them up on the knobs that differ.
    assert ablations.loc["ablate_cd_euler_N9", ["params.cd.solver", "params.cd.N"]].tolist() == ["euler", "9"]
    assert ablations.loc["ablate_cd_l1", "params.cd.metric"] == "l1" != ablations.loc["ablate_cd_l2",
                                                                                        "params.cd.metric"]
    assert ablations.loc["ablate_cd_l2", "tags.panels"] == "a_metric,b_solver"
    history = mlflow.MlflowClient().get_metric_history(ablations.loc["ablate_ct_fixed_N18", "run_id"], "fid_1step")
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    result = json.loads((ws / ablation_result(load(ws / "params.yaml", "micro"), "ct_fixed_N18")).read_text())
    assert [e["iteration"] for e in result["evaluations"]] == [1, 2]
    assert result["section"]["schedule"] == "fixed" and result["section"]["s1"] == 17


def _git(ws, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=ws, check=True,
                   capture_output=True)


@pytest.mark.slow
def test_dvc_repro_then_push_clone_pull_and_one_param_change(tmp_path):
    """dvc repro builds the same DAG; push to a local remote, clone, pull: neither DVC nor Snakemake has anything
    to do; then one param changes, and each re-runs exactly the stages that depend on it. Paths named (DVC keeps
    its experiments apart itself): `dvc exp run -S` then lists both experiments' FID."""
    ws, env = workspace(tmp_path)
    text = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(text.replace("\n  paths: keyed ", "\n  paths: named ", 1))
    run([sys.executable, "-m", "pipeline.stages", "--dvc"], ws, env)
    _git(ws, "init", "-q")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "code")
    run(["dvc", "init", "-q"], ws, env)
    out = run(["dvc", "repro", "tables"], ws, env)  # the tables' ancestry; Snakemake's test runs the rest
    cfg = load(ws / "params.yaml", "micro")
    assert cfg.run.paths == "named" and tables_dir(cfg) == "results/micro/tables"
    names = [s.name for s in stages(cfg)]
    ran = {name for name in names if f"Running stage '{name}'" in out.stdout}
    assert ran == {n for n in names if not n.startswith(("edit_", "ablate_", "figure3"))}
    check_table(ws / tables_dir(cfg) / "table1.csv")
    again = run(["dvc", "repro", "tables"], ws, env)
    assert "Running stage" not in again.stdout

    run([sys.executable, "-m", "pipeline.versions", "push"], ws, env)  # dvc.remote: ../consistency-models-dvc
    assert (tmp_path / "consistency-models-dvc/files").is_dir()
    _git(ws, "add", "dvc.lock", ".dvc", ".dvcignore", *[str(p.relative_to(ws)) for p in ws.rglob(".gitignore")])
    _git(ws, "commit", "-qm", "run")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(ws), str(clone))
    clone_env = {**env, "PYTHONPATH": str(clone)}
    ct = checkpoint(cfg, "ct")
    assert ct == "checkpoints/micro/ct.pt" and not (clone / ct).exists()
    run([sys.executable, "-m", "pipeline.versions", "pull"], clone, clone_env)
    assert (clone / ct).read_bytes() == (ws / ct).read_bytes()
    assert "Data and pipelines are up to date." in run(["dvc", "status", "--with-deps", "tables"], clone,
                                                        clone_env).stdout
    dry = run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", f"{tables_dir(cfg)}/table1.csv"], clone,
              clone_env)
    assert "Nothing to be done" in dry.stdout + dry.stderr

    # One param: the stages that name it, then (Snakemake) everything downstream of them.
    params = (clone / "params.yaml").read_text()
    assert "\n  pr_k: 3 " in params
    (clone / "params.yaml").write_text(params.replace("\n  pr_k: 3 ", "\n  pr_k: 2 ", 1))
    direct = {s.name for s in stages(cfg) if any(p in ("evaluate", "evaluate.pr_k") for p in s.params)} & ran
    downstream, outs = set(direct), {o for s in stages(cfg) if s.name in direct for o in s.outs}
    for s in stages(cfg):  # stages() is in DAG order
        if s.name in ran and outs & set(s.deps):
            downstream.add(s.name)
            outs |= set(s.outs)
    assert direct == {"evaluate_teacher", "evaluate_cd", "evaluate_ct"} and downstream == direct | {"tables"}
    dvc_dry = run(["dvc", "repro", "--dry", "tables"], clone, clone_env).stdout
    assert {n for n in names if f"Running stage '{n}'" in dvc_dry} == direct  # DVC: downstream once outputs change
    dry = run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", f"{tables_dir(cfg)}/table1.csv"], clone,
              clone_env)
    assert {line.split()[1].rstrip(":") for line in dry.stdout.splitlines() if line.startswith("rule ")} == downstream

    # DVC's own comparison: an experiment with one knob changed, beside the baseline, FID from the flat metrics.
    exp = run(["dvc", "exp", "run", "-n", "cd_l1", "-S", "presets.micro.cd.metric=l1", "tables"], ws, env)
    assert {n for n in names if f"Running stage '{n}'" in exp.stdout} == {
        "distill_cd", "search_cd", "sample_cd", "evaluate_cd", "tables"}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], ws, env).stdout)
    fids = {}
    for commit in shown:
        for entry in [commit] + [e for group in commit.get("experiments") or [] for e in group.get("revs", [])]:
            data = entry.get("data") or {}
            values = ((data.get("metrics") or {}).get(summary(cfg, "cd")) or {}).get("data") or {}
            if "fid_nfe1" in values:
                fids[data.get("name") or entry.get("name") or data.get("rev")] = values["fid_nfe1"]
    fids.pop("workspace", None)  # the files on disk: the last experiment's
    assert len(fids) == 2 and "cd_l1" in fids and len(set(fids.values())) == 2, fids  # the baseline's and cd_l1's
    table = run(["dvc", "exp", "show", "--csv", "--only-changed"], ws, env).stdout
    assert "fid_nfe1" in table.splitlines()[0] and "cd_l1" in table, table


# --- named experiments on the same micro DAG (here, not in test_experiments.py: one build of micro_dag per file) ---

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
                   "train_teacher__ect_cifar10_micro", "train_ect__ect_cifar10_micro",  # table3 reads no teacher
                   "sample_ect__ect_cifar10_micro", "evaluate_ect__ect_cifar10_micro", "table3"}, ran
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
