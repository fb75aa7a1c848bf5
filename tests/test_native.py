"""Native resolution (docs/training.md): a cache at a scale of each image's own size, training
on patches with foreground oversampling, sliding windows at validation, evaluation and
prediction, and every score at the original size equal to what ``segpipe predict`` delivers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from segpipe.data.cache import Cache, build_cache
from segpipe.data.dataset import PatchDataset
from segpipe.data.geometry import Geometry
from segpipe.data.synthetic import write_dataset
from segpipe.evaluate import evaluate_run
from segpipe.inference import Predictor
from segpipe.labels import Labels
from segpipe.models import build_model
from segpipe.predict import predict_folder
from segpipe.runtime import IMAGENET_MEAN, IMAGENET_STD, forward_logits, probabilities
from segpipe.spec import check_spec
from segpipe.train import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEMO = Labels.from_config(background=["grass"])
CLASSES = Labels.from_config(["leaf", "stone"], background=["grass"])


def make_spec(**train: object) -> dict:
    return {
        "run": "unet__scratch__bcedice_0.5__flips__s0", "seed": 0,
        "names": {"architecture": "unet", "backbone": "scratch", "loss": "bcedice_0.5",
                  "augmentation": "flips"},
        "architecture": {"model": "unet", "width": 4, "depth": 2}, "backbone": {},
        "loss": {"bce": 0.5, "dice": 0.5}, "augmentation": {"hflip": 0.5},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "scheduler": "none",
                  "early_stop_patience": 0, "snapshot_epochs": [1, 2], "amp": False,
                  "patch": [16, 16], "patches_per_epoch": 8, **train},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic photos of 40x56 cached at half their size (20x28), both kinds of study."""
    root = tmp_path_factory.mktemp("native")
    write_dataset(root / "train", count=12, seed=0, size=(40, 56))
    write_dataset(root / "test", count=3, seed=1, size=(40, 56))
    for name, labels in (("binary", DEMO), ("classes", CLASSES)):
        build_cache(root / "train", root / f"{name}_train.h5", Geometry(scale=0.5), labels,
                    val_fraction=0.25)
        build_cache(root / "test", root / f"{name}_test.h5", Geometry(scale=0.5), labels)
    return root


def test_a_cache_at_a_scale_keeps_each_images_aspect(data):
    with Cache(data / "binary_test.h5") as cache:
        assert cache.geometry == Geometry(scale=0.5) and cache.attrs["scale"] == 0.5
        assert cache.image(0).shape == (20, 28, 3) and cache.mask(0).shape == (20, 28)
        assert cache.truth(0).shape == (40, 56)  # the original size, scored against
        assert cache.shape.tolist() == [[20, 28]] * 3
        assert cache.orig_size.tolist() == [[40, 56]] * 3
        # a window reaching outside the image reads zeros there
        window = cache.image(0, (-2, -3, 8, 7))
        np.testing.assert_array_equal(window[2:, 3:], cache.image(0)[:8, :7])
        assert not window[:2].any() and not window[:, :3].any()


def one_dot(make_labelme, tmp_path: Path, size: tuple[int, int], at: tuple[int, int]) -> Path:
    """A cache at scale 1 of two dark noise photos of ``size`` with one 2x2 square at ``at``
    (y, x)."""
    y, x = at
    for seed, name in enumerate("ab"):  # two photos, not one (the same photo is one group)
        noise = np.random.default_rng(seed).integers(0, 64, (*size, 3), dtype=np.uint8)
        make_labelme([("dot", "rectangle", [[x, y], [x + 1, y + 1]])],
                     image=noise, name=name, folder=tmp_path / "dots")
    build_cache(tmp_path / "dots", tmp_path / "dots.h5", Geometry(scale=1.0), val_fraction=0.5)
    return tmp_path / "dots.h5"


def test_oversampled_patches_hold_foreground_the_others_are_uniform(make_labelme, tmp_path):
    """A 2x2 dot in a 64x64 image: with oversampling every patch of 8x8 holds it; placed
    uniformly, a patch holds a pixel of it with chance ~(8+1)²/57² ≈ 2.5 %."""
    cache = one_dot(make_labelme, tmp_path, (64, 64), (50, 40))
    forced = PatchDataset(cache, [0], (8, 8), length=40, batch_size=4, oversample=1.0)
    uniform = PatchDataset(cache, [0], (8, 8), length=400, batch_size=4, oversample=0.0)
    assert all(forced[k][1].any() for k in range(len(forced)))
    hits = np.mean([bool(uniform[k][1].any()) for k in range(len(uniform))])
    assert hits < 0.1
    # a share of each batch: with 0.5 the last two of every four, and only those
    half = PatchDataset(cache, [0], (8, 8), length=400, batch_size=4, oversample=0.5)
    assert all(half[k][1].any() for k in range(len(half)) if k % 4 >= 2)
    image, mask = half[2]
    assert image.shape == (3, 8, 8) and mask.shape == (1, 8, 8) and image.dtype == torch.uint8


def test_patches_depend_on_seed_epoch_and_item_only(data):
    def draw(epoch: int) -> list:
        dataset = PatchDataset(data / "binary_train.h5", [0, 1, 2], (16, 16), 6, 3, 0.33, seed=7)
        dataset.set_epoch(epoch)
        return [dataset[k][1].numpy().tobytes() + dataset[k][0].numpy().tobytes()
                for k in range(6)]
    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_an_image_smaller_than_the_patch_is_padded_black_and_background(make_labelme, tmp_path):
    cache = one_dot(make_labelme, tmp_path, (6, 6), (2, 2))
    image, mask = PatchDataset(cache, [0], (10, 12), length=1, batch_size=1, oversample=0.0)[0]
    with Cache(cache) as opened:
        inside = opened.mask(0)
    # the 6x6 image centred: 2 rows above, 3 columns left
    np.testing.assert_array_equal(mask[0, 2:8, 3:9].numpy(), inside)
    assert mask.sum() == inside.sum() and not image[:, :2].any() and not image[:, :, :3].any()
    assert image[:, 2:8, 3:9].any()  # the photo itself
    assert mask.sum() == 4  # LabelMe draws the rectangle (2, 2)-(3, 3) corners included: 2x2


def test_squashed_probabilities_are_those_of_a_plain_forward_to_the_bit(tmp_path):
    """Resize mode: the predictor's probabilities at the training size are those evaluation
    computed before native resolution (one forward pass of a batch), bit for bit."""
    torch.manual_seed(0)
    model = build_model({"model": "unet", "width": 4, "depth": 2}, {}).eval()
    images = torch.randint(0, 256, (5, 3, 24, 20), dtype=torch.uint8)
    predictor = Predictor((model,), Labels(), Geometry(size=(24, 20)), (24, 20), IMAGENET_MEAN,
                          IMAGENET_STD, torch.device("cpu"))
    with torch.no_grad():
        expected = probabilities(forward_logits(model, images, torch.device("cpu"),
                                                IMAGENET_MEAN, IMAGENET_STD))
    assert torch.equal(predictor(images), expected)


@pytest.mark.parametrize("study", ["binary", "classes"])
def test_native_run_trains_on_patches_and_scores_what_predict_delivers(data, tmp_path, study):
    labels = DEMO if study == "binary" else CLASSES
    run = tmp_path / "run"
    train_run(make_spec(), data / f"{study}_train.h5", run)
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    assert checkpoint["geometry"] == {"scale": 0.5} and checkpoint["size"] == [16, 16]
    assert checkpoint["spec"] == check_spec(make_spec(), labels=labels, native=True)
    assert "patches of 16x16" in (run / "train.log").read_text()
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 2 and history["val_dice"].between(0, 1).all()

    evaluate_run(run, data / f"{study}_test.h5", n_examples=2)
    per_image = pd.read_csv(run / "per_image.csv").set_index("name")
    evolution = np.load(run / "evolution.npz")
    assert evolution["masks"].shape == (2, 40, 56)  # examples at the original size
    out = tmp_path / "predicted"
    predict_folder(run / "model.pt", data / "test", out, tta=False)
    with Cache(data / f"{study}_test.h5") as cache:
        for row, name in enumerate(cache.names):
            mask = np.array(PIL.Image.open(out / f"{name}.png"))
            assert mask.shape == (40, 56)
            predicted = (mask > 0).astype(np.uint8) if labels.binary else mask
            assert dice(predicted, cache.truth(row), labels) == pytest.approx(
                per_image.loc[name, "dice"], abs=1e-6)


def dice(predicted: np.ndarray, truth: np.ndarray, labels: Labels) -> float:
    """An image's Dice by definition (docs/metrics.md): binary, or the mean over the classes
    its truth holds; both empty 1."""
    classes = [1] if labels.binary else [c for c in range(1, labels.outputs) if (truth == c).any()]
    scores = []
    for c in classes:
        p, t = predicted == c, truth == c
        if not (p.any() or t.any()):
            scores.append(1.0)
            continue
        scores.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores)) if scores else float(not (predicted > 0).any())
