"""The region table's copy beside the label file, LABELS.CRC.regions (beton.read_regions; issue 32 item 3).

On a small synthetic label file (`bench.scale_write`: the build's own writer, a seeded generator in the
teacher's place): a new copy removes only this file's stale copies; the commands that only read write
nothing; of several processes that start together one writes the copy and the others wait and map it; a
wait ends (a dead or silent writer is taken over, a live one is waited for at most COPY_WAIT_S); a full disk
falls back to a private copy with one warning line and leaves no file behind; a start that finds a matching
copy maps it without reading or checksumming the records. Processes that must run at the same time, or
under their own file-size limit, are forks of this one (beton is already imported: no 8 s start each).
"""
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(label file, its header, its records as the file's own slots hold them), 300 images x 8 regions."""
    import bench
    import beton
    path = tmp_path_factory.mktemp("synthetic") / "labels.beton"
    bench.scale_write(str(path), 300, 8, classes=10)
    header = beton.read_header(path)
    want = np.stack([b.copy() for b in beton.region_blocks(path, header["regions"] * header["region_bytes"])])
    return path, header, want.reshape(300, 8, -1)


@pytest.fixture
def labels(synthetic, tmp_path):
    """A fresh copy of the synthetic label file, alone in its own folder: (path, header, records)."""
    path, header, want = synthetic
    shutil.copy(path, tmp_path / "labels.beton")
    return tmp_path / "labels.beton", header, want


def copy_of(path, header):
    return path.parent / f"{path.name}.{header['regions_crc32']:08x}.regions"


def lock_of(path, header):
    return path.parent / f".{copy_of(path, header).name}.lock"


def test_a_new_copy_removes_only_stale_copies_of_the_same_file(labels):
    """A rebuilt label file has a new CRC, so its old copies (and a crashed writer's lock and temporary) are
    left behind under other names: making the new copy deletes them, and nothing that is not named by the
    copy's pattern for this file."""
    import beton
    path, header, want = labels
    d = path.parent
    stale = ["labels.beton.0badc0de.regions", ".labels.beton.0badc0de.regions.lock",
             ".labels.beton.12345678.regions.tmp.host.99"]
    others = ["labels.beton.0BADC0DE.regions", "labels.beton.0badc0d.regions", "notes.txt",
              "labels.beton.0badc0de.regions.bak", "other.beton.0badc0de.regions", "labels.beton.regions",
              "xlabels.beton.0badc0de.regions", ".labels.beton.0badc0de.regions",
              "labels.beton.0badc0de.regions.lock"]
    for name in stale + others:
        (d / name).write_bytes(b"x")
    (d / "labels.beton.deadbeef.regions.d").mkdir()  # a folder is never ours
    table = beton.read_regions(path, header)
    assert np.array_equal(table, want)
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted(others + ["labels.beton", copy_of(path, header).name,
                                    "labels.beton.deadbeef.regions.d"])
    # a copy that is current is kept as it is, and so are the files beside it
    mtime = copy_of(path, header).stat().st_mtime_ns
    beton.read_regions(path, header)
    assert copy_of(path, header).stat().st_mtime_ns == mtime and sorted(p.name for p in d.iterdir()) == left


def test_a_matching_copy_is_mapped_without_reading_the_records(labels, monkeypatch):
    """A start that finds a copy whose header page names this label file (size, mtime, CRC, shape) maps it:
    no pass over the records, no checksum (issue 26's 10 s start-up at 1.28M x 300). A copy made from an
    earlier state of the file (touched, so its mtime differs), a damaged header page, or a copy in the older
    headerless layout is written again."""
    import beton
    path, header, want = labels
    beton.read_regions(path, header)
    copy = copy_of(path, header)

    def no_pass(*args):
        raise AssertionError("read the records again")
    with monkeypatch.context() as m:
        m.setattr(beton, "region_blocks", no_pass)
        m.setattr(beton.zlib, "crc32", no_pass)
        table = beton.read_regions(path, header)
    assert isinstance(table, np.memmap) and not table.flags.writeable and np.array_equal(table, want)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the label file changed since the copy
    with open(copy, "r+b") as f:  # and the copy's records were damaged: all of it is written again
        f.seek(beton.COPY_HEADER + 5)
        f.write(b"\xff\xff")
    assert np.array_equal(beton.read_regions(path, header), want)
    with open(copy, "r+b") as f:  # a damaged header page
        f.seek(30)
        f.write(b"#")
    assert np.array_equal(beton.read_regions(path, header), want)
    copy.write_bytes(want.tobytes())  # the layout before the header page: the records alone
    assert np.array_equal(beton.read_regions(path, header), want)
    assert copy.stat().st_size == beton.COPY_HEADER + want.size


def test_commands_that_only_read_write_nothing(labels, built, tmp_path_factory):
    """`labels.py inspect`, `show` and `fidelity` read the records from the label file (or map a copy that
    is already there) and leave the folder as they found it."""
    path, header, want = labels
    cli("labels.py", "inspect", path, "--rows=2")
    cli("labels.py", "show", path, f"--out={tmp_path_factory.mktemp('show') / 'r.png'}", "--images=1",
        "--regions=2")
    assert os.listdir(path.parent) == ["labels.beton"]
    ckpt, digits = built
    d = tmp_path_factory.mktemp("digits")
    shutil.copy(digits, d / "labels.beton")
    p = cli("labels.py", "fidelity", d / "labels.beton", f"--teacher={ckpt}", "--samples=8")
    assert "KL" in p.stdout + p.stderr and os.listdir(d) == ["labels.beton"]


def _start_together(work, n):
    """Run work(i) in n forked processes released at once; returns their exit codes."""
    ctx = multiprocessing.get_context("fork")
    gate = ctx.Barrier(n)

    def run(i):
        gate.wait()
        work(i)
    procs = [ctx.Process(target=run, args=(i,)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def _redirected(out):
    """Send this (forked) process's stdout and stderr to the file `out`."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)


def test_one_process_writes_the_copy_the_others_wait_and_map_it(labels, monkeypatch, tmp_path_factory):
    """Three processes start on a label file without a copy (three nodes sharing the folder, or three ranks:
    no LOCAL_RANK says who writes). One takes the lock and writes (slowed here, so the others really wait);
    the others wait for it and map the same copy; no lock or temporary is left."""
    import beton
    path, header, want = labels
    logs = tmp_path_factory.mktemp("logs")
    slow = beton.checked_blocks

    def slow_blocks(*args):
        time.sleep(1.5)
        yield from slow(*args)
    monkeypatch.setattr(beton, "checked_blocks", slow_blocks)

    def work(i):
        _redirected(logs / f"{i}.txt")
        table = beton.read_regions(path, header)
        os._exit(0 if isinstance(table, np.memmap) and np.array_equal(table, want) else 1)
    assert _start_together(work, 3) == [0, 0, 0], [(logs / f"{i}.txt").read_text() for i in range(3)]
    said = [(logs / f"{i}.txt").read_text() for i in range(3)]
    assert sum(s.count("writing ") for s in said) == 1 and not any("warning" in s for s in said), said
    assert sorted(os.listdir(path.parent)) == ["labels.beton", copy_of(path, header).name]


def test_a_wait_for_another_writer_ends(labels, monkeypatch):
    """A lock whose holder is a live process that never finishes: one error line after COPY_WAIT_S, naming
    the lock to delete. A lock left by a dead process of this host is taken over at once; a lock that does
    not change for COPY_STALE_S (its writer, perhaps on another node, stopped) is taken over then."""
    import beton
    from runtime import UserError
    path, header, want = labels
    lock = lock_of(path, header)
    monkeypatch.setattr(beton, "COPY_WAIT_S", 1.0)
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # alive: this process, which is not writing
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"waited 1 s for .* delete {lock}"):
        beton.read_regions(path, header)
    assert time.monotonic() - t0 < 30 and not copy_of(path, header).exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")
    assert np.array_equal(beton.read_regions(path, header), want)
    assert sorted(os.listdir(path.parent)) == ["labels.beton", copy_of(path, header).name]
    copy_of(path, header).unlink()
    monkeypatch.setattr(beton, "COPY_WAIT_S", 60.0)
    monkeypatch.setattr(beton, "COPY_STALE_S", 1.0)
    lock.write_text("another-node 1")
    assert np.array_equal(beton.read_regions(path, header), want)
    assert not lock.exists()


def test_a_full_disk_falls_back_to_a_private_copy(labels, monkeypatch, tmp_path_factory):
    """A write that fails half way (here a real EFBIG from the kernel: the process's file-size limit stops
    the copy in its records) leaves no partial copy, temporary or lock, and the process goes on with its own
    copy in memory after one warning line. Too little free space is found before writing anything."""
    import beton
    path, header, want = labels
    log = tmp_path_factory.mktemp("logs") / "out.txt"

    def work(i):
        _redirected(log)
        limit = beton.COPY_HEADER + want.size // 2  # half way through the records
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        table = beton.read_regions(path, header)
        os._exit(0 if not isinstance(table, np.memmap) and np.array_equal(table, want) else 1)
    assert _start_together(work, 1) == [0], log.read_text()
    lines = log.read_text().splitlines()
    assert [line for line in lines if "warning" in line] == lines[-1:], lines
    assert "File too large" in lines[-1], lines
    assert os.listdir(path.parent) == ["labels.beton"]
    full = shutil._ntuple_diskusage(10**12, 10**12 - 10, 10)  # 10 bytes free
    monkeypatch.setattr(beton.shutil, "disk_usage", lambda p: full)
    table = beton.read_regions(path, header)
    assert not isinstance(table, np.memmap) and np.array_equal(table, want)
    assert os.listdir(path.parent) == ["labels.beton"]
