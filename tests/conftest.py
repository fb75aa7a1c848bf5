"""Shared fixtures: hand-made LabelMe files and a tiny synthetic LabelMe folder."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from segpipe.data.synthetic import write_dataset


@pytest.fixture
def make_labelme(tmp_path: Path):
    """Factory: ``make_labelme(shapes, image=..., name=..., embed=..., **fields)`` writes a
    LabelMe 5 JSON (and, unless ``embed``, a PNG beside it) into ``tmp_path``; ``shapes`` are
    ``(label, shape_type, points)`` tuples or shape dicts; ``image`` an (H, W[, 3]) array,
    RGB when it has 3 channels (default: black 8x8); ``fields`` override top-level keys."""

    def make(shapes=(), image=None, name="image", embed=False, folder=None, **fields) -> Path:
        folder = Path(folder or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        image = np.zeros((8, 8, 3), np.uint8) if image is None else np.asarray(image)
        pixels = image[..., ::-1] if image.ndim == 3 and image.shape[2] == 3 else image
        png = cv2.imencode(".png", pixels)[1].tobytes()
        if not embed:
            (folder / f"{name}.png").write_bytes(png)
        document = {
            "version": "5.5.0",
            "flags": {},
            "shapes": [
                s if isinstance(s, dict) else
                {"label": s[0], "points": s[2], "group_id": None, "description": "",
                 "shape_type": s[1], "flags": {}, "mask": None}
                for s in shapes
            ],
            "imagePath": f"{name}.png",
            "imageData": base64.b64encode(png).decode() if embed else None,
            "imageHeight": image.shape[0],
            "imageWidth": image.shape[1],
            **fields,
        }
        path = folder / f"{name}.json"
        path.write_text(json.dumps(document))
        return path

    return make


@pytest.fixture
def labelme_folder(tmp_path: Path) -> Path:
    """Six synthetic 48x64 images with LabelMe JSON (labels stone, leaf, grass)."""
    folder = tmp_path / "labelme"
    write_dataset(folder, count=6, seed=0, size=(48, 64))
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests run with one torch thread: the two CI cores are shared, and subprocesses
    get OMP_NUM_THREADS=1, so their results are bitwise those of the test process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def killed_after_first_epoch():
    """``kill(command, env, out, timeout_s)``: start the `segpipe train` ``command`` and SIGKILL
    it once it has saved a resumable state in ``out``; asserts it died of the kill, mid-run."""

    def kill(command: list[str], env: dict[str, str], out: Path, timeout_s: float) -> None:
        proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        while (not (out / "state.pt").exists() and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, stderr
        assert (out / "state.pt").exists() and not (out / "model.pt").exists()

    return kill
