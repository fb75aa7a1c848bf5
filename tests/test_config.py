"""The config contract (workflow/schemas/config.schema.yaml, segpipe.spec): the schema agrees with the code
it describes, its messages name the key path, and the depth rule is BatchNorm's own."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import yaml

from segpipe import SegpipeError
from segpipe.data.augment import build_augmentation
from segpipe.labels import Labels
from segpipe.losses import build_loss
from segpipe.models import ARCHITECTURES, BACKBONES, build_model
from segpipe.spec import RESNET_DEPTH, check_spec, default, model_errors, schema, validate_config

TINY = yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())
NAME_RULE = schema()["$defs"]["name"]["description"]


def family_keys() -> dict[str, set[str]]:
    """The keys the schema allows each model family (its per-family branches)."""
    keys = {}
    for branch in schema()["$defs"]["architecture"]["allOf"]:
        model = branch["if"]["properties"]["model"]
        for family in model.get("enum", [model.get("const")]):
            keys[family] = set(branch["then"]["propertyNames"]["enum"])
    return keys


def test_schema_states_what_the_model_registry_accepts():
    architecture = schema()["$defs"]["architecture"]
    assert architecture["properties"]["model"]["enum"] == list(ARCHITECTURES)
    assert family_keys() == {
        family: {"model"} | (set(inspect.signature(cls).parameters) - {"encoder", "outputs"})
        for family, cls in ARCHITECTURES.items()}
    assert set().union(*family_keys().values()) == set(architecture["properties"])
    assert schema()["$defs"]["backbone"]["properties"]["encoder"]["enum"] == list(BACKBONES)
    # The depths model_errors assumes when a definition gives none are the models' own.
    with torch.device("meta"):
        assert {build_model({"model": family}, {}).encoder.depth
                for family in ARCHITECTURES} == {default("$defs.architecture.depth")}
        assert build_model({"model": "unet"}, {"encoder": "resnet18", "weights": "none"}
                           ).encoder.depth == RESNET_DEPTH


def test_every_loss_and_augmentation_key_of_the_schema_builds():
    definitions = [{"bce": 0.5, "pos_weight": 3.0, "dice": 0.5},
                   {"focal_tversky": 1.0, "tversky_alpha": 0.6, "tversky_beta": 0.4,
                    "tversky_gamma": 1.5}]
    several = {"bce": 1.0, "class_weights": [1.0, 2.0, 3.0]}  # background + 2 classes
    assert set().union(*definitions, several) == set(schema()["$defs"]["loss"]["properties"])
    terms = [build_loss(d).terms for d in definitions]
    assert [list(t) for t in terms] == [["bce", "dice"], ["focal_tversky"]]
    assert terms[0]["bce"].pos_weight == 3.0 and terms[1]["focal_tversky"].gamma == 1.5
    classes = Labels(("a", "b"), configured=True)
    assert build_loss(several, classes).terms["bce"].class_weights == [1.0, 2.0, 3.0]

    augmentation = {"crop": {"min_scale": 0.7}, "hflip": 0.5, "vflip": 0.25, "rotate": 10,
                    "jitter": 0.2, "erase": 0.1}
    assert set(augmentation) == set(schema()["$defs"]["augmentation"]["properties"])
    transform = build_augmentation(augmentation, (16, 16))
    hflip, vflip, rotate, jitter = transform.both.transforms
    assert (transform.crop_min_scale, hflip.p, vflip.p, rotate.degrees, transform.erase.p) == (
        0.7, 0.5, 0.25, [-10.0, 10.0], 0.1)
    assert jitter.brightness == (0.8, 1.2)


def trains_on_one_image(architecture: dict, backbone: dict, size: tuple[int, int]) -> bool:
    """Whether a training-mode forward pass on a batch of one image works (BatchNorm needs
    more than one value per channel)."""
    model = build_model(architecture, backbone).train()
    try:
        model(torch.zeros(1, 3, *size))
    except ValueError as error:
        assert "Expected more than 1 value per channel" in str(error)
        return False
    return True


RESNET = {"encoder": "resnet18", "weights": "none"}


@pytest.mark.parametrize("architecture, backbone, size", [
    ({"model": "unet", "width": 2, "depth": 5}, {}, (32, 32)),  # deepest map 1x1
    ({"model": "unet", "width": 2, "depth": 5}, {}, (32, 33)),  # padded to 32x64: 1x2
    ({"model": "unet", "width": 2, "depth": 4}, {}, (17, 17)),  # padded to 32x32: 2x2
    ({"model": "unet", "width": 2, "depth": 5}, {}, (17, 17)),
    ({"model": "unetpp", "width": 2, "depth": 3, "down": "strided"}, {}, (8, 8)),
    ({"model": "r2unet", "width": 2, "depth": 2, "t": 1}, {}, (8, 8)),
    ({"model": "unet", "width": 2}, RESNET, (32, 32)),  # the ResNet's default depth 5
    ({"model": "atrous_unet", "width": 2, "depth": 4}, RESNET, (32, 32)),
])
def test_depth_rule_is_batchnorms(architecture, backbone, size):
    assert (model_errors(architecture, backbone, size) == []) == \
        trains_on_one_image(architecture, backbone, size)


def test_depth_rule_names_the_default_and_a_depth_that_fits():
    assert model_errors({"model": "unet"}, RESNET, (32, 32), ("architectures.u", "backbones.r")) \
        == ["architectures.u.depth: 5 (the default) is too deep for images of 32x32 under the "
            "resnet18 encoder (backbones.r): the deepest feature map would be 1x1 pixel, and "
            "BatchNorm cannot train on one value per channel; use depth <= 4 or larger images"]


def edited(change) -> dict:
    config = copy.deepcopy(TINY)
    change(config)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: c["architectures"]["unet"].pop("model"), "architectures.unet.model: missing"),
    (lambda c: c["architectures"].update({"u__net": {"model": "unet"}}),
     f"architectures.u__net: not {NAME_RULE}"),
    (lambda c: c["experiments"]["architecture"]["vary"].update(architecture=["unet", "a__b"]),
     f"experiments.architecture.vary.architecture[1]: 'a__b' is not {NAME_RULE}"),
    (lambda c: c["architectures"].update(pp={"model": "unetpp", "t": 2}),
     "architectures.pp.t: unknown key (allowed: model, width, depth, down, up, head, "
     "deep_supervision)"),
    (lambda c: c["losses"].update(l={"dice": 1, "pos_weight": 2}),
     "losses.l.pos_weight: applies to bce, which is not set"),
    (lambda c: c["losses"].update(l={"bce": 0, "dice": 0.0}),
     "losses.l: needs a term (bce, dice or focal_tversky) with a weight > 0"),
    (lambda c: c["backbones"].update(r={"encoder": "resnet34"}), "backbones.r.weights: missing"),
    (lambda c: c["backbones"]["scratch"].update(weights="none"),
     "backbones.scratch: the scratch encoder takes no weights or stem (it starts from random "
     "initialisation)"),
    (lambda c: c["backbones"].update(r={"encoder": "resnet18", "weights": "imagenet",
                                        "stem": "small"}),
     "backbones.r: stem: small starts from random initialisation (weights: none): ImageNet "
     "weights were learned with the ImageNet stem"),
    (lambda c: c["train"].update(lr=float("nan")), "train.lr: nan is not of type 'number'"),
    (lambda c: c["data"].update(size=[32, 32.0]), "data.size[1]: 32.0 is not of type 'integer'"),
    (lambda c: c["data"].update(val_fraction=0.0),
     "data.val_fraction: 0.0 is less than or equal to the minimum of 0"),
    (lambda c: c["data"].update(drop_test_duplicates="yes"),
     "data.drop_test_duplicates: 'yes' is not of type 'boolean'"),
])
def test_config_messages_name_the_key_path(change, message):
    with pytest.raises(SegpipeError) as error:
        validate_config(edited(change))
    assert str(error.value) == f"config: {message}"


def test_every_problem_is_reported_and_defaults_stay_out_of_definitions():
    with pytest.raises(SegpipeError) as error:
        validate_config(edited(lambda c: (c["architectures"]["unet"].update(widht=8),
                                          c["augmentations"]["plain"].update(hflip=2))))
    assert str(error.value).splitlines() == [
        "config: architectures.unet.widht: unknown key (allowed: model, width, depth, down, up, "
        "head)",
        "config: augmentations.plain.hflip: 2 is greater than the maximum of 1"]

    config = copy.deepcopy(TINY)
    validate_config(config)
    assert config["train"]["optimizer"] == "adam" and config["resources"]["num_workers"] == 0
    assert config["data"]["background"] == [] and config["evaluate"]["threshold"] == 0.5
    for section in ("architectures", "backbones", "losses", "augmentations", "experiments"):
        assert config[section] == TINY[section]  # a default here would change runs' params


def test_run_spec_is_checked_against_the_same_schema():
    config = copy.deepcopy(TINY)
    validate_config(config)
    spec = {"run": "unet__scratch__bcedice_0.5__plain__s0", "seed": 0,
            "names": {"architecture": "unet", "backbone": "scratch", "loss": "bcedice_0.5",
                      "augmentation": "plain"},
            "architecture": {"model": "unet", "widht": 4}, "backbone": {},
            "loss": {"bce": 0.5, "dice": 0.5, "pos_weight": -1}, "augmentation": {},
            "train": config["train"]}
    with pytest.raises(SegpipeError) as error:
        check_spec(spec)
    assert str(error.value).splitlines() == [
        "run spec: architecture.widht: unknown key (allowed: model, width, depth, down, up, head)",
        "run spec: loss.pos_weight: -1 is less than or equal to the minimum of 0"]
    spec.update(architecture={"model": "unet", "down": "strided"},
                backbone={"encoder": "resnet18", "weights": "none"}, loss={"dice": 1})
    with pytest.raises(SegpipeError, match=r"^run spec: architecture.down: does not apply"):
        check_spec(spec)
