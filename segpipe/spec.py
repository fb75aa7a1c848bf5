"""The config contract: one schema, checked by the workflow at start and by ``segpipe train``.

``workflow/schemas/config.schema.yaml`` (linked beside this module, so that an installed package
has it too) states what config.yaml may hold, every section, definition and option typed, unknown keys an error, and
what a run specification holds (``$defs.run_spec``, docs/formats.md). The workflow checks
config.yaml with :func:`validate_config` before it plans any job; ``segpipe train`` checks its
run specification with :func:`check_spec`; the model, loss and augmentation builders check
their definitions with :func:`check_definition`. Every message names the key path:
``config: architectures.unet.widht: unknown key (allowed: model, width, depth, down, up)``.

Beyond the schema, this module holds only the rules between options that a schema cannot
state (:func:`model_errors`). It imports neither torch nor numpy: the Snakemake process, which
may run without them (``--sdm conda``), imports it.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from segpipe import SegpipeError
from segpipe.columns import AXES

SCHEMA_FILE = Path(__file__).with_name("config.schema.yaml")
SCRATCH_DEPTH = 4
"""Default ``depth`` of every family's own encoder (the classes of :mod:`segpipe.models`)."""
RESNET_DEPTH = 5
"""Stride-2 stages of a ResNet encoder with its ImageNet stem: the most ``depth`` can be under
one, and its default (:func:`resnet_depth`)."""


@functools.cache
def schema() -> dict:
    """The parsed config.schema.yaml."""
    return yaml.safe_load(SCHEMA_FILE.read_text())


def default(setting: str) -> object:
    """The schema's default of a setting named ``<section>.<key>``, e.g.
    ``predict.tolerance``: what a CLI step uses when the option is not given, as the workflow
    does when the key is not in config.yaml."""
    section, key = setting.split(".")
    return copy.deepcopy(schema()["properties"][section]["properties"][key]["default"])


# JSON Schema's "integer" admits 2.0 and "number" admits NaN and infinity; the code needs neither.
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine_many({
    "integer": lambda checker, v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda checker, v: (isinstance(v, int | float) and not isinstance(v, bool)
                                  and math.isfinite(v)),
})
_Validator = validators.extend(Draft202012Validator, type_checker=_TYPES)


@functools.cache
def _validator(ref: str) -> Draft202012Validator:
    root = _Validator(schema())
    return root if ref == "#" else root.evolve(schema={"$ref": ref})


def schema_errors(instance: object, ref: str, where: str) -> list[str]:
    """One message ``<where>: <key path>: <problem>`` per problem of ``instance`` against the
    schema at ``ref`` (``#`` for a whole config, ``#/$defs/loss`` for a loss definition …)."""
    errors = sorted(_validator(ref).iter_errors(instance),
                    key=lambda e: [str(key) for key in e.absolute_path])
    return list(dict.fromkeys(m for error in errors for m in _messages(error, where)))


def _location(where: str, keys: Iterable[object]) -> str:
    path = ""
    for key in keys:
        path += f"[{key}]" if isinstance(key, int) else f"{'.' if path else ''}{key}"
    return f"{where}: {path}" if path else where


def _messages(error: ValidationError, where: str) -> list[str]:
    keys, schema_ = list(error.absolute_path), error.schema
    here = _location(where, keys)
    if "propertyNames" in error.schema_path:  # the instance is a key of the object at `keys`
        key = _location(where, [*keys, error.instance])
        if error.validator == "enum":
            return [f"{key}: unknown key (allowed: {', '.join(error.validator_value)})"]
        return [f"{key}: not {schema_.get('description', 'valid')}"]
    if error.validator == "additionalProperties":
        known = schema_.get("properties", {})
        return [f"{_location(where, [*keys, key])}: unknown key (allowed: {', '.join(known)})"
                for key in error.instance if key not in known]
    if error.validator == "required":
        return [f"{_location(where, [*keys, key])}: missing" for key in error.validator_value
                if key not in error.instance]
    if error.validator == "dependentRequired":
        return [f"{_location(where, [*keys, key])}: applies to {other}, which is not set"
                for key, others in error.validator_value.items() if key in error.instance
                for other in others if other not in error.instance]
    if error.validator in ("anyOf", "oneOf", "not") and "description" in schema_:
        return [f"{here}: {schema_['description']}"]
    if error.validator == "pattern" and "description" in schema_:
        return [f"{here}: {error.instance!r} is not {schema_['description']}"]
    if error.validator == "enum":
        return [f"{here}: {error.instance!r} is not one of "
                f"{', '.join(map(str, error.validator_value))}"]
    return [f"{here}: {error.message}"]


def _raise(messages: list[str]) -> None:
    if messages:
        raise SegpipeError("\n".join(messages))


def validate_config(config: dict) -> None:
    """Check a study config against the schema, raising :class:`SegpipeError` with every
    problem, then fill in the defaults of its settings (``data``, ``train``, ``evaluate``,
    ``resources``). Definitions get no defaults: they are a run's params, as written."""
    _raise(schema_errors(config, "#", "config"))
    _fill_defaults(config, schema())


def _fill_defaults(instance: dict, schema_: dict) -> None:
    for key, subschema in schema_.get("properties", {}).items():
        if key not in instance and "default" in subschema:
            instance[key] = copy.deepcopy(subschema["default"])
        if isinstance(instance.get(key), dict):
            _fill_defaults(instance[key], subschema)


def check_definition(axis: str, definition: object) -> None:
    """Raise :class:`SegpipeError` naming every key of an ``axis`` (architecture, backbone,
    loss, augmentation) definition that the schema refuses."""
    _raise(schema_errors(definition, f"#/$defs/{axis}", f"{axis} definition"))


def check_model(architecture: object, backbone: object,
                size: Sequence[int] | None = None) -> None:
    """Raise :class:`SegpipeError` naming the key when an architecture and a backbone
    definition do not make a model (for images of ``size``, when given):
    :func:`check_definition` of both, then :func:`model_errors`."""
    check_definition("architecture", architecture)
    check_definition("backbone", backbone)
    _raise(model_errors(architecture, backbone, size))


def resnet_depth(backbone: dict) -> int:
    """The stride-2 stages of a ResNet backbone definition: :data:`RESNET_DEPTH`, one fewer
    with ``stem: small``, whose first convolution keeps the image's resolution."""
    return RESNET_DEPTH - (backbone.get("stem") == "small")


def check_spec(spec: object) -> None:
    """Raise :class:`SegpipeError` naming the key when a run specification is malformed: not
    ``$defs.run_spec`` of the schema, a ``train`` setting missing, or definitions that
    :func:`model_errors` refuses."""
    _raise(schema_errors(spec, "#/$defs/run_spec", "run spec"))
    settings = schema()["properties"]["train"]["properties"]
    _raise([f"run spec: train.{key}: missing" for key in settings if key not in spec["train"]])
    _raise([f"run spec: {m}" for m in model_errors(spec["architecture"], spec["backbone"])])


def model_errors(architecture: dict, backbone: dict, size: Sequence[int] | None = None,
                 where: tuple[str, str] = ("architecture", "backbone")) -> list[str]:
    """The rules between a schema-valid architecture and backbone definition that the schema
    cannot state, as messages ``<key path>: <problem>`` (``where``: the definitions' paths).
    Under a ResNet, ``down`` does not apply and ``depth`` is at most :func:`resnet_depth`.
    With ``size`` (H, W) given, the deepest feature map, ``⌈H/2^depth⌉ × ⌈W/2^depth⌉`` pixels
    (models pad to a multiple of ``2^depth``), must have 2 pixels or more: at 1×1, BatchNorm
    sees one value per channel on a batch of one image (e.g. an epoch's last) and training
    fails."""
    encoder = backbone.get("encoder", "scratch")
    resnet = encoder != "scratch"
    stages = resnet_depth(backbone)
    depth = architecture.get("depth", stages if resnet else SCRATCH_DEPTH)
    arch, resnet_name = where[0], f"the {encoder} encoder ({where[1]})"
    if resnet and "down" in architecture:
        return [f"{arch}.down: does not apply under {resnet_name}, which does its own "
                f"downsampling"]
    if resnet and depth > stages:
        stem = " with stem: small" if backbone.get("stem") == "small" else ""
        return [f"{arch}.depth: {depth} exceeds the {stages} stages of {resnet_name}{stem}"]
    if size is None or _deepest_pixels(size, depth) >= 2:
        return []
    fits = max((d for d in range(1, depth) if _deepest_pixels(size, d) >= 2), default=None)
    advice = f"use depth <= {fits} or larger images" if fits else "use larger images"
    given = "" if "depth" in architecture else " (the default)"
    under = f" under {resnet_name}" if resnet else ""
    return [f"{arch}.depth: {depth}{given} is too deep for images of {size[0]}x{size[1]}{under}: "
            f"the deepest feature map would be 1x1 pixel, and BatchNorm cannot train on one "
            f"value per channel; {advice}"]


def _deepest_pixels(size: Sequence[int], depth: int) -> int:
    return math.prod(-(-side // 2**depth) for side in size)
