"""The device and precision decisions of segpipe.runtime, driven by stated environments, device
files and GPU capabilities: no GPU needed (tests/test_gpu.py runs the real thing on CUDA)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from segpipe import SegpipeError
from segpipe.models import build_model
from segpipe.runtime import (IMAGENET_MEAN, IMAGENET_STD, acquire_device, amp_dtype, choose_device,
                             forward_logits, normalise, nvidia_driver_version, place)

CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, dtype", [
    ((6, 1), torch.float16),   # Pascal
    ((7, 0), torch.float16),   # V100: bf16 only emulated
    ((7, 5), torch.float16),   # T4
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),
    ((9, 0), torch.bfloat16),  # H100
    ((10, 0), torch.bfloat16),
])
def test_bf16_only_where_the_held_gpu_computes_it_natively(capability, dtype):
    asked = []
    probe = lambda device: asked.append(device) or capability  # noqa: E731
    held = torch.device("cuda", 2)
    assert amp_dtype(held, True, probe) == dtype
    assert asked == [held]  # the GPU the job holds, not the current device


def test_no_autocast_with_amp_off_or_on_the_cpu():
    def probe(device):
        raise AssertionError("no GPU to ask")

    assert amp_dtype(CUDA0, False, probe) is None
    assert amp_dtype(torch.device("cpu"), True, probe) is None


def never_called() -> str:
    raise AssertionError("the driver is only probed to explain an error")


def decide(setting: str, env: dict | None = None, files: tuple = (), cuda: bool = False,
           driver=never_called, torch_cuda: str | None = "13.0") -> str:
    return choose_device(setting, env or {}, list(files), cuda, driver, torch_cuda)


@pytest.mark.parametrize("env, files", [
    ({}, ()),
    # CUDA_VISIBLE_DEVICES that hides every GPU: the job runs without one on purpose
    ({"CUDA_VISIBLE_DEVICES": ""}, ("/dev/nvidia0",)),
    ({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_JOB_GPUS": "0"}, ()),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, ("/dev/nvidia0",)),
    ({"SLURM_JOB_GPUS": "", "PATH": "/usr/bin"}, ()),
])
def test_auto_is_the_cpu_where_no_gpu_was_given(env, files):
    assert decide("auto", env, files) == "cpu"


@pytest.mark.parametrize("env, files, given", [
    ({"CUDA_VISIBLE_DEVICES": "0"}, (), "CUDA_VISIBLE_DEVICES=0"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5b1c"}, (), "CUDA_VISIBLE_DEVICES=GPU-5b1c"),
    ({"SLURM_JOB_GPUS": "3"}, (), "SLURM_JOB_GPUS=3"),
    ({"SLURM_STEP_GPUS": "0,1"}, (), "SLURM_STEP_GPUS=0,1"),
    ({"GPU_DEVICE_ORDINAL": "1"}, (), "GPU_DEVICE_ORDINAL=1"),
    ({}, ("/dev/nvidia0", "/dev/nvidia1"), "/dev/nvidia0"),
])
def test_a_gpu_given_that_torch_cannot_use_stops_with_the_versions_and_the_fix(env, files, given):
    for setting in ("auto", "cuda"):
        with pytest.raises(SegpipeError) as error:
            decide(setting, env, files, driver=lambda: "470.82.01")
        message = str(error.value)
        assert f"this job was given a GPU ({given})" in message
        assert "NVIDIA driver version 470.82.01" in message
        assert f"torch {torch.__version__} built for CUDA 13.0" in message
        assert "docs/cluster.md" in message and "--device cpu" in message


def test_the_decision_with_cuda_usable_or_the_cpu_asked_for():
    gpu = {"CUDA_VISIBLE_DEVICES": "0"}
    assert decide("auto", gpu, cuda=True) == decide("cuda", gpu, cuda=True) == "cuda"
    assert decide("auto", {}, cuda=True) == "cuda"
    assert decide("cpu", gpu, ("/dev/nvidia0",)) == "cpu"  # on purpose: never an error
    with pytest.raises(SegpipeError, match="a CPU-only build"):
        decide("auto", gpu, driver=lambda: "unknown", torch_cuda=None)
    with pytest.raises(SegpipeError, match="device 'cuda' was asked for, but this job has no GPU"):
        decide("cuda")
    with pytest.raises(SegpipeError, match="device 'gpu': expected one of auto, cpu, cuda"):
        decide("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's GPU is usable")
def test_acquire_device_uses_this_machines_probes(monkeypatch):
    """On a machine where torch has no CUDA: told it holds a GPU, the job stops."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(SegpipeError, match=r"given a GPU \(CUDA_VISIBLE_DEVICES=0\)"):
        acquire_device("auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert acquire_device("auto") == torch.device("cpu")


PROC_VERSIONS = [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.82.01  Wed Oct 27 21:21:55 UTC 2021\n"
     "GCC version:  gcc version 9.3.0 (Ubuntu 9.3.0-17ubuntu1~20.04)\n", "470.82.01"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build  "
     "(dvs-builder@U16-I3-B03-4-3)  Thu Feb 22 01:25:25 UTC 2024\nGCC version:  gcc 12.3.0\n",
     "550.54.14"),
]


@pytest.mark.parametrize("text, version", PROC_VERSIONS)
def test_driver_version_from_the_kernel_module(tmp_path, text, version):
    (tmp_path / "version").write_text(text)
    assert nvidia_driver_version(tmp_path / "version", str(tmp_path / "absent")) == version


def fake_nvidia_smi(folder: Path, script: str) -> Path:
    path = folder / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_driver_version_from_nvidia_smi_else_unknown(tmp_path):
    absent = tmp_path / "no-such-file"
    smi = fake_nvidia_smi(tmp_path, 'test "$*" = "--query-gpu=driver_version --format=csv,'
                                    'noheader" && printf "535.104.05\\n535.104.05\\n"')
    assert nvidia_driver_version(absent, str(smi)) == "535.104.05"
    fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9")  # a driver it cannot use
    assert nvidia_driver_version(absent, str(smi)) == "unknown"
    assert nvidia_driver_version(absent, str(tmp_path / "absent")) == "unknown"


@pytest.mark.parametrize("architecture, backbone", [
    ({"model": "unet", "width": 4, "depth": 3}, {}),
    ({"model": "attention_r2unet", "width": 4, "depth": 2}, {}),
    ({"model": "unetpp", "width": 4, "depth": 2}, {"encoder": "resnet18", "weights": "none"}),
])
def test_channels_last_computes_what_the_default_layout_does(architecture, backbone):
    """place() and forward_logits() run the model in channels_last (tests/test_gpu.py: CUDA)."""
    torch.manual_seed(0)
    model = build_model(architecture, backbone).eval()
    images = torch.randint(0, 256, (2, 3, 37, 29), dtype=torch.uint8)
    cpu = torch.device("cpu")
    with torch.no_grad():
        expected = model(normalise(images, IMAGENET_MEAN, IMAGENET_STD))
        got = forward_logits(place(model, cpu), images, cpu, IMAGENET_MEAN, IMAGENET_STD)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters() if p.ndim == 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
