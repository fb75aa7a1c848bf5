"""The GPU check in one call: segpipe's GPU tests, benchmarks and a study on a lent GPU machine.

    python3 benchmarks/gpu_check.py [--wheels .whl] [--out DIR] [--budget 480] [--cpu]
    make gpu-check                                  # the same, with --wheels .whl

Made for a GPU machine without network whose Python has torch but not snakemake, jsonschema,
MONAI or segmentation-models-pytorch (docs/training.md#the-gpu-check): ``--wheels`` is a
folder of their wheels (benchmarks/gpu_wheels.sh fills it), installed with ``--no-index
--no-deps`` into a private folder, and segpipe itself with ``--no-deps``, so the machine's
torch stays the one used. Then, each step a subprocess with a time limit, all within
``--budget`` seconds (8 minutes):

1. ``pytest -m gpu``: the GPU tests (tests/test_gpu.py);
2. ``bench_models.py`` at 512x512, batch 8, bf16 where native, channels_last, with the peers;
3. ``bench_data.py`` at 512x512 against the U-Net's images/s of step 2 (the GPU's rate);
4. the study of benchmarks/gpu_study.yaml by Snakemake, end to end (about two minutes).

It prints one table (also ``<out>/gpu_check.md``; every step's output in
``<out>/gpu_check.log``) and exits non-zero when a step failed or ran out of time. ``--cpu``
rehearses the same steps on the CPU at tiny sizes (the GPU tests skip there): how this script
is tried without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480
# Each step's own limit (seconds) on the GPU; the budget left caps it too.
LIMITS = {"install": 90, "pytest": 150, "bench_models": 120, "bench_data": 90, "study": 200}
PACKAGES = (("torch", "torch"), ("torchvision", "torchvision"), ("snakemake", "snakemake"),
            ("jsonschema", "jsonschema"), ("monai", "monai"),
            ("segmentation_models_pytorch", "segmentation-models-pytorch"), ("h5py", "h5py"),
            ("cv2", "opencv-python-headless"), ("segpipe", "segpipe"))
"""(module, distribution) of what the steps import; the versions go into the table."""


class Check:
    """Runs the steps, keeping the table's rows and the log."""

    def __init__(self, out: Path, budget: float, env: dict[str, str]) -> None:
        self.out, self.env = out, env
        self.deadline = time.monotonic() + budget
        self.rows: list[tuple[str, str, str]] = []  # (check, result, seconds)
        self.failed = False
        self.log = open(out / "gpu_check.log", "w")  # noqa: SIM115 - open for the whole check

    def row(self, check: str, result: str, seconds: float | None = None, ok: bool = True) -> None:
        self.rows.append((check, result if ok else f"FAILED: {result}",
                          "" if seconds is None else f"{seconds:.0f}"))
        self.failed |= not ok

    def run(self, step: str, command: list[str], limit: float,
            cwd: Path = REPO) -> tuple[bool, str, float]:
        """(succeeded, output, seconds) of ``command``, killed at ``limit`` seconds or when
        the budget runs out."""
        limit = min(limit, self.deadline - time.monotonic())
        self.log.write(f"\n===== {step}: {' '.join(command)} (limit {limit:.0f} s)\n")
        self.log.flush()
        start = time.monotonic()
        if limit < 5:
            return False, "no time left in the budget", 0.0
        try:
            proc = subprocess.run(command, cwd=cwd, env=self.env, capture_output=True,
                                  text=True, timeout=limit)
        except subprocess.TimeoutExpired as exc:
            output = _text(exc.stdout) + _text(exc.stderr)
            self.log.write(output + f"\n===== {step}: killed after {limit:.0f} s\n")
            return False, f"ran out of time ({limit:.0f} s)\n{output}", time.monotonic() - start
        output = proc.stdout + proc.stderr
        self.log.write(output + f"\n===== {step}: exit {proc.returncode}\n")
        self.log.flush()
        return proc.returncode == 0, output, time.monotonic() - start

    def table(self) -> str:
        width = max(len(check) for check, _, _ in self.rows)
        lines = [f"| {'check':<{width}} | result | s |", f"|{'-' * (width + 2)}|---|--:|"]
        lines += [f"| {check:<{width}} | {result} | {seconds} |"
                  for check, result, seconds in self.rows]
        return "\n".join(lines)


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _tail(output: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in output.strip().splitlines()[-lines:])


def install(check: Check, wheels: Path | None, site: Path) -> bool:
    """The carried wheels and segpipe (``--no-deps``) into ``site``; then the versions."""
    start = time.monotonic()
    if wheels is not None:
        files = sorted(glob.glob(str(wheels / "*.whl")))
        if not files:
            check.row("install", f"no wheels in {wheels} (benchmarks/gpu_wheels.sh)", ok=False)
            return False
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
        ok, output, _ = check.run("install wheels", [*pip, *files], LIMITS["install"])
        if not ok:
            check.row("install", f"{len(files)} wheels: {_tail(output)}", ok=False)
            return False
        # segpipe itself, without its pins (torch 2.14): the machine's torch is used.
        with tempfile.TemporaryDirectory() as build:
            ok, output, _ = check.run(
                "install segpipe", [*pip, "--no-build-isolation", str(REPO)], LIMITS["install"],
                cwd=Path(build))
        shutil.rmtree(REPO / "build", ignore_errors=True)
        for info in REPO.glob("*.egg-info"):
            shutil.rmtree(info, ignore_errors=True)
        if not ok:  # the steps still import this checkout (PYTHONPATH): go on, marked failed
            check.row("install segpipe", f"pip install --no-deps: {_tail(output)}", ok=False)
    code = f"""
import importlib, importlib.metadata, sys, torch
def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"
for module, _ in {PACKAGES!r}:
    importlib.import_module(module)
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print("=", gpu + "; Python", sys.version.split()[0] + ";",
      ", ".join(dist + " " + version(dist) for _, dist in {PACKAGES!r}))
"""
    ok, output, _ = check.run("versions", [sys.executable, "-c", code], 60)
    found = re.findall(r"^= (.*)$", output, re.M)
    if not ok or not found:
        check.row("install", f"an import failed: {_tail(output)}", time.monotonic() - start,
                  ok=False)
        return False
    check.row("environment", found[-1], time.monotonic() - start)
    return True


def gpu_tests(check: Check) -> None:
    ok, output, seconds = check.run(
        "pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                          "no:cacheprovider", "tests"], LIMITS["pytest"])
    summary = re.findall(r"^=*\s*(\d+ \w+.*?) in [\d.]+s", output, re.M)
    check.row("pytest -m gpu", summary[-1] if summary else _tail(output), seconds, ok)


def bench_models(check: Check, cpu: bool) -> float | None:
    """One row per model; the default U-Net's images/s (the GPU's rate for bench_data)."""
    result = check.out / "bench_models.json"
    sizes = (["--device", "cpu", "--size", "64", "--batch", "2", "--rounds", "1", "--steps",
              "1", "--width", "8", "--models", "unet", "attention_unet", "unet+resnet18"] if cpu
             else
             ["--device", "cuda", "--size", "512", "--batch", "8", "--rounds", "3"])
    ok, output, seconds = check.run(
        "bench_models", [sys.executable, "benchmarks/bench_models.py", *sizes, "--json",
                         str(result)], LIMITS["bench_models"])
    if not ok or not result.is_file():
        check.row("bench_models", _tail(output), seconds, ok=False)
        return None
    bench = json.loads(result.read_text())
    check.row("bench_models", f"training step, {bench['size']}x{bench['size']}, batch "
              f"{bench['batch']}, {bench['dtype']}, channels_last, on {bench['device']}"
              f"{'' if bench['peers'] else ' (peers not installed)'}", seconds)
    for row in bench["models"]:
        versus = ""
        if row["peer"]:
            versus = (f"; {row['speed_vs_peer']:.2f}x the speed, {row['tflops_vs_peer']:.2f}x "
                      f"the TFLOP/s of {row['peer']}")
        memory = "" if row["peak_mb"] != row["peak_mb"] else f", {row['peak_mb']:.0f} MiB"
        check.row(f"  {row['model']}", f"{row['images_per_s']:.1f} images/s, "
                  f"{row['tflops']:.2f} TFLOP/s{memory}{versus}")
    return next((row["images_per_s"] for row in bench["models"] if row["model"] == "unet"),
                None)


def bench_data(check: Check, cpu: bool, gpu_rate: float | None) -> None:
    result = check.out / "bench_data.json"
    sizes = (["--size", "64", "--count", "8", "--epochs", "1", "--workers", "0", "1"] if cpu
             else ["--size", "512", "--count", "48", "--epochs", "2", "--workers", "0", "4",
                   "8"])
    rate = ["--gpu-images-per-s", f"{gpu_rate:.3f}"] if gpu_rate else []
    ok, output, seconds = check.run(
        "bench_data", [sys.executable, "benchmarks/bench_data.py", *sizes, *rate, "--json",
                       str(result)], LIMITS["bench_data"])
    if not ok or not result.is_file():
        check.row("bench_data", _tail(output), seconds, ok=False)
        return
    bench = json.loads(result.read_text())
    gpu = bench["gpu_images_per_s"]
    check.row("bench_data", f"{bench['count']} photos at {bench['size']}x{bench['size']}: "
              f"rasterise {bench['rasterise']:.1f} images/s, HDF5 loader "
              f"{bench['cached']:.0f} samples/s ({bench['cached'] / bench['per_item']:.1f}x "
              "per-item decoding)", seconds)
    for row in bench["training"]:
        versus = (f", {row['persistent'] / gpu:.2f}x the U-Net training step's {gpu:.0f} "
                  "images/s" if gpu else "")
        check.row(f"  training loader, {row['workers']} workers",
                  f"{row['persistent']:.1f} samples/s{versus}")


def study(check: Check, cpu: bool) -> None:
    """benchmarks/gpu_study.yaml by Snakemake in a fresh folder; each run's device and Dice."""
    import yaml

    workdir = Path(tempfile.mkdtemp(prefix="segpipe-gpu-study-"))
    config = yaml.safe_load((REPO / "benchmarks" / "gpu_study.yaml").read_text())
    if cpu:  # the same study, tiny
        config["data"].update(size=[32, 32], synthetic={"train_count": 8, "test_count": 4,
                                                        "seed": 0, "size": [48, 64]})
        config["architectures"] = {name: {**a, "width": 4, "depth": 2}
                                   for name, a in config["architectures"].items()}
        config["backbones"]["resnet18"]["stem"] = "small"
        config["train"].update(epochs=2, snapshot_epochs=[1, 2])
        config["resources"].update(device="cpu", num_workers=0, train_threads=1)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    ok, output, seconds = check.run(
        "study", [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
                  str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores",
                  str(os.cpu_count() or 1), "--resources", "gpu=1"], LIMITS["study"])
    runs = sorted((workdir / "results" / "runs").glob("*/metrics.csv"))
    if not ok or not (workdir / "results" / "summary.md").is_file():
        check.row("study (Snakemake)", f"{len(runs)} run(s) evaluated; {_tail(output)}",
                  seconds, ok=False)
        return
    check.row("study (Snakemake)", f"benchmarks/gpu_study.yaml end to end: {len(runs)} runs, "
              "summary.md written", seconds)
    for metrics in runs:
        run = metrics.parent
        with open(metrics, newline="") as file:
            values = next(csv.DictReader(file))
        device = re.search(r"device (\S+?)(?:,|$)(?: autocast (\S+))?",
                           (run / "train.log").read_text(), re.M)
        where = "?" if device is None else " ".join(filter(None, device.groups()))
        check.row(f"  {run.name}", f"test Dice {float(values['dice']):.3f} after "
                  f"{values['epochs']} epochs, {float(values['train_seconds']):.1f} s training "
                  f"on {where}")
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path,
                        help="folder of wheels to install first (benchmarks/gpu_wheels.sh)")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "segpipe-site",
                        help="where the wheels and segpipe are installed")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or REPO / "benchmarks" / "out"),
                        help="folder of gpu_check.md, gpu_check.log and the benchmarks' JSON "
                             "(default: $OUT, else benchmarks/out)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for all steps (default {BUDGET_S})")
    parser.add_argument("--cpu", action="store_true",
                        help="rehearse on the CPU at tiny sizes (no GPU needed)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = [str(REPO), *([str(args.site)] if args.wheels else []),
            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1",
           # the jobs' `python -m segpipe` is this Python; the wheels' scripts come next
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), str(args.site / "bin"),
                                    os.environ.get("PATH", "")])}
    if args.wheels:
        shutil.rmtree(args.site, ignore_errors=True)
    check = Check(args.out, args.budget, env)
    start = time.monotonic()
    if install(check, args.wheels, args.site):
        gpu_tests(check)
        gpu_rate = bench_models(check, args.cpu)
        bench_data(check, args.cpu, gpu_rate)
        study(check, args.cpu)
    total = time.monotonic() - start
    check.row("total", f"{'within' if total <= args.budget else 'over'} the budget of "
              f"{args.budget:.0f} s", total, ok=total <= args.budget)
    table = check.table()
    (args.out / "gpu_check.md").write_text(table + "\n")
    check.log.close()
    print(table)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
