"""The tables stage: the paper's Tables 1 and 2 from metrics files, every row present, every empty cell explained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import experiment
from pipeline.config import load as load_config
from pipeline.stages import metrics
from pipeline.tables import (
    PAPER,
    TABLE1_COLUMNS,
    TABLE2_COLUMNS,
    build_table1,
    build_table2,
    load_results,
    to_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
OURS = ["fid", "is", "kid", "precision", "recall", "num_samples", "sigmas", "training", "preset", "mlflow_run_id"]


def row(nfe: int, **overrides) -> dict:
    """One metrics row as pipeline.evaluate writes it."""
    return {"nfe": nfe, "num_samples": 100, "fid": 12.34567, "kid": 0.0123456, "is": 7.12345, "is_std": 0.1,
            "precision": 0.612345, "recall": 0.456789, "is_note": "", "pr_note": "",
            "sigmas": [80.0, 0.8210001][:nfe], **overrides}


def write(dataset: str, model: str, rows: list[dict], /, **extra) -> None:
    doc = {"model": model, "dataset": dataset, "preset": "tiny", "training": "l2, heun, N=18, 10 it",
           "mlflow_run_id": "a" * 32, "inception": "x", "mode": "legacy_tensorflow", "ref_images": 100,
           "pr_ref_images": 100, "pr_k": 3, "rows": rows, **extra}
    write_at(metrics_file(dataset, model), doc)


def write_at(path: str | Path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def metrics_file(dataset: str, model: str) -> Path:
    return Path("results/metrics") / dataset / f"{model}.json"


def load() -> dict:
    return load_results(sorted(Path("results/metrics").rglob("*.json")))


def keys(table: pd.DataFrame, *columns: str) -> list[tuple]:
    return [tuple(v) for v in table[list(columns)].itertuples(index=False)]


def empty(v) -> bool:
    return v is None or pd.isna(v) or v == ""


def assert_every_empty_cell_explained(table: pd.DataFrame) -> None:
    for r in table.to_dict("records"):
        notes = r["notes"]
        for name, value in r.items():
            if name in ("is_note", "pr_note", "notes") or not empty(value):
                continue
            reason = {"is": r.get("is_note"), "precision": r["pr_note"], "recall": r["pr_note"]}.get(name)
            if name == "kid":
                reason = r["pr_note"] or notes
            assert not empty(reason or notes), f"{r['method']} NFE {r['nfe']}: empty {name} without a reason"


@pytest.fixture(autouse=True)
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_without_metrics_both_tables_hold_every_paper_row_with_the_preset_to_run():
    t1, t2 = build_table1({}), build_table2({})
    assert list(t1.columns) == TABLE1_COLUMNS and list(t2.columns) == TABLE2_COLUMNS
    assert keys(t1, "method", "nfe") == [("EDM teacher", 35), ("CD", 1), ("CD", 2), ("CT", 1), ("CT", 2)]
    assert keys(t1, "paper_fid", "paper_is") == [(2.04, 9.84), (3.55, 9.48), (2.93, 9.75), (8.70, 8.49), (5.83, 8.85)]
    assert (t1.notes == "not run here: run the preset paper_cifar10").all()
    assert t1[OURS].map(empty).all().all()
    datasets = ["ImageNet 64x64", "LSUN Bedroom 256x256", "LSUN Cat 256x256"]
    assert keys(t2, "dataset", "method", "nfe") == [(d, m, n) for d in datasets for m in ("CD", "CT") for n in (1, 2)]
    assert keys(t2, "paper_fid", "paper_precision", "paper_recall")[:4] == [
        (6.20, 0.68, 0.63), (4.70, 0.69, 0.64), (13.0, 0.71, 0.47), (11.1, 0.69, 0.56)]
    assert list(t2.notes.unique()) == [f"not run here: run the preset paper_{d}"
                                       for d in ("imagenet64", "lsun_bedroom", "lsun_cat")]
    assert_every_empty_cell_explained(t1)
    assert_every_empty_cell_explained(t2)


def test_paper_values_match_paper_facts_fids():
    fids = {(d, m, n): v["fid"] for (d, m), rows in PAPER.items() for n, v in rows}
    assert fids[("lsun_bedroom", "cd", 1)] == 7.80 and fids[("lsun_bedroom", "ct", 2)] == 7.85
    assert fids[("lsun_cat", "cd", 2)] == 8.84 and fids[("lsun_cat", "ct", 1)] == 20.7
    assert fids[("imagenet64", "teacher", 79)] == 2.44


def test_our_numbers_are_copied_rounded_as_documented():
    write("cifar10", "cd", [row(1), row(2)])
    t1 = build_table1(load())
    cd = t1[t1.method == "CD"].reset_index(drop=True)
    assert keys(cd, "nfe", "paper_nfe") == [(1, 1), (2, 2)]
    assert cd.fid[0] == 12.346 and cd["is"][0] == 7.123 and cd.kid[0] == 0.012346
    assert cd.precision[0] == 0.6123 and cd.recall[0] == 0.4568 and cd.num_samples[0] == 100
    assert list(cd.sigmas) == ["80.0", "80.0, 0.821"]
    assert cd.training[0] == "l2, heun, N=18, 10 it" and cd.preset[0] == "tiny" and cd.mlflow_run_id[0] == "a" * 32
    assert (cd.notes == "").all() and (cd.is_note == "").all() and (cd.pr_note == "").all()
    csv = t1.to_csv(index=False)
    assert "CD,1,12.346,7.123,0.012346,0.6123,0.4568,1,3.55,9.48,100,80.0," in csv  # integers stay integers


def test_teacher_row_pairs_the_papers_35_nfe_with_our_sampler_whatever_its_nfe():
    write("cifar10", "teacher", [row(17, sigmas=[80.0 / 2**i for i in range(9)] + [0.002])])
    teacher = build_table1(load()).iloc[0]
    assert (teacher.method, teacher.nfe, teacher.paper_nfe, teacher.paper_fid) == ("EDM teacher", 17, 35, 2.04)
    assert teacher.sigmas == "80.0, 40.0, ..., 0.002 (10 times)"


def test_a_missing_nfe_and_an_extra_nfe_are_explained():
    write("cifar10", "ct", [row(1), row(4, sigmas=[80.0, 10.0, 2.0, 0.5])])
    ct = build_table1(load()).query("method == 'CT'").reset_index(drop=True)
    assert keys(ct, "nfe") == [(1,), (2,), (4,)]
    assert ct.notes[1] == "not sampled at 2 NFE here: results/metrics/cifar10/ct.json has NFE 1, 4"
    assert empty(ct.fid[1]) and ct.paper_fid[1] == 5.83
    assert ct.notes[2] == "the paper's table has no CT row at 4 NFE" and empty(ct.paper_fid[2])
    assert_every_empty_cell_explained(build_table1(load()))


def test_null_is_precision_and_old_files_are_explained():
    nulls = {"is": None, "is_std": None, "is_note": "IS unavailable: x",
             "precision": None, "recall": None, "pr_note": "precision/recall unavailable: k"}
    write("cifar10", "cd", [row(1, **nulls)])
    old = {k: v for k, v in row(1).items() if k not in ("kid", "precision", "recall", "pr_note", "sigmas")}
    write("cifar10", "ct", [old])  # written before KID, precision/recall and sampling times
    t1 = build_table1(load()).set_index(["method", "nfe"])
    cd, ct = t1.loc[("CD", 1)], t1.loc[("CT", 1)]
    assert empty(cd["is"]) and cd.is_note == "IS unavailable: x"
    assert empty(cd.precision) and cd.pr_note == "precision/recall unavailable: k"
    assert ct[["kid", "precision", "recall", "sigmas"]].map(empty).all()
    assert ct.pr_note == "not evaluated: results/metrics/cifar10/ct.json predates KID and precision/recall"
    assert ct.notes == "sampling times not recorded: results/metrics/cifar10/ct.json predates them"
    assert_every_empty_cell_explained(t1.reset_index())


def test_table2_takes_each_dataset_that_has_files_and_a_teacher_only_where_we_have_one():
    write("lsun_cat", "teacher", [row(79, sigmas=None)])
    write("lsun_cat", "cd", [row(1), row(2)])
    write("cifar10", "ct", [row(1)])  # other datasets' files do not leak into Table 2
    t2 = build_table2(load())
    cat = t2[t2.dataset == "LSUN Cat 256x256"].reset_index(drop=True)
    assert keys(cat, "method", "nfe") == [("EDM teacher", 79), ("CD", 1), ("CD", 2), ("CT", 1), ("CT", 2)]
    assert keys(cat, "paper_fid", "paper_precision", "paper_recall")[:3] == [
        (6.69, 0.70, 0.43), (11.0, 0.65, 0.36), (8.84, 0.66, 0.40)]
    assert cat.fid[1] == 12.346 and cat.precision[2] == 0.6123 and cat.sigmas[2] == "80.0, 0.821"
    assert cat.notes[3] == "not run here: run the preset paper_lsun_cat"
    assert not (t2.method == "EDM teacher").iloc[:8].any()
    assert_every_empty_cell_explained(t2)


def test_two_files_of_one_dataset_and_model_are_refused():
    write("imagenet64", "cd", [row(1)], dataset="cifar10")
    write("cifar10", "cd", [row(1)])
    with pytest.raises(ValueError, match="imagenet64/cd.json and .*cifar10/cd.json both hold cifar10/cd"):
        load()


def test_markdown_escapes_pipes_and_leaves_empty_cells_empty():
    md = to_markdown(pd.DataFrame({"a": pd.array([1, None], dtype="Int64"), "b": ["x|y", None]}))
    assert md.splitlines()[2:] == ["| 1 | x\\|y |", "|  |  |"]


def run_stage(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db"}
    result = subprocess.run([sys.executable, "-m", "pipeline.tables", "--config", "params.yaml", *args],
                            cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_stage_writes_and_logs_both_tables_of_its_experiment_and_publish_copies_them(workspace):
    (workspace / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    cfg = load_config(workspace / "params.yaml")
    write_at(metrics(cfg, "cd"), {**json.loads(json.dumps(DOC)), "rows": [row(1), row(2)]})
    write("imagenet64", "ct", [row(1), row(2)])  # another experiment's file: not this experiment's tables
    run_stage(workspace)
    tables = workspace / "results" / cfg.name / "tables"
    assert sorted(p.name for p in tables.iterdir()) == ["table1.csv", "table1.md", "table2.csv", "table2.md",
                                                         "table3.csv", "table3.md"]
    t1, t2 = pd.read_csv(tables / "table1.csv"), pd.read_csv(tables / "table2.csv")
    assert list(t1.columns) == TABLE1_COLUMNS and list(t2.columns) == TABLE2_COLUMNS
    assert len(t1) == 5 and len(t2) == 12 and t2.fid.isna().all()
    assert t1.set_index(["method", "nfe"]).loc[("CD", 2), "fid"] == 12.346
    assert (tables / "table2.md").read_text().startswith("Table 2: ImageNet 64x64")
    logged = {p.name for p in workspace.rglob("table*.*") if tables not in p.parents}
    assert logged == {"table1.csv", "table1.md", "table2.csv", "table2.md", "table3.csv", "table3.md"}  # MLflow
    t3 = pd.read_csv(tables / "table3.csv").set_index(["dataset", "method", "nfe"])
    assert tuple(t3.loc[("CIFAR-10 32x32", "CD", 2), ["fid", "published_fid"]]) == (12.346, 2.93)
    assert t3.loc[("CIFAR-10 32x32", "iCT", 1)].notes.startswith("not run here")
    run_stage(workspace, "--publish")
    for name in ("table1.csv", "table1.md", "table2.csv", "table2.md"):
        assert (workspace / "results/tables" / name).read_bytes() == (tables / name).read_bytes()
    assert not (workspace / "results/tables/table3.csv").exists()  # Table 3 of several experiments: its own stage


DOC = {"model": "cd", "dataset": "cifar10", "preset": "tiny", "training": "x", "mlflow_run_id": "b" * 32, "rows": []}


def test_compare_lines_up_the_experiments_of_params_yaml_with_the_knobs_they_differ_in(workspace):
    text = (ROOT / "params.yaml").read_text()
    assert "compare: [tiny, tiny_l1]" in text and "tiny_l1: {preset: tiny, set: {cd.metric: l1}}" in text
    (workspace / "params.yaml").write_text(text)
    tiny, l1 = (experiment(workspace / "params.yaml", n).load(workspace / "params.yaml") for n in ("tiny", "tiny_l1"))
    assert [metrics(tiny, m) == metrics(l1, m) for m in ("teacher", "cd", "ct")] == [True, False, True]  # shared
    for model, fid in (("teacher", 5.0), ("cd", 20.0), ("ct", 40.0)):
        write_at(metrics(tiny, model), DOC | {"model": model, "rows": [row(1, fid=fid)]})
    write_at(metrics(l1, "cd"), DOC | {"rows": [row(1, fid=30.0)]})
    run_stage(workspace, "--compare")
    table = pd.read_csv(workspace / "results/tables/compare.csv")
    assert keys(table, "experiment", "method", "fid") == [
        ("tiny", "EDM teacher", 5.0), ("tiny", "CD", 20.0), ("tiny", "CT", 40.0),
        ("tiny_l1", "EDM teacher", 5.0), ("tiny_l1", "CD", 30.0), ("tiny_l1", "CT", 40.0)]
    knobs = [c for c in table.columns if "." in c]
    assert knobs == ["cd.metric"] and table["cd.metric"].tolist() == ["l2"] * 3 + ["l1"] * 3  # run.name: not a knob
    assert "| tiny_l1 | tiny | cifar10 | CD |" in (workspace / "results/tables/compare.md").read_text()
