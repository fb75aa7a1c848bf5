"""Data throughput: rasterising a LabelMe folder into the HDF5 cache, and the training loader
reading that cache versus the seed study's per-item path (decode the JPEG, parse the JSON and
fill the polygons on every read).

    python benchmarks/bench_data.py [--size 512] [--source 512] [--count 48] [--epochs 3]
                                    [--batch 8] [--workers 0] [--threads 1]

Self-contained: it writes a synthetic LabelMe folder (JPEG + JSON, ``source`` x ``source``
pixels) into a temporary folder and caches it at ``size`` x ``size``; the per-item loader
resizes and rasterises to that size too. Each loader is timed over ``epochs`` shuffled passes
after one untimed pass. Prints images/s, samples/s and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from segpipe.data.cache import build_cache
from segpipe.data.dataset import SegmentationH5Dataset
from segpipe.data.labelme import load_annotation, rasterise
from segpipe.data.synthetic import write_dataset


class PerItemDataset(Dataset):
    """The seed study's loader: every item is read and rasterised from the LabelMe files."""

    def __init__(self, folder: Path, size: tuple[int, int]) -> None:
        self.files = sorted(folder.glob("*.json"))
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        annotation = load_annotation(self.files[index])
        mask = rasterise(annotation, self.size, background=["grass"])
        image = annotation.image
        if annotation.size != self.size:
            image = cv2.resize(image, self.size[::-1], interpolation=cv2.INTER_AREA)
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(mask[None])


def samples_per_second(dataset: Dataset, epochs: int, batch: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up: worker start, file handles, page cache
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side (pixels)")
    parser.add_argument("--source", type=int, help="side of the photos (default: --size)")
    parser.add_argument("--count", type=int, default=48, help="number of images")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes over the data")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (workers use 1), as collating "
                             "small batches with several threads on a busy machine is slow")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, source = (args.size, args.size), (args.source or args.size,) * 2
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "labelme", Path(tmp) / "cache.h5"
        start = time.perf_counter()
        write_dataset(folder, count=args.count, seed=0, size=source)
        synth = args.count / (time.perf_counter() - start)
        start = time.perf_counter()
        build_cache(folder, cache, size, background=["grass"], val_fraction=0.2)
        raster = args.count / (time.perf_counter() - start)
        timing = args.epochs, args.batch, args.workers
        per_item = samples_per_second(PerItemDataset(folder, size), *timing)
        cached = samples_per_second(SegmentationH5Dataset(cache), *timing)
    print(f"{args.count} photos {source[0]}x{source[1]} -> {args.size}x{args.size}, "
          f"batch {args.batch}, {args.workers} workers, {torch.get_num_threads()} torch threads")
    print(f"synthesise:        {synth:8.1f} images/s")
    print(f"rasterise (cache): {raster:8.1f} images/s")
    print(f"loader per item:   {per_item:8.1f} samples/s  (decode JPEG + parse JSON + fill)")
    print(f"loader HDF5 cache: {cached:8.1f} samples/s")
    print(f"cache / per item:  {cached / per_item:8.1f} x")


if __name__ == "__main__":
    main()
