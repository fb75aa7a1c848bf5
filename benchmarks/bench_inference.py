"""Sliding-window inference: segpipe.inference.sliding_window against MONAI's
sliding_window_inference on the same model and photo (seconds, ratio), and the peak memory of
both on a large photo.

    python benchmarks/bench_inference.py [--device auto|cuda|cpu] [--sizes 1024x768 2048x1536]
        [--tile 256] [--width 4] [--depth 3] [--classes 2] [--batch 4] [--rounds 3]
        [--threads N] [--memory-size 8000x6000] [--memory-classes 1] [--json PATH]

Speed: for every ``--sizes`` photo (width x height, random uint8 RGB) two models: segpipe's
U-Net (``--width``, ``--depth``, ``--classes`` outputs, random weights, eval mode, in
channels_last) and a 1x1 convolution, so cheap that the windowing weighs. Both paths call the
same predictor (segpipe's :func:`~segpipe.runtime.forward_logits`, then softmax, or sigmoid for
one class) on the device, tiles of ``--tile`` pixels, overlap 1/2, Gaussian σ = tile/8,
``--batch`` tiles per forward pass, and return the probabilities on the CPU: ours from the
uint8 photo; MONAI's from the photo as float (1, 3, h, w) on the CPU (the conversion is
timed: MONAI's output has its input's dtype), ``sw_device`` the device, ``device`` the CPU.
Timed in interleaved rounds (ours, MONAI's) after an untimed one that checks the outputs agree
(1e-5); seconds are medians over rounds, a ratio MONAI/ours the median of per-round ratios
(> 1: ours faster). "windowing" is the total less the time inside the predictor (synchronised
on CUDA): cutting the tiles, weighting, accumulating, dividing (and MONAI's float conversion).

Memory: each case in a fresh process (a 1x1 convolution to ``--memory-classes`` outputs on
the CPU over a ``--memory-size`` photo, 1 thread): the peak of the resident anonymous memory
(RssAnon, sampled every 2 ms while the call runs) above that just before the call, next to
ours' bound (C + 1)·h·w·4 bytes (the sum and the weight map; the returned probabilities are
the sum). The photo (3·h·w bytes) is resident before the call in every case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from segpipe.inference import sliding_window, window_starts
from segpipe.models import build_model
from segpipe.runtime import (DEVICES, IMAGENET_MEAN, IMAGENET_STD, acquire_device,
                             forward_logits, place, probabilities)

OVERLAP, SIGMA_SCALE = 0.5, 0.125


def size(text: str) -> tuple[int, int]:
    """``WxH`` → (height, width)."""
    width, _, height = text.partition("x")
    return int(height), int(width)


def predictor(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch of tiles (uint8, or float 0..255 from MONAI) → probabilities on ``device``."""
    @torch.no_grad()  # not inference_mode: MONAI weights the tiles in place
    def predict(tiles: torch.Tensor) -> torch.Tensor:
        return probabilities(forward_logits(model, tiles, device, IMAGENET_MEAN, IMAGENET_STD))
    return predict


def ours(predict, image: torch.Tensor, tile: int, batch: int) -> torch.Tensor:
    return sliding_window(predict, image, (tile, tile), OVERLAP, SIGMA_SCALE, batch)


def monais(predict, image: torch.Tensor, tile: int, batch: int,
           device: torch.device) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(image[None].float(), (tile, tile), batch, predict,
                                    overlap=OVERLAP, mode="gaussian", sigma_scale=SIGMA_SCALE,
                                    padding_mode="constant", cval=0, sw_device=device,
                                    device=torch.device("cpu"))[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int,
              batch: int, rounds: int, device: torch.device) -> dict:
    """Medians over interleaved rounds after one untimed round, which also checks the
    outputs agree. The time inside ``predict`` is summed too: the rest is the windowing."""
    inside = []

    def timed(tiles: torch.Tensor) -> torch.Tensor:
        sync(device)
        start = time.perf_counter()
        out = predict(tiles)
        sync(device)
        inside.append(time.perf_counter() - start)
        return out
    runs = {"ours": lambda: ours(timed, image, tile, batch),
            "monai": lambda: monais(timed, image, tile, batch, device)}
    difference = (runs["ours"]() - runs["monai"]()).abs().max().item()
    if difference > 1e-5:
        raise SystemExit(f"outputs differ by {difference:.2e} (> 1e-5)")
    total, windowing = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            inside.clear()
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            total[name].append(time.perf_counter() - start)
            windowing[name].append(total[name][-1] - sum(inside))
    row = {"max_difference": difference}
    for part, seconds in (("", total), ("windowing_", windowing)):
        row[f"{part}ours_s"] = statistics.median(seconds["ours"])
        row[f"{part}monai_s"] = statistics.median(seconds["monai"])
        row[f"{part}ratio"] = statistics.median(m / o for m, o in zip(seconds["monai"],
                                                                       seconds["ours"]))
    return row


def anonymous_mib() -> float:
    """This process's resident anonymous memory (heap, tensors; not the mapped libraries)."""
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("RssAnon:")) / 1024


def peak_anonymous_mib(run: Callable[[], torch.Tensor], every_s: float = 0.002
                       ) -> tuple[float, torch.Tensor]:
    """The peak of :func:`anonymous_mib` while ``run`` runs, sampled by a thread (torch's
    kernels release the GIL), and after it (the result still held)."""
    peak, done = [anonymous_mib()], threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            peak.append(max(peak[-1], anonymous_mib()))
    sampler = threading.Thread(target=sample)
    sampler.start()
    result = run()
    done.set()
    sampler.join()
    return max(peak[-1], anonymous_mib()), result


def memory_child(which: str, height: int, width: int, classes: int, tile: int,
                 batch: int) -> None:
    """One memory case in this process: prints JSON (MiB)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    predict = predictor(place(nn.Conv2d(3, classes, 1), cpu).eval(), cpu)
    image = torch.empty(3, height, width, dtype=torch.uint8).random_(0, 256)
    run = {"ours": ours, "monai": lambda *a: monais(*a, cpu)}[which]
    run(predict, image[:, :tile + 1, :tile + 1], tile, batch)  # imports, lazy initialisation
    before = anonymous_mib()
    peak, out = peak_anonymous_mib(lambda: run(predict, image, tile, batch))
    print(json.dumps({"case": which, "classes": classes, "before_mib": before,
                      "peak_mib": peak, "extra_mib": peak - before,
                      "output_mib": out.nbytes / 2**20}))


def memory_case(which: str, memory_size: tuple[int, int], classes: int, tile: int,
                batch: int) -> dict:
    height, width = memory_size
    command = [sys.executable, __file__, "--memory-child", which, str(height), str(width),
               str(classes), "--tile", str(tile), "--batch", str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="as segpipe's jobs: a free GPU (held through its lock) or the CPU")
    parser.add_argument("--sizes", type=size, nargs="+", default=[(768, 1024), (1536, 2048)],
                        metavar="WxH", help="photos timed (default 1024x768 2048x1536)")
    parser.add_argument("--tile", type=int, default=256, help="tile side (default 256)")
    parser.add_argument("--width", type=int, default=4, help="U-Net width (default 4)")
    parser.add_argument("--depth", type=int, default=3, help="U-Net depth (default 3)")
    parser.add_argument("--classes", type=int, default=2,
                        help="model outputs (default 2: background + 1 class, softmax)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per forward (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--memory-size", type=size, default=(6000, 8000), metavar="WxH",
                        help="photo of the memory cases (default 8000x6000)")
    parser.add_argument("--memory-classes", type=int, nargs="*", default=[1],
                        help="outputs of the memory cases' 1x1 convolution (default 1; "
                             "none: skip them)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        which, *numbers = args.memory_child
        memory_child(which, *map(int, numbers), args.tile, args.batch)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = acquire_device(args.device)
    torch.manual_seed(0)
    models = {f"unet w{args.width} d{args.depth}":
              build_model({"model": "unet", "width": args.width, "depth": args.depth}, {},
                          outputs=args.classes),
              "1x1 conv": nn.Conv2d(3, args.classes, 1)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"sliding windows {args.tile}x{args.tile}, overlap {OVERLAP}, sigma tile*"
          f"{SIGMA_SCALE}, {args.batch} tiles per batch, {args.classes} outputs, fp32 on "
          f"{where}; median of {args.rounds} interleaved rounds")
    print(f"{'':<35} {'total (predict included)':^30}   {'windowing (predict excluded)':^30}")
    print(f"{'model':<16} {'photo':>11} {'tiles':>6}" + 2 * f" {'ours s':>9} {'MONAI s':>9} "
          f"{'MONAI/ours':>10} ")
    rows = []
    for name, model in models.items():
        predict = predictor(place(model, device).eval(), device)
        for height, width in args.sizes:
            image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
            row = time_pair(predict, image, args.tile, args.batch, args.rounds, device)
            tiles = len(window_starts(max(height, args.tile), args.tile, OVERLAP)) \
                * len(window_starts(max(width, args.tile), args.tile, OVERLAP))
            rows.append({"model": name, "photo": f"{width}x{height}", "tiles": tiles, **row})
            print(f"{name:<16} {width:>5}x{height:<5} {tiles:>6}" + "".join(
                f" {row[p + 'ours_s']:>9.3f} {row[p + 'monai_s']:>9.3f} {row[p + 'ratio']:>10.2f} "
                for p in ("", "windowing_")), flush=True)
    memory = []
    if args.memory_classes:
        height, width = args.memory_size
        print(f"peak memory, {width}x{height} photo ({3 * height * width / 2**20:.0f} MiB "
              f"uint8), 1x1 conv on the CPU, each case in a fresh process: peak MiB of "
              f"anonymous memory above that before the call")
        print(f"{'case':<8} {'C':>3} {'extra MiB':>10} {'(C+1)hw*4 MiB':>14} "
              f"{'output MiB':>11}")
        for classes in args.memory_classes:
            bound = (classes + 1) * height * width * 4 / 2**20
            for which in ("ours", "monai"):
                case = memory_case(which, args.memory_size, classes, args.tile, args.batch)
                memory.append({**case, "bound_mib": bound})
                print(f"{which:<8} {classes:>3} {case['extra_mib']:>10.0f} {bound:>14.0f} "
                      f"{case['output_mib']:>11.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": where, "tile": args.tile, "batch": args.batch,
                       "classes": args.classes, "speed": rows, "memory": memory}, file,
                      indent=1)


if __name__ == "__main__":
    main()
