"""Shared by the test files: the project root on sys.path, a CLI runner, and one digits teacher + label file
built through the command line for the whole session."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests import the top-level scripts
R, K = 6, 5


def cli(*args, cwd=ROOT, check=True):
    """Run one of the project's commands; returns the CompletedProcess (stdout+stderr as text)."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=500)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(teacher checkpoint, label file) for digits: a 6-epoch small32 teacher, R regions per image."""
    d = tmp_path_factory.mktemp("digits")
    cli("ferkd.py", "train", "--data=digits", "--kd=none", "--arch=small32", "--epochs=6", "--batch_size=64",
        f"--run_dir={d / 'teacher'}")
    out = d / "labels.beton"
    p = cli("labels.py", "build", "--data=digits", f"--teacher={d / 'teacher' / 'final.pt'}", f"--out={out}",
            f"--regions={R}", f"--k={K}", "--seed=3")
    assert "20 bytes/region" in p.stdout
    return d / "teacher" / "final.pt", out


