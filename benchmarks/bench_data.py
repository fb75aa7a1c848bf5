"""Data throughput: rasterising a LabelMe folder into the HDF5 cache; the loader reading that
cache versus the seed study's per-item path (decode the JPEG, parse the JSON and fill the
polygons on every read); and the augmented training loader with N workers against the GPU.

    python benchmarks/bench_data.py [--size 512] [--source 512] [--count 48] [--epochs 3]
        [--batch 8] [--workers 0 1 2 4] [--threads 1] [--augmentation standard]
        [--gpu-images-per-s R] [--json PATH]

Self-contained: it writes a synthetic LabelMe folder (JPEG + JSON, ``source`` x ``source``
pixels) into a temporary folder and caches it at ``size`` x ``size``; the per-item loader
resizes and rasterises to that size too (both with the first ``--workers`` count). The training
loader is train.py's: the cache's training split through the ``--augmentation`` definition of
config.yaml, persistent workers, pinned memory when CUDA is available; and for comparison the
same with new workers every epoch; and the patch loader of a study at ``data.scale`` 1 (the
photos cached at their own size, ``--size`` patches). Each loader is timed over ``epochs`` shuffled passes after
one untimed pass. The GPU side is ``--gpu-images-per-s`` (e.g. the U-Net's images/s from
bench_models.py), or, without it and with CUDA, measured here: the default U-Net's training
step at this size and batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from segpipe.data.augment import build_augmentation
from segpipe.data.cache import build_cache
from segpipe.data.dataset import PatchDataset, SegmentationH5Dataset, split_indices
from segpipe.data.geometry import Geometry
from segpipe.data.labelme import load_annotation, rasterise
from segpipe.labels import Labels
from segpipe.data.synthetic import write_dataset
from segpipe.models import build_model
from segpipe.runtime import acquire_device, amp_dtype, place
from segpipe.spec import default

CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


class PerItemDataset(Dataset):
    """The seed study's loader: every item is read and rasterised from the LabelMe files."""

    def __init__(self, folder: Path, size: tuple[int, int]) -> None:
        self.files = sorted(folder.glob("*.json"))
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        annotation = load_annotation(self.files[index])
        mask = rasterise(annotation, self.size, Labels.from_config(background=["grass"]))
        image = annotation.image
        if annotation.size != self.size:
            image = cv2.resize(image, self.size[::-1], interpolation=cv2.INTER_AREA)
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(mask[None])


def samples_per_second(dataset: Dataset, epochs: int, batch: int, workers: int,
                       pin_memory: bool = False, persistent: bool = False) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
                        generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up: worker start, file handles, page cache
        pass
    start = time.perf_counter()
    for epoch in range(epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch + 1)
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


def gpu_images_per_second(size: int, batch: int, steps: int = 10) -> float:
    """The default U-Net's training step on a free GPU (bench_models.py's), images/s."""
    from bench_models import training_step

    device = acquire_device("cuda")
    model = place(build_model({"model": "unet"}, {}), device).train()
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    step = training_step(model, images, target, device, amp_dtype(device, True))
    rates = []
    for _ in range(3 + 1):  # the first round warms up
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side (pixels)")
    parser.add_argument("--source", type=int, help="side of the photos (default: --size)")
    parser.add_argument("--count", type=int, default=48, help="number of images")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes over the data")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="DataLoader worker processes of the training loader")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (workers use 1), as collating "
                             "small batches with several threads on a busy machine is slow")
    parser.add_argument("--augmentation", default="standard",
                        help="an augmentation of config.yaml (default: standard)")
    parser.add_argument("--gpu-images-per-s", type=float,
                        help="the GPU's training images/s to compare with (default: measured "
                             "when CUDA is available)")
    parser.add_argument("--json", metavar="PATH", help="also write the rates to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    definition = yaml.safe_load(CONFIG.read_text())["augmentations"][args.augmentation]
    size, source = (args.size, args.size), (args.source or args.size,) * 2
    cuda = torch.cuda.is_available()
    gpu = args.gpu_images_per_s or (gpu_images_per_second(args.size, args.batch) if cuda
                                    else None)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "labelme", Path(tmp) / "cache.h5"
        start = time.perf_counter()
        write_dataset(folder, count=args.count, seed=0, size=source)
        synth = args.count / (time.perf_counter() - start)
        start = time.perf_counter()
        build_cache(folder, cache, size, Labels.from_config(background=["grass"]), val_fraction=0.2)
        raster = args.count / (time.perf_counter() - start)
        timing = args.epochs, args.batch, args.workers[0]
        per_item = samples_per_second(PerItemDataset(folder, size), *timing)
        cached = samples_per_second(SegmentationH5Dataset(cache), *timing)
        train_set = SegmentationH5Dataset(cache, indices=split_indices(cache)[0],
                                          transform=build_augmentation(definition, size))
        training = {n: [samples_per_second(train_set, args.epochs, args.batch, n, cuda, keep)
                        for keep in (False, True)] for n in args.workers}
        native = Path(tmp) / "native.h5"  # the photos at their own size, patches of --size
        build_cache(folder, native, Geometry(scale=1.0), Labels.from_config(background=["grass"]),
                    val_fraction=0.2)
        patch_set = PatchDataset(native, split_indices(native)[0], size, len(train_set),
                                 args.batch, default("train.oversample"),
                                 build_augmentation(definition, size))
        patches = {n: samples_per_second(patch_set, args.epochs, args.batch, n, cuda, True)
                   for n in args.workers}
    print(f"{args.count} photos {source[0]}x{source[1]} -> {args.size}x{args.size}, "
          f"batch {args.batch}, {torch.get_num_threads()} torch threads")
    print(f"synthesise:        {synth:8.1f} images/s")
    print(f"rasterise (cache): {raster:8.1f} images/s")
    print(f"loader per item:   {per_item:8.1f} samples/s  (decode JPEG + parse JSON + fill; "
          f"{args.workers[0]} workers)")
    print(f"loader HDF5 cache: {cached:8.1f} samples/s")
    print(f"cache / per item:  {cached / per_item:8.1f} x")
    print(f"training loader, augmentation {args.augmentation} {definition}, "
          f"{len(train_set)} training images per epoch, samples/s with new workers every "
          f"epoch | with persistent workers (train.py){' | the latter / GPU' if gpu else ''}:")
    for workers, (fresh, kept) in training.items():
        versus = f"  {kept / gpu:5.2f} x the GPU's {gpu:.1f} images/s" if gpu else ""
        print(f"  {workers} workers: {fresh:8.1f} | {kept:8.1f}{versus}")
    print(f"patch loader (data.scale 1: {args.size}x{args.size} patches of the "
          f"{source[0]}x{source[1]} photos, oversampled, augmented), persistent workers, "
          f"patches/s{' | / GPU' if gpu else ''}:")
    for workers, rate in patches.items():
        versus = f"  {rate / gpu:5.2f} x the GPU's {gpu:.1f} images/s" if gpu else ""
        print(f"  {workers} workers: {rate:8.1f}{versus}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"count": args.count, "size": args.size, "batch": args.batch,
                       "synthesise": synth, "rasterise": raster, "per_item": per_item,
                       "cached": cached, "gpu_images_per_s": gpu,
                       "training": [{"workers": n, "new_workers": fresh, "persistent": kept}
                                    for n, (fresh, kept) in training.items()],
                       "patches": [{"workers": n, "persistent": rate}
                                   for n, rate in patches.items()]}, file, indent=1)


if __name__ == "__main__":
    main()
