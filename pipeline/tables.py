"""Stage tables: the paper's Table 1 (CIFAR-10) and Table 2 (ImageNet 64, LSUN Bedroom and Cat 256), ours beside
the paper's.

    python -m pipeline.tables [--config params.yaml]

Reads the experiment's metrics of each model and writes results/<experiment>/tables/table{1,2,3}.{csv,md};
--publish copies tables 1 and 2 to results/tables/ (the experiment params.yaml or --config selects); --compare
writes results/tables/compare.{csv,md}, one row per (experiment, model, sample set) of params.yaml's `compare:`
list with the knobs on which they differ; --table3 NAME ... writes results/tables/table3.{csv,md} from the results
of those experiments (params.yaml's `table3:`): CD, CT, iCT and ECT beside their published FIDs. Tables 1 and 2
always have every row of the paper: a (dataset, model) that was not run here keeps the paper's values, with our
cells empty and the preset to run named in `notes`. Every empty cell has its reason in is_note, pr_note or notes.

Rounding: FID and IS to 3 decimals, KID to 6, precision and recall to 4; sampling times to 4 significant digits.
The paper's CD uses LPIPS; ours uses the metric in params.yaml, named in `training`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

from pipeline import tracking
from pipeline.config import MODELS, Config, add_arguments, compare_names, experiment, from_args
from pipeline.data import write_bytes, write_text
from pipeline.datasets import DATASETS

TABLES_DIR = "results/tables"
TABLE1_MODELS = ("teacher", "cd", "ct")
TABLE2_DATASETS = ("imagenet64", "lsun_bedroom", "lsun_cat")
METHOD = {"teacher": "EDM teacher", "cd": "CD", "ct": "CT", "ict": "iCT", "ect": "ECT"}
DATASET_NAME = {"cifar10": "CIFAR-10", "imagenet64": "ImageNet", "lsun_bedroom": "LSUN Bedroom", "lsun_cat": "LSUN Cat"}

# The paper's numbers (Song et al., ICML 2023, arXiv 2303.01469), per (dataset, model): [(nfe, values)].
# FID: Tables 1 and 2, as in the project notes (paper-facts.md). Table 1's IS (EDM 9.84 at 35 NFE; CD 9.48, 9.75;
# CT 8.49, 8.85) and Table 2's precision/recall were checked against two public transcriptions of the paper's tables
# (found with the search tool's code corpus, index files 56764211201 and 70956430801): a Markdown rendering of the
# whole paper, with every row of both tables, and a review quoting every Table 1 row used here and Table 2's 1-step
# and EDM rows. Both agree with each other and with paper-facts.md on every FID, including the LSUN rows that
# paper-facts.md marks "verify". Not cross-checked: the 2-step precision/recall of Table 2 (CD and CT on all three
# datasets) appear in the first transcription only. The paper's CD rows are CD (LPIPS); its EDM rows in Table 2 are
# the teachers (79 NFE), shown only where we have a teacher of our own for that dataset.
PAPER: dict[tuple[str, str], list[tuple[int, dict]]] = {
    ("cifar10", "teacher"): [(35, {"fid": 2.04, "is": 9.84})],
    ("cifar10", "cd"): [(1, {"fid": 3.55, "is": 9.48}), (2, {"fid": 2.93, "is": 9.75})],
    ("cifar10", "ct"): [(1, {"fid": 8.70, "is": 8.49}), (2, {"fid": 5.83, "is": 8.85})],
    ("imagenet64", "teacher"): [(79, {"fid": 2.44, "precision": 0.71, "recall": 0.67})],
    ("imagenet64", "cd"): [(1, {"fid": 6.20, "precision": 0.68, "recall": 0.63}),
                           (2, {"fid": 4.70, "precision": 0.69, "recall": 0.64})],
    ("imagenet64", "ct"): [(1, {"fid": 13.0, "precision": 0.71, "recall": 0.47}),
                           (2, {"fid": 11.1, "precision": 0.69, "recall": 0.56})],
    ("lsun_bedroom", "teacher"): [(79, {"fid": 3.57, "precision": 0.66, "recall": 0.45})],
    ("lsun_bedroom", "cd"): [(1, {"fid": 7.80, "precision": 0.66, "recall": 0.34}),
                             (2, {"fid": 5.22, "precision": 0.68, "recall": 0.39})],
    ("lsun_bedroom", "ct"): [(1, {"fid": 16.0, "precision": 0.60, "recall": 0.17}),
                             (2, {"fid": 7.85, "precision": 0.68, "recall": 0.33})],
    ("lsun_cat", "teacher"): [(79, {"fid": 6.69, "precision": 0.70, "recall": 0.43})],
    ("lsun_cat", "cd"): [(1, {"fid": 11.0, "precision": 0.65, "recall": 0.36}),
                         (2, {"fid": 8.84, "precision": 0.66, "recall": 0.40})],
    ("lsun_cat", "ct"): [(1, {"fid": 20.7, "precision": 0.56, "recall": 0.23}),
                         (2, {"fid": 11.7, "precision": 0.63, "recall": 0.36})],
}

OURS = {"fid": 3, "kid": 6, "is": 3, "precision": 4, "recall": 4}  # metric: decimals kept
RUN = ["num_samples", "sigmas", "training", "preset"]
TABLE1_COLUMNS = (["method", "nfe", "fid", "is", "kid", "precision", "recall", "paper_nfe", "paper_fid", "paper_is"]
                  + RUN + ["is_note", "pr_note", "notes", "mlflow_run_id"])
TABLE2_COLUMNS = (["dataset", "method", "nfe", "fid", "kid", "precision", "recall", "paper_nfe", "paper_fid",
                   "paper_precision", "paper_recall"] + RUN + ["pr_note", "notes", "mlflow_run_id"])
INTEGER_COLUMNS = ("nfe", "paper_nfe", "num_samples")

NOT_RUN = "not run here: run the preset paper_{}"
NOT_SAMPLED = "not sampled at {} NFE here: {} has NFE {}"
NO_PAPER_ROW = "the paper's table has no {} row at {} NFE"
NOT_EVALUATED = "not evaluated: {} predates KID and precision/recall"
NO_SIGMAS = "sampling times not recorded: {} predates them"
NO_VALUE = "{} not recorded in {}"


def load_results(paths: list[str | Path]) -> dict[tuple[str, str], dict]:
    """{(dataset, model): metrics JSON} of the metrics files that exist; each gets its path as `path`."""
    results = {}
    for path in map(Path, paths):
        if path.exists():
            result = json.loads(path.read_text())
            held = (result["dataset"], result["model"])
            if held in results:
                raise ValueError(f"{path} and {results[held]['path']} both hold {held[0]}/{held[1]}")
            results[held] = {**result, "path": str(path)}
    return results


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _times(sigmas: list[float] | None) -> str | None:
    """The sampling times, e.g. '80.0, 0.821'; a long (Heun) grid as its ends and length."""
    if sigmas is None:
        return None
    times = [repr(float(f"{s:.4g}")) for s in sigmas]
    return ", ".join(times) if len(times) <= 4 else f"{times[0]}, {times[1]}, ..., {times[-1]} ({len(times)} times)"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _ours(result: dict, row: dict) -> dict:
    """Our cells of one metrics row, with the reason for each empty one."""
    path = result["path"]
    cells = {name: _rounded(row.get(name), digits) for name, digits in OURS.items()}
    cells |= {"nfe": row["nfe"], "num_samples": row.get("num_samples"), "sigmas": _times(row.get("sigmas")),
              "training": result.get("training"), "preset": result.get("preset"),
              "mlflow_run_id": result.get("mlflow_run_id"),
              "is_note": row.get("is_note") or "", "pr_note": row.get("pr_note") or "", "notes": ""}
    if "kid" not in row:  # written before KID and precision/recall
        cells["pr_note"] = NOT_EVALUATED.format(path)
    if "sigmas" not in row:
        cells["notes"] = NO_SIGMAS.format(path)
    if cells["is"] is None and not cells["is_note"]:
        cells["is_note"] = NO_VALUE.format("IS", path)
    if (cells["precision"] is None or cells["recall"] is None) and not cells["pr_note"]:
        cells["pr_note"] = NO_VALUE.format("precision/recall", path)
    missing = [k for k in ("fid", "kid", "num_samples", "sigmas", "training", "preset", "mlflow_run_id")
               if cells[k] is None and (k in row or k not in ("kid", "sigmas"))]  # absent ones: see above
    if missing:
        cells["notes"] = _join(cells["notes"], NO_VALUE.format(", ".join(missing), path))
    return cells


def _paper(nfe: int | None, values: dict | None) -> dict:
    return {"paper_nfe": nfe} | {f"paper_{k}": v for k, v in (values or {}).items()}


def model_rows(dataset: str, model: str, result: dict | None) -> list[dict]:
    """The rows of one (dataset, model): the paper's NFEs first, then any other NFE we sampled.

    CD and CT rows pair by NFE (the number of steps). The teacher's one paper row pairs with our teacher row of the
    most NFE (its full sampler), whatever that is.
    """
    paper = PAPER.get((dataset, model), [])
    method = {"method": METHOD[model]}
    if result is None:
        note = NOT_RUN.format(dataset)
        return [method | {"nfe": nfe, "notes": note} | _paper(nfe, values) for nfe, values in paper]
    ours = {row["nfe"]: row for row in result["rows"] if "sampler" not in row}  # the teacher's few-step rows: not here
    if model == "teacher" and paper and ours:
        pairs = {paper[0][0]: max(ours)}
    else:
        pairs = {nfe: nfe for nfe, _ in paper if nfe in ours}
    rows = []
    for nfe, values in paper:
        if nfe in pairs:
            rows.append(method | _ours(result, ours[pairs[nfe]]) | _paper(nfe, values))
        else:
            note = NOT_SAMPLED.format(nfe, result["path"], ", ".join(map(str, sorted(ours))) or "none")
            rows.append(method | {"nfe": nfe, "notes": note} | _paper(nfe, values))
    for nfe in sorted(set(ours) - set(pairs.values())):
        cells = _ours(result, ours[nfe])
        rows.append(method | cells | {"notes": _join(NO_PAPER_ROW.format(METHOD[model], nfe), cells["notes"])})
    return rows


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    table = pd.DataFrame([{"is_note": "", "pr_note": "", "notes": ""} | row for row in rows], columns=columns)
    for name in (c for c in INTEGER_COLUMNS if c in columns):
        table[name] = table[name].astype("Int64")  # not 1.0 beside an empty cell
    return table


def build_table1(results: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """CIFAR-10: EDM teacher, CD and CT at 1 and 2 NFE (and any other NFE we sampled)."""
    rows = [row for model in TABLE1_MODELS for row in model_rows("cifar10", model, results.get(("cifar10", model)))]
    return _frame(rows, TABLE1_COLUMNS)


def build_table2(results: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """ImageNet 64, LSUN Bedroom and Cat 256: CD and CT at 1 and 2 NFE; the teacher where we have one."""
    rows = []
    for dataset in TABLE2_DATASETS:
        size = DATASETS[dataset].resolution
        name = {"dataset": f"{DATASET_NAME[dataset]} {size}x{size}"}
        for model in TABLE1_MODELS:
            result = results.get((dataset, model))
            if model != "teacher" or result is not None:
                rows += [name | row for row in model_rows(dataset, model, result)]
    return _frame(rows, TABLE2_COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (without pandas' optional tabulate dependency)."""
    def cell(v):
        return "" if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# Table 3, beyond the paper: published FIDs per (dataset, model), {nfe: fid}, and where each comes from.
PUBLISHED: dict[tuple[str, str], tuple[dict[int, float], str]] = {
    ("cifar10", "cd"): ({1: 3.55, 2: 2.93}, "Song et al. 2023, Table 1 (CD with LPIPS)"),
    ("cifar10", "ct"): ({1: 8.70, 2: 5.83}, "Song et al. 2023, Table 1"),
    ("cifar10", "ict"): ({1: 2.83, 2: 2.46}, "Song & Dhariwal 2024 (iCT), Table 2, as reproduced in Lu & Song 2025 "
                                             "Table 1; iCT-deep: 2.51 / 2.24"),
    ("cifar10", "ect"): ({1: 3.60, 2: 2.11}, "Geng et al. 2025 (ECT), locuslab/ect README, ECM 400k iterations "
                                             "(200k: 3.86 / 2.15; 100k: 4.54 / 2.20); 1-step also Lu & Song 2025 "
                                             "Table 3"),
    ("imagenet64", "cd"): ({1: 6.20, 2: 4.70}, "Song et al. 2023, Table 2 (CD with LPIPS)"),
    ("imagenet64", "ct"): ({1: 13.0, 2: 11.1}, "Song et al. 2023, Table 2"),
    ("imagenet64", "ict"): ({1: 4.02, 2: 3.20}, "Song & Dhariwal 2024 (iCT), Table 3, as reproduced in Lu & Song "
                                                "2025 Table 1; iCT-deep: 3.25 / 2.77"),
}
TABLE3_MODELS = ("cd", "ct", "ict", "ect")
TABLE3_PRESET = {"cd": "paper_{}", "ct": "paper_{}", "ict": "ict_{}", "ect": "ect_{}"}
TABLE3_COLUMNS = (["dataset", "method", "nfe", "fid", "is", "kid", "precision", "recall", "published_fid",
                   "published"] + RUN + ["notes", "mlflow_run_id"])


def build_table3(results: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """CD, CT, iCT and ECT at every NFE published or sampled here, ours beside the published FID."""
    rows = []
    for dataset in ("cifar10", "imagenet64"):
        size = DATASETS[dataset].resolution
        for model in TABLE3_MODELS:
            published, source = PUBLISHED.get((dataset, model), ({}, ""))
            result = results.get((dataset, model))
            if not published and result is None:
                continue
            ours = {row["nfe"]: row for row in result["rows"] if "sampler" not in row} if result else {}
            for nfe in sorted(set(published) | set(ours)):
                row = {"dataset": f"{DATASET_NAME[dataset]} {size}x{size}", "method": METHOD[model], "nfe": nfe,
                       "published_fid": published.get(nfe), "published": source if nfe in published else ""}
                if nfe in ours:
                    row |= {k: v for k, v in _ours(result, ours[nfe]).items() if k in TABLE3_COLUMNS}
                elif result is None:
                    row["notes"] = f"not run here: run an experiment with {model} in run.models, e.g. preset " \
                                   + TABLE3_PRESET[model].format(dataset)
                else:
                    row["notes"] = NOT_SAMPLED.format(nfe, result["path"], ", ".join(map(str, sorted(ours))))
                rows.append(row)
    return _frame(rows, TABLE3_COLUMNS)


TABLE3_CAPTION = ("Table 3, beyond the paper: CD, CT, iCT and ECT, ours beside the published FIDs (source of each "
                  "in `published`).")

CAPTIONS = ("Table 1: CIFAR-10, ours beside Song et al. 2023 (Table 1).",
            "Table 2: ImageNet 64x64, LSUN Bedroom and Cat 256x256, ours beside Song et al. 2023 (Table 2).")


def write_table(table: pd.DataFrame, caption: str, stem: Path) -> list[Path]:
    """<stem>.csv and <stem>.md (the caption above the Markdown table), written atomically."""
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    write_text(csv_path, table.to_csv(index=False))
    write_text(md_path, f"{caption}\n\n{to_markdown(table)}")
    return [csv_path, md_path]


def write_tables(results: dict[tuple[str, str], dict], out_dir: str | Path = TABLES_DIR) -> list[Path]:
    """Write tables 1, 2 and 3 as CSV and Markdown; returns the six paths."""
    tables = (build_table1(results), build_table2(results), build_table3(results))
    return [path for i, (table, caption) in enumerate(zip(tables, CAPTIONS + (TABLE3_CAPTION,)), start=1)
            for path in write_table(table, caption, Path(out_dir) / f"table{i}")]


COMPARED = ("fid", "is", "kid", "precision", "recall", "nll_gap", "on_mode", "mode_tv", "frechet")
NOT_KNOBS = ("preset", "run.name", "resources.", "run.tracking", "run.device", "run.threads")  # where, not what


def knob_differences(cfgs: dict[str, Config]) -> dict[str, dict[str, str]]:
    """{experiment: {knob: value}} for the knobs on which the experiments differ (params.yaml's dotted keys)."""
    flat = {name: tracking.flatten(cfg.raw) for name, cfg in cfgs.items()}
    keys = sorted({k for values in flat.values() for k in values})
    differing = [k for k in keys if not k.startswith(NOT_KNOBS) and len({v.get(k) for v in flat.values()}) > 1]
    return {name: {k: values.get(k, "") for k in differing} for name, values in flat.items()}


def compare_table(cfgs: dict[str, Config], results: dict[str, dict[tuple[str, str], dict]]) -> pd.DataFrame:
    """One row per (experiment, model, sample set): its measures, and the knobs on which the experiments differ."""
    knobs = knob_differences(cfgs)
    rows = []
    for name, cfg in cfgs.items():
        for (dataset, model), result in sorted(results[name].items(), key=lambda kv: MODELS.index(kv[0][1])):
            for row in result["rows"]:
                rows.append({"experiment": name, "preset": cfg.preset, "dataset": dataset, "method": METHOD[model],
                             "sampler": row.get("sampler", ""), "nfe": row["nfe"]}
                            | {k: _rounded(row.get(k), 4) for k in COMPARED if row.get(k) is not None}
                            | knobs[name] | {"mlflow_run_id": result.get("mlflow_run_id")})
    table = pd.DataFrame(rows)
    return table.dropna(axis=1, how="all") if len(table) else table


def experiment_results(cfg: Config, paths_only: bool = False):
    """The metrics of each model of an experiment ({(dataset, model): JSON}), or their paths."""
    from pipeline.stages import layout, models

    at = layout(cfg)
    paths = [at.metrics(m) for m in models(cfg)]
    return paths if paths_only else load_results(paths)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--publish", action="store_true", help="copy this experiment's tables to results/tables/")
    which.add_argument("--compare", action="store_true",
                       help="results/tables/compare.{csv,md}: the experiments of params.yaml's compare:")
    which.add_argument("--table3", nargs="+", metavar="NAME",
                       help="results/tables/table3.{csv,md} from these experiments (params.yaml's table3:)")
    args = parser.parse_args()
    cfg = from_args(args)
    if args.publish:
        from pipeline.stages import publish_stage

        stage = publish_stage(cfg)
        for source, target in zip(stage.deps, stage.outs):
            write_bytes(target, Path(source).read_bytes())
        print(f"results/tables/: the tables of experiment {cfg.name}", file=sys.stderr)
        return
    try:
        if args.compare:
            cfgs = {name: experiment(args.config, name).load(args.config) for name in compare_names(args.config)}
            table = compare_table(cfgs, {n: experiment_results(c) for n, c in cfgs.items()})
            paths = write_table(table, f"Experiments {', '.join(cfgs)}: measures, and the knobs on which they differ.",
                                Path(TABLES_DIR) / "compare")
        elif args.table3:
            cfgs = {name: experiment(args.config, name).load(args.config) for name in args.table3}
            results = load_results([p for c in cfgs.values() for p in experiment_results(c, paths_only=True)])
            paths = write_table(build_table3(results), f"{TABLE3_CAPTION} Experiments: {', '.join(cfgs)}.",
                                Path(TABLES_DIR) / "table3")
        else:
            from pipeline.stages import tables_dir

            paths = write_tables(experiment_results(cfg), tables_dir(cfg))
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        sys.exit(f"error: {e}")
    with tracking.stage_run("compare" if args.compare else "table3" if args.table3 else "tables", cfg):
        for path in paths:
            tracking.log_artifact(path)
    for path in paths[1::2]:
        print(path.read_text(), file=sys.stderr)


if __name__ == "__main__":
    main()
