"""Training quality of segpipe's models side by side with their nearest peers, same budget.

    python benchmarks/bench_quality.py [--data synthetic | shapes | LABELME_DIR] [--binary]
        [--size H W] [--models unet+resnet34 unet ...] [--seeds 0 1 2] [--epochs E]
        [--batch B] [--lr LR] [--width W] [--variants ...] [--work DIR] [--threads N]

Data: ``synthetic`` (default) is the multi-class demo's (configs/demo_classes.yaml: its classes,
background label, image count, generator and size, with a test split three times larger so that
seeds, not the few test images, set the interval); ``shapes`` is ten classes whose outline
and fill name them, not their colour (:func:`write_shapes`, :data:`SHAPES_COUNT` photos); a
LabelMe folder holds ``train/`` and ``test/``, every label a class (sorted) unless
``--classes`` names them, e.g. /work/shared/data/devices_labelme. ``--binary`` makes every class one foreground.

Budget (the same for every model): the multi-class demo's training recipe (``train`` of
configs/demo_classes.yaml: epochs, batch, lr, Adam, cosine schedule, no augmentation) and its
loss ``{bce: 0.5, dice: 0.5}`` (segpipe.losses), random initialisation everywhere, the same
seeds; the checkpoint of the best validation Dice is scored on the test split by segpipe's
evaluation (``segpipe.evaluate.score``: the per-image mean foreground Dice).

- segpipe's models (``<architecture>[+<backbone>]``, default options, ``--width`` for scratch
  encoders) are trained by segpipe's own training (``segpipe.train.train_run``);
- each one's nearest peer is trained by a plain loop of the same steps (the peer's own
  parameters in one Adam group; ``segpipe.train.validate`` selects): ``smp.Unet`` /
  ``smp.UnetPlusPlus`` (resnet34, ``encoder_weights=None``) under a ResNet; MONAI ``BasicUNet``
  (features w…16w, BatchNorm, ReLU) or ``AttentionUnet`` (channels w…16w) for scratch models.

``--variants`` adds the ablation (the plain loop, to isolate the model): segpipe's model with
one change of :data:`VARIANTS` at a time (``before``: the decoder before issue 28; ``today``:
the default, under a ResNet smp.Unet's layers and initialisation).

Printed: per model the test Dice of each seed, mean and a 95 % t-interval over seeds, and for
segpipe's models the ratio ours/peer with the interval of the per-seed ratios (paired by seed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from segpipe.checkpoint import load_checkpoint
from segpipe.data.cache import Cache, build_cache
from segpipe.data.dataset import SegmentationH5Dataset, cache_facts, split_indices
from segpipe.data.synthetic import write_dataset
from segpipe.evaluate import score
from segpipe.inference import Predictor
from segpipe.labels import Labels
from segpipe.losses import build_loss
from segpipe.models import ARCHITECTURES, build_model, family_options, initialise_decoder
from segpipe.models.encoders import resnet_encoder
from segpipe.models.blocks import DoubleConv
from segpipe.runtime import IMAGENET_MEAN, IMAGENET_STD, forward_logits, place
from segpipe.spec import default
from segpipe.train import build_scheduler, train_run, validate

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_classes.yaml"
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


# ----------------------------------------------------------------------------- data

SHAPES = ("disc", "triangle", "square", "star", "cross")
FILLS = ("plain", "striped")
SHAPES_COUNT = (600, 200)
"""Training (validation split included) and test photos of the ``shapes`` set."""


def _outline(kind: str, rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """The polygon of a ``kind`` of :data:`SHAPES`, turned by a random angle."""
    if kind == "disc":
        angles, radii = np.linspace(0, 2 * np.pi, 24, endpoint=False), np.ones(24)
    elif kind == "star":
        angles, radii = np.linspace(0, 2 * np.pi, 10, endpoint=False), np.tile([1, 0.45], 5)
    elif kind == "cross":
        arm = 0.35
        xy = np.array([(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1),
                       (-arm, -1), (-arm, -arm), (-1, -arm), (-1, arm), (-arm, arm), (-arm, 1)])
        angles, radii = np.arctan2(xy[:, 1], xy[:, 0]), np.hypot(*xy.T) / np.sqrt(1 + arm**2)
    else:
        corners = 3 if kind == "triangle" else 4
        angles, radii = np.linspace(0, 2 * np.pi, corners, endpoint=False), np.ones(corners)
    angles = angles + rng.uniform(0, 2 * np.pi)
    return centre + radius * radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)


def write_shapes(folder: Path, count: int, seed: int, size: int = 96) -> None:
    """``count`` LabelMe files of the ``shapes`` set: ten classes ``<shape>_<fill>``, five
    outlines (:data:`SHAPES`) × plain or striped, in random colours on a mottled background of
    random colour, 1-3 objects per image. Colour says nothing of the class; the outline (a
    whole object's context) and the fill (a few pixels') do, as a flower's species does."""
    import cv2

    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        noise = cv2.resize(rng.standard_normal((size // 8, size // 8, 3)).astype(np.float32),
                           (size, size), interpolation=cv2.INTER_CUBIC)
        image = rng.uniform(40, 215, 3).astype(np.float32) + 25 * noise
        shapes = []
        for _ in range(rng.integers(1, 4)):
            kind, fill = SHAPES[rng.integers(len(SHAPES))], FILLS[rng.integers(len(FILLS))]
            radius = rng.uniform(0.12, 0.24) * size
            points = _outline(kind, rng, rng.uniform(radius, size - radius, 2), radius)
            inside = np.zeros((size, size), np.uint8)
            cv2.fillPoly(inside, [np.round(points).astype(np.int32)], 1)
            colour = rng.uniform(30, 225, 3).astype(np.float32)
            texture = colour + 8 * rng.standard_normal((size, size, 3)).astype(np.float32)
            if fill == "striped":
                angle, period = rng.uniform(0, np.pi), rng.uniform(4, 7)
                phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
                texture = texture * np.where(phase % 1 < 0.5, 1.0, 0.45)[..., None]
            image = np.where(inside[..., None] > 0, texture, image)
            shapes.append({"label": f"{kind}_{fill}", "points": np.round(points, 2).tolist(),
                           "group_id": None, "description": "", "shape_type": "polygon",
                           "flags": {}, "mask": None})
        name = f"shapes_{index:04d}"
        cv2.imwrite(str(folder / f"{name}.png"), np.clip(image, 0, 255).astype(np.uint8)[..., ::-1])
        (folder / f"{name}.json").write_text(json.dumps(
            {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": f"{name}.png",
             "imageData": None, "imageHeight": size, "imageWidth": size}))


def prepare(data: str, work: Path, size: list[int] | None, binary: bool,
            classes: list[str] | None) -> tuple[Path, Path, Labels]:
    """The training and test caches of ``data`` below ``work``, and their classes."""
    demo = yaml.safe_load(DEMO.read_text())["data"]
    if data == "synthetic":
        synthetic, folder = demo["synthetic"], work / "data"
        for split, count in (("train", synthetic["train_count"]),
                             ("test", 3 * synthetic["test_count"])):
            if not (folder / split).is_dir():
                write_dataset(folder / split, count, synthetic["seed"] * 2 + (split == "test"),
                              tuple(synthetic["size"]))
        classes, background, size = demo["classes"], demo["background"], size or demo["size"]
    elif data == "shapes":
        folder, background = work / "shapes", []
        for split, count, seed in (("train", SHAPES_COUNT[0], 0), ("test", SHAPES_COUNT[1], 1)):
            if not (folder / split).is_dir():
                write_shapes(folder / split, count, seed)
        classes, size = [f"{s}_{f}" for s in SHAPES for f in FILLS], size or [64, 64]
    else:
        folder, background = Path(data), []
        if classes is None:
            classes = sorted({shape["label"] for path in (folder / "train").glob("*.json")
                              for shape in json.loads(path.read_text())["shapes"]})
        size = size or [64, 64]
    labels = (Labels.from_config(foreground=[c for c in classes], background=background)
              if binary else Labels.from_config(classes, background=background))
    kind = "binary" if binary else "classes"
    train, test = work / f"train_{kind}_{size[0]}x{size[1]}.h5", \
        work / f"test_{kind}_{size[0]}x{size[1]}.h5"
    if not train.is_file():
        build_cache(folder / "train", train, tuple(size), labels, val_fraction=demo["val_fraction"],
                    split_seed=demo["split_seed"])
    if not test.is_file():
        build_cache(folder / "test", test, tuple(size), labels, train_cache=train)
    return train, test, labels


# ----------------------------------------------------------------------------- models

def segpipe_definitions(name: str, width: int) -> tuple[dict, dict]:
    architecture, _, backbone = name.partition("+")
    if backbone in ("", "scratch"):
        return {"model": architecture, "width": width}, {}
    return {"model": architecture}, {"encoder": backbone, "weights": "none"}


def peer(name: str, width: int, outputs: int) -> tuple[str, Callable[[], nn.Module]]:
    """(name, builder) of a segpipe model's nearest peer (the module docstring)."""
    architecture, _, backbone = name.partition("+")
    if backbone not in ("", "scratch"):
        import segmentation_models_pytorch as smp

        kind = smp.UnetPlusPlus if architecture == "unetpp" else smp.Unet
        return (f"smp.{kind.__name__}({backbone})",
                lambda: kind(backbone, encoder_weights=None, in_channels=3, classes=outputs))
    from monai.networks.nets import AttentionUnet, BasicUNet

    channels = tuple(width * 2**i for i in range(5))
    if "attention" in architecture:
        return (f"monai.AttentionUnet({width}..{16 * width})",
                lambda: AttentionUnet(2, 3, outputs, channels, strides=(2, 2, 2, 2)))
    return (f"monai.BasicUNet({width}..{16 * width})",
            lambda: BasicUNet(2, 3, outputs, features=(*channels, width), act="relu",
                              norm="batch", bias=False))


# The ablation, under a ResNet: from the U-Net decoder segpipe had before issue 28 (``before``:
# 2×2 up-convolutions to the level's width, the raw image as the finest skip, a 1×1 head) one
# change at a time towards smp's Unet decoder, which is today's default (``today``: smp.Unet's
# layers and initialisation); scratch models have no image skip.

def smp_init(model) -> None:
    """smp's initialisation of the decoder (:func:`segpipe.models.initialise_decoder`)."""
    initialise_decoder(model.decoder)


def transpose_full(model) -> None:
    """smp's channel flow with U-Net's operator: a 2×2 transposed convolution that keeps every
    coarse channel, concatenated with the skip, then the two 3×3 convolutions."""
    encoder = model.encoder.out_channels
    widths = [block[0][0].out_channels for block in model.decoder.blocks]
    coarser = widths[1:] + [encoder[-1]]
    model.decoder.ups = nn.ModuleList(nn.ConvTranspose2d(c, c, 2, stride=2) for c in coarser)
    model.decoder.blocks = nn.ModuleList(DoubleConv(encoder[i] + coarser[i], widths[i])
                                         for i in range(len(widths)))


BEFORE = {"up": "transpose", "head": 1}
VARIANTS: dict[str, tuple[dict, bool, list[Callable]]] = {
    "before": (BEFORE, True, []),
    "nearest": ({**BEFORE, "up": "nearest"}, True, []),
    "transpose_full": (BEFORE, True, [transpose_full]),
    "bilinear": ({**BEFORE, "up": "bilinear"}, True, []),
    "head3": ({**BEFORE, "head": 3}, True, []),
    "no_image_skip": (BEFORE, False, []),
    "smp_init": (BEFORE, True, [smp_init]),
    "smp_layers": ({}, False, []),
    "today": ({}, False, []),
    "peer": ({}, False, []),
}
"""Ablation variant → (architecture options, the raw image as the finest skip under a ResNet,
changes applied to the built model in order). Every variant but ``today`` (segpipe's
``build_model``) is built without segpipe's decoder initialisation under a ResNet
(:func:`segpipe.models.initialise_decoder`): ``smp_layers`` is ``today`` with PyTorch's default
initialisation."""


def variant_builder(name: str, variant: str, width: int, outputs: int) -> Callable[[], nn.Module]:
    """The builder of segpipe's model ``name`` with the ablation's ``variant``, or (``peer``)
    of its nearest peer."""
    if variant == "peer":
        return peer(name, width, outputs)[1]
    architecture, backbone = segpipe_definitions(name, width)
    options, image_skip, changes = VARIANTS[variant]

    def build() -> nn.Module:
        definition = {**architecture, **options}
        if variant == "today" or not backbone:
            model = build_model(definition, backbone, outputs)
        else:
            settings = family_options(definition, backbone)
            encoder = resnet_encoder(backbone["encoder"], "none", settings["depth"])
            if image_skip:
                encoder.out_channels[0] = 3  # Encoder.forward then passes the image as f_0
            model = ARCHITECTURES[definition["model"]](**settings, encoder=encoder,
                                                       outputs=outputs)
        for change in changes:
            change(model)
        return model
    return build


# ----------------------------------------------------------------------------- training

def recipe(args) -> dict:
    train = yaml.safe_load(DEMO.read_text())["train"]
    return {**train, "epochs": args.epochs or train["epochs"],
            "batch_size": args.batch or train["batch_size"], "lr": args.lr or train["lr"],
            "early_stop_patience": 0, "snapshot_epochs": []}


LOSS = yaml.safe_load(DEMO.read_text())["losses"]["bcedice_0.5"]


def train_segpipe(name: str, args, seed: int, train: Path, test: Path, work: Path) -> float:
    """Test Dice of segpipe's model ``name`` trained by segpipe's training."""
    architecture, backbone = segpipe_definitions(name, args.width)
    run = f"{name}__s{seed}".replace("+", "_")
    out = work / "runs" / run
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"run": run, "seed": seed, "names": dict.fromkeys(
        ("architecture", "backbone", "loss", "augmentation"), "bench"),
        "architecture": architecture, "backbone": backbone, "loss": LOSS,
        "augmentation": {}, "train": recipe(args)}
    train_run(spec, train, out, device="cpu")
    model, checkpoint = load_checkpoint(out / "model.pt")
    return test_dice(model, checkpoint, test)


def test_dice(model: nn.Module, checkpoint: dict, test: Path) -> float:
    """The per-image mean foreground Dice of ``model`` on the ``test`` cache, scored as
    ``segpipe evaluate`` scores (at each image's original size)."""
    with Cache(test) as cache:
        predictor = Predictor((model,), cache.labels, cache.geometry, cache.geometry.size,
                              checkpoint["mean"], checkpoint["std"], torch.device("cpu"))
        per_image, *_ = score(predictor, cache, np.arange(len(cache)), 0.5, 1, (8, 8))
    return float(np.mean(per_image["dice"]))


def train_plain(build: Callable[[], nn.Module], args, seed: int, train: Path,
                test: Path) -> float:
    """Test Dice of ``build()`` trained by a plain loop of segpipe's recipe."""
    settings = recipe(args)
    geometry, labels = cache_facts(train)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = place(build(), torch.device("cpu"))
    criterion = build_loss(LOSS, labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"],
                                 weight_decay=default("train.weight_decay"))
    scheduler = build_scheduler(optimizer, settings)
    train_idx, val_idx, _ = split_indices(train)
    shuffle = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        SegmentationH5Dataset(train, indices=train_idx), batch_size=settings["batch_size"],
        shuffle=True, generator=shuffle)
    val_loader = torch.utils.data.DataLoader(SegmentationH5Dataset(train, indices=val_idx),
                                             batch_size=settings["batch_size"])
    device = torch.device("cpu")
    predictor = Predictor((model,), labels, geometry, geometry.size, IMAGENET_MEAN, IMAGENET_STD,
                          device)
    best, best_state = -math.inf, None
    for _ in range(settings["epochs"]):
        model.train()
        for images, masks in train_loader:
            logits = forward_logits(model, images, device, IMAGENET_MEAN, IMAGENET_STD)
            loss = criterion(logits, masks.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        dice = validate(predictor, val_loader, criterion)["dice"]
        if dice > best:
            best, best_state = dice, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return test_dice(model.eval(), {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, test)


# ----------------------------------------------------------------------------- report

def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def ratio_interval(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """mean(ours) / mean(theirs), and its 95 % interval from the t-interval of the paired
    (by seed) difference: 1 + [low, high] / mean(theirs)."""
    base = statistics.fmean(theirs)
    difference, low, high = interval([a - b for a, b in zip(ours, theirs)])
    return 1 + difference / base, 1 + low / base, 1 + high / base


def line(name: str, values: list[float], versus: str = "") -> str:
    mean, low, high = interval(values)
    seeds = " ".join(f"{v:.3f}" for v in values)
    return f"{name:<40} {mean:.3f} [{low:.3f}, {high:.3f}]   ({seeds}){versus}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic",
                        help="synthetic (the multi-class demo's), shapes (ten classes) or a "
                             "LabelMe folder with train/ and test/")
    parser.add_argument("--classes", nargs="+", help="the classes of a LabelMe folder "
                        "(default: every label, sorted)")
    parser.add_argument("--binary", action="store_true", help="every class one foreground")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="cache size (default: the demo's 48x48; 64x64 for a folder)")
    parser.add_argument("--models", nargs="+", default=["unet+resnet34", "unet"],
                        help="segpipe models architecture[+backbone] (default: unet+resnet34 "
                             "unet)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="default: the multi-class demo's")
    parser.add_argument("--batch", type=int, help="default: the multi-class demo's")
    parser.add_argument("--lr", type=float, help="default: the multi-class demo's")
    parser.add_argument("--width", type=int, default=8,
                        help="first-level width of scratch models and their peers (default 8)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS),
                        help="ablation: train segpipe's models with these changes (plain loop) "
                             "instead of comparing with the peers; no names = all")
    parser.add_argument("--no-peers", action="store_true", help="segpipe's models only")
    parser.add_argument("--work", type=Path, help="folder for data, caches and runs "
                        "(default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    train, test, labels = prepare(args.data, work, args.size, args.binary, args.classes)
    geometry, _ = cache_facts(train)
    settings = recipe(args)
    print(f"data {args.data} ({labels.describe()}), {'x'.join(map(str, geometry.size))}, "
          f"{len(split_indices(train)[0])} train / {len(split_indices(train)[1])} val / "
          f"{len(SegmentationH5Dataset(test))} test images; {settings['epochs']} epochs, batch "
          f"{settings['batch_size']}, Adam lr {settings['lr']}, {settings['scheduler']}, loss "
          f"{LOSS}; seeds {args.seeds}; scratch width {args.width}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    print(f"{'model':<40} test Dice, mean [95% CI over seeds]   (per seed)")
    for name in args.models:
        if args.variants is not None:
            for variant in args.variants or list(VARIANTS):
                start = time.perf_counter()
                values = [train_plain(variant_builder(name, variant, args.width, labels.outputs),
                                      args, seed, train, test) for seed in args.seeds]
                print(line(f"{name} {variant}", values,
                           f"  {time.perf_counter() - start:.0f} s"), flush=True)
            continue
        ours = [train_segpipe(name, args, seed, train, test, work) for seed in args.seeds]
        if args.no_peers:
            print(line(f"segpipe {name}", ours), flush=True)
            continue
        peer_name, build = peer(name, args.width, labels.outputs)
        theirs = [train_plain(build, args, seed, train, test) for seed in args.seeds]
        ratio, low, high = ratio_interval(ours, theirs)
        print(line(f"segpipe {name}", ours, f"   ours/peer {ratio:.3f} [{low:.3f}, {high:.3f}]"))
        print(line(f"  peer {peer_name}", theirs), flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
