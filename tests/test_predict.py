"""`segpipe predict`: masks at the original sizes from nothing but a checkpoint."""

from __future__ import annotations

from pathlib import Path

import cv2
import PIL.Image
import numpy as np
import pytest
import torch

from segpipe import SegpipeError
from segpipe.labels import Labels
from segpipe.models import build_model
from segpipe.predict import predict_folder
from segpipe.checkpoint import make_checkpoint

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
    assert written == [f"{stem}.png" for stem in sorted(sizes)]
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
    predict_folder(checkpoint, tmp_path / "in", tmp_path / "out", threshold=threshold)
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
    assert not (tmp_path / "out" / "broken.png").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # sorted: broken comes first

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
