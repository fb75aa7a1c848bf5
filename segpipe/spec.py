"""The config contract: one schema, checked by the workflow at start and by ``segpipe train``.

``workflow/schemas/config.schema.yaml`` (linked beside this module, so that an installed package
has it too) states what config.yaml may hold, every section, definition and option typed,
unknown keys an error, what a run specification holds (``$defs.run_spec``, docs/formats.md),
and every default (:func:`default`: the CLI's options take theirs from it). Each rule is checked
once, where a value enters: the workflow checks config.yaml with :func:`validate_config` before
it plans any job; ``segpipe train`` its run specification with :func:`check_spec`; the other
steps their options with :func:`check_setting`. The builders of models, losses and
augmentations trust what they get. Every message names the key path:
``config: architectures.unet.widht: unknown key (allowed: model, width, depth, down, up,
head)``.

Beyond the schema, this module holds only the rules between options that a schema cannot
state (:func:`model_errors`, :func:`loss_errors`). It imports neither torch nor numpy: the
Snakemake process, which may run without them (``--sdm conda``), imports it.
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
RESNET_DEPTH = 5
"""Stride-2 stages of a ResNet encoder with its ImageNet stem: the most ``depth`` can be under
one, and its default (:func:`resnet_depth`)."""


@functools.cache
def schema() -> dict:
    """The parsed config.schema.yaml, with what it states once made into JSON Schema rules:
    ``$defs.architecture.families`` (family → its options) into the enum of ``model`` and
    each family's unknown-key check; ``$defs.loss.terms`` (term → the options that apply to it)
    into "an option needs its term", "a term with a weight > 0" and the weights' types."""
    schema_ = yaml.safe_load(SCHEMA_FILE.read_text())
    loss = schema_["$defs"]["loss"]
    terms = loss["terms"]
    loss["properties"] = {**{term: {"type": "number", "minimum": 0,
                                    "description": f"weight of the {term} term (0 = off)"}
                             for term in terms if term not in loss["properties"]},
                          **loss["properties"]}
    loss["dependentRequired"] = {option: [term] for term, options in terms.items()
                                 for option in options}
    *others, last = terms
    names = f"{', '.join(others)} or {last}" if others else last
    loss["allOf"] = [{"description": f"needs a term ({names}) with a weight > 0",
                      "anyOf": [{"required": [term], "properties": {term: {"exclusiveMinimum": 0}}}
                                for term in terms]}]
    architecture = schema_["$defs"]["architecture"]
    families = architecture["families"]
    architecture["properties"]["model"]["enum"] = list(families)
    architecture["allOf"] = [
        {"if": {"properties": {"model": {"const": family}}, "required": ["model"]},
         "then": {"propertyNames": {"enum": ["model", *options]}}}
        for family, options in families.items()]
    return schema_


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


def setting_ref(path: str) -> str:
    """The JSON pointer of a setting's schema, by its dotted config path: ``evaluate.threshold``
    → ``#/properties/evaluate/properties/threshold``; a path that starts with ``$defs`` names
    an option of a definition: ``$defs.loss.tversky_alpha`` → ``#/$defs/loss/properties/
    tversky_alpha``. Raises KeyError for a path the schema does not have."""
    keys = path.split(".")
    node, ref = schema(), "#"
    if keys[0] == "$defs":
        node, ref, keys = schema()["$defs"][keys[1]], f"#/$defs/{keys[1]}", keys[2:]
    for key in keys:
        node, ref = node["properties"][key], f"{ref}/properties/{key}"
    return ref


def setting(path: str) -> dict:
    """The schema of the setting at the dotted ``path`` (:func:`setting_ref`)."""
    node = schema()
    for key in setting_ref(path).split("/")[1:]:
        node = node[key]
    return node


def default(path: str) -> object:
    """The default of the setting at the dotted ``path`` (:func:`setting_ref`), a copy: the one
    place a default is written is the schema, and every CLI option, builder and the workflow
    take it from here. Raises KeyError for a setting without a default."""
    return copy.deepcopy(setting(path)["default"])


def check_setting(path: str, value: object, where: str) -> None:
    """Raise :class:`SegpipeError` ``<where>: <problem>`` when ``value`` is not what the schema
    allows for the setting at ``path``, e.g. ``--threshold: 1.5 is greater than or equal to the
    maximum of 1``: a step called by hand checks its options by the rule that the workflow
    checks the config by."""
    _raise(schema_errors(value, setting_ref(path), where))


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
    if error.validator in ("anyOf", "oneOf") and "description" in schema_:
        # Alternatives told apart by type (a label or a mapping): what is wrong in the one of
        # the instance's type, or that its type is none of them.
        def other_type(e: ValidationError) -> bool:
            return e.validator == "type" and not e.relative_path

        if any(map(other_type, error.context)):
            wrong = [e for e in error.context if not other_type(e)]
            if not wrong:
                return [f"{here}: {_kind(error.instance)}; {schema_['description']}"]
            return [f"{_location(where, e.absolute_path)}: {_problem(e)}; "
                    f"{schema_['description']}" for e in wrong]
    if error.validator in ("anyOf", "oneOf", "not") and "description" in schema_:
        return [f"{here}: {schema_['description']}"]
    if error.validator == "pattern" and "description" in schema_:
        return [f"{here}: {error.instance!r} is not {schema_['description']}"]
    if error.validator == "enum":
        return [f"{here}: {error.instance!r} is not one of "
                f"{', '.join(map(str, error.validator_value))}"]
    return [f"{here}: {error.message}"]


def _kind(instance: object) -> str:
    """E.g. ``5 is a number``, ``['a'] is a list``."""
    if instance is None:
        return "the entry is empty (null)"
    kind = ("a boolean" if isinstance(instance, bool) else "a number"
            if isinstance(instance, int | float) else "a list" if isinstance(instance, list)
            else f"a {type(instance).__name__}")
    return f"{instance!r} is {kind}"


def _problem(error: ValidationError) -> str:
    """jsonschema's message, in words where it speaks of 'properties'."""
    if error.validator == "maxProperties":
        return (f"{error.instance!r} has {len(error.instance)} keys, at most "
                f"{error.validator_value}")
    return error.message


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


def resnet_depth(backbone: dict) -> int:
    """The stride-2 stages of a ResNet backbone definition: :data:`RESNET_DEPTH`, one fewer
    with ``stem: small``, whose first convolution keeps the image's resolution."""
    return RESNET_DEPTH - (backbone.get("stem") == "small")


def smp_decoder(backbone: dict) -> bool:
    """Whether a backbone is one smp.Unet is built on, a ResNet with its ImageNet stem: its
    decoder then follows smp's Unet decoder (the options' ``smp_default``, no raw-image skip,
    smp's initialisation; docs/models.md says why)."""
    return (backbone.get("encoder", "scratch") != "scratch"
            and backbone.get("stem", "imagenet") == "imagenet")


def encoder_defaults(architecture: dict, backbone: dict) -> dict:
    """The options an architecture definition leaves out whose default depends on its encoder:
    under a ResNet each option of its family with a ``resnet_default`` in the schema
    (``width``), and with the ImageNet stem (:func:`smp_decoder`) each with an
    ``smp_default`` (``up``, ``head``). The workflow writes them into a run's spec, so that a
    run trained before a default changed is a changed run: trained again, never read with
    weights that no longer fit its model."""
    if backbone.get("encoder", "scratch") == "scratch":
        return {}
    keys = ("resnet_default", "smp_default") if smp_decoder(backbone) else ("resnet_default",)
    defaults = {}
    for option in schema()["$defs"]["architecture"]["families"][architecture["model"]]:
        rules = setting(f"$defs.architecture.{option}")
        defaults.update({option: rules[key] for key in keys
                         if key in rules and option not in architecture})
    return defaults


def check_spec(spec: object, size: Sequence[int] | None = None, labels: object = None,
               native: bool = False) -> dict:
    """The run specification with every ``train`` setting it leaves out taken from the schema
    (as the workflow fills in config.train: a spec written by hand and the workflow's of the
    same settings are equal), checked once for ``segpipe train``, where it enters: raises
    :class:`SegpipeError` naming the key when it is not ``$defs.run_spec`` of the schema, or its
    definitions do not make a model for images of ``size`` (:func:`model_errors`) or a loss
    for the classes ``labels`` (a :class:`segpipe.labels.Labels`, :func:`loss_errors`);
    ``native``: the cache is at a scale (``data.scale``), so the spec trains on patches
    (:func:`patch_errors`), and the patch is the model's input size."""
    _raise(schema_errors(spec, "#/$defs/run_spec", "run spec"))
    spec = copy.deepcopy(spec)
    _fill_defaults(spec["train"], schema()["properties"]["train"])
    errors = patch_errors(spec["train"]["patch"], native, "train.patch")
    errors += model_errors(spec["architecture"], spec["backbone"],
                           input_size(spec["train"]["patch"], size))
    if labels is not None:
        errors += loss_errors(spec["loss"], labels)
    _raise([f"run spec: {m}" for m in errors])
    return spec


def input_size(patch: Sequence[int] | None, size: Sequence[int] | None):
    """The model's input in training: the ``train.patch`` of a study at ``data.scale`` (which
    :func:`patch_errors` requires there and refuses elsewhere), else the squashed ``size``."""
    return size if patch is None else patch


def patch_errors(patch: Sequence[int] | None, native: bool, where: str) -> list[str]:
    """A study at ``data.scale`` (``native``) trains on patches: ``train.patch`` is required
    there and applies nowhere else."""
    if native and patch is None:
        return [f"{where}: missing: a study at data.scale trains on patches of [height, width] "
                "pixels (e.g. [256, 256])"]
    if not native and patch is not None:
        return [f"{where}: applies with data.scale (a study at data.size trains on its whole "
                "squashed images)"]
    return []


def loss_errors(loss: dict, labels: object, where: str = "loss") -> list[str]:
    """The rule between a schema-valid loss definition and the classes of the study (a
    :class:`segpipe.labels.Labels`) that the schema cannot state, as messages: ``class_weights``
    apply with several classes only, one weight per class, background first."""
    weights = loss.get("class_weights")
    if weights is None:
        return []
    if labels.binary:
        return [f"{where}.class_weights: applies with several classes (data.classes); a "
                "binary loss weighs positives with pos_weight"]
    if len(weights) != labels.outputs:
        return [f"{where}.class_weights: {len(weights)} weights, but the study has "
                f"{labels.outputs} classes ({', '.join(labels.class_names)})"]
    return []


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
    depth = architecture.get("depth", stages if resnet else default("$defs.architecture.depth"))
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
