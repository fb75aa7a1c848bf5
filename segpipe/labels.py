"""The classes of a study: one object that every stage asks (after nnU-Net's ``LabelManager``).

:class:`Labels` says which LabelMe labels paint which class, how many outputs a model has,
whether its logits go through a sigmoid (one class: binary) or a softmax (several classes),
how a prediction is made (threshold or argmax), the per-class metric column names and the
colour palette. Rasterise builds it from the config (:meth:`Labels.from_config`) and writes it
into the cache (:meth:`Labels.attrs`); training copies it from there into the checkpoint
(:meth:`Labels.to_dict`); evaluation, prediction, aggregation and the figures read it from
the checkpoint and the CSV headers. Binary is the one-class case of the same object; the
binary study without ``data.classes`` writes today's files exactly (no extra attribute or
checkpoint key).

Mask values (docs/formats.md): 0 background, 1…K the classes in config order, :data:`IGNORE`
(255) for pixels that no loss or metric counts — LabelMe's VOC export (``labelme2voc.py``)
writes −1 for its ``__ignore__`` label, which is 255 as uint8.

Torch- and numpy-free at import: the Snakemake process imports it for its start checks.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from segpipe import SegpipeError

IGNORE = 255
"""The mask value of pixels that no loss or metric counts."""
BACKGROUND = "background"
"""The name of class 0."""
LABELME_BACKGROUND = "_background_"
"""LabelMe's own label for class 0 (``labelme2voc.py``): segpipe's predicted LabelMe files
label the holes of a region with it when the study names no background label."""
CLASS_NAME = re.compile(r"[A-Za-z0-9.-]+(_[A-Za-z0-9.-]+)*")
"""A class name: ASCII letters, digits, ``.``, ``-``, single ``_``. It becomes part of column
names (``dice.<class>``), table keys and figure labels, which stay portable (any locale, any
font); a label, which may be any text, is given a name with ``{name: [label]}``."""
NAME_RULE = f"ASCII letters, digits, '.', '-', single '_'; not {BACKGROUND!r}"
MAX_CLASSES = 254
"""Foreground classes 1…254: 0 is the background, 255 :data:`IGNORE`."""
COUNTS = ("tp", "fp", "fn", "ref", "pred")
"""Per-class pixel counts of per_image.csv: true positives, false positives, false negatives,
pixels of the class in the truth (``tp + fn``) and in the prediction (``tp + fp``)."""
CLASS_METRICS = ("dice", "iou", "precision", "recall", "ap")
"""The metrics reported per class."""


def is_class_name(name: str) -> bool:
    """Whether ``name`` may name a class (:data:`CLASS_NAME`, not :data:`BACKGROUND`)."""
    return bool(CLASS_NAME.fullmatch(name)) and name != BACKGROUND


def _name_error(index: int, name: str, labels: Sequence[str], label_only: bool) -> str:
    """The message for entry ``index`` of ``data.classes`` whose class name is bad: a label
    written alone is told to name its class, a mapping that its key is not a name; both with
    a name to use, made of the key or the first label."""
    suggestion = next((n for n in (_as_name(name), _as_name(labels[0]), f"class{index + 1}")
                       if is_class_name(n)))
    example = f"{{{suggestion}: [{', '.join(map(repr, labels))}]}}"
    if label_only:
        return (f"data.classes[{index}]: the label {name!r} is not a class name ({NAME_RULE}): "
                f"give its class a name, e.g. {example}")
    what = "is empty" if not name else f"{name!r} is not one ({NAME_RULE})"
    return f"data.classes[{index}]: the class name {what}: e.g. {example}"


def _as_name(text: str) -> str:
    """``text`` made a class name where it can be: accents dropped, other characters '_'."""
    ascii_ = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]", "_", ascii_)).strip("_")


def voc_colour(index: int) -> tuple[int, int, int]:
    """Colour ``index`` of the PASCAL VOC palette, which LabelMe's VOC export writes into its
    class PNGs: the bits of the index spread over R, G, B from the most significant bit down
    (0 black, 1 dark red, 2 dark green, 3 olive, …, 255 cream)."""
    rgb = [0, 0, 0]
    for shift in range(8):
        for channel in range(3):
            rgb[channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return rgb[0], rgb[1], rgb[2]


@dataclass(frozen=True)
class Labels:
    """The classes of a study.

    ``names``: the foreground classes in order (class ``i + 1`` is ``names[i]``);
    ``sources``: the LabelMe labels each class paints, or ``None`` for the one class of a
    binary study without ``classes`` (every label that is neither background nor ignore);
    ``background``: labels that paint class 0 (they erase); ``ignore``: labels that paint
    :data:`IGNORE`; ``configured``: whether ``data.classes`` was given (a binary study
    without it stores no class attributes, so its files stay as they were)."""

    names: tuple[str, ...] = ("foreground",)
    sources: tuple[tuple[str, ...], ...] | None = None
    background: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    configured: bool = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, classes: list | None = None, foreground: Iterable[str] | None = None,
                    background: Iterable[str] = (), ignore: Iterable[str] = ()) -> Labels:
        """From ``data.classes`` (entries: a label, which names its class, or ``{name:
        [labels]}``), or without it from the binary ``data.foreground`` (``None``: every label
        that is neither background nor ignore). Raises :class:`SegpipeError` for a label given
        two roles, a bad or repeated class name, and ``classes`` with ``foreground``."""
        background, ignore = tuple(background), tuple(ignore)
        if classes is None:
            sources = None if foreground is None else (tuple(foreground),)
            labels = cls(sources=sources, background=background, ignore=ignore)
        else:
            if foreground is not None:
                raise SegpipeError("data.classes and data.foreground exclude each other: with "
                                   "classes, each class names its labels")
            names, sources = [], []
            for index, entry in enumerate(classes):
                if isinstance(entry, str):
                    name, labels_ = entry, (entry,)
                elif (isinstance(entry, Mapping) and len(entry) == 1
                      and isinstance(next(iter(entry.values())), list)
                      and next(iter(entry.values()))
                      and all(isinstance(x, str) for x in next(iter(entry.values())))):
                    (name, labels_), = entry.items()
                    labels_ = tuple(labels_)
                else:
                    raise SegpipeError(f"data.classes[{index}]: expected a label or "
                                       "{name: [labels]} (a non-empty list of labels)")
                if not is_class_name(name):
                    raise SegpipeError(_name_error(index, name, labels_, isinstance(entry, str)))
                names.append(name)
                sources.append(labels_)
            labels = cls(tuple(names), tuple(sources), background, ignore, configured=True)
        labels.check()
        return labels

    def check(self) -> None:
        """Raise :class:`SegpipeError` for a label with two roles or a bad class name."""
        if not 1 <= len(self.names) <= MAX_CLASSES:
            raise SegpipeError(f"data.classes: 1 to {MAX_CLASSES} classes, got {len(self.names)}")
        for name in self.names:
            if not is_class_name(name):
                raise SegpipeError(f"data.classes: {name!r} is not a class name ({NAME_RULE})")
        repeated = sorted({n for n in self.names if self.names.count(n) > 1})
        if repeated:
            raise SegpipeError(f"data.classes: class {', '.join(map(repr, repeated))} named twice")
        roles: dict[str, list[str]] = {}
        for name, labels in zip(self.names, self.sources or [()]):
            for label in labels:
                roles.setdefault(label, []).append(f"class {name}" if self.configured
                                                   else "foreground")
        for role in ("background", "ignore"):
            for label in getattr(self, role):
                roles.setdefault(label, []).append(role)
        doubled = {label: r for label, r in roles.items() if len(r) > 1}
        if doubled:
            label, where = next(iter(sorted(doubled.items())))
            raise SegpipeError(f"data: label {label!r} is given two roles ({' and '.join(where)})")

    # ------------------------------------------------------------------ the model's view

    @property
    def binary(self) -> bool:
        """One class: one sigmoid output, thresholded."""
        return len(self.names) == 1

    @property
    def outputs(self) -> int:
        """Channels of the model's logits: 1 (binary, sigmoid) or background + K (softmax)."""
        return 1 if self.binary else len(self.names) + 1

    @property
    def activation(self) -> str:
        """``sigmoid`` (binary) or ``softmax``: :func:`segpipe.runtime.probabilities`."""
        return "sigmoid" if self.binary else "softmax"

    @property
    def prediction(self) -> str:
        """``threshold`` (binary: probability ≥ ``evaluate.threshold``) or ``argmax``."""
        return "threshold" if self.binary else "argmax"

    @property
    def class_names(self) -> tuple[str, ...]:
        """Every class by mask value 0…K: the background, then ``names``."""
        return (BACKGROUND, *self.names)

    def predict(self, probs, threshold: float = 0.5):
        """Class map (…, H, W) uint8 of numpy probabilities: binary ``probs`` (…, H, W) at
        ``threshold`` (1 where ≥), else ``probs`` (…, C, H, W) by argmax over C."""
        import numpy as np

        probs = np.asarray(probs)
        if self.binary:
            return (probs >= threshold).astype(np.uint8)
        return probs.argmax(axis=-3).astype(np.uint8)

    # ------------------------------------------------------------------ painting

    def value(self, label: str) -> int | None:
        """The mask value a shape labelled ``label`` paints, or ``None`` (not drawn: in a
        binary study with ``foreground`` given, a label it does not list)."""
        if label in self.background:
            return 0
        if label in self.ignore:
            return IGNORE
        if self.sources is None:
            return 1
        for index, labels in enumerate(self.sources, start=1):
            if label in labels:
                return index
        return None

    def label_of(self, value: int) -> str:
        """The LabelMe label a predicted shape of class ``value`` (1…K) gets: the first label
        that paints the class (:meth:`value` gives it back), else the class name."""
        sources = self.sources[value - 1] if self.sources else ()
        return sources[0] if sources else self.names[value - 1]

    @property
    def hole_label(self) -> str:
        """The label of a predicted hole (it paints 0, erasing): the study's first background
        label, else :data:`LABELME_BACKGROUND`."""
        return self.background[0] if self.background else LABELME_BACKGROUND

    def named_labels(self) -> set[str]:
        """Every label that the config names (classes, background, ignore)."""
        return {*(label for labels in self.sources or () for label in labels),
                *self.background, *self.ignore}

    def unnamed(self, labels: Iterable[str]) -> list[str]:
        """The labels of ``labels`` that a study with ``classes`` does not name, sorted. Without
        ``classes`` a binary study draws what it selects and skips the rest, but
        :data:`LABELME_BACKGROUND`, the holes of predicted files, must be a background label:
        drawn as foreground it would fill them, and skipped it would leave them filled."""
        if not self.configured:
            return [LABELME_BACKGROUND] if (LABELME_BACKGROUND in set(labels) and
                                            self.value(LABELME_BACKGROUND) != 0) else []
        return sorted(set(labels) - self.named_labels())

    def folder_errors(self, found: Mapping[str, Sequence[object]], folder: str,
                      training: bool = True) -> list[str]:
        """The label rule of a LabelMe folder, as messages naming the config key: ``found`` is
        ``{label: [files]}`` of its filled shapes (:func:`segpipe.data.index.found_labels`). A label
        of a study with ``classes`` that no class, background or ignore names is an error (the
        files named), as is a folder in which no shape paints a class; and in a ``training``
        folder (the training images, or all of them with folds) a class (or foreground) label
        that no shape has, since no model can learn it (a test folder may lack a class). A
        background or ignore label that no file has is no error: files merely may hold one
        (:meth:`folder_notes`). The one rule of both entry points: the workflow's start
        checks, per data folder, and ``segpipe rasterise`` before its first image."""
        errors = []
        if training:
            key = "classes" if self.configured else "foreground"
            sources = [label for labels in self.sources or () for label in labels]
            errors += self._absent(key, sources, found, folder)
        for label in self.unnamed(found):
            files = found[label]
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            where = f"label {label!r} of {', '.join(map(str, files[:3]))}{more}"
            errors.append(
                f"data.classes: {where} is named by no class, data.background or data.ignore; "
                "add it to one of them" if self.configured else
                f"data.background: {where} is LabelMe's class 0, the holes of segpipe's "
                "predicted files: list it in data.background")
        if not errors and not any(self.value(label) not in (None, 0, IGNORE) for label in found):
            errors.append(f"{folder}: no shape paints a class ({self.describe()}); labels of "
                          f"filled shapes found: {', '.join(sorted(found)) or 'none'}")
        return errors

    def folder_notes(self, found: Mapping[str, Sequence[object]], folder: str) -> list[str]:
        """What to log about a LabelMe folder (``found`` as for :meth:`folder_errors`): the
        background and ignore labels that none of its files has (e.g. ``_background_``, the
        holes of predicted files, in a folder without a corrected one)."""
        return [*self._absent("background", self.background, found, folder),
                *self._absent("ignore", self.ignore, found, folder)]

    @staticmethod
    def _absent(key: str, wanted: Iterable[str], found: Mapping[str, object],
                folder: str) -> list[str]:
        unknown = " or ".join(repr(label) for label in wanted if label not in found)
        return [f"data.{key}: no LabelMe file of {folder} has a shape labelled {unknown} "
                f"(their labels: {', '.join(sorted(found)) or 'none'})"] if unknown else []

    # ------------------------------------------------------------------ columns

    def class_columns(self, metric: str) -> list[str]:
        """The per-class columns of ``metric``: ``<metric>.<class>`` for every foreground
        class; none for a binary study (its one class is the image's score)."""
        return [] if self.binary else [f"{metric}.{name}" for name in self.names]

    def per_image_columns(self) -> list[str]:
        """Per-class columns of per_image.csv: :data:`CLASS_METRICS` then :data:`COUNTS`."""
        return [c for m in (*CLASS_METRICS, *COUNTS) for c in self.class_columns(m)]

    # ------------------------------------------------------------------ palette

    def palette(self) -> list[tuple[int, int, int]]:
        """RGB of mask values 0…255 (the VOC palette: what LabelMe's users know)."""
        return [voc_colour(i) for i in range(256)]

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict | None:
        """The JSON-able form stored in a checkpoint (``labels``); ``None`` for the binary
        study without ``classes`` and ``ignore``, which stores nothing."""
        if not self.configured and not self.ignore:
            return None
        return {"names": list(self.names),
                "sources": None if self.sources is None else [list(s) for s in self.sources],
                "background": list(self.background), "ignore": list(self.ignore),
                "configured": self.configured}

    @classmethod
    def from_dict(cls, data: dict | None) -> Labels:
        """The inverse of :meth:`to_dict` (``None``: the default binary labels)."""
        if data is None:
            return cls()
        sources = data["sources"]
        return cls(tuple(data["names"]),
                   None if sources is None else tuple(map(tuple, sources)),
                   tuple(data["background"]), tuple(data["ignore"]), bool(data["configured"]))

    def attrs(self) -> dict[str, str]:
        """HDF5 cache attributes: today's ``foreground`` and ``background``, and ``labels``
        (JSON of :meth:`to_dict`) only when there are classes or ignore labels."""
        foreground = None if self.configured or self.sources is None else list(self.sources[0])
        attrs = {"foreground": json.dumps(foreground), "background": json.dumps(list(self.background))}
        data = self.to_dict()
        if data is not None:
            attrs["labels"] = json.dumps(data)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> Labels:
        """The labels of a cache (:meth:`attrs`)."""
        if "labels" in attrs:
            return cls.from_dict(json.loads(attrs["labels"]))
        foreground = json.loads(attrs.get("foreground", "null"))
        return cls(sources=None if foreground is None else (tuple(foreground),),
                   background=tuple(json.loads(attrs.get("background", "[]"))))

    @classmethod
    def from_columns(cls, columns: Iterable[str]) -> Labels:
        """The classes of a per_image.csv or metrics.csv header: those of its ``dice.<class>``
        columns, in order (binary when it has none)."""
        names = tuple(c.removeprefix("dice.") for c in columns if c.startswith("dice."))
        return cls(names, configured=True) if names else cls()

    def describe(self) -> str:
        """E.g. ``3 classes (softmax): leaf, stone, flower`` or ``binary (sigmoid)``."""
        if self.binary:
            return f"binary ({self.names[0]}, sigmoid)"
        return f"{len(self.names)} classes (softmax): {', '.join(self.names)}"
