"""Aggregation with many classes: time, peak memory and figure sizes of `segpipe aggregate`.

    python benchmarks/bench_many_classes.py [--classes 254] [--repeat 2] [--workdir DIR]

Self-contained: it writes LabelMe folders of small synthetic images whose rectangles carry
``--classes`` labels (every label in the training folder), a study of two runs (U-Net and
Attention U-Net, one seed, one epoch) on 4 test images, runs Snakemake up to the evaluate jobs
(``--until evaluate``), then times ``segpipe aggregate`` on the two runs ``--repeat`` times in a
fresh process each (wall and CPU seconds, peak resident memory of the process) and prints the
pixel size of each figure. A ``--workdir`` that holds the evaluated study is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import yaml

REPO = Path(__file__).resolve().parents[1]
RUNS = ("unet__scratch__ce__plain__s0", "attention_unet__scratch__ce__plain__s0")


def write_folder(folder: Path, names: list[str], count: int, seed: int, size: int = 48) -> None:
    """``count`` LabelMe files of ``size`` x ``size`` noise images, each with rectangles of the
    labels ``names`` dealt out in turn (every label drawn when ``count`` files suffice)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_image = -(-len(names) // count)
    for i in range(count):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i:02d}.png"), image)
        shapes = []
        for label in names[i * per_image:(i + 1) * per_image]:
            x, y = rng.integers(0, size - 6, 2)
            w, h = rng.integers(3, 7, 2)
            shapes.append({"label": label, "shape_type": "rectangle", "flags": {},
                           "points": [[float(x), float(y)], [float(x + w), float(y + h)]]})
        (folder / f"img{i:02d}.json").write_text(json.dumps(
            {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": f"img{i:02d}.png",
             "imageData": None, "imageHeight": size, "imageWidth": size}))


def prepare(workdir: Path, classes: int) -> None:
    names = [f"c{i:03d}" for i in range(classes)]
    write_folder(workdir / "train", names, 12, seed=0)
    write_folder(workdir / "test", names, 4, seed=1)
    config = {
        "data": {"train_dir": "train", "test_dir": "test", "size": [32, 32], "classes": names,
                 "val_fraction": 0.25},
        "architectures": {"unet": {"model": "unet", "width": 4, "depth": 2},
                          "attention_unet": {"model": "attention_unet", "width": 4, "depth": 2}},
        "backbones": {"scratch": {}}, "losses": {"ce": {"bce": 1.0}},
        "augmentations": {"plain": {}},
        "defaults": {"architecture": "unet", "backbone": "scratch", "loss": "ce",
                     "augmentation": "plain", "seeds": [0]},
        "experiments": {"architecture": {"vary": {"architecture": ["unet", "attention_unet"]}}},
        "train": {"epochs": 1, "batch_size": 4, "scheduler": "none", "early_stop_patience": 0,
                  "snapshot_epochs": [1]},
        "evaluate": {"examples": 2},
        "resources": {"train_threads": 1, "device": "cpu", "num_workers": 0},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
                    str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "1",
                    "--until", "evaluate", "--quiet"], check=True)


def aggregate_once(workdir: Path, output: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak resident MiB of one `segpipe aggregate` process."""
    spec = {"name": "architecture", "axes": ["architecture"], "sweep": None,
            "baseline": {"architecture": "unet"},
            "runs": [{"run": run, "dir": str(workdir / "results" / "runs" / run), "seed": 0,
                      "architecture": run.split("__")[0]} for run in RUNS]}
    (workdir / "spec.json").write_text(json.dumps(spec))
    start = time.perf_counter()
    code = ("import resource, sys; from segpipe.cli import main; code = main(sys.argv[1:]); "
            "use = resource.getrusage(resource.RUSAGE_SELF); print('usage', use.ru_maxrss, "
            "use.ru_utime + use.ru_stime, file=sys.stderr); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, "aggregate", "--experiment",
                           "architecture", "--spec", f"@{workdir / 'spec.json'}", "--output-dir",
                           str(output)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    rss_kib, cpu = done.stderr.rsplit("usage", 1)[1].split()[:2]
    return seconds, float(cpu), int(rss_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=254)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="many_classes_"))
    if not all((workdir / "results" / "runs" / run / "per_image.csv").exists() for run in RUNS):
        prepare(workdir, args.classes)
    output = workdir / "aggregate"
    print(f"{args.classes} classes, {len(RUNS)} runs x 4 test images ({workdir})")
    for attempt in range(args.repeat):
        seconds, cpu, mib = aggregate_once(workdir, output)
        print(f"aggregate {attempt + 1}: {seconds:.1f} s wall, {cpu:.1f} s CPU, "
              f"peak {mib:.0f} MiB", flush=True)
    PIL.Image.MAX_IMAGE_PIXELS = None  # the figures are ours, however large
    for figure in sorted(output.glob("*.png")):
        with PIL.Image.open(figure) as png:
            print(f"{figure.name}: {png.width} x {png.height} px, "
                  f"{figure.stat().st_size / 1024:.0f} KiB")
    print(f"load: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs; "
          f"self {resource.getrusage(resource.RUSAGE_SELF).ru_utime:.0f} s user")


if __name__ == "__main__":
    main()
