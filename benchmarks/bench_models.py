"""Training-step throughput of segpipe's models side by side with their nearest peers.

    python benchmarks/bench_models.py [--device auto|cuda|cpu] [--size S] [--batch 8]
        [--width W] [--models unet attention_unet unet+resnet34 ... | all] [--rounds 5]
        [--steps 3] [--threads N] [--compile] [--peak-tflops T] [--no-peers] [--json PATH]

A model is ``<architecture>`` (its scratch encoder, ``--width`` channels at the first level,
default the architecture's) or ``<architecture>+<backbone>``, default options, random weights.
A step is one batch of segpipe's training on the device that ``segpipe train`` would take
(:mod:`segpipe.runtime`): the model in channels_last, the uint8 batch normalised on the device,
the forward pass under autocast (CUDA: bf16 where native, else fp16 with a GradScaler; CPU:
fp32), BCE loss in fp32 (the mean over a deep-supervision list), backward, Adam step.
``--compile`` compiles every model (``nn.Module.compile``) before its untimed steps.

Every model, segpipe's and the peers', lives in this one process and is timed in interleaved
rounds: a round runs ``--steps`` steps of each model in turn, so a load change (a shared machine,
GPU clocks) hits all alike. images/s is the median over rounds, a ratio the median of the
per-round ratios. Each model first runs two untimed steps (cuDNN autotuning, compilation).

- GFLOPs: forward GFLOPs per image as ``segpipe models`` counts them
  (:func:`segpipe.models.model_cost`: 2 per multiply-accumulate of convolutions and matrix
  products). A training step counts :data:`TRAIN_FLOPS_FACTOR` = 3 forwards (the backward pass
  computes gradients for activations and for weights, each about a forward's cost), so
  TFLOP/s = 3 × GFLOPs × images/s / 1000; ``--peak-tflops`` (the GPU's dense peak for the
  autocast dtype, from its datasheet) adds the percentage of it.
- peak MiB (CUDA): what the model adds to allocated memory at the peak of a training step
  (weights, gradients, Adam state, activations; ``torch.cuda.max_memory_allocated``), measured
  before the next model is built. On the CPU one process's resident set cannot be split per
  model: use ``segpipe train`` logs or run one model per invocation with /usr/bin/time.

Peers (``pip install -e '.[bench]'``, i.e. segmentation-models-pytorch and monai), built with
segpipe's conv-BatchNorm-ReLU where they offer the choice: ``smp.Unet(<resnet>,
encoder_weights=None)`` (``smp.UnetPlusPlus`` for unetpp) for models with a ResNet encoder;
for scratch models of width w, MONAI ``AttentionUnet`` (channels w…16w, strides 2)
for the attention families, ``BasicUNetPlusPlus`` for unetpp and ``BasicUNet`` (features
w…16w) for the others. The last column compares each segpipe model with that nearest peer:
speed (images/s) and efficiency (TFLOP/s), as the peers do less or more work per image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from segpipe.models import ARCHITECTURES, BACKBONES, build_model, model_cost
from segpipe.runtime import (DEVICES, IMAGENET_MEAN, IMAGENET_STD, acquire_device, amp_dtype,
                             forward_logits, place)
from segpipe.spec import default

DEFAULT_MODELS = [*ARCHITECTURES, "unet+resnet34", "attention_r2unet+resnet34",
                  "atrous_unet+resnet50"]
TRAIN_FLOPS_FACTOR = 3
PEERS_MISSING = ("peers not installed: pip install -e '.[bench]' (segmentation-models-pytorch, "
                 "monai); timing segpipe's models only")


@dataclass
class Entry:
    """A model under test with its optimizer and measurements."""

    name: str
    parameters: int
    gflops: float
    peer: str | None = None  # name of the nearest peer's entry (segpipe models only)
    step: Callable[[], None] | None = None
    peak_mb: float = float("nan")
    images_per_s: list[float] = field(default_factory=list)


def scratch_width(architecture: str, width: int | None) -> int:
    """The first-level width of a scratch model: ``width`` or the schema's default."""
    return width or default("$defs.architecture.width")


def build_segpipe(name: str, width: int | None) -> nn.Module:
    architecture, _, backbone = name.partition("+")
    if backbone in ("", "scratch"):
        definition = {"model": architecture}
        if width:
            definition["width"] = width
        return build_model(definition, {})
    return build_model({"model": architecture}, {"encoder": backbone, "weights": "none"})


def nearest_peer(name: str, width: int | None) -> tuple[str, Callable[[], nn.Module]]:
    """(name, builder) of a segpipe model's nearest peer (the module docstring)."""
    architecture, _, backbone = name.partition("+")
    if backbone not in ("", "scratch"):
        import segmentation_models_pytorch as smp

        kind = smp.UnetPlusPlus if architecture == "unetpp" else smp.Unet
        return (f"smp.{kind.__name__}({backbone})",
                lambda: kind(backbone, encoder_weights=None, in_channels=3, classes=1))
    from monai.networks.nets import AttentionUnet, BasicUNet, BasicUNetPlusPlus

    w = scratch_width(architecture, width)
    channels = tuple(w * 2**i for i in range(5))
    if "attention" in architecture:
        return (f"monai.AttentionUnet({w}..{16 * w})",
                lambda: AttentionUnet(2, 3, 1, channels, strides=(2, 2, 2, 2)))
    kind = BasicUNetPlusPlus if architecture == "unetpp" else BasicUNet
    return (f"monai.{kind.__name__}({w}..{16 * w})",
            lambda: kind(2, 3, 1, features=(*channels, w), act="relu", norm="batch", bias=False))


def training_step(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                  device: torch.device, autocast: torch.dtype | None) -> Callable[[], None]:
    """One step of segpipe's training on a fixed batch, with the model's own Adam and scaler."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)

    def step() -> None:
        logits = forward_logits(model, images, device, IMAGENET_MEAN, IMAGENET_STD, autocast)
        outputs = logits if isinstance(logits, list) else [logits]
        loss = sum(F.binary_cross_entropy_with_logits(o.float(), target) for o in outputs)
        scaler.scale(loss / len(outputs)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="as segpipe train's: a free GPU (held through its lock) or the CPU")
    parser.add_argument("--size", type=int,
                        help="image side (default: 512 on a GPU, 128 on the CPU)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--width", type=int, help="first-level width of scratch models and "
                        "their peers (default: each architecture's, 64)")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="architecture[+backbone] ... or 'all' (default: every "
                             "architecture and three ResNet models)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense peak TFLOP/s for the autocast dtype: adds %% of it")
    parser.add_argument("--no-peers", action="store_true", help="time segpipe's models only")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the setting and one object per model to PATH")
    args = parser.parse_args(argv)
    models = [f"{a}+{b}" for a in ARCHITECTURES for b in BACKBONES] \
        if args.models == ["all"] else args.models
    for name in models:
        architecture, _, backbone = name.partition("+")
        if architecture not in ARCHITECTURES or backbone not in ("", *BACKBONES):
            parser.error(f"unknown model {name!r}: expected architecture[+backbone] with "
                         f"architecture in {', '.join(ARCHITECTURES)} and backbone in "
                         f"{', '.join(BACKBONES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = acquire_device(args.device)
    autocast = amp_dtype(device, amp=True)
    args.size = args.size or (512 if device.type == "cuda" else 128)

    peers = not args.no_peers
    if peers:
        try:
            import monai  # noqa: F401
            import segmentation_models_pytorch  # noqa: F401
        except ImportError:
            print(PEERS_MISSING, file=sys.stderr)
            peers = False

    torch.manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    target = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.5).float()
    entries: dict[str, Entry] = {}

    def add(name: str, build: Callable[[], nn.Module], peer: str | None = None) -> None:
        """Builds, counts and warms up a model: two untimed steps (autotuning, compilation),
        the second one measured for peak memory on CUDA."""
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model = place(build(), device)
        entry = Entry(name, *model_cost(model, args.size), peer)
        model.train()
        if args.compile:
            model.compile()
        entry.step = training_step(model, images, target, device, autocast)
        entry.step()
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            entry.step()
            sync(device)
            entry.peak_mb = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        entries[name] = entry

    for name in models:
        peer = nearest_peer(name, args.width) if peers else None
        if peer and peer[0] not in entries:
            add(*peer)
        add(name, lambda: build_segpipe(name, args.width), peer and peer[0])

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"training step (forward + backward + Adam), {args.size}x{args.size}, batch "
          f"{args.batch}, {autocast or torch.float32}, channels_last"
          f"{', torch.compile' if args.compile else ''} on {where}; median of {args.rounds} "
          f"interleaved rounds of {args.steps} steps; TFLOP/s = {TRAIN_FLOPS_FACTOR} x forward")
    for _ in range(args.rounds):
        for entry in entries.values():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                entry.step()
            sync(device)
            entry.images_per_s.append(args.batch * args.steps / (time.perf_counter() - start))

    setting = {"device": where, "size": args.size, "batch": args.batch,
               "dtype": str(autocast or torch.float32).removeprefix("torch."),
               "channels_last": True, "compile": args.compile, "peers": peers}
    rows = []
    peak = f" {'% peak':>7}" if args.peak_tflops else ""
    print(f"{'model':<32} {'parameters':>11} {'GFLOPs':>8} {'images/s':>9} {'TFLOP/s':>8}"
          f"{peak} {'peak MiB':>9}   vs nearest peer (speed, TFLOP/s)")
    for name, entry in entries.items():
        rate = statistics.median(entry.images_per_s)
        tflops = TRAIN_FLOPS_FACTOR * entry.gflops * rate / 1000
        percent = f" {100 * tflops / args.peak_tflops:>6.1f}%" if args.peak_tflops else ""
        memory = f"{entry.peak_mb:>9.0f}" if device.type == "cuda" else f"{'n/a':>9}"
        versus, speed = "", None
        if entry.peer:
            other = entries[entry.peer]
            speed = statistics.median(a / b for a, b in zip(entry.images_per_s,
                                                            other.images_per_s))
            versus = (f"   {speed:.2f}x, {speed * entry.gflops / other.gflops:.2f}x "
                      f"vs {entry.peer}")
        rows.append({"model": name, "parameters": entry.parameters, "gflops": entry.gflops,
                     "images_per_s": rate, "tflops": tflops, "peak_mb": entry.peak_mb,
                     "peer": entry.peer, "speed_vs_peer": speed,
                     "tflops_vs_peer": speed and speed * entry.gflops / entries[entry.peer].gflops})
        print(f"{name:<32} {entry.parameters:>11,} {entry.gflops:>8.2f} {rate:>9.2f} {tflops:>8.3f}"
              f"{percent} {memory}{versus}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({**setting, "models": rows}, file, indent=1)


if __name__ == "__main__":
    main()
