"""Training throughput of the model zoo: forward + backward images/s and peak memory per model.

    python benchmarks/bench_models.py [--size 256] [--batch 8] [--iters 10]
                                      [--models unet attention_r2unet+resnet34 | all]

A model is ``<architecture>`` (its scratch encoder) or ``<architecture>+<backbone>``, with the
architecture's default options and random weights; ``all`` is every combination. Each model
runs in a fresh process, so its peak memory is its own: on CUDA with AMP (bf16 where supported,
else fp16) and channels_last, peak = ``torch.cuda.max_memory_allocated``; on the CPU, peak =
growth of the process's peak resident set over its size before the model was built. One
warm-up step is not timed. The loss is BCE with logits against a random mask.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import torch.nn.functional as F

from segpipe.models import ARCHITECTURES, BACKBONES, build_model

DEFAULT_MODELS = [*ARCHITECTURES, "attention_r2unet+resnet34", "atrous_unet+resnet50"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def measure(name: str, size: int, batch: int, iters: int) -> dict:
    """Times ``iters`` forward + backward steps of one model (run in its own process)."""
    architecture, _, backbone = name.partition("+")
    definition = {} if backbone in ("", "scratch") else {"encoder": backbone, "weights": "none"}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    baseline = peak_rss_mb()
    model = build_model({"model": architecture}, definition).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            logits = model(x)
        outputs = logits if isinstance(logits, list) else [logits]
        loss = sum(F.binary_cross_entropy_with_logits(o.float(), target) for o in outputs)
        (loss / len(outputs)).backward()
        model.zero_grad(set_to_none=True)

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb() - baseline
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "images_per_s": batch * iters / seconds, "peak_mb": peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per model")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="architecture[+backbone] ... or 'all' (default: every "
                             "architecture, and the seed study's two ResNet models)")
    args = parser.parse_args(argv)
    models = [f"{a}+{b}" for a in ARCHITECTURES for b in BACKBONES] \
        if args.models == ["all"] else args.models
    for name in models:
        architecture, _, backbone = name.partition("+")
        if architecture not in ARCHITECTURES or backbone not in ("", *BACKBONES):
            parser.error(f"unknown model {name!r}: expected architecture[+backbone] with "
                         f"architecture in {', '.join(ARCHITECTURES)} and backbone in "
                         f"{', '.join(BACKBONES)}")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"forward+backward, {args.size}x{args.size}, batch {args.batch}, {args.iters} steps "
          f"on {device}")
    print(f"{'model':<28} {'parameters':>12} {'images/s':>10} {'peak MB':>9}   "
          f"vs {models[0]} (speed, memory)")
    baseline = None
    for name in models:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(measure, name, args.size, args.batch, args.iters).result()
        baseline = baseline or row
        print(f"{row['model']:<28} {row['parameters']:>12,} {row['images_per_s']:>10.2f} "
              f"{row['peak_mb']:>9.0f}   {row['images_per_s'] / baseline['images_per_s']:.2f}x, "
              f"{row['peak_mb'] / baseline['peak_mb']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
