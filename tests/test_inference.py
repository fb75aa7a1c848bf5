"""Sliding-window inference (segpipe.inference) against MONAI and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

from segpipe import SegpipeError
from segpipe.inference import gaussian_importance, sliding_window, window_starts

TILE = (32, 24)


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (7, 8), (8, 7), (3, 64), (48, 33), (128, 96)])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.25])
def test_gaussian_importance_is_monais(tile, sigma_scale):
    ours = gaussian_importance(tile, sigma_scale)
    assert ours.dtype == torch.float32 and ours.shape == tile
    monai = compute_importance_map(tile, mode="gaussian", sigma_scale=sigma_scale)
    torch.testing.assert_close(ours, monai, rtol=0, atol=1e-6)


def test_gaussian_importance_by_hand():
    # 3x3, sigma = 3/8: the edge weight exp(-1 / (2 (3/8)^2)) = exp(-32/9); the corners, its
    # square 8e-4, are floored at 1e-3
    edge = math.exp(-32 / 9)
    expected = torch.tensor([[1e-3, edge, 1e-3], [edge, 1.0, edge], [1e-3, edge, 1e-3]])
    torch.testing.assert_close(gaussian_importance((3, 3)), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tile", [1, 2, 7, 8, 24, 32])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_window_starts_are_monais_scan(tile, overlap):
    for length in range(tile, tile * 5 + 3):
        interval = _get_scan_interval((length,), (tile,), 1, (overlap,))
        monai = [s[0].start for s in dense_patch_slices((length,), (tile,), interval)]
        assert window_starts(length, tile, overlap) == monai, (length, tile, overlap)


@pytest.mark.parametrize("length, tile, overlap, starts", [
    (8, 8, 0.5, [0]), (12, 8, 0.5, [0, 4]), (13, 8, 0.5, [0, 4, 5]), (10, 4, 0.0, [0, 4, 6]),
    (9, 8, 0.9, [0, 1]), (20, 8, 0.25, [0, 6, 12])])
def test_window_starts_by_hand(length, tile, overlap, starts):
    assert window_starts(length, tile, overlap) == starts
    assert window_starts(np.int64(length), np.int32(tile), overlap) == starts  # from NumPy


def random_predictor(classes: int, seed: int):
    """A random-init conv net from uint8 tiles to probabilities: softmax over ``classes`` or,
    for one class, a sigmoid."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, classes, 5, padding=2)).eval()

    @torch.no_grad()
    def predict(tiles: torch.Tensor) -> torch.Tensor:
        logits = net(tiles.float() / 127.5 - 1)
        return torch.sigmoid(logits) if classes == 1 else torch.softmax(logits, dim=1)
    return predict


def ones(tiles: torch.Tensor) -> torch.Tensor:
    return torch.ones(len(tiles), 1, *tiles.shape[2:])


SIZES = [(10, 20), (20, 24), (32, 24), (33, 25), (45, 70), (64, 48), (17, 150), (150, 30)]


@pytest.mark.parametrize("classes, batch_size", [(3, 4), (1, 3), (2, 1)])
def test_sliding_window_is_monais(classes, batch_size):
    predict = random_predictor(classes, seed=classes)
    generator = torch.Generator().manual_seed(classes)
    for size in SIZES:
        image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
        ours = sliding_window(predict, image, TILE, batch_size=batch_size)
        monai = sliding_window_inference(
            image[None].float(), roi_size=TILE, sw_batch_size=batch_size, predictor=predict,
            overlap=0.5, mode="gaussian", sigma_scale=0.125, padding_mode="constant",
            cval=0)[0]
        assert ours.dtype == torch.float32 and ours.shape == (classes, *size)
        torch.testing.assert_close(ours, monai, rtol=0, atol=1e-5, msg=f"size {size}")


@pytest.mark.parametrize("overlap, sigma_scale", [(0.0, 0.125), (0.25, 0.25), (0.75, 0.1)])
def test_sliding_window_is_monais_other_settings(overlap, sigma_scale):
    predict = random_predictor(3, seed=7)
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(7))
    ours = sliding_window(predict, image, TILE, overlap, sigma_scale)
    monai = sliding_window_inference(image[None].float(), TILE, 4, predict, overlap=overlap,
                                     mode="gaussian", sigma_scale=sigma_scale)[0]
    torch.testing.assert_close(ours, monai, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_constant_probability_stays(size):
    """Every pixel's blend is a weighted mean of equal values: dyadic constants come back
    exactly (scaling by a power of two commutes with rounding), others to rounding."""
    image = torch.zeros(3, *size, dtype=torch.uint8)
    for value, tolerance in ((0.25, 0.0), (1.0, 0.0), (0.3, 1e-6)):
        out = sliding_window(lambda t: torch.full((len(t), 2, *TILE), value), image, TILE)
        torch.testing.assert_close(out, torch.full((2, *size), value), rtol=0,
                                   atol=tolerance)


@pytest.mark.parametrize("size", SIZES)
def test_pixelwise_predictor_returns_the_image(size):
    """A predictor that reads each pixel's own value gives back the image: every tile lands
    where it was cut and the black padding of small images is cropped away."""
    image = torch.randint(1, 256, (3, *size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    out = sliding_window(lambda t: t.float() / 255, image, TILE, batch_size=2)
    torch.testing.assert_close(out, image.float() / 255, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 100])
def test_tiles_go_batch_by_batch(batch_size):
    """Each tile is predicted once, at most ``batch_size`` at a time: 45 x 70 under 32 x 24
    tiles is rows [0, 13] times columns [0, 12, 24, 36, 46]."""
    seen = []

    def predict(tiles):
        seen.append(len(tiles))
        return ones(tiles)
    sliding_window(predict, torch.zeros(3, 45, 70, dtype=torch.uint8), TILE, batch_size=batch_size)
    assert window_starts(45, 32, 0.5) == [0, 13]
    assert window_starts(70, 24, 0.5) == [0, 12, 24, 36, 46]
    assert sum(seen) == 10 and max(seen) == min(batch_size, 10)
    assert seen == [min(batch_size, 10 - first) for first in range(0, 10, batch_size)]


def test_no_graph_across_tiles():
    net = nn.Conv2d(3, 2, 1)  # trainable, called without no_grad by the predictor
    out = sliding_window(lambda t: torch.softmax(net(t.float()), 1),
                         torch.zeros(3, 45, 70, dtype=torch.uint8), TILE)
    assert not out.requires_grad and out.grad_fn is None


def test_blend_by_hand_1d():
    """A 1-pixel-high image 12 wide, tiles 1x8, overlap 1/2: tiles at columns 0 and 4. Each
    tile predicts one constant (its first pixel / 100): columns 0-3 see tile 0 only, 8-11
    tile 1 only, 4-7 both, weighted by the Gaussian g(i) = exp(-(i - 3.5)^2 / 2) (sigma =
    8/8) at their positions i in each tile."""
    assert window_starts(12, 8, 0.5) == [0, 4]
    image = torch.tensor([10] * 4 + [20] * 4 + [30] * 4, dtype=torch.uint8).expand(3, 1, 12)
    out = sliding_window(lambda t: (t[:, :1, :1, :1].float() / 100).expand(-1, 1, 1, 8).clone(),
                         image, (1, 8))
    g = [math.exp(-(i - 3.5) ** 2 / 2) for i in range(8)]
    a, b = 0.1, 0.2  # tile 0 starts on a 10, tile 1 on a 20
    expected = [a] * 4 + [(a * g[x] + b * g[x - 4]) / (g[x] + g[x - 4]) for x in range(4, 8)] \
        + [b] * 4
    torch.testing.assert_close(out, torch.tensor(expected).view(1, 1, 12), rtol=1e-6, atol=0)


def test_ensemble_inside_or_outside_is_the_same():
    """Blending probabilities is linear: averaging two models inside ``predict`` equals
    averaging their sliding-window probabilities."""
    first, second = random_predictor(3, seed=1), random_predictor(3, seed=2)
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(3))
    inside = sliding_window(lambda t: (first(t) + second(t)) / 2, image, TILE)
    outside = (sliding_window(first, image, TILE) + sliding_window(second, image, TILE)) / 2
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-6)


IMAGE = torch.zeros(3, 40, 40, dtype=torch.uint8)


@pytest.mark.parametrize("call, message", [
    (lambda: sliding_window(ones, IMAGE, (0, 8)), "tile must be two positive integers"),
    (lambda: sliding_window(ones, IMAGE, (8,)), "tile must be two positive integers"),
    (lambda: sliding_window(ones, IMAGE, (8.0, 8)), "tile must be two positive integers"),
    (lambda: sliding_window(ones, IMAGE, 8), "tile must be two positive integers"),
    (lambda: sliding_window(ones, IMAGE, TILE, overlap=1.0), r"overlap must be .* in \[0, 1\)"),
    (lambda: sliding_window(ones, IMAGE, TILE, overlap=-0.1), r"overlap must be .* in \[0, 1\)"),
    (lambda: sliding_window(ones, IMAGE, TILE, sigma_scale=0), "sigma_scale must be a positive"),
    (lambda: sliding_window(ones, IMAGE, TILE, batch_size=0), "batch_size must be a positive"),
    (lambda: sliding_window(ones, IMAGE.float(), TILE), r"uint8 tensor \(3, h, w\), got .*float32"),
    (lambda: sliding_window(ones, IMAGE[0], TILE), r"uint8 tensor .* got torch.uint8 \(40, 40\)"),
    (lambda: sliding_window(ones, IMAGE.numpy(), TILE), "uint8 tensor .* got ndarray"),
    (lambda: sliding_window(lambda t: ones(t)[:, :, :-1], IMAGE, TILE),
     r"predict must return probabilities \(n, C, 32, 24\) for n tiles.* got \(4, 1, 31, 24\)"),
    (lambda: sliding_window(lambda t: ones(t)[0], IMAGE, TILE), "predict must return"),
    (lambda: sliding_window(lambda t: torch.ones(len(t), len(t), *TILE), IMAGE, TILE),
     "the same C for every batch"),
    (lambda: window_starts(7, 8, 0.5), "length 7 must be an integer >= the tile 8"),
    (lambda: window_starts(8, 0, 0.5), "tile must be a positive integer, got 0"),
    (lambda: gaussian_importance((4, 4), sigma_scale=-1.0), "sigma_scale must be a positive"),
])
def test_bad_arguments(call, message):
    with pytest.raises(SegpipeError, match=message):
        call()
