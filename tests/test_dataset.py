"""SegmentationH5Dataset: items, split indices, per-item RNG, DataLoader workers."""

from __future__ import annotations

import shutil

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cachefile import open_stacked
from segpipe import SegpipeError
from segpipe.data.cache import build_cache
from segpipe.data.dataset import SegmentationH5Dataset, split_indices
from segpipe.labels import Labels


@pytest.fixture
def cache(labelme_folder, tmp_path):
    path = tmp_path / "cache.h5"
    build_cache(labelme_folder, path, (12, 16), Labels.from_config(background=["grass"]),
                val_fraction=0.34, split_seed=0)
    return path


def stamp(image, mask, rng):
    """A transform that writes one draw of its RNG into the mask, and flips the image."""
    mask = mask.copy()
    mask[0, 0] = rng.integers(2, 256)
    return image[:, ::-1], mask


def test_items_are_the_cache_rows_as_uint8_tensors(cache):
    dataset = SegmentationH5Dataset(cache)
    with open_stacked(cache) as h5:
        images, masks = h5["images"][()], h5["masks"][()]
    assert len(dataset) == 6
    image, mask = dataset[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 16)
    assert mask.dtype == torch.uint8 and mask.shape == (1, 12, 16)
    np.testing.assert_array_equal(image.numpy(), images[4].transpose(2, 0, 1))
    np.testing.assert_array_equal(mask.numpy()[0], masks[4])


def test_split_indices_select_train_and_val_rows(cache):
    train, val, test = split_indices(cache)
    assert len(test) == 0  # the test images of a fixed split are another cache
    with open_stacked(cache) as h5:
        is_val = h5["is_val"][()]
    assert sorted([*train, *val]) == list(range(6)) and len(val) == 2  # round(0.34 * 6)
    assert is_val[val].all() and not is_val[train].any()
    dataset = SegmentationH5Dataset(cache, indices=val)
    np.testing.assert_array_equal(dataset[1][1], SegmentationH5Dataset(cache)[val[1]][1])


def test_rng_depends_on_seed_epoch_and_row_only(cache):
    dataset = SegmentationH5Dataset(cache, indices=[3, 1], transform=stamp, seed=5)
    expected = np.random.default_rng([5, 0, 3]).integers(2, 256)
    image, mask = dataset[0]
    assert mask[0, 0, 0] == expected
    plain = SegmentationH5Dataset(cache)[3][0].numpy()
    np.testing.assert_array_equal(image.numpy(), plain[:, :, ::-1])
    assert dataset[0][1][0, 0, 0] == expected  # the same item again: the same draw
    other_order = SegmentationH5Dataset(cache, indices=[1, 3], transform=stamp, seed=5)
    assert other_order[1][1][0, 0, 0] == expected
    dataset.set_epoch(1)
    assert dataset[0][1][0, 0, 0] == np.random.default_rng([5, 1, 3]).integers(2, 256)


def test_dataloader_workers_give_the_same_batches(cache):
    dataset = SegmentationH5Dataset(cache, transform=stamp, seed=1)
    dataset[0]  # the main process opens the file before the workers fork
    dataset.set_epoch(2)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=2, num_workers=workers)
        batches[workers] = [torch.cat([image.flatten(), mask.flatten()]) for image, mask in loader]
    assert len(batches[2]) == 3
    for single, parallel in zip(batches[0], batches[2]):
        assert torch.equal(single, parallel)
    expected = [np.random.default_rng([1, 2, row]).integers(2, 256) for row in range(6)]
    assert [int(m[0, 0, 0]) for _, m in DataLoader(dataset, batch_size=None)] == expected


def test_pickles_without_its_file_handle(cache):
    dataset = SegmentationH5Dataset(cache)
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[2][0], dataset[2][0])


def test_errors_name_the_file(cache, tmp_path):
    with pytest.raises(SegpipeError, match="absent.h5: cannot open HDF5 cache"):
        SegmentationH5Dataset(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["images"] = np.zeros((1, 2, 2, 3), np.uint8)
    with pytest.raises(SegpipeError, match=r"other.h5: not a segpipe cache of layout 2 \(an "
                       r"older one, written by another segpipe\): rasterise it again"):
        split_indices(tmp_path / "other.h5")
    shutil.copy(cache, tmp_path / "other.h5")
    with h5py.File(tmp_path / "other.h5", "a") as h5:
        del h5["is_val"]
    with pytest.raises(SegpipeError, match="other.h5: no validation split 'is_val'$"):
        split_indices(tmp_path / "other.h5")
    with h5py.File(tmp_path / "other.h5", "a") as h5:
        h5["fold"] = np.zeros(1, np.int64)
    with pytest.raises(SegpipeError, match=r"'is_val' \(a cross-validation cache: train one"):
        split_indices(tmp_path / "other.h5")
    with pytest.raises(SegpipeError, match="cache.h5: no cross-validation folds 'fold' for fold 1"):
        split_indices(cache, fold=1)
    with pytest.raises(SegpipeError, match="indices out of range for 6 images"):
        SegmentationH5Dataset(cache, indices=[0, 6])
