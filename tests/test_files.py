"""Atomic outputs: replaced when complete, errors naming the output, temporaries of killed
processes removed by the next writer."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from segpipe import SegpipeError
from segpipe.files import HOST, atomic_path, write_csv

ROOT = Path(__file__).resolve().parents[1]


def test_output_replaced_when_the_block_succeeds_and_kept_when_it_fails(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".csv" and tmp.exists()
        tmp.write_text("new")
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        1 / 0
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "out.h5").mkdir(), r"out\.h5: is a folder, expected a file name"),
        (lambda d: (d / "file").write_text(""), r"file: cannot create the folder \(File exists\)"),
    ],
)
def test_output_that_cannot_be_written_fails_before_the_block(tmp_path, make, message):
    make(tmp_path)
    target = tmp_path / "out.h5" if message.startswith("out") else tmp_path / "file" / "out.h5"
    with pytest.raises(SegpipeError, match=message), atomic_path(target):
        pytest.fail("the block ran")


def test_block_that_runs_out_of_space(tmp_path):
    # A real EFBIG: the file size limit of the child is 64 KiB (SIGXFSZ ignored, so the write
    # fails instead of killing it).
    code = ("import sys; from segpipe import SegpipeError; from segpipe.files import atomic_path\n"
            "try:\n"
            "    with atomic_path(sys.argv[1]) as tmp:\n        tmp.write_bytes(bytes(2**20))\n"
            "except SegpipeError as exc:\n    sys.exit(str(exc))\n")
    limit = 64 * 1024

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    target = tmp_path / "big.bin"
    result = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, text=True,
                            capture_output=True, preexec_fn=limit_file_size)
    assert result.returncode == 1
    assert result.stderr == f"{target}: not enough space to write it (File too large)\n"
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_processes_of_this_host_are_removed(tmp_path):
    target = tmp_path / "state.pt"
    code = ("import sys, time; from segpipe.files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(bytes(1000)); print(tmp, flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE)
    killed = Path(child.stdout.readline().strip())
    child.kill()  # SIGKILL: no finally block runs
    child.wait()
    child.stdout.close()
    assert killed.name == f".state@{HOST}.{child.pid}.tmp.pt" and killed.stat().st_size == 1000
    live = subprocess.Popen(["sleep", "60"])
    kept = [
        tmp_path / f".state@{HOST}.{live.pid}.tmp.pt",  # its process still runs
        tmp_path / f".state@other-node.{child.pid}.tmp.pt",  # another host's process
        tmp_path / f".state.{child.pid}.tmp.pt",  # not our name
        tmp_path / f".state@{HOST}.{child.pid}.tmp.pt.bak",
    ]
    for path in kept:
        path.write_bytes(b"")
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    finally:
        live.kill()
        live.wait()
    assert not killed.exists()
    assert sorted(tmp_path.iterdir()) == sorted([target, *kept])


def test_write_csv_writes_what_pandas_reads_back(tmp_path):
    """Header, one line per row in column order, NaN and None as empty cells (as pandas writes
    them), floats in full precision; nothing but the file is left."""
    path = tmp_path / "metrics.csv"
    write_csv(path, ["name", "dice", "epoch"],
              [{"epoch": 1, "name": "a", "dice": 0.1 + 0.2},
               {"epoch": 2, "name": "b,c", "dice": float("nan")},
               {"epoch": 3, "name": "d", "dice": None}])
    assert path.read_text() == 'name,dice,epoch\na,0.30000000000000004,1\n"b,c",,2\nd,,3\n'
    frame = pd.read_csv(path)
    assert frame["dice"].iloc[0] == 0.1 + 0.2 and frame["dice"].iloc[1:].isna().all()
    assert list(tmp_path.iterdir()) == [path]
