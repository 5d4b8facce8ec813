"""Stage tables: results/tables/table1.csv (and .md), the paper's Table 1 layout for CIFAR-10.

    python -m pipeline.tables

One row per (method, NFE), with the paper's FID beside ours (Song et al. 2023, Table 1; the paper's
CD uses LPIPS, ours uses the metric in params.yaml, named in `training`), and KID, IS and precision/recall
from the same samples. An empty cell has its reason in is_note or pr_note.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

from pipeline import tracking
from pipeline.config import stage_cli
from pipeline.data import write_text
from pipeline.stages import MODELS, TABLES, metrics

METHOD = {"teacher": "EDM teacher", "cd": "CD", "ct": "CT"}
PAPER_FID = {("teacher", 35): 2.04, ("cd", 1): 3.55, ("cd", 2): 2.93, ("ct", 1): 8.70, ("ct", 2): 5.83}
COLUMNS = ["method", "nfe", "fid", "is", "kid", "precision", "recall", "paper_fid", "num_samples", "training", "preset",
           "is_note", "pr_note", "mlflow_run_id"]
NOT_EVALUATED = "not evaluated: results/metrics/{}.json predates KID and precision/recall"


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def build_table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for result in results:
        for row in result["rows"]:
            # Metrics files written before KID and precision/recall lack their keys: empty cells, with the reason.
            old = "kid" not in row
            rows.append({
                "method": METHOD[result["model"]], "nfe": row["nfe"], "fid": round(row["fid"], 3),
                "is": _rounded(row["is"], 3), "kid": _rounded(row.get("kid"), 6),
                "precision": _rounded(row.get("precision"), 4), "recall": _rounded(row.get("recall"), 4),
                "paper_fid": PAPER_FID.get((result["model"], row["nfe"])),
                "num_samples": row["num_samples"], "training": result["training"], "preset": result["preset"],
                "is_note": row["is_note"],
                "pr_note": NOT_EVALUATED.format(result["model"]) if old else row.get("pr_note", ""),
                "mlflow_run_id": result["mlflow_run_id"],
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (without pandas' optional tabulate dependency)."""
    def cell(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main() -> None:
    cfg, _ = stage_cli(__doc__)
    results = [json.loads(Path(metrics(m)).read_text()) for m in MODELS]
    table = build_table(results)
    csv_path, md_path = map(Path, TABLES)
    write_text(csv_path, table.to_csv(index=False))
    write_text(md_path, to_markdown(table))
    with tracking.stage_run("tables", cfg):
        for path in (csv_path, md_path):
            tracking.log_artifact(path)
    print(to_markdown(table), file=sys.stderr)


if __name__ == "__main__":
    main()
