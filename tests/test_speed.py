"""The fast paths of issue 9 against the plain ones: fused EMA, batches on the device or streamed, no host syncs in
a training step, bf16 and torch.compile against eager fp32, and the benchmark's report."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline import bench, config, metrics
from pipeline.data import Batches, choose_placement, to_model_range, training_images
from pipeline.models import ema_update
from pipeline.stages import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_fused_ema_is_the_per_parameter_lerp():
    torch.manual_seed(0)
    model, ema = (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) for _ in range(2))
    model[1].running_mean.normal_()
    expected = [p_ema.detach() * 0.9 + p.detach() * 0.1 for p_ema, p in zip(ema.parameters(), model.parameters())]
    looped = [p_ema.detach().clone().lerp_(p.detach(), 0.1) for p_ema, p in zip(ema.parameters(), model.parameters())]
    ema_update(ema, model, 0.9)
    for p_ema, want, loop in zip(ema.parameters(), expected, looped):
        torch.testing.assert_close(p_ema, want)      # the EMA formula
        assert torch.equal(p_ema, loop)             # bit for bit the loop it replaces
    assert torch.equal(ema[1].running_mean, model[1].running_mean)  # buffers copied


def _split(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_training_images_flip_as_the_reference():
    images, _ = _split(6)
    flip = torch.tensor([True, False, True, False, False, True])
    expected = to_model_range(images)
    expected[flip] = expected[flip].flip(-1)
    assert torch.equal(training_images(torch.from_numpy(images), flip), expected)


@pytest.mark.parametrize("rows", [slice(None), slice(3, 7)])
def test_batches_on_the_device_and_streamed_are_the_same_and_resume(rows):
    images, labels = _split()
    device = Batches(images, labels, 10, True, seed=3, rows=rows, placement="device")
    stream = Batches(images, labels, 10, True, seed=3, rows=rows, placement="stream")
    drawn = []
    for _ in range(5):
        a, b = device.next(), stream.next()
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        drawn.append(a)
    index, flip = Batches(images, labels, 10, True, seed=3).draw()  # the global batch, before slicing
    assert torch.equal(drawn[0][0], torch.from_numpy(images[index[rows].numpy()]))
    assert torch.equal(drawn[0][1], flip[rows])
    # The stream thread has read ahead; its state is still the one after the 5th batch returned.
    resumed = Batches(images, labels, 10, True, seed=99, rows=rows, placement="stream")
    resumed.load_state_dict(stream.state_dict())
    sixth = device.next()
    for x, y in zip(resumed.next(), sixth):
        assert torch.equal(x, y)


def test_stream_errors_reach_the_training_thread():
    images, labels = _split()
    batches = Batches(images[:, :, :, :2], labels, 10, False, seed=0, placement="stream")
    batches.labels = None  # the thread's gather fails
    with pytest.raises(TypeError):
        batches.next()


def test_placement_auto_streams_on_the_cpu():
    assert choose_placement("auto", 10, torch.device("cpu")) == "stream"
    assert choose_placement("device", 10**12, torch.device("cpu")) == "device"


# --------------------------------------------------------------------------------------------------
# Training steps, through the stages' own trainers, in a synthetic workspace.

def micro_config(*sets: str) -> config.Config:
    return config.load(ROOT / "params.yaml", "micro", list(sets))


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A folder with a random micro split and teacher, as the DAG lays them out; yields a step builder."""
    monkeypatch.chdir(tmp_path)
    bench.write_synthetic_workspace(micro_config(), images=32)

    def step(kind: str, *sets: str):
        cfg = micro_config(*sets)
        teacher = Path(checkpoint(cfg, "teacher"))
        if not teacher.exists():  # a knob of the teacher's key (run.mixed_precision, ...): the same random teacher
            teacher.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(checkpoint(micro_config(), "teacher"), teacher)
        return bench.training_step(cfg, kind)

    return step


SYNCING = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu",
           "masked_select", "unique", "any", "all"}


class HostSyncs(TorchFunctionMode):
    """Records every tensor call that makes the host wait for a CUDA device (a value or shape read back),
    except the optimiser's own step counters, which PyTorch keeps on the CPU (or the device, when fused)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else ()
        boolean_index = any(torch.is_tensor(i) and i.dtype == torch.bool
                            for i in (index if isinstance(index, tuple) else (index,)))
        if (name in SYNCING and not self._in_optimizer()) or boolean_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _in_optimizer() -> bool:
        frame = sys._getframe(2)
        for _ in range(6):
            if frame is None:
                return False
            if "/torch/optim/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False


def test_the_sync_counter_sees_syncs():
    x = torch.ones(4)
    with HostSyncs() as syncs:
        x.sum().item()
        x[x > 0]
        bool(x[0] > 0)
    assert syncs.calls == ["item", "__getitem__", "__bool__"]


@pytest.mark.parametrize("placement", ["device", "stream"])
@pytest.mark.parametrize("kind", ["teacher", "cd", "ct"])
def test_no_host_sync_in_a_training_step(synthetic, kind, placement):
    step = synthetic(kind, f"run.data_placement={placement}")
    step()  # the first step creates the optimiser state
    with HostSyncs() as syncs:
        for _ in range(3):
            loss, _ = step()
    assert syncs.calls == [], f"{kind}: host syncs in the steady state: {syncs.calls}"
    assert loss.ndim == 0 and torch.isfinite(loss)


def _losses(step, steps: int) -> torch.Tensor:
    return torch.stack([step()[0] for _ in range(steps)])


@pytest.mark.parametrize("kind", ["teacher", "cd", "ct"])
def test_bf16_autocast_gives_the_fp32_loss(synthetic, kind):
    """bf16 keeps 8 bits of mantissa: the loss of the same first steps agrees with fp32 to a few per cent."""
    fp32 = _losses(synthetic(kind), 3)
    step = synthetic(kind, "run.mixed_precision=bf16")
    dtypes = set()
    step.func.__self__.model.net.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    bf16 = _losses(step, 3)
    assert dtypes == {torch.bfloat16}  # the network ran under autocast
    assert ((bf16 - fp32).abs() / fp32.abs()).max() < 0.05


def test_fp16_stays_fp32_on_the_cpu(synthetic):
    """fp16 needs CUDA's loss scaling; a paper preset run on the CPU trains in fp32."""
    assert torch.equal(_losses(synthetic("teacher"), 2), _losses(synthetic("teacher", "run.mixed_precision=fp16"), 2))


def test_channels_last_gives_the_same_loss(synthetic):
    eager = _losses(synthetic("ct"), 2)
    torch.testing.assert_close(_losses(synthetic("ct", "run.channels_last=true"), 2), eager, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cd", "ct"])
def test_compiled_steps_give_the_eager_loss(synthetic, kind):
    """torch.compile fuses kernels (different float rounding), nothing else: 4 steps agree to 1e-4 relative.
    Two levels instead of micro's three keep every block type (attention, down- and upsampling) and halve the
    minutes of CPU code generation; CT's step reuses the graphs compiled for CD's. The teacher's step is left out:
    Training compiles its online network as CD's (forward and backward, in training mode), and CD's step also
    runs the compiled target and teacher."""
    two_levels = "network.channel_mult=[1,1]"
    bench.write_synthetic_workspace(micro_config(two_levels), images=32)  # a teacher of that shape for CD
    eager = _losses(synthetic(kind, two_levels), 4)
    compiled = _losses(synthetic(kind, two_levels, "run.compile=true"), 4)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------------------------

def test_variant_sets():
    assert bench.variant_sets("eager") == ["run.compile=false", "run.mixed_precision=none", "run.tf32=false",
                                           "run.channels_last=false"]
    assert "run.mixed_precision=bf16" in bench.variant_sets("bf16+compile")
    assert "run.compile=true" in bench.variant_sets("bf16+compile")
    with pytest.raises(ValueError, match="fp8"):
        bench.variant_sets("fp8")


def test_default_variants_leave_out_what_the_device_cannot_run_fast(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.default_variants(cuda) == list(bench.DEFAULT_VARIANTS)
    monkeypatch.setattr(bench, "has_bf16", lambda device: True)
    assert bench.default_variants(cpu) == ["eager", "bf16", "compile", "bf16+compile", "bf16+compile+channels_last"]
    monkeypatch.setattr(bench, "has_bf16", lambda device: device.type == "cuda")
    assert bench.default_variants(cpu) == ["eager", "compile"]


def test_report_ratios_and_peak_fraction():
    rows = [bench.Row("CT step", "eager", 100.0, 0.5), bench.Row("CT step", "bf16+compile", 250.0, 1.25, 2.0),
            bench.Row("Inception features", "eager", note="no weights")]
    text = bench.report(rows, {"fp32": 1.0, "bf16": 5.0}, {"device": "X", "torch": "2"})
    assert "| CT step | eager | 100.0 | 1.00 | 0.500 | 50% | – |" in text
    assert "| CT step | bf16+compile | 250.0 | 2.50 | 1.250 | 25% | 2.0 |" in text
    assert "| Inception features | eager | – | – | – | – | – | no weights |" in text


@pytest.mark.slow
def test_bench_runs_end_to_end(tmp_path):
    """The benchmark on the micro network: every workload gets a row and the report is written. (bf16 and compile
    have their own tests above; on a CPU without bf16 hardware the LPIPS step alone takes minutes in bf16.)"""
    args = ["--config", str(ROOT / "params.yaml"), "--preset", "micro", "--batch", "4", "--steps", "1",
            "--warmup", "1", "--variants", "eager,channels_last", "--fid-samples", "8", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "pipeline.bench", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = tmp_path.glob("*.md")
    text = report.read_text()
    for workload in ("teacher step", "CD step (Heun, l2)", "CD step (Heun, LPIPS)", "CT step (l2)",
                     "1-step sampling", "teacher Heun sampler", "Inception features", "8 samples + features"):
        assert f"| {workload} |" in text, workload
    assert "| CT step (l2) | channels_last |" in text
    assert "| 8 samples + features | eager |" in text  # no variant asked for compile


# --------------------------------------------------------------------------------------------------
# A short GPU session (issue 20): a failing row costs that row only, the report survives a killed job, and every
# compiled row compiles.

def fake_bench(monkeypatch, tmp_path, step, variants: str = "eager,channels_last") -> Path:
    """bench.run on the micro preset with `step(cfg, kind)` as the training-step builder, the teacher and CT steps
    only, and no matmul peak or LPIPS weights: the benchmark's own bookkeeping, in a second."""
    monkeypatch.setattr(bench, "training_step", step)
    monkeypatch.setattr(bench, "matmul_peak", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(bench, "lpips_sets", lambda cfg: ([], ""))
    args = argparse.Namespace(config=str(ROOT / "params.yaml"), preset="micro", set=[], batch=4, steps=1, warmup=1,
                              variants=variants, workloads="teacher step|CT step", fid_samples=8,
                              out=str(tmp_path / "out"))
    return bench.run(args)


def _matmul():
    a = torch.ones(8, 8)
    return lambda: a @ a


def test_a_row_that_runs_out_of_memory_or_fails_costs_that_row_only(tmp_path, monkeypatch):
    def step(cfg, kind):
        if kind == "teacher" and not cfg.run.channels_last:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if kind == "ct" and not cfg.run.channels_last:
            raise ValueError("bad shape\nsecond line")
        if kind == "ct":
            def oom():  # as Inductor or cuDNN re-raise it, in the timed calls
                raise RuntimeError("CUDA error: out of memory")
            return oom
        return _matmul()

    text = fake_bench(monkeypatch, tmp_path, step).read_text()
    assert "| teacher step | eager | – | – | – | – | – | OOM |" in text
    assert "| CT step (l2) | eager | – | – | – | – | – | failed: ValueError: bad shape |" in text
    assert "| CT step (l2) | channels_last | – | – | – | – | – | OOM |" in text
    (measured,) = [line for line in text.splitlines() if line.startswith("| teacher step | channels_last |")]
    assert "| – |" not in measured.split("|", 4)[3]  # img/s measured after the OOM, FLOPs counted on this variant
    assert "incomplete" not in text


def test_after_an_oom_the_cuda_cache_is_emptied(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    row = bench.guarded("CT step", "eager", torch.device("cuda"), oom)
    assert row.note == "OOM" and row.images_per_s is None and emptied


def test_the_report_keeps_the_finished_rows_of_a_killed_run(tmp_path, monkeypatch):
    seen = []

    def step(cfg, kind):
        if kind == "ct":  # the teacher rows are done: the report on disk already holds them
            seen.append(next((tmp_path / "out").glob("*.md")).read_text())
            raise KeyboardInterrupt
        return _matmul()

    with pytest.raises(KeyboardInterrupt):
        fake_bench(monkeypatch, tmp_path, step)
    (report,) = (tmp_path / "out").glob("*.md")
    assert report.read_text() == seen[0]
    for variant in ("eager", "channels_last"):
        assert f"| teacher step | {variant} |" in seen[0]
    assert "CT step" not in seen[0] and "- incomplete:" in seen[0]
    assert [p.name for p in report.parent.iterdir()] == [report.name]  # no temporary file left beside it


def _traced(x):
    return x.sin() + 1


def test_every_compiled_row_compiles(tmp_path, monkeypatch):
    """With a recompile budget of one, the second compiled row (another dtype: a recompile) would run eager unless
    dynamo is reset before it."""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda reset=torch._dynamo.reset: resets.append(reset()))

    def step(cfg, kind):
        x = torch.ones(4, dtype=torch.float64 if cfg.run.mixed_precision == "bf16" else torch.float32)
        fn = torch.compile(_traced, backend="eager") if cfg.run.compile else _traced
        return lambda: fn(x)

    with torch._dynamo.config.patch(recompile_limit=1):
        text = fake_bench(monkeypatch, tmp_path, step, variants="eager,compile,bf16+compile").read_text()
    assert len(resets) == 4  # two compiled rows of two workloads
    rows = [line for line in text.splitlines() if "compile |" in line]
    assert len(rows) == 4 and not any("eager" in row.split("|")[-2] for row in rows), rows


def test_a_compiled_row_says_when_dynamo_ran_eager():
    x = torch.ones(4)
    compiled = torch.compile(_traced, backend="eager")
    row = bench.guarded("w", "compile", torch.device("cpu"), lambda: bench.Row("w", "compile", 1.0, note="n"))
    assert row.note == "n; ran eager: dynamo compiled no graph"

    def twice() -> bench.Row:
        compiled(x), compiled(x.double())  # the second dtype is past the budget: eager
        return bench.Row("w", "compile", 1.0)

    with torch._dynamo.config.patch(recompile_limit=1):
        assert "recompile limit" in bench.guarded("w", "compile", torch.device("cpu"), twice).note


def test_bench_imports_without_clean_fid():
    """clean-fid is only imported by the FID rows, which then say it is missing."""
    code = ("import sys; sys.modules['cleanfid'] = None\n"
            "import torch\n"
            "from pipeline import bench, config\n"
            "assert 'pipeline.metrics' not in sys.modules\n"
            "rows = []\n"
            "bench.fid_path(rows.append, config.load('params.yaml', 'micro', []), torch.device('cpu'), 8)\n"
            "print([row.note for row in rows])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("no clean-fid") == 2


def test_bench_reads_the_weights_folder_although_it_runs_in_a_temporary_one(tmp_path, monkeypatch):
    """run.weights_dir is relative (weights/) by default, and the rows run in a temporary folder: Inception and LPIPS
    must still be looked for in the folder `make weights` filled, not in the temporary one."""
    seen = {}

    def lpips_sets(cfg):
        seen["lpips"] = cfg.lpips.vgg16_weights
        return [], ""

    class Inception:
        def __init__(self, *args, weights_dir=None, **kwargs):
            seen["inception"] = weights_dir
            raise RuntimeError("no weights (test)")

    monkeypatch.setattr(bench, "lpips_sets", lpips_sets)
    monkeypatch.setattr(metrics, "InceptionFeatures", Inception)
    monkeypatch.chdir(ROOT)
    args = argparse.Namespace(config="params.yaml", preset="micro", set=[], batch=4, steps=1, warmup=1,
                              variants="eager", workloads="Inception", fid_samples=8, out=str(tmp_path / "out"))
    text = bench.run(args).read_text()
    assert "no Inception weights: no weights (test)" in text
    assert seen == {"inception": str(ROOT / "weights"), "lpips": str(ROOT / "weights" / "vgg16-397923af.pth")}
