"""Native resolution at photo scale: rasterise time and cache size for large photos at two
scales, and the peak memory of evaluate and predict on one very large photo.

    python benchmarks/bench_native.py [--count 4] [--photo 3000 4000] [--scales 1 0.25]
        [--large 6000 8000] [--large-scale 0.25] [--json PATH]

Self-contained: writes ``count`` synthetic LabelMe photos of ``photo`` (H W; default 12 MP, the
demo generator with cracks) and rasterises them (binary) at each of ``scales`` (seconds per photo, MiB
of cache per photo, and the same for ``data.size`` 256x256 as the baseline). Then it trains a
tiny U-Net for one epoch on 64x64 patches of a small native cache, and runs ``segpipe
evaluate`` on a test cache holding one ``large`` photo (a synthetic one enlarged 8x) at
``large-scale`` (scored at its
original size) and ``segpipe predict`` on that photo, each in a process of its own whose peak
resident memory (ru_maxrss) is reported, beside the size of the photo's probabilities at its
original size (C x H x W x 4 bytes) as the yardstick.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from segpipe.data.cache import build_cache
from segpipe.data.geometry import Geometry
from segpipe.data.synthetic import write_dataset
from segpipe.labels import Labels
from segpipe.train import train_run

BINARY = Labels.from_config(background=["grass"])
LABELS = Labels.from_config(["stone", "leaf", "crack"], background=["grass"])
SPEC = {
    "run": "unet__scratch__bcedice_0.5__plain__s0", "seed": 0,
    "names": {"architecture": "unet", "backbone": "scratch", "loss": "bcedice_0.5",
              "augmentation": "plain"},
    "architecture": {"model": "unet", "width": 4, "depth": 3}, "backbone": {},
    "loss": {"bce": 0.5, "dice": 0.5}, "augmentation": {},
    "train": {"epochs": 1, "batch_size": 4, "snapshot_epochs": [], "amp": False,
              "patch": [64, 64], "patches_per_epoch": 16},
}


def rasterise(folder: Path, output: Path, geometry: Geometry, count: int) -> tuple[float, float]:
    """Seconds per photo and MiB of cache per photo."""
    start = time.perf_counter()
    build_cache(folder, output, geometry, BINARY, val_fraction=0.5)
    return (time.perf_counter() - start) / count, output.stat().st_size / 2**20 / count


def peak_mib(command: list[str], cwd: Path) -> float:
    """Run ``segpipe <command>`` in a process of its own; its peak resident memory in MiB (the
    kernel's high-water mark of the process's own memory, VmHWM: ru_maxrss would count the
    parent's at the fork)."""
    code = ("import re, sys, torch, segpipe.evaluate, segpipe.predict\n"
            "from segpipe.cli import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])")
    done = subprocess.run([sys.executable, "-c", code, *command], cwd=cwd, check=True,
                          capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024  # kB


def enlarge(folder: Path, factor: int) -> None:
    """Make each photo of a synthetic LabelMe ``folder`` ``factor`` times larger, its shapes
    too (cheaper than synthesising a very large photo)."""
    for path in folder.glob("*.json"):
        document = json.loads(path.read_text())
        image = cv2.imread(str(path.with_name(document["imagePath"])))
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(path.with_name(document["imagePath"])), image,
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        for shape in document["shapes"]:
            shape["points"] = [[x * factor, y * factor] for x, y in shape["points"]]
        document["imageHeight"], document["imageWidth"] = image.shape[:2]
        path.write_text(json.dumps(document))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4, help="photos to rasterise")
    parser.add_argument("--photo", type=int, nargs=2, default=[3000, 4000], metavar=("H", "W"))
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--large", type=int, nargs=2, default=[6000, 8000], metavar=("H", "W"))
    parser.add_argument("--large-scale", type=float, default=0.25)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    results: dict = {"photo": args.photo, "count": args.count, "rasterise": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_dataset(tmp / "photos", args.count, seed=0, size=tuple(args.photo), cracks=True)
        results["synthesise_s_per_photo"] = (time.perf_counter() - start) / args.count
        for name, geometry in [("size 256x256", Geometry(size=(256, 256))),
                               *((f"scale {s:g}", Geometry(scale=s)) for s in args.scales)]:
            results["rasterise"][name] = rasterise(tmp / "photos", tmp / f"{name}.h5".replace(
                " ", "_"), geometry, args.count)

        write_dataset(tmp / "small", 8, seed=1, size=(192, 256), cracks=True)
        build_cache(tmp / "small", tmp / "small.h5", Geometry(scale=args.large_scale), LABELS,
                    val_fraction=0.34)
        train_run(SPEC, tmp / "small.h5", tmp / "run", device="cpu")
        factor = 8
        write_dataset(tmp / "large", 1, seed=2, cracks=True,
                      size=(args.large[0] // factor, args.large[1] // factor))
        enlarge(tmp / "large", factor)
        build_cache(tmp / "large", tmp / "large.h5", Geometry(scale=args.large_scale), LABELS,
                    train_cache=tmp / "small.h5")
        height, width = args.large
        results["probabilities_mib"] = LABELS.outputs * height * width * 4 / 2**20
        results["imports_peak_mib"] = peak_mib(["--help"], tmp)
        results["evaluate_peak_mib"] = peak_mib(
            ["evaluate", "--run-dir", str(tmp / "run"), "--cache", str(tmp / "large.h5"),
             "--examples", "1", "--device", "cpu"], tmp)
        results["predict_peak_mib"] = peak_mib(
            ["predict", "--checkpoint", str(tmp / "run" / "model.pt"), "--input",
             str(tmp / "large"), "--output", str(tmp / "predicted"), "--device", "cpu"], tmp)
    print(f"rasterise {args.count} photos of {args.photo[0]}x{args.photo[1]} "
          f"(synthesised in {results['synthesise_s_per_photo']:.1f} s each):")
    baseline = results["rasterise"]["size 256x256"]
    for name, (seconds, mib) in results["rasterise"].items():
        print(f"  {name:14s} {seconds:6.2f} s/photo ({seconds / baseline[0]:4.1f} x size), "
              f"{mib:7.1f} MiB/photo")
    print(f"one {height}x{width} photo at scale {args.large_scale:g}, {LABELS.outputs} outputs "
          f"(its probabilities at the original size: {results['probabilities_mib']:.0f} MiB):")
    print(f"  segpipe's imports    {results['imports_peak_mib']:7.0f} MiB (the same process "
          "without work)")
    print(f"  evaluate peak memory {results['evaluate_peak_mib']:7.0f} MiB")
    print(f"  predict peak memory  {results['predict_peak_mib']:7.0f} MiB (with mirrors)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
