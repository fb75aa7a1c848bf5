"""Where and how a model runs, shared by training, evaluation and prediction.

- :func:`acquire_device`: the job's device; on CUDA a free GPU held through a lock file per GPU
  UUID (:func:`lock_free_gpu`), so concurrent jobs on one machine never share a GPU;
- :func:`amp_dtype`: the autocast dtype of mixed precision;
- :func:`normalise` and :func:`forward_logits`: uint8 batch → ``(x/255 − mean)/std`` on the
  device (ImageNet mean/std, :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`) → the model's logits,
  channels_last on CUDA;
- :func:`peak_memory_mb`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import resource
import tempfile
import time
from collections.abc import Sequence
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
"""The device settings: ``auto`` is CUDA when available, else the CPU."""

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


def acquire_device(setting: str = "auto") -> torch.device:
    """The device of a job: ``cpu``; or ``cuda``/``auto`` (``auto`` falls back to the CPU when
    CUDA is not available): a free GPU, taken with :func:`lock_free_gpu`."""
    if setting not in DEVICES:
        raise SegpipeError(f"device {setting!r}: expected one of {', '.join(DEVICES)}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SegpipeError("device 'cuda' was asked for, but CUDA is not available")
    uuids = [str(torch.cuda.get_device_properties(i).uuid)
             for i in range(torch.cuda.device_count())]
    index = lock_free_gpu(uuids)
    log.info("using GPU %d (%s, uuid %s)", index, torch.cuda.get_device_name(index), uuids[index])
    return torch.device("cuda", index)


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, else fp16; None (fp32) on CPU."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@functools.lru_cache(maxsize=8)
def _per_channel(values: tuple[float, ...], device: torch.device) -> Tensor:
    """(1, C, 1, 1) tensor on ``device``, made once: no host-to-device copy per batch."""
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x/255 − mean)/std`` of a uint8 batch (N,3,H,W), as float32 on the batch's device."""
    m = _per_channel(tuple(mean), images.device)
    s = _per_channel(tuple(std), images.device)
    return (images.float() / 255 - m) / s


def forward_logits(model: nn.Module, images: Tensor, device: torch.device,
                   mean: Sequence[float], std: Sequence[float],
                   autocast: torch.dtype | None = None) -> Tensor | list[Tensor]:
    """The model's output for a uint8 batch (N,3,H,W): moved to ``device``, normalised,
    channels_last on CUDA, under autocast when ``autocast`` is a dtype."""
    x = normalise(images.to(device, non_blocking=True), mean, std)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        return model(x)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max memory allocated by tensors; CPU: max resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
