"""``results/summary.md``: one section per experiment, read from its summary.csv (written by
:mod:`segpipe.aggregate`): a table of every group's estimates, the reference chosen on
validation and each comparison's verdict in words, the per-class table with several classes,
and links to the experiment's figures (:data:`segpipe.figures.FIGURES`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from segpipe import SegpipeError, figures, stats
from segpipe.aggregate import TEST_METRIC
from segpipe.files import atomic_path
from segpipe.results import PER_IMAGE_METRICS, read_csv


SUMMARY_COLUMNS = {"dice": "Dice", "iou": "IoU", "map": "mAP", "pooled_dice": "pooled Dice",
                   "val_dice": "val Dice"}


def _estimate(row: pd.Series, metric: str) -> str:
    """``mean [low, high]`` for a bootstrap interval, ``mean ± half-width`` for a t interval."""
    mean = row[f"{metric}_mean"]
    if f"{metric}_lo" in row:
        return f"{mean:.3f} [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"
    ci = row[f"{metric}_ci95"]
    return f"{mean:.3f} ± {'—' if math.isnan(ci) else f'{ci:.3f}'}"


def _signed(x: float) -> str:
    """``x`` with its sign and a true minus; −0.000 shows as +0.000."""
    return f"{round(x, 3) + 0.0:+.3f}".replace("-", "−")


def _count(parameters: float) -> str:
    return f"{parameters / 1e6:.2f} M" if parameters >= 1e6 else f"{parameters / 1e3:.1f} k"


def _verdict(row: pd.Series) -> str:
    """One comparison in words, e.g. "b: worse than a: ΔDice −0.040 [−0.070, −0.010], Holm
    p = 0.003 (Wilcoxon), 0.012 (seeds × images)" or "b: no detectable difference (ΔDice …)".
    With one seed there is no seeds × images p."""
    p = f"Holm p {_p_value(row['p_holm'])} (Wilcoxon)"
    if not math.isnan(row["p_mrmc_holm"]):
        p += f", {_p_value(row['p_mrmc_holm']).removeprefix('= ')} (seeds × images)"
    delta = (f"ΔDice {_signed(row['delta_dice'])} [{_signed(row['delta_dice_lo'])}, "
             f"{_signed(row['delta_dice_hi'])}], {p}")
    if row["verdict"] in ("better", "worse"):
        return f"{row['group']}: {row['verdict']} than {row['reference']}: {delta}"
    return f"{row['group']}: {row['verdict']} ({delta})"


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3g}"


def _comparisons(summary: pd.DataFrame) -> list[str]:
    """The paragraph on the comparisons with the reference, one verdict per line."""
    if len(summary) == 1:
        return ["One group: nothing to compare."]
    if summary["reference"].isna().all():
        return ["No comparison: no validation Dice was recorded to choose a reference."]
    others = summary[summary["verdict"] != "reference"]
    reference = summary["reference"].iloc[0]
    return [f"Compared with **{reference}** image by image: ΔDice = group − {reference}, the "
            "mean paired difference over test images and shared seeds [95 % paired bootstrap "
            f"interval]; Holm p: Holm-adjusted over the {len(others)} comparison(s), of the "
            "two-sided Wilcoxon signed-rank test on the per-image Dice differences (averaged "
            "over shared seeds) and of the seeds × images test, which also counts the "
            "training runs as random (docs/metrics.md); better or worse where both p < "
            f"{stats.ALPHA:g} and the interval excludes 0.", "",
            *(f"- {_verdict(row)}" for _, row in others.iterrows())]


def _experiment_section(folder: Path, output: Path) -> str:
    path = folder / "summary.csv"
    intervals = {m: ("lo", "hi") if m in PER_IMAGE_METRICS else ("ci95",)
                 for m in SUMMARY_COLUMNS}
    numeric = ["n_seeds", "n_images", "parameters", "train_seconds_mean", "best_run_val_dice",
               "delta_dice", "delta_dice_lo", "delta_dice_hi", "p_holm", "p_mrmc_holm",
               "rank", "rank_lo",
               "rank_hi", *(f"{m}_{s}" for m, ends in intervals.items()
                            for s in ("mean", *ends))]
    summary = read_csv(path, numeric, text=("group", "best_run", "reference", "verdict"))
    axes = list(summary.columns[1:list(summary.columns).index("n_seeds")])
    is_reference = summary["verdict"] == "reference"
    reference = summary.index[is_reference][0] if is_reference.any() else None

    fewest, most = int(summary["n_seeds"].min()), int(summary["n_seeds"].max())
    seeds = str(most) if fewest == most else f"{fewest}–{most}"
    folds = [c for c in summary.columns if c.startswith(f"{TEST_METRIC}_fold")]
    images = f"{int(summary['n_images'].iloc[0])} test images"
    if folds:
        images = (f"{len(folds)}-fold cross-validation: {images}, each tested once per seed by "
                  "the models of the fold that held it out")

    header = ["group", "n", *SUMMARY_COLUMNS.values(), *(["Dice per fold"] if folds else []),
              "rank", "parameters", "train s"]
    lines = [f"## {folder.name}", "",
             f"Varied: {', '.join(axes) or 'nothing'}; {len(summary)} group(s), "
             f"{seeds} seed(s) each, {images}.", "",
             "Test-split metrics. Dice and IoU: mean per-image score [95 % bootstrap percentile "
             f"interval, {stats.N_RESAMPLES} resamples of the test images and the seeds, "
             f"generator seed {stats.SEED}]; mAP, pooled Dice, val Dice: mean ± 95 % CI over "
             "seeds (Student t). Rank: by mean test Dice [95 % bootstrap interval]. **Bold**: "
             "the reference, chosen on validation Dice — never on test: the best mean, or the "
             "experiment's baseline (its default group) when the best is ahead of it by at most "
             "one standard error." + (" Dice per fold: the mean test Dice of each fold's "
                                      "images, folds 0, 1, …" if folds else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in summary.iterrows():
        group = f"**{row['group']}**" if i == reference else row["group"]
        per_fold = [" · ".join(f"{row[c]:.3f}" for c in folds)] if folds else []
        cells = [group, str(int(row["n_seeds"])), *(_estimate(row, m) for m in SUMMARY_COLUMNS),
                 *per_fold, f"{int(row['rank'])} [{int(row['rank_lo'])}, {int(row['rank_hi'])}]",
                 _count(row["parameters"]), f"{row['train_seconds_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if reference is None:
        lines.append("Reference: not available (no validation Dice recorded).")
    else:
        row = summary.loc[reference]
        top = summary.loc[summary["val_dice_mean"].idxmax()]
        why = ("the best validation Dice" if top["group"] == row["group"] else
               f"the baseline: {top['group']} has the best mean validation Dice "
               f"({top['val_dice_mean']:.3f}), ahead of it by at most one standard error")
        lines.append(
            f"Reference: **{row['group']}** (val Dice {_estimate(row, 'val_dice')}), {why}. "
            f"Its test Dice {_estimate(row, 'dice')}, IoU {_estimate(row, 'iou')}, mAP "
            f"{_estimate(row, 'map')}; its best run: `{row['best_run']}` (val Dice "
            f"{row['best_run_val_dice']:.3f}).")
    lines += ["", *_comparisons(summary), *_class_table(summary)]
    pngs = [folder / f"{figure}.png" for figure in figures.FIGURES]
    links = [f"[{path.stem}]({Path(os.path.relpath(path, output.parent)).as_posix()})"
             for path in pngs if path.is_file()]
    lines += ["", "Figures: " + " · ".join(links), ""]
    return "\n".join(lines)


def _class_table(summary: pd.DataFrame) -> list[str]:
    """With several classes: each group's test Dice per class [95 % bootstrap interval] and its
    ΔDice against the reference [95 % paired interval], so a reader sees which class a model
    wins on."""
    classes = [c.removeprefix("dice.").removesuffix("_mean") for c in summary.columns
               if c.startswith("dice.") and c.endswith("_mean")]
    if not classes:
        return []
    reference = summary["reference"].iloc[0]
    images = ", ".join(f"{c} {int(summary[f'n_images.{c}'].iloc[0])}" for c in classes)
    lines = ["", f"Per class: test Dice on the images whose truth holds the class ({images}) "
             "[95 % bootstrap interval]" + (f"; Δ: group − {reference} on those images [95 % "
                                            "paired interval]" if isinstance(reference, str)
                                            else "") + ".", "",
             "| group | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for _, row in summary.iterrows():
        cells = []
        for c in classes:
            if math.isnan(row[f"dice.{c}_mean"]):
                cells.append("—")
                continue
            cell = (f"{row[f'dice.{c}_mean']:.3f} [{row[f'dice.{c}_lo']:.3f}, "
                    f"{row[f'dice.{c}_hi']:.3f}]")
            if not math.isnan(row[f"delta_dice.{c}"]):
                cell += (f" Δ {_signed(row[f'delta_dice.{c}'])} "
                         f"[{_signed(row[f'delta_dice.{c}_lo'])}, "
                         f"{_signed(row[f'delta_dice.{c}_hi'])}]")
            cells.append(cell)
        lines.append(f"| {row['group']} | " + " | ".join(cells) + " |")
    return lines


def write_summary(experiment_dirs: list[Path], output: Path) -> None:
    """Write ``output`` (results/summary.md): one section per experiment folder, each with a
    table of its summary.csv, the best group by validation Dice and links to its figures."""
    if not experiment_dirs:
        raise SegpipeError("summary: no experiment folders given")
    sections = [_experiment_section(Path(folder), output) for folder in experiment_dirs]
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text("# segpipe results\n\n" + "\n".join(sections))
