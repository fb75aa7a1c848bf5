"""Training of one run: HDF5 cache + run specification → run directory.

``train_run(spec, cache, out_dir)`` trains ``build_model(architecture, backbone)`` on the
training split of the cache and selects the model on the validation split only (``is_val``,
or inside ``spec["fold"]`` of a cross-validation cache the next fold,
:func:`segpipe.data.split.cv_split`); the test images are never seen here. It writes
(docs/formats.md):

- ``model.pt``: the checkpoint of the epoch with the best validation Dice (mean over images at
  :data:`VALIDATION_THRESHOLD`; the first epoch wins ties), self-describing
  (:mod:`segpipe.checkpoint`);
- ``history.csv``: one row per epoch (:data:`HISTORY_COLUMNS`);
- ``snapshots/epoch_<k>.pt``: the model at the end of each reached ``snapshot_epochs`` epoch;
- ``train.log``: timestamped lines, also on stderr: the start (images, size, parameters,
  device), one line per epoch (losses, validation Dice, learning rate, seconds; ``*`` marks a
  new best), resuming, an ignored stale state, early stopping, and the end (best epoch,
  training time, peak memory). A resumed run appends to it.

Resuming: after every epoch the full training state is written atomically to ``state.pt``, and
snapshots to ``state_snapshots/``; neither is a workflow output, so Snakemake does not delete
them when a job fails. The final outputs are written only when the run ends, then both are
removed. A state whose fingerprint (spec + cache content, :func:`fingerprint`) differs is
ignored and the run starts over. A run directory that already holds the complete outputs of the
same fingerprint (``model.pt`` records it) is kept as it is: a cache rebuilt with the same
content, or a second job that waited for the first to finish the run
(:func:`segpipe.rundir.run_lock`), trains nothing. The data order depends only on (seed,
epoch): the shuffling generator is re-seeded every epoch and the dataset draws its augmentation
from ``rng(seed, epoch, index)``, so a run killed at any moment and started again ends with the
same weights as an uninterrupted run (on CPU).

Device, mixed precision, input normalisation and the forward pass are those of
:mod:`segpipe.runtime`, shared with evaluation and prediction; with ``amp`` on CUDA, fp16
autocast trains with a gradient scaler. ``device`` and ``num_workers`` are execution settings:
they are not part of the spec, so changing them neither re-runs nor invalidates a state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from segpipe import SegpipeError
from segpipe.checkpoint import save_checkpoint
from segpipe.data.cache import CONTENT_KEY, Cache
from segpipe.data.geometry import Geometry
from segpipe.files import atomic_path, write_csv
from segpipe.inference import Predictor
from segpipe.labels import Labels
from segpipe.runtime import (IMAGENET_MEAN, IMAGENET_STD, acquire_device, amp_dtype,
                             forward_logits, peak_memory_mb, place, probabilities)
from segpipe import rundir
from segpipe.rundir import check_snapshots, expected_snapshots, run_lock, snapshot_path, snapshots
from segpipe.spec import check_spec, default, input_size

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_accuracy",
                   "val_ap", "lr", "seconds"]
PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 5
VALIDATION_THRESHOLD = 0.5
"""Threshold of the validation metrics, which choose the model: fixed, so that
``evaluate.threshold`` (test split only) never changes the choice."""

# ----------------------------------------------------------------------------- files


def save_atomic(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_split(cache: Path, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
    if len(val_idx) == 0:
        raise SegpipeError(f"{cache}: no validation images (is_val is all false); "
                           "rasterise with --val-fraction > 0")
    if len(train_idx) == 0:
        raise SegpipeError(f"{cache}: every image is in the validation split")


def fingerprint(spec: dict, cache: Path) -> str:
    """SHA-256 of the spec (canonical JSON) and the cache's content digest (its attribute
    :data:`segpipe.data.cache.CONTENT_KEY`): a resumable state or a finished run is only valid for
    the same run on the same data, and a cache rebuilt with the same content is the same data."""
    with Cache(cache) as opened:
        content = opened.attrs[CONTENT_KEY]
    return hashlib.sha256(json.dumps([spec, content], sort_keys=True).encode()).hexdigest()


def _finished(out_dir: Path, spec: dict, key: str) -> bool:
    """Whether ``out_dir`` holds a complete run of fingerprint ``key``: ``model.pt`` recording
    it, ``history.csv``, exactly the snapshots of its epochs, and no state of a run unfinished."""
    model = out_dir / rundir.MODEL
    if ((out_dir / rundir.STATE).exists() or (out_dir / rundir.PENDING_SNAPSHOTS).exists()
            or not model.is_file() or not (out_dir / rundir.HISTORY).is_file()):
        return False
    try:
        checkpoint = torch.load(model, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable: not complete
        return False
    if not isinstance(checkpoint, dict) or checkpoint.get("fingerprint") != key:
        return False
    try:
        check_snapshots(out_dir / rundir.SNAPSHOTS, spec["train"]["snapshot_epochs"],
                        checkpoint["epochs"])
    except SegpipeError:
        return False
    return True


def _cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker: python/numpy seeded from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# ----------------------------------------------------------------------------- training


def build_optimizer(model: nn.Module, train: dict, pretrained: bool) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015) or AdamW (Loshchilov & Hutter 2019) over the model's parameter
    groups ``encoder`` and ``decoder``: learning rate ``lr``, times ``encoder_lr_mult`` for the
    encoder when it is pretrained."""
    mult = {"encoder": train["encoder_lr_mult"] if pretrained else 1.0, "decoder": 1.0}
    kind = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    return kind([{"params": params, "lr": train["lr"] * mult[name], "name": name}
                 for name, params in model.parameter_groups().items() if params],
                lr=train["lr"], weight_decay=train["weight_decay"])


def build_scheduler(optimizer: torch.optim.Optimizer, train: dict) -> object | None:
    """Per-epoch schedule: ``plateau`` multiplies the learning rates by
    :data:`PLATEAU_FACTOR` after :data:`PLATEAU_PATIENCE` epochs without validation-Dice gain;
    ``cosine`` anneals them to 0 over ``epochs`` (Loshchilov & Hutter 2017, SGDR); ``none``."""
    if train["scheduler"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
    if train["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, train["epochs"])
    return None


def train_run(spec: dict, cache: Path, out_dir: Path,
              device: str = default("resources.device"), num_workers: int = 0) -> None:
    """Train one run (see the module docstring) on ``device`` (:data:`segpipe.runtime.DEVICES`)
    with ``num_workers`` DataLoader workers (0: loading in this process; ``segpipe train`` and
    the workflow pass ``resources.num_workers``); resumes from ``out_dir/state.pt``, and keeps a run
    directory that holds the complete outputs of this spec and cache content. Holds the run
    directory's lock (:func:`segpipe.rundir.run_lock`) throughout, waiting for its holder.
    The spec is checked here, once (:func:`segpipe.spec.check_spec`, with the cache's image
    size and classes); the train settings it leaves out are the schema's defaults."""
    from segpipe.data.dataset import cache_facts

    cache, out_dir = Path(cache), Path(out_dir)
    if not cache.is_file():
        raise SegpipeError(f"{cache}: training cache not found")
    geometry, labels = cache_facts(cache)
    spec = check_spec(spec, geometry.size, labels, native=geometry.native)
    size = list(input_size(spec["train"]["patch"], geometry.size))
    with run_lock(out_dir, "train"):
        handler = logging.FileHandler(out_dir / rundir.TRAIN_LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        level = log.level
        log.setLevel(min(log.getEffectiveLevel(), logging.INFO))  # train.log gets the epochs
        log.addHandler(handler)
        try:
            if _finished(out_dir, spec, fingerprint(spec, cache)):
                log.info("%s: model.pt, history.csv and snapshots are complete for this spec and "
                         "cache: kept, nothing to train", spec["run"])
            else:
                _train(spec, cache, out_dir, device, num_workers, size, geometry, labels)
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
            handler.close()


def _train(spec: dict, cache: Path, out_dir: Path, device_setting: str, num_workers: int,
           size: list[int], geometry: Geometry, labels: Labels) -> None:
    """Train the run: the pieces below, in the order that keeps a run deterministic (the
    global generators are seeded before the model is built)."""
    from segpipe.data.dataset import SegmentationH5Dataset, split_indices

    train_idx, val_idx, _ = split_indices(cache, spec.get("fold"))
    _check_split(cache, train_idx, val_idx)
    val_set = SegmentationH5Dataset(cache, indices=val_idx)
    device = acquire_device(device_setting)
    _seed_everything(spec["seed"])
    run = _Run(spec, out_dir, size, geometry, labels, device, fingerprint(spec, cache))
    train_set, train_loader, val_loader = run.loaders(cache, train_idx, val_set, num_workers)
    run.resume()
    at = (f"at {geometry.describe()}, patches of {'x'.join(map(str, run.size))}"
          if geometry.native else "x".join(map(str, run.size)))
    log.info("%s: %d train / %d val images %s, %s, %s parameters, device %s%s", spec["run"],
             len(train_idx), len(val_idx), at, run.labels.describe(),
             f"{run.parameters:,}", device, f", autocast {run.autocast}" if run.autocast else "")
    while run.progress["epoch"] < spec["train"]["epochs"] and not run.stopped_early():
        run.epoch(train_set, train_loader, val_loader)
    run.finish()


class _Run:
    """One training run's objects and progress: the model of the spec on ``device`` with its
    loss, optimizer, scheduler and gradient scaler; each method does one job of training."""

    def __init__(self, spec: dict, out_dir: Path, size: list[int], geometry: Geometry,
                 labels: Labels, device: torch.device, key: str) -> None:
        from segpipe.losses import build_loss
        from segpipe.models import build_model

        self.spec, self.settings, self.out_dir = spec, spec["train"], out_dir
        self.size, self.labels, self.device, self.key = size, labels, device, key
        self.geometry = geometry
        self.autocast = amp_dtype(device, self.settings["amp"])
        self.model = place(build_model(spec["architecture"], spec["backbone"], labels.outputs),
                           device)
        self.predictor = Predictor((self.model,), labels, geometry, tuple(size), IMAGENET_MEAN,
                                   IMAGENET_STD, device, overlap=self.settings["tile_overlap"],
                                   sigma_scale=self.settings["tile_sigma"],
                                   batch_size=self.settings["batch_size"],
                                   autocast=self.autocast)
        self.criterion = build_loss(spec["loss"], labels)
        pretrained = spec["backbone"].get("weights", "none") != "none"
        self.optimizer = build_optimizer(self.model, self.settings, pretrained)
        self.scheduler = build_scheduler(self.optimizer, self.settings)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.state_path = out_dir / rundir.STATE
        self.pending = out_dir / rundir.PENDING_SNAPSHOTS
        self.shuffle = torch.Generator()  # the sampler's, re-seeded every epoch
        self.progress: dict = {}

    def loaders(self, cache: Path, train_idx: np.ndarray, val_set, num_workers: int) -> tuple:
        """The augmented training set and the training and validation loaders. Workers live for
        the whole run (a GPU would idle while new ones start every epoch); the sampler has its
        own generator, which the loader's per-iterator draws do not touch."""
        from segpipe.data.augment import build_augmentation
        from segpipe.data.dataset import PatchDataset, SegmentationH5Dataset

        seed, settings = self.spec["seed"], self.settings
        augment = build_augmentation(self.spec["augmentation"], tuple(self.size))
        options = dict(batch_size=settings["batch_size"], num_workers=num_workers,
                       worker_init_fn=_seed_worker, pin_memory=self.device.type == "cuda",
                       persistent_workers=num_workers > 0,
                       generator=torch.Generator().manual_seed(seed))
        if self.geometry.native:  # the patches are random already, in batch order
            train_set = PatchDataset(cache, train_idx, self.size,
                                     settings["patches_per_epoch"] or len(train_idx),
                                     settings["batch_size"], settings["oversample"], augment, seed)
            sampler = torch.utils.data.SequentialSampler(train_set)
        else:
            train_set = SegmentationH5Dataset(cache, train_idx, augment, seed)
            sampler = torch.utils.data.RandomSampler(train_set, generator=self.shuffle)
        train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, **options)
        if self.geometry.native:  # images of their own sizes: one at a time
            options["batch_size"] = 1
        return train_set, train_loader, torch.utils.data.DataLoader(val_set, **options)

    def resume(self) -> None:
        """Progress from the resumable state of this run (fingerprint), else from the start."""
        state = _load_state(self.state_path, self.key)
        if state is not None and not set(expected_snapshots(
                self.settings["snapshot_epochs"], state["progress"]["epoch"])
        ) <= set(snapshots(self.pending)):
            log.warning("ignoring %s: %s lacks snapshots it records; starting over",
                        self.state_path, self.pending)
            state = None
        if state is None:
            shutil.rmtree(self.pending, ignore_errors=True)
            self.progress = {"epoch": 0, "history": [], "best_dice": -math.inf,
                             "best_epoch": 0, "best_state": None, "stale": 0,
                             "peak_memory_mb": 0.0}
        else:
            self.progress = _restore(state, self.model, self.optimizer, self.scheduler,
                                     self.scaler, self.device)
            log.info("%s: resuming after epoch %d from %s", self.spec["run"],
                     self.progress["epoch"], self.state_path)

    def stopped_early(self) -> bool:
        patience = self.settings["early_stop_patience"]
        return bool(patience) and self.progress["stale"] >= patience

    def epoch(self, train_set, train_loader, val_loader) -> None:
        """One epoch: train, validate, step the schedule, keep the best model, save the
        snapshot of this epoch if configured and the resumable state."""
        run, progress, epoch = self.spec["run"], self.progress, self.progress["epoch"] + 1
        start = time.perf_counter()
        lr = next(g["lr"] for g in self.optimizer.param_groups if g["name"] == "decoder")
        train_set.set_epoch(epoch)
        self.shuffle.manual_seed(_epoch_seed(self.spec["seed"], epoch))
        train_loss = _train_epoch(self.model, train_loader, self.criterion, self.optimizer,
                                  self.scaler, self.device, self.autocast,
                                  desc=f"{run} epoch {epoch}/{self.settings['epochs']}")
        if not math.isfinite(train_loss):
            raise SegpipeError(f"run {run}: the training loss is {train_loss} in epoch {epoch}; "
                               "lower train.lr or check the loss definition")
        val = validate(self.predictor, val_loader, self.criterion)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val["dice"])
        elif self.scheduler is not None:
            self.scheduler.step()
        progress["history"].append({
            "epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
            "val_dice": val["dice"], "val_iou": val["iou"], "val_accuracy": val["accuracy"],
            "val_ap": val["ap"], "lr": lr, "seconds": time.perf_counter() - start})
        progress["epoch"] = epoch
        progress["peak_memory_mb"] = max(progress["peak_memory_mb"], peak_memory_mb(self.device))
        if val["dice"] > progress["best_dice"]:
            progress.update(best_dice=val["dice"], best_epoch=epoch, stale=0,
                            best_state=_cpu_state_dict(self.model))
        else:
            progress["stale"] += 1
        if epoch in self.settings["snapshot_epochs"]:
            save_checkpoint(snapshot_path(self.pending, epoch), self.spec,
                            _cpu_state_dict(self.model), self.size, self.labels,
                            self.geometry, epoch=epoch,
                            val_dice=val["dice"], **_meta(progress, self.parameters))
        save_atomic(_state(self.model, self.optimizer, self.scheduler, self.scaler, self.device,
                           progress, self.key), self.state_path)
        log.info("%s epoch %d/%d: train loss %.4f, val loss %.4f, val dice %.4f, lr %.2e, %.1f s%s",
                 run, epoch, self.settings["epochs"], train_loss, val["loss"], val["dice"], lr,
                 progress["history"][-1]["seconds"],
                 " *" if progress["best_epoch"] == epoch else "")

    def finish(self) -> None:
        """The run's outputs: model.pt (the best epoch), history.csv and the snapshots; then no
        state is left."""
        run, progress, out_dir = self.spec["run"], self.progress, self.out_dir
        if self.stopped_early():
            log.info("%s: early stop after epoch %d (no validation-Dice gain in %d epochs)",
                     run, progress["epoch"], self.settings["early_stop_patience"])
        meta = _meta(progress, self.parameters)
        save_checkpoint(out_dir / rundir.MODEL, self.spec, progress["best_state"], self.size,
                        self.labels, self.geometry, epoch=progress["best_epoch"],
                        val_dice=progress["best_dice"], fingerprint=self.key, **meta)
        write_csv(out_dir / rundir.HISTORY, HISTORY_COLUMNS, progress["history"])
        # The state goes first: killed after this, a re-run starts over instead of finishing
        # without the pending snapshots.
        self.state_path.unlink()
        shutil.rmtree(out_dir / rundir.SNAPSHOTS, ignore_errors=True)
        self.pending.mkdir(exist_ok=True)
        os.replace(self.pending, out_dir / rundir.SNAPSHOTS)
        check_snapshots(out_dir / rundir.SNAPSHOTS, self.settings["snapshot_epochs"],
                        progress["epoch"])
        log.info("%s: best val dice %.4f at epoch %d of %d; %.0f s training, peak memory "
                 "%.0f MiB", run, progress["best_dice"], progress["best_epoch"],
                 progress["epoch"], meta["train_seconds"], meta["peak_memory_mb"])


def _meta(progress: dict, parameters: int) -> dict:
    return {"parameters": parameters,
            "train_seconds": sum(row["seconds"] for row in progress["history"]),
            "epochs": progress["epoch"], "best_epoch": progress["best_epoch"],
            "peak_memory_mb": progress["peak_memory_mb"]}


def _train_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, criterion: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, autocast: torch.dtype | None, desc: str) -> float:
    """One pass over the training data; the mean loss over images."""
    model.train()
    total, count = torch.zeros((), device=device), 0
    for images, masks in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        target = masks.to(device, non_blocking=True).float()
        logits = forward_logits(model, images, device, IMAGENET_MEAN, IMAGENET_STD, autocast)
        loss = criterion(logits, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach() * len(images)
        count += len(images)
    return total.item() / count


@torch.no_grad()
def validate(predictor: Predictor, loader: torch.utils.data.DataLoader, criterion: nn.Module
             ) -> dict[str, float]:
    """Mean loss over images and per-image means of Dice, IoU, accuracy and AP
    (:mod:`segpipe.metrics`) on the validation images at the working resolution, at
    :data:`VALIDATION_THRESHOLD` 0.5, of the predictor's one model (:mod:`segpipe.inference`):
    squashed images a batch at a time; at a native scale each image by sliding windows, the
    loss then of the blended probabilities (as logits: their logit, or log for softmax). With
    several classes, the image scores of the mean over the foreground classes its truth holds
    (:func:`segpipe.metrics.per_image_class_metrics`), so the model is selected on the mean
    foreground Dice. Model selection is done at the working resolution (nnU-Net's online
    validation does the same); test scores are at the original size (:mod:`segpipe.evaluate`)."""
    from segpipe.metrics import image_metrics

    (model,), labels = predictor.models, predictor.labels
    model.eval()
    losses, metrics = [], []
    for images, masks in loader:
        target = masks.to(predictor.device, non_blocking=True).float()
        if predictor.geometry.native:
            probs = predictor(images).to(predictor.device)
            logits = (torch.logit(probs, eps=1e-6) if labels.binary
                      else torch.log(probs.clamp_min(1e-12)))
        else:
            logits = predictor.logits(model, images)
            probs = probabilities(logits)
        losses.append(criterion(logits, target).double() * len(images))
        metrics.append(image_metrics(probs, target, labels, VALIDATION_THRESHOLD))
    count = sum(len(m["dice"]) for m in metrics)
    means = {k: torch.cat([m[k] for m in metrics]).mean().item()
             for k in ("dice", "iou", "accuracy", "ap")}
    return {"loss": torch.stack(losses).sum().item() / count, **means}


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
           scaler: torch.amp.GradScaler, device: torch.device, progress: dict, key: str) -> dict:
    return {"fingerprint": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "progress": progress}


def _restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: object, scaler: torch.amp.GradScaler, device: torch.device) -> dict:
    """Load a saved state into the training objects and RNGs; returns its progress."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty unless saved under fp16: e.g. begun on a bf16 GPU or the CPU
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return state["progress"]


def _load_state(path: Path, key: str) -> dict | None:
    """The resumable state at ``path`` if it exists and belongs to this run (``key``)."""
    if not path.exists():
        return None
    try:  # our own file, holding numpy/python RNG states: not loadable with weights_only
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable state means: start over
        log.warning("ignoring unreadable %s (%s); starting over", path, exc)
        return None
    if state.get("fingerprint") != key:
        log.warning("ignoring %s: it belongs to another spec or cache; starting over", path)
        return None
    return state
