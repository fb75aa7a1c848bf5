"""A run directory's one-writer lock and its snapshots folder (docs/formats.md).

``segpipe train`` and ``segpipe evaluate`` hold :func:`run_lock` while they write into a run
directory, so a second process on the same run (e.g. Snakemake re-run after ``--unlock`` while
the jobs of a killed Snakemake still run) stops at once with a message naming the holder,
instead of writing the same files. Stopping rather than waiting: the first process completes
the run, and the re-run's failed job makes the next ``snakemake`` check it again. The lock is
``fcntl.flock`` on ``<run>/.segpipe.lock``; the kernel releases it when its holder exits,
however it exits (kill -9 included), so a lock file left behind locks nothing.

A snapshots folder holds ``epoch_<k>.pt`` for every ``snapshot_epochs`` entry ``k`` that
training reached, no more and no fewer (:func:`check_snapshots`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from segpipe import SegpipeError
from segpipe.files import HOST

LOCK_FILE = ".segpipe.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, step: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the folder) for the block, or raise
    :class:`SegpipeError` naming the process that holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise SegpipeError(f"{run_dir}: in use by {holder}; a run directory has one "
                               f"writer: wait for it to end (or stop it), then run again"
                               ) from None
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
