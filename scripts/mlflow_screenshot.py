"""A PNG of the MLflow UI comparing the Figure 3 ablation runs side by side (their params, only those that differ).

    python scripts/mlflow_screenshot.py sqlite:///mlflow.db results/figures/mlflow_compare.png
    python scripts/mlflow_screenshot.py sqlite:///mlflow.db out.png --experiment tiny --panel a_metric

Starts `mlflow server` on 127.0.0.1 over the store, opens the compare page of the newest run of each ablation run
(tag ablation_run) in headless Chromium and waits until the runs' params are on the page. Needs the Python package
playwright and a Chromium (Debian: apt-get install chromium; playwright's own browser download is not needed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import tracking  # noqa: E402


def ablation_runs(uri: str, experiment: str, name: str | None = None, panel: str | None = None) -> tuple[str, list]:
    """The experiment's id and the newest finished run of each ablation run (of the experiment name, of the panel),
    in the order of their names."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: {uri}: no MLflow experiment {experiment!r}")
    where = ["tags.ablation_run IS NOT NULL", "attributes.status = 'FINISHED'"]
    where += [f"tags.experiment = '{name}'"] if name else []
    where += [f"tags.panels LIKE '%{panel}%'"] if panel else []
    newest = {}
    for run in client.search_runs([found.experiment_id], " and ".join(where), order_by=["attributes.start_time DESC"],
                                  max_results=1000):
        newest.setdefault(run.data.tags["ablation_run"], run)
    if not newest:
        raise SystemExit(f"error: {uri}: no finished run tagged ablation_run in {experiment!r} ({' and '.join(where)})")
    return found.experiment_id, [newest[k] for k in sorted(newest)]


def compare_url(server: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow 3 UI's compare page (its route: /#/compare-runs?runs=[...]&experiments=[...])."""
    quote = lambda value: urllib.parse.quote(json.dumps(value, separators=(",", ":")))
    return f"{server}/#/compare-runs?runs={quote(run_ids)}&experiments={quote([experiment_id])}"


# The height the page would need to show every scrolled panel at once (the UI scrolls inside its own containers).
_HIDDEN_HEIGHT = """() => Math.max(0, ...[...document.querySelectorAll('*')]
    .filter(e => /(auto|scroll)/.test(getComputedStyle(e).overflowY)).map(e => e.scrollHeight - e.clientHeight))"""


def screenshot(url: str, runs: list, output: Path, chromium: str, width: int, timeout: float) -> None:
    """Open url in the model-training view, wait for every run and the params table, show only the params, metrics
    and tags that differ, grow the window to the whole page, save a PNG."""
    from playwright.sync_api import sync_playwright

    ms = timeout * 1000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
        page.goto(url, timeout=ms)
        page.get_by_role("button", name="Model training", exact=True).click(timeout=ms)  # the UI's mode, not GenAI
        page.goto(url, timeout=ms)
        for run in runs:  # the header row names every run
            page.get_by_text(run.info.run_name, exact=True).first.wait_for(timeout=ms)
        page.get_by_text("Parameters", exact=True).first.wait_for(timeout=ms)
        close = page.get_by_role("button", name="Close", exact=True)  # the assistant's side panel
        if close.count():
            close.first.click()
        for switch in page.get_by_role("switch").all():  # "Show diff only" of params, metrics and tags
            if switch.get_attribute("aria-checked") != "true":
                switch.click()
        page.wait_for_timeout(2000)  # the plots draw after their data arrives
        page.set_viewport_size({"width": width, "height": min(900 + page.evaluate(_HIDDEN_HEIGHT), 10000)})
        page.wait_for_timeout(1000)
        output.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(output), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="the tracking store, e.g. sqlite:///mlflow.db")
    parser.add_argument("output", type=Path, help="the PNG to write")
    parser.add_argument("--mlflow-experiment", default="consistency-models", help="params.yaml run.experiment")
    parser.add_argument("--experiment", help="only the runs of this experiment name (tag experiment, e.g. tiny)")
    parser.add_argument("--panel", help="only the runs of this Figure 3 panel, e.g. a_metric")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1600, help="viewport width in pixels")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server and the page")
    args = parser.parse_args()
    experiment_id, runs = ablation_runs(args.uri, args.mlflow_experiment, args.experiment, args.panel)
    with tempfile.TemporaryDirectory() as artifacts:  # new artifacts only; the runs' own stay where they are
        server, url = tracking.start_server(args.uri, artifacts, timeout=args.timeout)
        try:
            screenshot(compare_url(url, experiment_id, [r.info.run_id for r in runs]), runs, args.output,
                       args.chromium, args.width, args.timeout)
        finally:
            tracking.stop_server(server)
    print(f"wrote {args.output} ({len(runs)} runs: {', '.join(r.data.tags['ablation_run'] for r in runs)})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
