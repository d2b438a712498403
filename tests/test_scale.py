"""Memory that grows with the label file, not with a multiple of it (issue 12).

`bench.py scale` writes an ImageNet-shaped label file as `labels.py build` does, minus the teacher, and starts
the trainer on it; here it runs at two region counts on the same 4,000 images, each part in its own
process, and the growth of each part's peak resident memory is compared with the growth of the region records
(20 B each at k=5). Before schema 2's streaming passes, train's start-up grew by ~150 B and the build by
~240 B per region.
"""
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(600)


def run_bench(call):
    p = subprocess.run([sys.executable, "-c", f"import bench; bench.{call}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def peak_mb(out, part):
    return float(re.search(rf"^{part}:.*peak RSS ([\d,]+) MB", out, re.M).group(1).replace(",", ""))


def test_peak_memory_grows_with_the_record_bytes():
    import tempfile
    N, small, large = 4000, 32, 544
    peaks = {}
    with tempfile.TemporaryDirectory() as d:
        for R in (small, large):
            path = f"{d}/r{R}.beton"
            out = run_bench(f"scale_write({path!r}, {N}, {R}, classes=10)")
            out += run_bench(f"scale_train({path!r}, steps=0)")
            parts = ("boxes, plan and records", "checksum and header", "train start-up")
            peaks[R] = {part: peak_mb(out, part) for part in parts}
    records_mb = N * (large - small) * 20 / 2**20
    for part in peaks[small]:
        grown = peaks[large][part] - peaks[small][part]
        assert grown <= 2.5 * records_mb, (part, grown, records_mb, peaks)
