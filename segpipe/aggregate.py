"""Aggregate the runs of an experiment into ``summary.csv`` and figures, and all experiments
into ``results/summary.md``.

Groups are the distinct combinations of the experiment's varied axes, in the order the runs
are listed; the replicates of a group are its seeds. Each statistic is the mean over seeds
with the half-width of its 95 % confidence interval from Student's t distribution:

    mean ± t_{0.975, n−1} · s / √n,    s = sample standard deviation (ddof = 1).

With one seed the interval is undefined: NaN in ``summary.csv``, "—" in ``summary.md``.
The test split is never used for model selection: the best group is the one with the
highest mean validation Dice (each run's best epoch in ``history.csv``); its test metrics
are reported.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from segpipe import SegpipeError, plots
from segpipe.columns import METRIC_COLUMNS, RUN_COLUMNS
from segpipe.files import atomic_path

EVOLUTION_KEYS = ("epochs", "probs", "images", "masks", "names", "threshold")
MAX_EVOLUTION_ROWS = 9
MAX_SAMPLES = 3

# t_{0.975, ν} for ν = 1..30, from standard tables (e.g. NIST/SEMATECH e-Handbook of
# Statistical Methods, §1.3.6.7.2); tests check each value by integrating the t density.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
_Z975 = 1.959964


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` ≥ 1 degrees of freedom.

    Tabulated up to 30; beyond, the Cornish–Fisher expansion (Abramowitz & Stegun 26.7.5)
    z + (z³ + z)/(4ν) + (5z⁵ + 16z³ + 3z)/(96ν²), whose error there is below 1e-4."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95 % CI half-width t_{0.975, n−1} · s / √n of ``values`` (NaN when n = 1)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    if x.size == 1:
        return float(x[0]), math.nan
    return float(x.mean()), t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


# --------------------------------------------------------------------------- reading inputs

def _read_csv(path: Path, numeric: Sequence[str], text: Sequence[str] = (),
              allow_empty: bool = False) -> pd.DataFrame:
    """A CSV file with the ``numeric`` and ``text`` columns and, unless ``allow_empty``, rows."""
    if not path.is_file():
        raise SegpipeError(f"{path}: file not found")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SegpipeError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in (*text, *numeric) if c not in table.columns]
    if missing:
        raise SegpipeError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.empty:
        if not allow_empty:
            raise SegpipeError(f"{path}: no rows")
        return table.astype(dict.fromkeys(numeric, float))
    wrong = [c for c in numeric if not pd.api.types.is_numeric_dtype(table[c])]
    if wrong:
        raise SegpipeError(f"{path}: non-numeric values in column(s) {', '.join(wrong)}")
    return table


def _read_evolution(path: Path) -> dict[str, np.ndarray]:
    """evolution.npz with consistent shapes: epochs (S,), probs (S,K,H,W), images (K,H,W,3),
    masks (K,H,W), names (K,), the evaluation threshold (a scalar), optional probs_best
    (K,H,W); K ≥ 1, and S ≥ 1 unless probs_best is present (no configured snapshot epoch may
    have been reached)."""
    if not path.is_file():
        raise SegpipeError(f"{path}: file not found")
    try:
        with np.load(path) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SegpipeError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [key for key in EVOLUTION_KEYS if key not in data]
    if missing:
        raise SegpipeError(f"{path}: missing array(s) {', '.join(missing)} (an older "
                           "segpipe evaluate wrote it? re-run: snakemake --forcerun evaluate)")
    s, k = len(data["epochs"]), len(data["names"])
    if k == 0:
        raise SegpipeError(f"{path}: holds no test image")
    if s == 0 and "probs_best" not in data:
        raise SegpipeError(f"{path}: holds neither a snapshot epoch nor probs_best, so there "
                           "is no prediction to show")
    h, w = data["masks"].shape[1:] if data["masks"].ndim == 3 else (None, None)
    expected = {"probs": (s, k, h, w), "images": (k, h, w, 3), "masks": (k, h, w),
                "threshold": ()}
    if "probs_best" in data:
        expected["probs_best"] = (k, h, w)
    wrong = [f"{key} {data[key].shape} (expected {shape})" for key, shape in expected.items()
             if data[key].shape != shape]
    if wrong:
        raise SegpipeError(f"{path}: inconsistent array shapes: {'; '.join(wrong)}")
    return data


def _check_spec(name: str, spec: dict) -> tuple[list[str], list[dict]]:
    axes, runs = spec.get("axes", []), spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SegpipeError(f"experiment '{name}': spec key 'runs' must be a non-empty list")
    for i, run in enumerate(runs):
        missing = [key for key in ("run", "dir", "seed", *axes) if key not in run]
        if missing:
            raise SegpipeError(f"experiment '{name}': runs[{i}] lacks key(s) {', '.join(missing)}")
    return list(axes), runs


def _load_runs(name: str, axes: list[str], runs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run (group, seed, test metrics, best validation Dice) and the per-snapshot
    test metrics of every run (group, seed, epoch, metrics)."""
    rows, by_epoch = [], []
    for run in runs:
        folder = Path(run["dir"])
        group = " / ".join(str(run[axis]) for axis in axes) or name
        metrics = _read_csv(folder / "metrics.csv", (*METRIC_COLUMNS, *RUN_COLUMNS)).iloc[0]
        history = _read_csv(folder / "history.csv", ("val_dice",))
        snapshots = _read_csv(folder / "metrics_by_epoch.csv", ("epoch", *plots.CURVE_METRICS),
                              allow_empty=True)
        rows.append({"group": group, **{axis: str(run[axis]) for axis in axes},
                     "seed": run["seed"], "run": run["run"], "dir": folder,
                     **metrics[[*METRIC_COLUMNS, *RUN_COLUMNS]].to_dict(),
                     "val_dice": history["val_dice"].max()})
        by_epoch.append(snapshots.assign(group=group, seed=run["seed"]))
    return pd.DataFrame(rows), pd.concat(by_epoch, ignore_index=True)


# --------------------------------------------------------------------------- statistics

def summarise(runs: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """summary.csv: one row per group in order of appearance — ``group``, the axes,
    ``n_seeds``, ``<metric>_mean``/``<metric>_ci95`` for each test metric and ``val_dice``,
    ``parameters``, ``train_seconds_mean``, ``epochs_mean``, ``best_run``, ``best_run_val_dice``."""
    rows = []
    for group, members in runs.groupby("group", sort=False):
        row = {"group": group, **members.iloc[0][list(axes)].to_dict(), "n_seeds": len(members)}
        for metric in (*METRIC_COLUMNS, "val_dice"):
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean_ci95(members[metric])
        val_dice = members["val_dice"]
        best = members.loc[val_dice.idxmax()] if val_dice.notna().any() else None
        rows.append({**row, "parameters": int(members["parameters"].iloc[0]),
                     "train_seconds_mean": members["train_seconds"].mean(),
                     "epochs_mean": members["epochs"].mean(),
                     "best_run": None if best is None else best["run"],
                     "best_run_val_dice": math.nan if best is None else best["val_dice"]})
    return pd.DataFrame(rows)


def summarise_by_epoch(by_epoch: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % CI over seeds of the curve metrics per (group, snapshot epoch); a seed
    that stopped before an epoch does not count there."""
    rows = []
    for (group, epoch), members in by_epoch.groupby(["group", "epoch"], sort=False):
        row = {"group": group, "epoch": epoch, "n_seeds": len(members)}
        for metric in plots.CURVE_METRICS:
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean_ci95(members[metric])
        rows.append(row)
    columns = ["group", "epoch", "n_seeds",
               *(f"{m}_{s}" for m in plots.CURVE_METRICS for s in ("mean", "ci95"))]
    table = pd.DataFrame(rows, columns=columns).astype(dict.fromkeys(columns[1:], float))
    return table.sort_values("epoch", kind="stable")


# --------------------------------------------------------------------------- writing outputs

def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi="figure")


def _sweep_values(name: str, sweep: dict, axes: list[str], summary: pd.DataFrame) -> list[float]:
    """The swept parameter's value of each group, in summary order."""
    axis, values = sweep["axis"], sweep["values"]
    if axes != [axis]:
        raise SegpipeError(f"experiment '{name}': a sweep needs '{axis}' as the only varied axis")
    missing = sorted(set(summary[axis]) - set(values))
    if missing:
        raise SegpipeError(f"experiment '{name}': spec key sweep.values lacks {', '.join(missing)}")
    return [float(values[v]) for v in summary[axis]]


def _representatives(runs: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """evolution.npz of each group's run with the smallest seed, all on the same test images
    and evaluated at the same threshold."""
    chosen = runs.loc[runs.groupby("group", sort=False)["seed"].idxmin()]
    evolution, reference = {}, None
    for group, folder in zip(chosen["group"], chosen["dir"]):
        path = folder / "evolution.npz"
        data = _read_evolution(path)
        reference = data if reference is None else reference
        if list(data["names"]) != list(reference["names"]):
            raise SegpipeError(f"{path}: example images {list(data['names'])} differ from "
                               f"those of the other groups {list(reference['names'])}")
        if data["threshold"] != reference["threshold"]:
            raise SegpipeError(f"{path}: evaluated at threshold {data['threshold']:g}, the "
                               f"other groups at {reference['threshold']:g}")
        evolution[group] = data
    return evolution


def _final_prediction(data: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, str]:
    """Probabilities (k, H, W) of the trained model on the first k example images: the best
    model on validation where evaluate stored it (``probs_best``), else the last snapshot."""
    if "probs_best" in data:
        return data["probs_best"][:k], "best model on validation"
    return data["probs"][-1, :k], "last snapshot"


def aggregate_experiment(name: str, spec: dict, output_dir: Path) -> None:
    """Write summary.csv, curves.png, bars.png, evolution.png, samples.png and, when
    ``spec["sweep"]`` is set, sweep.png for experiment ``name`` into ``output_dir``.

    ``spec``: ``{"axes": [...], "sweep": null | {"axis", "param", "values": {value: number}},
    "runs": [{"run", "dir", "seed", <axis>: value, ...}]}`` (docs/formats.md)."""
    axes, run_specs = _check_spec(name, spec)
    runs, by_epoch = _load_runs(name, axes, run_specs)
    summary = summarise(runs, axes)
    groups = list(summary["group"])
    sweep = spec.get("sweep")
    x = _sweep_values(name, sweep, axes, summary) if sweep else None
    evolution = _representatives(runs)
    colours = plots.group_colours(len(groups), x)

    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    _save(plots.plot_curves(summarise_by_epoch(by_epoch), groups, colours,
                            f"{name}: test metrics during training"), output_dir / "curves.png")
    _save(plots.plot_bars(summary, colours, f"{name}: test metrics"), output_dir / "bars.png")
    if sweep:
        _save(plots.plot_sweep(summary, x, f"{sweep['axis']} {sweep['param']}",
                               f"{name}: test metrics vs {sweep['axis']} {sweep['param']}"),
              output_dir / "sweep.png")

    first = next(iter(evolution.values()))
    threshold = float(first["threshold"])  # evaluate's: the figures agree with metrics.csv
    per_group = max(1, min(MAX_SAMPLES, MAX_EVOLUTION_ROWS // len(groups)))
    examples = [(group, data, k) for group, data in evolution.items()
                for k in range(min(per_group, len(data["names"])))]
    _save(plots.plot_evolution(examples, f"{name}: predictions at each snapshot epoch "
                               "(lowest seed of each group)", threshold=threshold),
          output_dir / "evolution.png")

    k = min(MAX_SAMPLES, len(first["names"]))
    predictions, sources = zip(*(_final_prediction(data, k) for data in evolution.values()))
    source = " or ".join(dict.fromkeys(sources))
    _save(plots.plot_samples(groups, predictions, first["images"][:k], first["masks"][:k],
                             first["names"][:k], f"{name}: test predictions ({source})",
                             threshold=threshold),
          output_dir / "samples.png")


# --------------------------------------------------------------------------- summary.md

SUMMARY_COLUMNS = {"dice": "Dice", "iou": "IoU", "map": "mAP", "pooled_dice": "pooled Dice",
                   "val_dice": "val Dice"}
FIGURES = ("curves", "bars", "sweep", "evolution", "samples")


def _estimate(mean: float, ci: float) -> str:
    return f"{mean:.3f} ± {'—' if math.isnan(ci) else f'{ci:.3f}'}"


def _count(parameters: float) -> str:
    return f"{parameters / 1e6:.2f} M" if parameters >= 1e6 else f"{parameters / 1e3:.1f} k"


def _experiment_section(folder: Path, output: Path) -> str:
    path = folder / "summary.csv"
    numeric = ["n_seeds", "parameters", "train_seconds_mean", "best_run_val_dice",
               *(f"{m}_{s}" for m in SUMMARY_COLUMNS for s in ("mean", "ci95"))]
    summary = _read_csv(path, numeric, text=("group", "best_run"))
    axes = list(summary.columns[1:list(summary.columns).index("n_seeds")])
    best = summary["val_dice_mean"].idxmax() if summary["val_dice_mean"].notna().any() else None

    fewest, most = int(summary["n_seeds"].min()), int(summary["n_seeds"].max())
    seeds = str(most) if fewest == most else f"{fewest}–{most}"

    header = ["group", "n", *SUMMARY_COLUMNS.values(), "parameters", "train s"]
    lines = [f"## {folder.name}", "",
             f"Varied: {', '.join(axes) or 'nothing'}; {len(summary)} group(s), "
             f"{seeds} seed(s) each.", "",
             "Test-split metrics, mean ± 95 % CI over seeds. **Bold**: the best group by "
             "mean validation Dice — the test split is never used to choose it.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in summary.iterrows():
        group = f"**{row['group']}**" if i == best else row["group"]
        cells = [group, str(int(row["n_seeds"])),
                 *(_estimate(row[f"{m}_mean"], row[f"{m}_ci95"]) for m in SUMMARY_COLUMNS),
                 _count(row["parameters"]), f"{row['train_seconds_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if best is None:
        lines.append("Best by validation Dice: not available (no validation Dice recorded).")
    else:
        row = summary.loc[best]
        lines.append(
            f"Best by validation Dice: **{row['group']}** (val Dice "
            f"{_estimate(row['val_dice_mean'], row['val_dice_ci95'])}); its test Dice "
            f"{_estimate(row['dice_mean'], row['dice_ci95'])}, IoU "
            f"{_estimate(row['iou_mean'], row['iou_ci95'])}, mAP "
            f"{_estimate(row['map_mean'], row['map_ci95'])}. Its best run: `{row['best_run']}` "
            f"(val Dice {row['best_run_val_dice']:.3f}).")
    figures = [folder / f"{figure}.png" for figure in FIGURES]
    links = [f"[{path.stem}]({Path(os.path.relpath(path, output.parent)).as_posix()})"
             for path in figures if path.is_file()]
    lines += ["", "Figures: " + " · ".join(links), ""]
    return "\n".join(lines)


def write_summary(experiment_dirs: list[Path], output: Path) -> None:
    """Write ``output`` (results/summary.md): one section per experiment folder, each with a
    table of its summary.csv, the best group by validation Dice and links to its figures."""
    if not experiment_dirs:
        raise SegpipeError("summary: no experiment folders given")
    sections = [_experiment_section(Path(folder), output) for folder in experiment_dirs]
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text("# segpipe results\n\n" + "\n".join(sections))
