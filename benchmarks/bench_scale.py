"""How the workflow scales with the number of photos and runs (issue 26).

Writes ``--count`` synthetic LabelMe photos of ``--size`` (JPEG beside its JSON, as a camera
folder annotated with LabelMe), and ``--count // 10`` (at least 4) test photos, then prints one
table: the dry-run time (``snakemake -n``) cold (no file index: every file read), warm (nothing
changed: a stat per file) and with one file changed; the parse of a cluster job
(``--mode remote``, as the executor runs Snakemake inside each job: the checks are skipped);
the dry run of a study of ``--runs`` runs on the same data (the run table); and ``segpipe
rasterise`` of the training folder with 1 and ``--workers`` threads: wall time and peak memory
(RSS). Each photo is a synthetic demo photo (segpipe.data.synthetic) drawn at 96×128 and
scaled to the size, with its own sensor noise (σ = 4), so that photos are distinct.

    python benchmarks/bench_scale.py --count 2000 --size 480 640 --runs 2000
    python benchmarks/bench_scale.py --count 100 --size 3000 4000 --runs 0   # 12 MP photos

Timings are of whole processes (Python start-up and imports included), taken with GNU time
(/usr/bin/time): wall and CPU (user + system) seconds, peak RSS. docs/cluster.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from segpipe.data.identity import same_photos, seen_in
from segpipe.data.index import FileIndex, labelme_index
from segpipe.data.synthetic import synthesise
from segpipe.files import labelme_files

REPO = Path(__file__).resolve().parents[1]
BASE = (96, 128)


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int) -> None:
    """``count`` distinct LabelMe photos of ``size`` in ``folder``."""
    folder.mkdir(parents=True)
    height, width = size
    scale = np.array([width / BASE[1], height / BASE[0]])
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        small, shapes = synthesise(rng, BASE)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        name = f"photo_{i:05d}"
        (folder / f"{name}.jpg").write_bytes(encoded.tobytes())
        for shape in shapes:
            shape["points"] = ((np.array(shape["points"]) + 0.5) * scale - 0.5).tolist()
        (folder / f"{name}.json").write_text(json.dumps({
            "version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": f"{name}.jpg",
            "imageData": None, "imageHeight": height, "imageWidth": width}))
    old = time.time() - 3600  # an hour old, as photos are: none is "racily" recent
    for path in folder.iterdir():
        os.utime(path, (old, old))


def study(workdir: Path, data: Path, runs: int) -> Path:
    """A study config of the tiny test study on ``data``; ``runs`` > 0: one experiment of that
    many runs (losses × seeds)."""
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["data"].update(train_dir=str(data / "train"), test_dir=str(data / "test"))
    if runs:
        losses = 20 if runs % 20 == 0 else 1
        config["losses"] = {f"bcedice_{k}": {"bce": 1 - k / losses, "dice": k / losses}
                            for k in range(losses)}
        config["defaults"].update(loss="bcedice_0", seeds=list(range(runs // losses)))
        config["experiments"] = {"scale": {"vary": {"loss": list(config["losses"])}}}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


def measure(command: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system), peak RSS (MiB) and output of ``command``,
    run under GNU time (a child of this large process would count this one's pages)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", *command], capture_output=True,
                          text=True, env=ENV)
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    user, system, peak = proc.stderr.splitlines()[-1].split()
    return (time.perf_counter() - start, float(user) + float(system), int(peak) / 1024,
            proc.stdout + proc.stderr)


def dry_run(workdir: Path, *args: str) -> tuple[float, float, float, str]:
    return measure([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
                    str(workdir), "--configfile", str(workdir / "config.yaml"), "--dry-run",
                    "--cores", "1", *args])


def rasterise(data: Path, output: Path, workers: int) -> tuple[float, float, float, str]:
    return measure([sys.executable, "-m", "segpipe", "rasterise", "--input",
                    str(data / "train"), "--output", str(output), "--size", "256", "256",
                    "--workers", str(workers)])


def checks_alone(workdir: Path, data: Path) -> tuple[float, float]:
    """In this process, with the index of ``workdir``: seconds of the data pass of a cluster
    job (index read, a stat per file) and of the whole data checks (+ same-photo groups of the
    training folder, test photos against it)."""
    files = {split: labelme_files(data / split) for split in ("train", "test")}
    start = time.perf_counter()
    index = FileIndex(workdir / ".snakemake" / "segpipe" / "labelme_index.json")
    entries = {split: labelme_index(paths, index) for split, paths in files.items()}
    passed = time.perf_counter() - start
    photos = {split: [entry.photo for entry in e] for split, e in entries.items()}
    same_photos(photos["train"])
    seen_in(photos["test"], photos["train"])
    assert index.read == 0
    return passed, time.perf_counter() - start


def index_line(output: str) -> str:
    return next((line.removeprefix("segpipe: ") for line in output.splitlines()
                 if "data files" in line), "")


ENV = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="training photos")
    parser.add_argument("--size", type=int, nargs=2, default=(3000, 4000), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=2000, help="runs of the large study (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="rasterise threads to compare")
    parser.add_argument("--workdir", type=Path, default=Path("bench_scale"))
    args = parser.parse_args()
    data = args.workdir / "data"
    made = {"count": args.count, "size": args.size}
    if not (data / "made.json").is_file() or json.loads((data / "made.json").read_text()) != made:
        shutil.rmtree(args.workdir, ignore_errors=True)
        start = time.perf_counter()
        write_photos(data / "train", args.count, tuple(args.size), seed=0)
        write_photos(data / "test", max(4, args.count // 10), tuple(args.size), seed=1)
        (data / "made.json").write_text(json.dumps(made))
        print(f"wrote the photos in {time.perf_counter() - start:.0f} s")
    for folder in args.workdir.glob("study*"):
        shutil.rmtree(folder)
    megabytes = sum(p.stat().st_size for p in data.rglob("*")) / 2**20
    tests = max(4, args.count // 10)

    small = study(args.workdir / "study", data, 0)
    load = os.getloadavg()[0]
    rows = []

    def row(what, result, note):
        wall, cpu, peak, _ = result
        rows.append((what, f"{wall:.1f}", f"{cpu:.1f}", f"{peak:.0f}", note))

    baseline = study(args.workdir / "study_demo", data, 0)
    edit = yaml.safe_load((baseline / "config.yaml").read_text())
    edit["data"].update(train_dir="results/demo_data/train", test_dir="results/demo_data/test")
    (baseline / "config.yaml").write_text(yaml.safe_dump(edit))
    row("dry run of the study on the demo data (no user files: the fixed cost)",
        dry_run(baseline), "")
    result = dry_run(small)
    row("dry run, cold (no index: every file read and decoded)", result, index_line(result[3]))
    result = dry_run(small)
    row("dry run, warm (nothing changed)", result, index_line(result[3]))
    changed = data / "train" / "photo_00001.json"
    document = json.loads(changed.read_text())
    changed.write_text(json.dumps({**document, "flags": {"x": True}}))
    result = dry_run(small)
    row("dry run, one JSON changed", result, index_line(result[3]))
    changed.write_text(json.dumps(document))  # as it was, an hour old, and known to the index
    os.utime(changed, (time.time() - 3600,) * 2)
    dry_run(small)
    result = dry_run(small, "--mode", "remote", "results/data/train.h5")
    row("parse inside a cluster job (`--mode remote`)", result,
        "checks skipped" if "start checks skipped" in result[3] else "checks made")
    passed, checked = checks_alone(small, data)
    rows.append(("in-process: a cluster job's data pass (index read, a stat per file)",
                 f"{passed:.2f}", "", "", ""))
    rows.append(("in-process: the warm data checks (+ same-photo groups, test vs training)",
                 f"{checked:.2f}", "", "", ""))
    if args.runs:
        large = study(args.workdir / "study_large", data, args.runs)
        shutil.copytree(small / ".snakemake" / "segpipe", large / ".snakemake" / "segpipe")
        for quiet in ((), ("--quiet",)):
            result = dry_run(large, *quiet)
            jobs = [line.split()[-1] for line in result[3].splitlines()
                    if line.startswith("total")]
            row(f"dry run of a {args.runs}-run study (warm index){' --quiet' if quiet else ''}",
                result, f"{jobs[0]} jobs planned" if jobs else "")
    for workers in dict.fromkeys((1, args.workers)):
        row(f"rasterise {args.count} photos to 256x256, {workers} thread(s)",
            rasterise(data, args.workdir / f"train_{workers}.h5", workers), "")
    if args.workers != 1:
        same = (args.workdir / "train_1.h5").read_bytes() == \
            (args.workdir / f"train_{args.workers}.h5").read_bytes()
        rows.append((f"caches of 1 and {args.workers} threads byte-identical", "", "", "",
                     str(same)))

    print(f"\n{args.count} + {tests} photos of {args.size[0]}x{args.size[1]} ({megabytes:.0f} "
          f"MiB); load average at the start: {load:.1f} on {os.cpu_count()} cores\n")
    print("| measurement | wall s | CPU s | peak RSS MiB | note |\n|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
