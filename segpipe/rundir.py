"""A run directory's one-writer lock and its snapshots folder (docs/formats.md).

``segpipe train`` and ``segpipe evaluate`` hold :func:`run_lock` while they write into a run
directory, so a second process on the same run (e.g. Snakemake re-run after ``--unlock`` while
the jobs of a killed Snakemake still run) waits for the first to end, saying whom it waits
for, instead of writing the same files. Waiting rather than stopping: a job that failed on the
lock would make Snakemake delete the outputs the first process then finishes; after the wait,
``segpipe train`` finds them complete and keeps them (:func:`segpipe.train.train_run`). The
lock is ``fcntl.flock`` on ``<run>/.segpipe.lock``; the kernel releases it when its holder
exits, however it exits (kill -9 included), so a lock file left behind locks nothing.

A snapshots folder holds ``epoch_<k>.pt`` for every ``snapshot_epochs`` entry ``k`` that
training reached, no more and no fewer (:func:`check_snapshots`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from segpipe import SegpipeError
from segpipe.files import HOST

log = logging.getLogger(__name__)

LOCK_FILE = ".segpipe.lock"

# The files of a run directory (docs/formats.md), named here once: training writes the first
# three (and keeps its resumable state and a log), evaluation the others, aggregation and the
# workflow read them.
MODEL, HISTORY, SNAPSHOTS = "model.pt", "history.csv", "snapshots"
STATE, PENDING_SNAPSHOTS, TRAIN_LOG = "state.pt", "state_snapshots", "train.log"
METRICS, PER_IMAGE, BY_EPOCH = "metrics.csv", "per_image.csv", "metrics_by_epoch.csv"
EVOLUTION, PREDICTIONS, CONFUSION = "evolution.npz", "predictions.png", "confusion.csv"


def evaluation_files(binary: bool) -> dict[str, str]:
    """What ``segpipe evaluate`` writes into a run directory, by name (confusion.csv only
    with several classes)."""
    return {"metrics": METRICS, "per_image": PER_IMAGE, "by_epoch": BY_EPOCH,
            "evolution": EVOLUTION, "predictions": PREDICTIONS,
            **({} if binary else {"confusion": CONFUSION})}


@contextlib.contextmanager
def run_lock(run_dir: Path, step: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the folder) for the block; while another process
    holds it, wait for that one to end, logging whom it waits for and how long it waited."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            log.info("%s: in use by %s; waiting for it to end (a run directory has one writer)",
                     run_dir, holder)
            start = time.monotonic()
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("%s: %s ended after %.0f s of waiting; going on", run_dir, holder,
                     time.monotonic() - start)
        lock.truncate(0)
        lock.write(f"segpipe {step} (pid {os.getpid()} on {HOST})\n")
        lock.flush()
        yield


def snapshot_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"epoch_{epoch}.pt"


def snapshots(folder: Path) -> dict[int, Path]:
    """``{epoch: path}`` of the ``epoch_<k>.pt`` files in ``folder``, by epoch."""
    found = ((re.fullmatch(r"epoch_(\d+)\.pt", p.name), p) for p in Path(folder).glob("*.pt"))
    return dict(sorted((int(m.group(1)), p) for m, p in found if m))


def expected_snapshots(snapshot_epochs: Iterable[int], epochs: int) -> list[int]:
    """The snapshot epochs that a run of ``epochs`` epochs reached."""
    return sorted(k for k in snapshot_epochs if k <= epochs)


def check_snapshots(folder: Path, snapshot_epochs: Iterable[int], epochs: int) -> None:
    """Raise :class:`SegpipeError` unless ``folder`` holds exactly the snapshots of
    :func:`expected_snapshots`."""
    found, expected = list(snapshots(folder)), expected_snapshots(snapshot_epochs, epochs)
    if found != expected:
        raise SegpipeError(f"{folder}: holds snapshots of epochs {found or 'none'}, but the run "
                           f"reached {epochs} epoch(s) and snapshots at {expected or 'none'}; "
                           f"delete the run directory to train it again")
