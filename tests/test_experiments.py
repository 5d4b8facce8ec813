"""Named experiments in one workspace: stage keys, --config selection, outputs that coexist, shared stages run once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import workspace
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
