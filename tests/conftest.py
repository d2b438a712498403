"""Shared by the test files: the project root on sys.path, a CLI runner, and one digits teacher + label file
built through the command line for the whole session.

The CLI runner forks each command from a warm interpreter that has already imported torch, torchvision,
FFCV, scikit-learn and the project's modules (8 s of a command's start on 2 cores, most of it FFCV's numba
Dict, torch and torch._dynamo), then runs the script as `__main__` with its own argv, cwd, stdin, stdout and
stderr: the same code path as `python SCRIPT ARGS`, minus the imports. Tests that need a fresh process or
another environment (torchrun, signals, rlimits, TRITON_INTERPRET) call subprocess themselves.

`make test` runs the files in two pytest-xdist workers, a file's tests in one worker (`--dist loadfile`: the
module fixtures, some of which write shared files, are made once); each worker makes its own session fixtures
and its own warm interpreter."""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers (pytest-xdist) on 2 cores: each worker,
    # and every process it starts, at one torch thread whose OpenMP team sleeps when idle; two processes whose
    # threads spin-wait for each other's cores run many times slower, not twice
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402  (after the thread settings it reads)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests import the top-level scripts
R, K = 6, 5

WARM = r"""
import gc, json, os, runpy, sys
sys.path.insert(0, sys.argv[1])
import fire, numpy, sklearn.datasets, timm, torch, torch.utils.tensorboard, torchvision, tqdm
import beton, kernels_triton, models, runtime  # beton imports FFCV (keeping torch's threads, as in any run)
sys.path.pop(0)
gc.freeze()  # the children's collector leaves these objects alone: no copy-on-write of the whole heap at exit
while True:  # a request per line, [cwd, argv, stdout path, stderr path]; answers the child's pid, then status
    line = sys.stdin.readline()
    if not line:
        os._exit(0)
    cwd, argv, out, err = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        break
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
# the child: become `python SCRIPT ARGS` run in cwd; leaving this file exits as that command would
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
sys.stdin = open(os.devnull)
os.chdir(cwd)
script = os.path.abspath(argv[0])
sys.argv, sys.path[0] = argv, os.path.dirname(script)
runpy.run_path(script, run_name="__main__")
"""
_warm = []  # the warm interpreter, started by the first command


class Started:
    """One of the project's commands, `python SCRIPT ARGS` in cwd, forked from the warm interpreter (in the
    environment it started with) and not yet waited for: `.pid`, `.running()`, `.wait()`. The warm
    interpreter serves one command at a time."""

    def __init__(self, *args, cwd=ROOT):
        self.args = list(map(str, args))
        if not _warm or _warm[0].poll() is not None:
            _warm[:] = [subprocess.Popen([sys.executable, "-c", WARM, str(ROOT)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, bufsize=1)]
        self.warm, self.dir = _warm[0], tempfile.TemporaryDirectory()
        self.out, self.err = Path(self.dir.name) / "stdout", Path(self.dir.name) / "stderr"
        self.warm.stdin.write(json.dumps([str(cwd), self.args, str(self.out), str(self.err)]) + "\n")
        self.pid = int(self.warm.stdout.readline())

    def running(self):
        return not select.select([self.warm.stdout], [], [], 0)[0]  # its exit status not yet written

    def wait(self, check=True, timeout=500):
        """The CompletedProcess (stdout and stderr as text); a timeout ends the command and the warm
        interpreter."""
        try:
            if not select.select([self.warm.stdout], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout, self.out.read_text(), self.err.read_text())
            code = int(self.warm.stdout.readline())
        except BaseException:  # a timeout, pytest-timeout's or ^C
            os.kill(self.pid, signal.SIGKILL)
            self.warm.kill()
            raise
        with self.dir:
            p = subprocess.CompletedProcess([sys.executable, *self.args], code, self.out.read_text(),
                                            self.err.read_text())
        if check and p.returncode != 0:
            raise AssertionError(f"{self.args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return p


def cli(*args, cwd=ROOT, check=True, timeout=500):
    """Run one of the project's commands, `python SCRIPT ARGS` in cwd, forked from the warm interpreter;
    returns the CompletedProcess (stdout and stderr as text)."""
    return Started(*args, cwd=cwd).wait(check, timeout)


def code_tolerance(true_topk, atol=0.0):
    """How far a stored top-k probability may be from the teacher's (..., k), descending: a stored value
    within one step of the log code (half a step of rounding, and the encoder may raise a near tie one more)
    or the code's smallest value; the top-1, when it is derived from the others, within the sum of theirs.
    `atol` adds the tests' own float noise (a teacher re-run)."""
    import beton
    step = 2 ** (1 / beton.LOG_STEPS) - 1
    floor = 2.0 ** (-1 - (beton.ZERO_CODE - 1) / beton.LOG_STEPS) + 2.0 ** -20  # + the encoder's fp32 slack
    tol = step * true_topk + floor
    derived = step * (1 - true_topk[..., :1]) + true_topk.shape[-1] * floor
    return torch.cat([torch.maximum(tol[..., :1], derived), tol[..., 1:]], -1) + atol


def torchrun(nproc=2):
    """The command that starts nproc processes under torchrun on a free rendezvous port (`--standalone`: two
    at once, as under pytest-xdist, do not collide on the default one)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


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
    assert "21 bytes/region" in p.stdout
    return d / "teacher" / "final.pt", out


