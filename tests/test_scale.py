"""Memory that grows with the label file, not with a multiple of it (issue 12).

`bench.py scale` writes an ImageNet-shaped label file as `labels.py build` does, minus the teacher, and starts
the trainer on it; here it runs at two region counts on the same 4,000 images, each part in its own
process, and the growth of each part's peak resident memory is compared with the growth of the region records
(21 B each at k=5), and the trainer's own (anonymous) memory by at most 2 B per region: the records are a
memory map that a node's processes share: checked in each of two processes under torchrun (peak RSS is
checked in one process: with a process group's threads, glibc's arenas move a process's peak by ±15 MB here).
Before schema 2's streaming passes, train's start-up grew by ~150 B and the build by ~240 B per region;
before the mapped table, each process held its own copy of the records.
"""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, torchrun

pytestmark = pytest.mark.timeout(600)


def run_bench(call):
    p = subprocess.run([sys.executable, "-c", f"import bench; bench.{call}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def run_torchrun(nproc, *args):
    p = subprocess.run([*torchrun(nproc), "bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def peak_mb(out, part, what="peak RSS"):
    return float(re.search(rf"^{re.escape(part)}:.*{what} ([\d,]+) MB", out, re.M).group(1).replace(",", ""))


def test_peak_memory_grows_with_the_record_bytes():
    import tempfile
    N, small, large = 4000, 32, 544
    peaks = {}
    with tempfile.TemporaryDirectory() as d:
        for R in (small, large):
            path = f"{d}/r{R}.beton"
            out = run_bench(f"scale_write({path!r}, {N}, {R}, classes=10)")
            out += run_bench(f"scale_train({path!r}, steps=0)")  # one trainer process, then two on a node:
            out += run_torchrun(2, "scale_train", path, "--steps=0")  # both map the copy
            parts = ("boxes, plan and records", "checksum and header", "train start-up")
            peaks[R] = {part: peak_mb(out, part) for part in parts}
            for rank in (0, 1):
                peaks[R][f"anonymous, rank {rank}"] = peak_mb(out, f"train start-up (rank {rank}/2)",
                                                              "now anonymous")
    regions = N * (large - small)
    records_mb = regions * 21 / 2**20
    for part in parts:
        grown = peaks[large][part] - peaks[small][part]
        assert grown <= 2.5 * records_mb, (part, grown, records_mb, peaks)
    # the trainer maps the records (shared by a node's processes) instead of holding a copy: what it holds
    # after start-up (freed temporaries handed back) grows by the rank score byte per region (--thresholds=rank,
    # the default; categories are looked up from it, never held), not 21 B more; issue 26's bound is 2 B per
    # region, + 1 MB for the two readings' rounding (with a held category byte as well, CI read 5.0 MB of 4.9)
    for rank in (0, 1):  # each process of the node maps the shared copy
        grown = peaks[large][f"anonymous, rank {rank}"] - peaks[small][f"anonymous, rank {rank}"]
        assert grown <= 2 * regions / 2**20 + 1, (rank, grown, records_mb, peaks)
