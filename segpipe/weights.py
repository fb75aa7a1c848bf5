"""Pretrained weights: where training reads them, fetched once before any training job.

``weights: imagenet`` is torchvision's ``IMAGENET1K_V1`` state dict of the ResNet, read from the
torch hub cache, ``<hub>/checkpoints/<file name of the URL>`` with ``<hub>`` as
``torch.hub.get_dir()`` finds it (``$TORCH_HOME/hub``, default ``$XDG_CACHE_HOME/torch/hub`` or
``~/.cache/torch/hub``). Training only reads that file (compute nodes of a cluster often have
no internet); the workflow's ``fetch_weights`` step, a ``localrules`` step on the machine that
runs Snakemake, or ``segpipe fetch-weights`` by hand, downloads it first, checking the SHA-256
prefix in its name as ``torch.hub`` does. Standard library only: the workflow's start checks
use it.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from segpipe import SegpipeError
from segpipe.files import atomic_path

IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
"""torchvision's ``IMAGENET1K_V1`` weights of each ResNet (``get_model_weights(name)``)."""
_HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX


def hub_checkpoints() -> Path:
    """The torch hub's checkpoint folder, as ``torch.hub.get_dir()`` finds it, without torch."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def imagenet_file(encoder: str) -> Path:
    """Where training reads the ImageNet weights of ``encoder``."""
    return hub_checkpoints() / IMAGENET_URLS[encoder].rsplit("/", 1)[1]


def how_to_supply(encoder: str) -> str:
    """How to supply the ImageNet weights of ``encoder`` when their file is missing."""
    return (f"on a machine with internet run `segpipe fetch-weights --encoder {encoder}` (or "
            f"download {IMAGENET_URLS[encoder]}) and put the file at {imagenet_file(encoder)} "
            "(the torch hub cache: TORCH_HOME); or set weights to the path of a saved state "
            "dict, or to none")


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` cannot be reached from this machine (a HEAD request), or None if it can."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def fetch_imagenet(encoder: str, timeout: float = 60.0) -> Path:
    """Download the ImageNet weights of ``encoder`` to :func:`imagenet_file` unless they are
    there, checking the SHA-256 prefix that the file name carries; the file appears only when
    complete and checked. Raises :class:`SegpipeError` naming the URL when it fails."""
    path, url = imagenet_file(encoder), IMAGENET_URLS[encoder]
    if path.is_file():
        return path
    digest = hashlib.sha256()
    with atomic_path(path) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while chunk := response.read(2**20):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SegpipeError(f"{url}: cannot download ({getattr(exc, 'reason', exc)}): "
                               f"{how_to_supply(encoder)}") from None
        prefix = _HASH_PREFIX.search(path.name)
        if prefix and not digest.hexdigest().startswith(prefix[1]):
            raise SegpipeError(f"{url}: the download's SHA-256 {digest.hexdigest()[:12]}… does "
                               f"not start with {prefix[1]} (its name's): corrupt, not kept")
    return path
