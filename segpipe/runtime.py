"""Where and how a model runs, shared by training, evaluation and prediction.

- :func:`acquire_device`: the job's device (:func:`choose_device`: never the CPU by mistake when
  the job was given a GPU); on CUDA a free GPU held through a lock file per GPU UUID
  (:func:`lock_free_gpu`), so concurrent jobs on one machine never share a GPU;
- :func:`amp_dtype`: the autocast dtype of mixed precision (bf16 only where it is native);
- :func:`place`, :func:`normalise` and :func:`forward_logits`: the model on the device in
  channels_last; uint8 batch → ``(x/255 − mean)/std`` on the device (ImageNet mean/std,
  :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`) → the model's logits;
- :func:`peak_memory_mb`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import logging
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from segpipe import SegpipeError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GPU_LOCK_DIR = Path(tempfile.gettempdir()) / "segpipe-gpu-locks"
GPU_WAIT_S = 600.0
DEVICES = ("auto", "cpu", "cuda")
"""The device settings: ``auto`` is a GPU when the job was given one, else the CPU."""
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL")
"""Variables that give a job GPUs (CUDA, SLURM): a non-empty value means it has one, except a
CUDA_VISIBLE_DEVICES in :data:`NO_GPUS`, which hides every GPU."""
NO_GPUS = ("", "-1", "NoDevFiles")
NVIDIA_DEVICE_FILES = "/dev/nvidia[0-9]*"
NVIDIA_PROC_VERSION = Path("/proc/driver/nvidia/version")
BF16_CAPABILITY = (8, 0)
"""Compute capability from which a GPU computes bf16 natively (Ampere); older GPUs emulate it."""

_held_gpu_locks: dict[Path, int] = {}  # lock file -> descriptor, held until the process exits


def lock_free_gpu(uuids: Sequence[str], lock_dir: Path = GPU_LOCK_DIR,
                  wait_s: float = GPU_WAIT_S, poll_s: float = 5.0) -> int:
    """Index in ``uuids`` of a GPU this process holds the lock of.

    Each physical GPU has a lock file ``lock_dir/<uuid>.lock``; the first one on which an
    exclusive non-blocking ``flock`` succeeds is taken and held until the process exits
    (the kernel releases it, also on a crash). Keying by UUID, not index, keeps jobs that see
    different GPUs as index 0 (SLURM) apart. A lock already held by this process is reused.
    When every GPU is taken, polls every ``poll_s`` s, then raises :class:`SegpipeError`
    after ``wait_s`` s.
    """
    lock_dir = Path(lock_dir)
    paths = [lock_dir / f"{uuid}.lock" for uuid in uuids]
    for i, path in enumerate(paths):
        if path in _held_gpu_locks:
            return i
    if not lock_dir.exists():
        lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # other users' jobs share the GPUs and the locks
            lock_dir.chmod(0o1777)
    start = time.monotonic()
    next_log = start
    while True:
        for i, path in enumerate(paths):
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _held_gpu_locks[path] = fd
            return i
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise SegpipeError(
                f"all {len(uuids)} GPU(s) are in use by other segpipe jobs (locks in {lock_dir}) "
                f"after waiting {waited:.0f} s; limit concurrent jobs with "
                f"`snakemake --resources gpu=<number of GPUs>`")
        if time.monotonic() >= next_log:
            log.info("all %d GPU(s) are in use by other segpipe jobs; waiting (%.0f of %.0f s)",
                     len(uuids), waited, wait_s)
            next_log += 60
        time.sleep(min(poll_s, max(wait_s - waited, 0.0)))


def gpu_given(env: Mapping[str, str], device_files: Sequence[str]) -> str | None:
    """What says that the job was given a GPU: ``NAME=value`` of the first variable of
    :data:`GPU_ENV` that is set and not empty, else the first NVIDIA device file
    (``/dev/nvidia0``); None when nothing does, or when CUDA_VISIBLE_DEVICES hides every GPU
    (a value in :data:`NO_GPUS`: the job deliberately runs without one)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in NO_GPUS:
        return None
    for name in GPU_ENV:
        if env.get(name, "").strip():
            return f"{name}={env[name]}"
    return device_files[0] if device_files else None


def choose_device(setting: str, env: Mapping[str, str], device_files: Sequence[str],
                  cuda_available: bool, driver_version: Callable[[], str],
                  torch_cuda: str | None) -> str:
    """``"cpu"`` or ``"cuda"`` for a device setting (:data:`DEVICES`), from what the job was
    given (``env``, NVIDIA ``device_files``, see :func:`gpu_given`) and whether torch can use
    CUDA. ``auto`` is the CPU only where no GPU was given: a job that holds a GPU torch cannot
    use (typically a driver older than torch's CUDA build ``torch_cuda``) stops with a
    :class:`SegpipeError` naming ``driver_version()``, ``torch_cuda`` and the fix, instead of
    training on the CPU for days."""
    if setting not in DEVICES:
        raise SegpipeError(f"device {setting!r}: expected one of {', '.join(DEVICES)}")
    if setting == "cpu":
        return "cpu"
    if cuda_available:
        return "cuda"
    given = gpu_given(env, device_files)
    if given is None:
        if setting == "auto":
            return "cpu"
        raise SegpipeError("device 'cuda' was asked for, but this job has no GPU (no "
                           f"{', '.join(GPU_ENV)}, no {NVIDIA_DEVICE_FILES})")
    build = f"built for CUDA {torch_cuda}" if torch_cuda else "a CPU-only build"
    raise SegpipeError(
        f"device {setting!r}: this job was given a GPU ({given}) but torch cannot use it: "
        f"NVIDIA driver version {driver_version()}, torch {torch.__version__} {build}. "
        "Install the torch build for the CUDA version that the driver supports (`nvidia-smi` "
        "shows it), see docs/cluster.md \"A GPU that torch cannot use\"; or pass --device cpu "
        "to run on the CPU on purpose")


def nvidia_driver_version(proc_file: Path = NVIDIA_PROC_VERSION,
                          nvidia_smi: str = "nvidia-smi") -> str:
    """The NVIDIA driver's version, from ``proc_file`` (the kernel module's ``NVRM version``
    line) or else the ``nvidia_smi`` program (looked up on PATH); ``"unknown"`` when neither
    says."""
    with contextlib.suppress(OSError):
        match = re.search(r"NVRM version:.*?\s(\d+(?:\.\d+)+)\s", proc_file.read_text())
        if match:
            return match[1]
    program = shutil.which(nvidia_smi)
    if program:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([program, "--query-gpu=driver_version",
                                   "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30, check=True)
            lines = done.stdout.split()
            if lines:
                return lines[0]
    return "unknown"


def acquire_device(setting: str = "auto") -> torch.device:
    """The device of a job (:func:`choose_device` with this machine's probes): the CPU, or a
    free GPU, taken with :func:`lock_free_gpu` and made the current CUDA device (so that no
    library call makes a CUDA context on another job's GPU), with cuDNN autotuning on (a job's
    images all have one size, so the fastest convolution algorithms are found once)."""
    kind = choose_device(setting, os.environ, sorted(glob.glob(NVIDIA_DEVICE_FILES)),
                         torch.cuda.is_available(), nvidia_driver_version, torch.version.cuda)
    if kind == "cpu":
        return torch.device("cpu")
    uuids = [str(torch.cuda.get_device_properties(i).uuid)
             for i in range(torch.cuda.device_count())]
    index = lock_free_gpu(uuids)
    torch.cuda.set_device(index)
    torch.backends.cudnn.benchmark = True
    log.info("using GPU %d (%s, compute capability %d.%d, uuid %s)", index,
             torch.cuda.get_device_name(index), *torch.cuda.get_device_capability(index),
             uuids[index])
    return torch.device("cuda", index)


def amp_dtype(device: torch.device, amp: bool,
              capability: Callable[[torch.device], tuple[int, int]] =
              torch.cuda.get_device_capability) -> torch.dtype | None:
    """The autocast dtype: None (fp32) with ``amp`` off or on the CPU; on a GPU, bf16 where the
    GPU computes it natively (``capability(device)`` ≥ :data:`BF16_CAPABILITY`: Ampere and
    newer), else fp16, which training pairs with a gradient scaler.

    Not ``torch.cuda.is_bf16_supported()``: it also counts emulated bf16 (slow on Volta and
    Turing) and asks the current device rather than the one the job holds."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if tuple(capability(device)) >= BF16_CAPABILITY else torch.float16


@functools.lru_cache(maxsize=8)
def _per_channel(values: tuple[float, ...], device: torch.device) -> Tensor:
    """(1, C, 1, 1) tensor on ``device``, made once: no host-to-device copy per batch."""
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x/255 − mean)/std`` of a uint8 batch (N,3,H,W), as float32 on the batch's device."""
    m = _per_channel(tuple(mean), images.device)
    s = _per_channel(tuple(std), images.device)
    return (images.float() / 255 - m) / s


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` moved to ``device`` in the channels_last memory format, the layout that
    cuDNN's tensor-core kernels and oneDNN's CPU kernels compute in natively (a training step
    on the CPU is 1.2-1.3x faster than in the default layout); :func:`forward_logits` feeds it
    channels_last batches."""
    return model.to(device, memory_format=torch.channels_last)


def forward_logits(model: nn.Module, images: Tensor, device: torch.device,
                   mean: Sequence[float], std: Sequence[float],
                   autocast: torch.dtype | None = None) -> Tensor | list[Tensor]:
    """The output of a model (:func:`place`) for a uint8 batch (N,3,H,W): moved to ``device``,
    channels_last, normalised, under autocast when ``autocast`` is a dtype."""
    # Normalised before the layout change: elementwise work on channels_last is slow on CPUs
    # (the same values either way).
    images = normalise(images.to(device, non_blocking=True), mean, std)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        return model(images.contiguous(memory_format=torch.channels_last))


def probabilities(logits: Tensor) -> Tensor:
    """Class probabilities of logits (N, C, H, W), in float32: the sigmoid of a single channel
    (binary: the foreground probability), else the softmax over the C channels (background and
    the classes). The one place where sigmoid and softmax are told apart
    (:attr:`segpipe.labels.Labels.activation`)."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max memory allocated by tensors; CPU: max resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
