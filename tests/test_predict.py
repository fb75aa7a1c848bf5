"""`segpipe predict`: masks at the original sizes from nothing but a checkpoint."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cv2
import PIL.Image
import PIL.PngImagePlugin
import numpy as np
import pandas as pd
import pytest
import torch

from segpipe import SegpipeError
from segpipe.labels import Labels
from segpipe.models import build_model
from segpipe.checkpoint import make_checkpoint
from segpipe.data.labelme import Simplification, load_annotation, rasterise
from segpipe.inference import Predictor, image_batch
from segpipe.predict import checkpoint_paths, predict_folder, uncertainty

ARCHITECTURE = {"model": "unet", "width": 4, "depth": 2}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def save_checkpoint(model: torch.nn.Module, path: Path, backbone: dict, size=(24, 20),
                    labels: Labels = Labels()) -> Path:
    spec = {"run": "test", "architecture": ARCHITECTURE, "backbone": backbone}
    torch.save(make_checkpoint(spec, model.state_dict(), size, labels, epoch=1), path)
    return path


def constant_model(logit: float, backbone: dict | None = None) -> torch.nn.Module:
    """A model whose output is ``logit`` everywhere: every weight 0 but the head's bias."""
    definition = {} if backbone is None else {**backbone, "weights": "none"}
    model = build_model(ARCHITECTURE, definition)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
        model.state_dict()["decoder.head.bias"].fill_(logit)
    return model


def write_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of several sizes and formats; name -> (height, width)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (24, 20), "b.jpg": (37, 53), "c.bmp": (9, 31), "d.tif": (64, 16)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "e.JPEG"), rng.integers(0, 256, (30, 30), dtype=np.uint8))  # grey
    (folder / "notes.txt").write_text("not an image")
    return {Path(n).stem: s for n, s in {**sizes, "e.JPEG": (30, 30)}.items()}


def test_masks_have_the_original_sizes_and_follow_the_threshold(tmp_path):
    # sigmoid(2) = 0.8808: every pixel is foreground at threshold 0.5, none at 0.9.
    checkpoint = save_checkpoint(constant_model(2.0), tmp_path / "model.pt", backbone={})
    sizes = write_images(tmp_path / "in")
    predict_folder(checkpoint, tmp_path / "in", tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([f"{stem}.png" for stem in sizes] + ["uncertainty.csv"])
    for stem, size in sizes.items():
        mask = cv2.imread(str(tmp_path / "out" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == size and mask.dtype == np.uint8 and (mask == 255).all()
    predict_folder(checkpoint, tmp_path / "in", tmp_path / "out", threshold=0.9)
    assert not cv2.imread(str(tmp_path / "out" / "b.png"), cv2.IMREAD_UNCHANGED).any()


def test_mask_is_the_thresholded_model_probability(tmp_path):
    torch.manual_seed(0)
    model = build_model(ARCHITECTURE, {}).eval()
    checkpoint = save_checkpoint(model, tmp_path / "model.pt", backbone={})
    (tmp_path / "in").mkdir()
    image = np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8)  # model size
    cv2.imwrite(str(tmp_path / "in" / "x.png"), image[..., ::-1])  # RGB on disk as BGR
    x = (torch.from_numpy(image).permute(2, 0, 1)[None] / 255.0
         - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        prob = torch.sigmoid(model(x))[0, 0].numpy()
    # About half of the pixels, in the widest gap between neighbouring probabilities near the
    # median, so that no pixel sits within last bits of the threshold on any CPU.
    ordered = np.sort(prob.flatten())
    middle = ordered[len(ordered) // 4: 3 * len(ordered) // 4]
    i = int(np.argmax(np.diff(middle)))
    threshold = float(middle[i] + middle[i + 1]) / 2
    predict_folder(checkpoint, tmp_path / "in", tmp_path / "out", threshold=threshold, tta=False)
    expected = np.where(prob >= threshold, 255, 0)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "x.png"), cv2.IMREAD_UNCHANGED),
                                  expected)


def test_pretrained_backbone_is_rebuilt_without_its_weights(tmp_path):
    """A checkpoint of a pretrained encoder rebuilds the encoder with ``weights: none`` and
    loads the stored weights: the original weights file is not needed (nor downloaded)."""
    backbone = {"encoder": "resnet18", "weights": str(tmp_path / "gone" / "resnet18.pth")}
    checkpoint = save_checkpoint(constant_model(-3.0, backbone), tmp_path / "model.pt", backbone)
    write_images(tmp_path / "in")
    predict_folder(checkpoint, tmp_path / "in", tmp_path / "out")
    assert not cv2.imread(str(tmp_path / "out" / "d.png"), cv2.IMREAD_UNCHANGED).any()


def test_bad_input_names_the_file(tmp_path):
    checkpoint = save_checkpoint(constant_model(2.0), tmp_path / "model.pt", backbone={})
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "good.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SegpipeError, match=r"broken.png: not a readable image"):
        predict_folder(checkpoint, tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # all or nothing, the folder too

    (tmp_path / "in" / "broken.png").unlink()
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SegpipeError, match=r"junk.pt: not a readable checkpoint"):
        predict_folder(tmp_path / "junk.pt", tmp_path / "in", tmp_path / "out")
    with pytest.raises(SegpipeError, match=r"missing.pt: checkpoint not found"):
        predict_folder(tmp_path / "missing.pt", tmp_path / "in", tmp_path / "out")
    cv2.imwrite(str(tmp_path / "in" / "good.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SegpipeError, match=r"good.jpg and .*good.png: two images of one name"):
        predict_folder(checkpoint, tmp_path / "in", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegpipeError, match=r"empty: no images"):
        predict_folder(checkpoint, tmp_path / "empty", tmp_path / "out")


def test_several_classes_write_palette_pngs_of_class_indices(tmp_path):
    """A model of background + 2 classes whose head biases (0, 1, 3) make stone (2) the argmax
    everywhere: each mask is a palette PNG of class indices at the image's size, VOC colours."""
    labels = Labels(("leaf", "stone"), configured=True)
    model = build_model(ARCHITECTURE, {}, labels.outputs)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
        model.state_dict()["decoder.head.bias"].copy_(torch.tensor([0.0, 1.0, 3.0]))
    checkpoint = save_checkpoint(model, tmp_path / "model.pt", {}, labels=labels)
    sizes = write_images(tmp_path / "in")
    predict_folder(checkpoint, tmp_path / "in", tmp_path / "out")
    for stem, size in sizes.items():
        png = PIL.Image.open(tmp_path / "out" / f"{stem}.png")
        assert png.mode == "P" and png.size == size[::-1]
        assert (np.array(png) == 2).all()  # stone everywhere, as LabelMe's VOC export writes
        assert png.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]


def random_model(seed: int, labels: Labels = Labels()) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCHITECTURE, {}, labels.outputs).eval()


def smooth_images(folder: Path, count: int = 3, size=(48, 60)) -> list[Path]:
    """Images of smooth colour fields, so that a random U-Net's output has regions, not noise."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = cv2.GaussianBlur(rng.random((*size, 3)), (0, 0), 5)
        image = (255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        cv2.imwrite(str(paths[-1]), image)
    return paths


@pytest.mark.parametrize("labels", [Labels(), Labels(("leaf", "stone"), configured=True)],
                         ids=["binary", "classes"])
def test_labelme_files_round_trip_to_the_png_masks(tmp_path, labels):
    """Both formats at once: masks/ and labelme/; each LabelMe file, rasterised by segpipe, is
    the PNG mask: exactly without simplification, and at the default IoU >= 0.98 per class
    (the classes tile these images, each boundary shared by two polygons; the demo images'
    0.99 is tested in test_labelme.py); it points at its image and holds every field
    LabelMe 5 reads."""
    images = smooth_images(tmp_path / "in", size=(96, 120))
    # A random model whose head bias cancels its mean logit per channel: every class wins
    # somewhere, and a binary model's probability straddles 0.5.
    model = random_model(0, labels)
    probe = torch.from_numpy(cv2.imread(str(images[0]))[..., ::-1].copy()).permute(2, 0, 1)[None]
    x = (probe / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        model.state_dict()["decoder.head.bias"] -= model(x).mean(dim=(0, 2, 3))
    checkpoint = save_checkpoint(model, tmp_path / "model.pt", {}, labels=labels)
    threshold = 0.5
    reader = Labels.from_config(list(labels.names) if labels.configured else None,
                                background=["_background_"])  # the labels of the files
    for simplification, least in ((Simplification(0, 0), 1.0), (None, 0.98)):
        out = tmp_path / f"out{least}"
        predict_folder(checkpoint, tmp_path / "in", out, threshold=threshold,
                       formats=["png", "labelme"], simplification=simplification, tta=False)
        assert sorted(p.name for p in out.iterdir()) == ["labelme", "masks", "uncertainty.csv"]
        for image in images:
            mask = np.array(PIL.Image.open(out / "masks" / f"{image.stem}.png"))
            mask = (mask > 0).astype(np.uint8) if labels.binary else mask
            path = out / "labelme" / f"{image.stem}.json"
            document = json.loads(path.read_text())
            assert set(document) == {"version", "flags", "shapes", "imagePath", "imageData",
                                     "imageHeight", "imageWidth", "segpipe"}
            assert (path.parent / document["imagePath"]).resolve() == image.resolve()
            assert document["imageData"] is None
            assert (document["imageHeight"], document["imageWidth"]) == mask.shape
            for shape in document["shapes"]:
                assert set(shape) == {"label", "points", "group_id", "description",
                                      "shape_type", "flags", "mask"}
                assert shape["flags"] == {"predicted": True}
            back = rasterise(load_annotation(path), None, reader)
            present = [v for v in range(1, len(labels.names) + 1) if (mask == v).any()]
            assert present, "the model predicts no region: no round trip to check"
            for value in present:
                a, b = mask == value, back == value
                assert (a & b).sum() / (a | b).sum() >= least


def test_embedded_image(tmp_path):
    checkpoint = save_checkpoint(constant_model(2.0), tmp_path / "model.pt", backbone={})
    (image,) = smooth_images(tmp_path / "in", count=1)
    predict_folder(checkpoint, tmp_path / "in", tmp_path / "out", formats=["labelme"],
                   embed_image=True)
    document = json.loads((tmp_path / "out" / "img0.json").read_text())
    assert base64.b64decode(document["imageData"]) == image.read_bytes()
    (shape,) = document["shapes"]  # the whole image, foreground
    assert sorted(map(tuple, shape["points"])) == [(0, 0), (0, 47), (59, 0), (59, 47)]
    assert shape["description"] == "mean probability 0.881"  # sigmoid(2)


def test_a_human_or_corrected_annotation_in_the_output_is_never_replaced(tmp_path, make_labelme):
    checkpoint = save_checkpoint(constant_model(2.0), tmp_path / "model.pt", backbone={})
    smooth_images(tmp_path / "in", count=2)
    out = tmp_path / "out"
    predict_folder(checkpoint, tmp_path / "in", out, formats=["labelme"])
    predict_folder(checkpoint, tmp_path / "in", out, formats=["labelme"])  # its own: replaced
    corrected = json.loads((out / "img1.json").read_text())
    corrected["shapes"][0]["points"][0] = [3.0, 4.0]
    (out / "img1.json").write_text(json.dumps(corrected))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SegpipeError, match=r"img1.json: exists and is not an unedited segpipe "
                                           r"prediction"):
        predict_folder(checkpoint, tmp_path / "in", out, formats=["labelme"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    theirs = tmp_path / "theirs"  # a folder of the user's own masks
    theirs.mkdir()
    cv2.imwrite(str(theirs / "img0.png"), np.zeros((48, 60), np.uint8))
    with pytest.raises(SegpipeError, match=r"img0.png: exists and is not a mask segpipe predicted"):
        predict_folder(checkpoint, tmp_path / "in", theirs)
    predict_folder(checkpoint, tmp_path / "in", out / "masks")
    predict_folder(checkpoint, tmp_path / "in", out / "masks")  # its own masks: replaced
    make_labelme([("cat", "polygon", [[1, 1], [5, 1], [5, 5]])], name="img0",
                 folder=tmp_path / "in")
    with pytest.raises(SegpipeError, match=r"is the input folder"):
        predict_folder(checkpoint, tmp_path / "in", tmp_path / "in", formats=["labelme"])


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def corrected_mask(out: Path) -> str:
    """A predicted mask painted over in an editor that keeps its text chunks."""
    path = out / "masks" / "img1.png"
    with PIL.Image.open(path) as png:
        pixels, info = np.array(png), png.info
    pixels[:5, :5] = 0
    meta = PIL.PngImagePlugin.PngInfo()
    for key, value in info.items():
        if isinstance(value, str):
            meta.add_text(key, value)
    PIL.Image.fromarray(pixels).save(path, pnginfo=meta)
    return f"{path}: exists and is not a mask segpipe predicted, unchanged since"


def their_mask(out: Path) -> str:
    path = out / "masks" / "field.png"
    cv2.imwrite(str(path), np.zeros((48, 60), np.uint8))
    return f"{path}: exists and is not a mask segpipe predicted, unchanged since"


def their_csv(out: Path) -> str:
    path = out / "uncertainty.csv"
    path.write_text("image,notes\nimg0.jpg,blurred\n")
    return f"{path}: exists and is not the uncertainty.csv segpipe writes"


def their_annotation(out: Path) -> str:
    path = out / "labelme" / "field.json"
    path.write_text(json.dumps({"shapes": [], "imagePath": "field.jpg"}))
    return f"{path}: exists and is not an unedited segpipe prediction"


@pytest.mark.parametrize("edit", [corrected_mask, their_mask, their_csv, their_annotation])
def test_the_predictions_of_a_folder_are_replaced_as_one_set(tmp_path, edit):
    """A re-run replaces segpipe's own set, the files of images no longer in the input
    removed; one file of the user's (or corrected) in the set stops it before any is written."""
    checkpoint = save_checkpoint(constant_model(2.0), tmp_path / "model.pt", backbone={})
    smooth_images(tmp_path / "in", count=3)
    out = tmp_path / "out"
    formats = ["png", "labelme"]
    predict_folder(checkpoint, tmp_path / "in", out, formats=formats)
    (tmp_path / "in" / "img2.png").unlink()
    predict_folder(checkpoint, tmp_path / "in", out, formats=formats)  # its own: replaced
    assert sorted(contents(out)) == ["labelme/img0.json", "labelme/img1.json", "masks/img0.png",
                                     "masks/img1.png", "uncertainty.csv"]
    message = edit(out)
    before = contents(out)
    with pytest.raises(SegpipeError) as error:
        predict_folder(checkpoint, tmp_path / "in", out, formats=formats)
    assert str(error.value).startswith(message)
    assert contents(out) == before


def test_an_ensemble_averages_its_members_probabilities(tmp_path):
    """sigmoid(2) = 0.8808 and sigmoid(-1) = 0.2689 average to 0.5749: foreground at
    threshold 0.5, background at 0.6; each member alone decides otherwise at 0.6 and 0.5."""
    high = save_checkpoint(constant_model(2.0), tmp_path / "high.pt", backbone={})
    low = save_checkpoint(constant_model(-1.0), tmp_path / "low.pt", backbone={})
    smooth_images(tmp_path / "in", count=1)
    for threshold, expected in ((0.5, 255), (0.6, 0)):
        predict_folder([high, low], tmp_path / "in", tmp_path / "out", threshold=threshold)
        assert (cv2.imread(str(tmp_path / "out" / "img0.png"), cv2.IMREAD_UNCHANGED)
                == expected).all()
    row = pd.read_csv(tmp_path / "out" / "uncertainty.csv").iloc[0]
    # 2 models x 4 mirrors; at 0.6 four masks all foreground, four empty: of the 28 pairs the
    # 2 x 6 within a kind agree (Dice 1), the 16 across do not (0): disagreement 16/28
    assert row["members"] == 8 and row["disagreement"] == pytest.approx(16 / 28)
    p = (1 / (1 + np.exp(-2)) + 1 / (1 + np.exp(1))) / 2
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)
    assert row["entropy"] == pytest.approx(entropy, rel=1e-5)


def test_mirrored_passes_are_flipped_back_and_averaged(tmp_path):
    model = random_model(3)
    checkpoint = save_checkpoint(model, tmp_path / "model.pt", {})
    image = np.random.default_rng(2).integers(0, 256, (24, 20, 3), dtype=np.uint8)  # model size
    predictor = Predictor.load([checkpoint], torch.device("cpu"), mirrors=True)
    members = [m[0].numpy() for m in predictor.members(image_batch([image]))]
    x = (torch.from_numpy(image).permute(2, 0, 1)[None] / 255.0
         - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        for row, dims in zip(members, [(), (3,), (2,), (2, 3)]):
            flipped = x.flip(dims) if dims else x
            expected = torch.sigmoid(model(flipped))
            expected = expected.flip(dims) if dims else expected
            np.testing.assert_allclose(row, expected[0].numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(members[0], members[1], atol=1e-3)  # the model is not symmetric


def test_uncertainty_of_hand_made_members():
    """Four binary members on 2x2 pixels, masks {1,1,0,0}, {1,0,0,0}, {0,0,0,0} twice: of the
    six pairs the first has Dice 2/3, the last (both empty) 1, the others 0, so the
    disagreement is 1 - (2/3 + 1)/6 = 13/18."""
    members = np.array([[[[0.9, 0.9], [0.1, 0.1]]],
                        [[[0.9, 0.1], [0.1, 0.1]]],
                        [[[0.1, 0.1], [0.1, 0.1]]],
                        [[[0.2, 0.3], [0.4, 0.1]]]], np.float32)
    result, mean = uncertainty(members, Labels())
    np.testing.assert_allclose(mean, members.mean(axis=0), rtol=1e-6)
    assert result["members"] == 4
    assert result["disagreement"] == pytest.approx(13 / 18)
    mean = members.mean(axis=0)[0]
    h = -(mean * np.log(mean) + (1 - mean) * np.log(1 - mean)) / np.log(2)
    assert result["entropy"] == pytest.approx(h.mean(), rel=1e-5)
    assert np.isnan(uncertainty(members[:1], Labels())[0]["disagreement"])


def test_members_that_disagree_on_what_they_predict_are_an_error(tmp_path):
    base = save_checkpoint(constant_model(1.0), tmp_path / "base.pt", {})
    labels = Labels(("leaf", "stone"), configured=True)
    classes = save_checkpoint(random_model(0, labels), tmp_path / "classes.pt", {}, labels=labels)
    size = save_checkpoint(constant_model(1.0), tmp_path / "size.pt", {}, size=(32, 32))
    norm = torch.load(base, weights_only=True)
    norm["mean"] = [0.5, 0.5, 0.5]
    torch.save(norm, tmp_path / "norm.pt")
    smooth_images(tmp_path / "in", count=1)
    for other, message in ((classes, r"classes.pt and .*base.pt differ in their classes: 2 "
                                     r"classes \(softmax\): leaf, stone and binary"),
                           (size, r"size.pt and .*base.pt differ in their input size: \(32, 32\) "
                                  r"and \(24, 20\)"),
                           (tmp_path / "norm.pt", r"norm.pt and .*base.pt differ in their "
                                                  r"normalisation mean: \(0.5, ")):
        with pytest.raises(SegpipeError, match=message):
            predict_folder([base, other], tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_folders_and_lists_name_their_checkpoints(tmp_path):
    run = tmp_path / "run"
    for fold in (0, 1):
        (run / f"fold{fold}" / "snapshots").mkdir(parents=True)
        for path in (run / f"fold{fold}" / "model.pt",
                     run / f"fold{fold}" / "snapshots" / "model.pt"):
            path.write_bytes(b"")
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    other.write_bytes(b"")
    (tmp_path / "list.txt").write_text(f"{run}\n\n{other}\n")
    folds = [run / "fold0" / "model.pt", run / "fold1" / "model.pt"]
    assert checkpoint_paths([run]) == folds
    assert checkpoint_paths([f"@{tmp_path / 'list.txt'}", other]) == [*folds, other]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegpipeError, match=r"empty: holds no model.pt"):
        checkpoint_paths([tmp_path / "empty"])
    (tmp_path / "bad.txt").write_text(f"{tmp_path / 'gone'}\n")
    with pytest.raises(SegpipeError, match=r"gone: checkpoint not found \(listed in .*bad.txt\)"):
        checkpoint_paths([f"@{tmp_path / 'bad.txt'}"])
    (tmp_path / "none.txt").write_text("\n")
    with pytest.raises(SegpipeError, match=r"none.txt: lists no checkpoint"):
        checkpoint_paths([f"@{tmp_path / 'none.txt'}"])
