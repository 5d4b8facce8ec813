"""docs/params.md, the reference of every knob, is generated from params.yaml and pipeline/config.py: it is current,
and it lists every field of the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import params_doc
from pipeline.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_page_is_what_the_generator_writes():
    page = params_doc.render((ROOT / "params.yaml").read_text())
    assert (ROOT / "docs" / "params.md").read_text() == page, "run: python -m pipeline.params_doc"


def test_every_field_of_the_schema_has_a_row_with_its_default_and_type():
    page = params_doc.render((ROOT / "params.yaml").read_text())
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    for section, schema in SECTIONS.items():
        if dataclasses.is_dataclass(schema):
            for field in dataclasses.fields(schema):
                assert f"{section}.{field.name}" in rows, f"{section}.{field.name} missing from docs/params.md"
    assert rows["run.mixed_precision"].startswith("| `run.mixed_precision` | `none` | none \\| fp16 \\| bf16 | ")
    assert "initial discretisation N(0)" in rows["ct.s0"]  # no comment in params.yaml: the schema's
    assert "`uniform`" in rows["ct.index"] and "not listed in params.yaml" in rows["ct.index"]


def test_a_comment_continued_on_the_next_line_stays_with_its_knob():
    text = ("run:\n  paths: keyed      # keyed: first half\n                    # and the second half\n"
            "  seed: 0\nexperiments:\n")
    knobs, _ = params_doc.read_knobs(text)
    assert [(k.path, k.comment) for k in knobs] == [
        (("run",), ""), (("run", "paths"), "keyed: first half and the second half"), (("run", "seed"), "")]
