"""The run specification `segpipe train` receives (docs/formats.md): checked before training.

The workflow builds it from config.yaml (``run_spec`` in workflow/rules/common.smk): the run's
name, seed, the four definitions, the ``train`` settings and, in cross-validation, the
``fold``, i.e. everything that changes the run's results. Execution settings (device, loader
workers, resources) are not part of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from segpipe import SegpipeError
from segpipe.columns import AXES

SPEC_KEYS = ("run", "seed", "names", *AXES, "train")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


TRAIN_SETTINGS: dict[str, tuple[Callable[[object], bool], str]] = {
    "epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "optimizer": (lambda v: v in ("adam", "adamw"), "'adam' or 'adamw'"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "encoder_lr_mult": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "scheduler": (lambda v: v in ("plateau", "cosine", "none"), "'plateau', 'cosine' or 'none'"),
    "early_stop_patience": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "snapshot_epochs": (lambda v: isinstance(v, list) and all(_is_int(k) and k >= 1 for k in v),
                        "a list of epoch numbers >= 1"),
    "amp": (lambda v: isinstance(v, bool), "true or false"),
}
"""The keys of ``spec["train"]`` (all required; the workflow fills in the schema defaults)."""


def check_spec(spec: dict) -> None:
    """Raise :class:`SegpipeError` naming the key when the run specification is malformed."""
    if not isinstance(spec, dict):
        raise SegpipeError("run spec: expected a JSON object")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise SegpipeError(f"run spec: missing key(s) {', '.join(missing)}")
    for key in ("seed", "fold"):
        if key in spec and not (_is_int(spec[key]) and spec[key] >= 0):
            raise SegpipeError(f"run spec: {key} = {spec[key]!r}: expected an integer >= 0")
    train = spec["train"]
    if not isinstance(train, dict):
        raise SegpipeError("run spec: train must be an object")
    unknown = sorted(set(train) - set(TRAIN_SETTINGS))
    if unknown:
        raise SegpipeError(f"run spec: unknown key(s) train.{', train.'.join(unknown)} "
                           f"(known: {', '.join(TRAIN_SETTINGS)})")
    missing = [k for k in TRAIN_SETTINGS if k not in train]
    if missing:
        raise SegpipeError(f"run spec: missing key(s) train.{', train.'.join(missing)}")
    for key, (valid, expected) in TRAIN_SETTINGS.items():
        if not valid(train[key]):
            raise SegpipeError(f"run spec: train.{key} = {train[key]!r}: expected {expected}")
