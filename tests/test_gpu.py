"""segpipe's GPU path on a real CUDA GPU: a training step of every model family under bf16 (where
native) and fp16 with a gradient scaler, channels_last, one GPU per job through the locks,
resuming on CUDA, and evaluation and prediction on CUDA equal to the CPU's.

Marked ``gpu`` and skipped without CUDA: ``pytest -m gpu`` runs them on a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import cache, make_spec  # noqa: F401 (cache: the training cache fixture)

from segpipe.evaluate import evaluate_run
from segpipe.losses import build_loss
from segpipe.models import build_model
from segpipe.inference import Predictor, image_batch
from segpipe.runtime import IMAGENET_MEAN, IMAGENET_STD, amp_dtype, forward_logits, place
from segpipe.train import train_run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]
# This checkout first, then what the environment adds: on a machine without network the GPU
# check (benchmarks/gpu_check.py) installs jsonschema and the others into a folder of its own.
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
FAMILIES = {  # every family, small, and one under a ResNet encoder
    "unet": ({"model": "unet", "width": 8, "depth": 3}, {}),
    "unetpp": ({"model": "unetpp", "width": 8, "depth": 3, "deep_supervision": True}, {}),
    "attention_unet": ({"model": "attention_unet", "width": 8, "depth": 3}, {}),
    "r2unet": ({"model": "r2unet", "width": 8, "depth": 3}, {}),
    "attention_r2unet": ({"model": "attention_r2unet", "width": 8, "depth": 3}, {}),
    "atrous_unet": ({"model": "atrous_unet", "width": 8, "depth": 3}, {}),
    "unet+resnet34": ({"model": "unet"}, {"encoder": "resnet34", "weights": "none"}),
}
TOLERANCE = 1e-3
"""CUDA vs CPU in fp32: probabilities and metrics agree within this (absolute)."""


@pytest.fixture
def gpu() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def ieee_fp32():
    """fp32 convolutions computed in fp32: by torch's default, cuDNN may use TF32 (10-bit
    mantissa) for them on Ampere and newer GPUs, which is not what the CPU computes."""
    before = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    yield
    torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_under_mixed_precision(gpu, family, dtype):
    """Five steps of the training loop's computation (train.py): finite losses, every weight
    moved; fp16 with the gradient scaler (steps whose gradients overflow are skipped)."""
    if dtype == torch.bfloat16 and amp_dtype(gpu, True) != torch.bfloat16:
        pytest.skip("bf16 is not native on this GPU (compute capability < 8.0)")
    torch.manual_seed(0)
    model = place(build_model(*FAMILIES[family]), gpu).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    criterion = build_loss({"bce": 0.5, "dice": 0.5})
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    masks = (torch.rand(4, 1, 64, 64, device=gpu) > 0.5).float()
    for _ in range(5):
        logits = forward_logits(model, images, gpu, IMAGENET_MEAN, IMAGENET_STD, dtype)
        outputs = logits if isinstance(logits, list) else [logits]
        assert all(o.dtype == dtype and o.shape == (4, 1, 64, 64) for o in outputs)
        loss = criterion(logits, masks)
        assert torch.isfinite(loss), loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    for name, p in model.named_parameters():
        assert p.isfinite().all(), name
        if p.ndim > 1:  # convolution weights: never an exactly-zero gradient
            assert not torch.equal(p, before[name]), f"{name} did not change"


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_last_computes_what_the_default_layout_does(gpu, ieee_fp32, family):
    torch.manual_seed(0)
    model = build_model(*FAMILIES[family]).to(gpu).eval()
    x = torch.randn(2, 3, 45, 61, device=gpu)  # padded and cropped by the model
    with torch.no_grad():
        expected = model(x)
        got = place(model, gpu)(x.contiguous(memory_format=torch.channels_last))
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters() if p.ndim == 4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


HOLD_A_GPU = """
import sys, time
import torch
from segpipe.runtime import acquire_device
device = acquire_device("cuda")
print(torch.cuda.get_device_properties(device).uuid, time.time(), flush=True)
time.sleep(float(sys.argv[1]))
print("released", time.time(), flush=True)
"""


def test_two_jobs_take_different_gpus_or_wait_for_each_other(tmp_path):
    """Two `acquire_device("cuda")` processes: with two GPUs or more each takes its own; with
    one, the second waits until the first exits (it polls its lock every 5 s)."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "TMPDIR": str(tmp_path)}  # private locks
    first = subprocess.Popen([sys.executable, "-c", HOLD_A_GPU, "20"], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        uuid_first, _ = first.stdout.readline().split()
        second = subprocess.run([sys.executable, "-c", HOLD_A_GPU, "0"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        uuid_second, taken = second.stdout.splitlines()[0].split()
        _, released = first.stdout.readline().split()
    finally:
        first.kill()
        first.wait()
    assert (tmp_path / "segpipe-gpu-locks" / f"{uuid_first}.lock").exists()
    if torch.cuda.device_count() >= 2:
        assert uuid_second != uuid_first
        assert float(taken) < float(released)  # while the first still held its GPU
    else:
        assert uuid_second == uuid_first
        assert float(taken) > float(released)  # only once the first had let it go


def test_kill_and_resume_on_cuda(cache, tmp_path, killed_after_first_epoch):
    """`segpipe train --device cuda` killed once an epoch's state is saved, then run again,
    finishes the run: every epoch in the history once, the snapshots, no state left."""
    epochs = 40
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(make_spec(epochs=epochs, snapshot_epochs=[1, epochs])))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "segpipe", "train", "--cache", str(cache), "--spec",
               f"@{spec}", "--output-dir", str(out), "--device", "cuda"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "TMPDIR": str(tmp_path)}  # private GPU locks
    killed_after_first_epoch(command, env, out, timeout_s=300)

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    log = (out / "train.log").read_text()
    assert "resuming after epoch" in log and "device cuda" in log
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == list(range(1, epochs + 1))
    assert history[["train_loss", "val_loss", "val_dice"]].notna().all().all()
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == \
        ["epoch_1.pt", f"epoch_{epochs}.pt"]
    assert not (out / "state.pt").exists()


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    """A tiny run trained on the CPU: the model that both devices evaluate."""
    out = tmp_path_factory.mktemp("run")
    train_run(make_spec(epochs=3), cache, out, device="cpu")
    return out


def test_evaluate_on_cuda_equals_the_cpu(trained, cache, tmp_path, ieee_fp32):
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path / device
        shutil.copytree(trained, runs[device])
        evaluate_run(runs[device], cache, device=device)
    for name in ("metrics.csv", "per_image.csv", "metrics_by_epoch.csv"):
        cpu, cuda = (pd.read_csv(runs[d] / name) for d in ("cpu", "cuda"))
        pd.testing.assert_frame_equal(cuda, cpu, check_exact=False, rtol=0, atol=TOLERANCE)
    with np.load(runs["cpu"] / "evolution.npz") as cpu, \
            np.load(runs["cuda"] / "evolution.npz") as cuda:
        assert cpu.files == cuda.files
        for key in cpu.files:
            np.testing.assert_allclose(cuda[key], cpu[key], rtol=0, atol=TOLERANCE)


def test_predict_on_cuda_equals_the_cpu(trained, ieee_fp32):
    image = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    probabilities = {}
    for device in (torch.device("cpu"), torch.device("cuda", torch.cuda.current_device())):
        predictor = Predictor.load([trained / "model.pt"], device, mirrors=True)
        probabilities[device.type] = np.stack(
            [m[0].numpy() for m in predictor.members(image_batch([predictor.working(image)]))])
    assert probabilities["cuda"].shape == (4, 1, *predictor.size)  # the four mirrors
    np.testing.assert_allclose(probabilities["cuda"], probabilities["cpu"], rtol=0,
                               atol=TOLERANCE)
