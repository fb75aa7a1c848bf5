"""The figures of an experiment, each registered once: its name, report title, when it is
drawn, and how.

:data:`FIGURES` maps a name (the file ``<name>.png`` of the experiment folder, captioned by
``workflow/report/<name>.rst`` in the Snakemake report) to its :class:`Figure`: the title in the
report, when it is drawn (:data:`ALWAYS`, with a :data:`SWEEP`, with several :data:`CLASSES`) and
``draw(context)``, which makes the matplotlib figure from what the aggregation computed
(:class:`Context`, built by :func:`segpipe.aggregate.aggregate_experiment`). The workflow
declares the outputs of its aggregate rule from it, ``segpipe aggregate`` draws them and
summary.md links them, in this order. A new figure is a draw function here, registered with
:func:`figure`, and its caption file.

Torch- and numpy-free at import: the Snakemake process imports it; the draw functions import
the plotting code (:mod:`segpipe.plots`) when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ALWAYS, SWEEP, CLASSES = "always", "sweep", "classes"
MAX_EVOLUTION_ROWS = 9
MAX_SAMPLES = 3


@dataclass(frozen=True)
class Figure:
    """A registered figure: ``title`` in the report, ``when`` it is drawn, ``draw(context)``."""

    name: str
    title: str
    when: str
    draw: Callable[[Context], Any]


FIGURES: dict[str, Figure] = {}
"""Every figure of an experiment by name, in the order summary.md lists them."""


def figure(name: str, title: str, when: str = ALWAYS):
    """Register ``draw(context) -> matplotlib.figure.Figure`` as the figure ``name``."""
    def register(draw: Callable[[Context], Any]) -> Callable[[Context], Any]:
        FIGURES[name] = Figure(name, title, when, draw)
        return draw
    return register


def figures_for(sweep: bool, binary: bool) -> list[str]:
    """The names of the figures of an experiment with or without a ``sweep``, of a ``binary``
    study or one of several classes."""
    drawn = {ALWAYS: True, SWEEP: sweep, CLASSES: not binary}
    return [name for name, spec in FIGURES.items() if drawn[spec.when]]


@dataclass(frozen=True)
class Context:
    """What the figures of experiment ``name`` are drawn from: ``summary`` (summary.csv's
    table, groups in order of appearance), ``ranked`` (its rows best first, from ``order``),
    ``colours`` per group, ``by_epoch`` (the curves' means per group and snapshot epoch),
    ``sweep`` and ``x`` (the swept parameter and its value per group), ``labels``
    (:class:`segpipe.labels.Labels`), ``test_scores`` (per-image test Dice per group),
    ``ranks`` (bootstrap ranks), ``confusion`` (summed confusion matrix per group, several
    classes), ``evolution`` (evolution.npz of each group's representative run) and
    ``image_folds`` (the fold of each test image in cross-validation, else None)."""

    name: str
    summary: Any
    ranked: Any
    order: Any
    colours: list
    by_epoch: Any
    sweep: dict | None
    x: list[float] | None
    labels: Any
    test_scores: list
    ranks: Any
    confusion: list | None
    evolution: dict
    image_folds: Any

    @property
    def groups(self) -> list[str]:
        return list(self.summary["group"])

    @property
    def threshold(self) -> float:
        """evaluate's threshold: the figures agree with metrics.csv."""
        return float(next(iter(self.evolution.values()))["threshold"])


@figure("curves", "test metrics vs epoch")
def _curves(c: Context):
    from segpipe import plots

    return plots.plot_curves(c.by_epoch, c.groups, c.colours,
                             f"{c.name}: test metrics during training")


@figure("bars", "test metrics")
def _bars(c: Context):
    from segpipe import plots

    return plots.plot_bars(c.summary, c.colours, f"{c.name}: test metrics")


@figure("sweep", "test metrics vs swept parameter", SWEEP)
def _sweep(c: Context):
    from segpipe import plots

    swept = f"{c.sweep['axis']} {c.sweep['param']}"
    return plots.plot_sweep(c.summary, c.x, swept, f"{c.name}: test metrics vs {swept}")


@figure("classes", "test Dice per class", CLASSES)
def _classes(c: Context):
    from segpipe import plots

    return plots.plot_class_bars(c.summary, c.labels.names, c.colours,
                                 f"{c.name}: test Dice per class")


@figure("confusion", "confusion matrices", CLASSES)
def _confusion(c: Context):
    from segpipe import plots

    return plots.plot_confusion(c.confusion, c.groups, c.labels.class_names,
                                f"{c.name}: test pixels by true and predicted class (all runs "
                                "of each group)")


@figure("significance", "pairwise significance")
def _significance(c: Context):
    from segpipe import plots, stats

    return plots.plot_significance(list(c.ranked["group"]), c.ranked["dice_mean"],
                                   stats.significance([c.test_scores[i] for i in c.order]),
                                   stats.ALPHA, f"{c.name}: pairwise significance (test Dice)")


@figure("ranking", "rank stability")
def _ranking(c: Context):
    from segpipe import plots

    return plots.plot_ranking(list(c.ranked["group"]), c.ranks[:, c.order], c.ranked["rank"],
                              c.ranked["rank_lo"], c.ranked["rank_hi"],
                              [c.colours[i] for i in c.order],
                              f"{c.name}: rank stability (test Dice)")


@figure("evolution", "mask evolution")
def _evolution(c: Context):
    from segpipe import plots

    per_group = max(1, min(MAX_SAMPLES, MAX_EVOLUTION_ROWS // len(c.groups)))
    examples = [(group, data, k) for group, data in c.evolution.items()
                for k in range(min(per_group, len(data["names"])))]
    shown = "lowest seed of each group" + (", fold 0" if c.image_folds is not None else "")
    return plots.plot_evolution(examples, f"{c.name}: predictions at each snapshot epoch "
                                f"({shown})", threshold=c.threshold, labels=c.labels)


@figure("samples", "sample predictions")
def _samples(c: Context):
    from segpipe import plots

    first = next(iter(c.evolution.values()))
    k = min(MAX_SAMPLES, len(first["names"]))
    source = "best model on validation" + (", fold 0" if c.image_folds is not None else "")
    return plots.plot_samples(c.groups, [data["probs_best"][:k] for data in c.evolution.values()],
                              [data["dice_best"][:k] for data in c.evolution.values()],
                              first["images"][:k], first["masks"][:k], first["names"][:k],
                              f"{c.name}: test predictions ({source})", threshold=c.threshold,
                              labels=c.labels)
