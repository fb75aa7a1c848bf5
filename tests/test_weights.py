"""Pretrained weights fetched once, where training reads them (segpipe.weights)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import torchvision

from segpipe import SegpipeError
from segpipe import weights
from segpipe.cli import main
from segpipe.models.encoders import RESNETS


def test_the_urls_and_the_folder_are_torchvisions(monkeypatch, tmp_path):
    assert set(weights.IMAGENET_URLS) == set(RESNETS)
    for name, url in weights.IMAGENET_URLS.items():
        assert url == torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "x")},
                {}):
        for key in ("TORCH_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert weights.hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints"


@pytest.fixture
def server(tmp_path):
    """An HTTP server of the folder tmp_path/served on 127.0.0.1; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", served
    httpd.shutdown()


def test_fetch_downloads_once_and_checks_the_hash_in_the_name(server, tmp_path, monkeypatch):
    base, served = server
    content = b"the weights"
    name = f"resnet18-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    (served / name).write_bytes(content)
    (served / "resnet34-00000000.pth").write_bytes(content)  # a name whose hash is not its own
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(weights.IMAGENET_URLS, "resnet18", f"{base}/{name}")
    monkeypatch.setitem(weights.IMAGENET_URLS, "resnet34", f"{base}/resnet34-00000000.pth")
    assert weights.unreachable(f"{base}/{name}") is None
    assert main(["fetch-weights", "--encoder", "resnet18"]) == 0
    path = tmp_path / "torch" / "hub" / "checkpoints" / name
    assert path.read_bytes() == content
    (served / name).unlink()  # fetched once: there, it is not downloaded again
    assert weights.fetch_imagenet("resnet18") == path

    with pytest.raises(SegpipeError, match=r"resnet34-00000000\.pth: the download's SHA-256 "
                                           r"\w+… does not start with 00000000"):
        weights.fetch_imagenet("resnet34")
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # nothing partial is left


def test_an_unreachable_url_says_why(tmp_path, monkeypatch):
    assert "refused" in weights.unreachable("http://127.0.0.1:9/w.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(weights.IMAGENET_URLS, "resnet50", "http://127.0.0.1:9/resnet50-0.pth")
    with pytest.raises(SegpipeError, match=r"http://127\.0\.0\.1:9/resnet50-0\.pth: cannot "
                                           r"download \(.*refused\): on a machine with internet"):
        weights.fetch_imagenet("resnet50")
    assert not any(tmp_path.rglob("*.pth"))
