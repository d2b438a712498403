"""`.ci/gpu-bundle` (issue 33): FFCV 1.0.2 compiled for CPython 3.12, the shared libraries its extension
loads, and fire, in one folder of at most 40 MiB that works with nothing installed.

The checks run a Python 3.12 (PY312, default pyenv's 3.12.1; skipped where there is none) in a venv that has
what the GPU machine has and the bundle does not carry: numpy, numba, Pillow, OpenCV's pip wheel, tqdm
(the project's pins, from PyPI, cached in ~/.cache/ferkd/py312-bundle-test). Not torch: PyPI's torch for 3.12
is the ~900 MB CUDA build, too much for a test; FFCV imports torch, but a loader without torch transforms
needs only a handful of its names, which a stand-in module gives (STAND_IN). The GPU machine has the real
torch, and .ci/gpu_e2e.py runs the bundle with it there.

Cost (2 cores): the first run builds the bundle (6 s: FFCV's one C++ file compiles fast) and the venv (11 s
with pip's download cache warm; ~100 MB from PyPI when cold); then both are reused (the bundle's stamp, the
venv's) and the tests take 5 s, so they stay in `make test`.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "gpu-bundle"
PY312 = os.environ.get("PY312", "/root/.pyenv/versions/3.12.1/bin/python")
VENV = Path.home() / ".cache" / "ferkd" / "py312-bundle-test"
VENV_PINS = ["numpy==2.4.6", "numba==0.68.1", "pillow==13.0.0", "opencv-python-headless==5.0.0.93",
             "tqdm==4.70.1"]
SYSTEM = re.compile(r"^(linux-vdso|ld-linux-x86-64|libc|libm|libpthread|libdl|librt|libutil|libresolv|"
                    r"libstdc\+\+|libgcc_s)\.so")

pytestmark = pytest.mark.skipif(not Path(PY312).exists(), reason=f"no CPython 3.12 at {PY312} (set PY312)")

STAND_IN = r'''
"""torch, as far as FFCV's import and a loader without torch transforms use it (tests/test_bundle.py)."""
import sys, types

import numpy as np


class _Array:  # FFCV allocates a numpy pipeline's buffers as torch.empty(...).numpy()
    def __init__(self, a):
        self.a, self.dtype = a, a.dtype

    def numpy(self):
        return self.a


from_numpy = _Array
empty = lambda *shape, dtype=None, device=None: _Array(np.empty(shape, dtype))  # noqa: E731


class device:
    def __init__(self, kind):
        self.type = str(kind)

    def __eq__(self, other):
        return isinstance(other, device) and other.type == self.type

    def __hash__(self):
        return hash(self.type)


class dtype:
    pass


class Tensor:
    pass


channels_last = object()
float16, int16 = dtype(), dtype()
cuda = types.SimpleNamespace(is_available=lambda: False)
set_num_threads = lambda n: None  # noqa: E731
get_num_threads = lambda: 1  # noqa: E731
nn = types.ModuleType("torch.nn")
nn.Module = type("Module", (), {})
nn.functional = types.ModuleType("torch.nn.functional")
utils = types.ModuleType("torch.utils")
utils.data = types.ModuleType("torch.utils.data")
utils.data.Dataset = type("Dataset", (), {})
utils.data.DistributedSampler = type("DistributedSampler", (), {})
sys.modules.update({"torch.nn": nn, "torch.nn.functional": nn.functional, "torch.utils": utils,
                    "torch.utils.data": utils.data})
'''

# In the 3.12 child: write a small FFCV file of JPEGs with the bundle's FFCV, read it back with a Loader
# (2 threads, FFCV's own JPEG decoder, i.e. the extension's TurboJPEG), compare with the originals, and say
# where FFCV and the libraries it loaded came from.
CHILD = r'''
import json, os, sys, tempfile
import cv2
import numpy as np
import ffcv
import fire
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.writer import DatasetWriter

rng = np.random.default_rng(0)
images = [np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(20)]
path = os.path.join(tempfile.mkdtemp(), "t.beton")
DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()},
              num_workers=1).from_indexed_dataset([(im, i) for i, im in enumerate(images)])
loader = Loader(path, batch_size=8, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
# the oracle: OpenCV's decoder (the venv's wheel) on the bytes FFCV's writer stores (OpenCV's encoder, BGR)
expected = [cv2.imdecode(cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1],
                         cv2.IMREAD_COLOR)[..., ::-1] for im in images]
errors, labels = [], []
for x, y in loader:
    labels += y[:, 0].tolist()
    errors += [float(np.abs(x[j].astype(int) - expected[int(y[j, 0])]).mean()) for j in range(len(y))]
maps = open("/proc/self/maps").read()
libs = sorted({line.split()[-1] for line in maps.splitlines() if "/" in line and os.path.basename(
    line.split()[-1]).startswith(("libturbojpeg.", "libopencv_", "_libffcv."))})
print(json.dumps(dict(ffcv=ffcv.__file__, fire=fire.__file__, labels=labels, mean_abs_error=max(errors),
                      libs=libs, python=sys.version.split()[0])))
'''


@pytest.fixture(scope="module")
def bundle():
    """The bundle, built by the script (returns at once when its stamp is current)."""
    subprocess.run(["bash", str(ROOT / ".ci" / "gpu-bundle"), str(BUNDLE)], check=True, timeout=600,
                   env=dict(os.environ, PY312=PY312))
    return BUNDLE


@pytest.fixture(scope="module")
def python312():
    """A bare 3.12 venv with the GPU machine's packages that the bundle leaves out, made once and reused."""
    stamp, py = VENV / "pins.txt", VENV / "bin" / "python"
    if not (stamp.exists() and stamp.read_text() == "\n".join(VENV_PINS)):
        subprocess.run([PY312, "-m", "venv", "--clear", str(VENV)], check=True, timeout=120)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *VENV_PINS], check=True, timeout=600)
        stamp.write_text("\n".join(VENV_PINS))
    return py


def test_bundle_size_and_libraries(bundle):
    """At most 40 MiB; every library the extension loads (ldd: the whole dependency tree) comes from the
    bundle's lib/ or is the C library's, libstdc++ or libgcc_s, with no LD_LIBRARY_PATH."""
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size <= 40 * 2**20, f"{size / 2**20:.1f} MiB"
    ext, = (bundle / "python" / "ffcv").glob("_libffcv*.so")
    assert "cpython-312" in ext.name
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    ldd = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, check=True, env=env).stdout
    resolved = [line.split() for line in ldd.splitlines() if "=>" in line]
    assert resolved and not [r for r in resolved if r[2] == "not"], ldd
    lib = str((bundle / "lib").resolve()) + "/"
    outside = [r for r in resolved if not os.path.realpath(r[2]).startswith(lib)  # the RPATH's path has ..
               and not SYSTEM.match(r[0])]
    assert not outside, ldd
    names = {r[0] for r in resolved}
    assert {"libturbojpeg.so.0"} <= names and any(n.startswith("libopencv_imgproc") for n in names), ldd
    for f in (bundle / "lib").iterdir():  # nothing carried that the extension does not load
        assert f.name in names, f.name


def test_bundle_loads_and_decodes_under_bare_python312(bundle, python312, tmp_path):
    """Only PYTHONPATH=gpu-bundle/python added to a 3.12 that has no FFCV, fire, setuptools (FFCV's distutils
    import) or system paths: `import ffcv`, a writer and a Loader work, and the extension and its libraries
    are the bundle's files, not the system's copies this machine also has."""
    (tmp_path / "torch.py").write_text(STAND_IN)
    for name in ("ffcv", "fire", "setuptools", "torch"):  # the venv has none of them itself
        p = subprocess.run([str(python312), "-c", f"import {name}"], capture_output=True, env={})
        assert p.returncode != 0, name
    env = dict(PYTHONPATH=f"{bundle / 'python'}{os.pathsep}{tmp_path}", PATH=os.environ["PATH"],
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    p = subprocess.run([str(python312), "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["python"].startswith("3.12") and out["ffcv"].startswith(str(bundle / "python"))
    assert out["fire"].startswith(str(bundle / "python"))
    assert out["labels"] == list(range(20))
    # FFCV's TurboJPEG against OpenCV's decoder of the same bytes: 0.94 grey levels at most (their chroma
    # upsampling differs); the pixels themselves, through JPEG, are ~9 off, a wrong image far more
    assert out["mean_abs_error"] < 2
    lib = str((bundle / "lib").resolve())
    assert {Path(x).name.split(".so")[0] for x in out["libs"]} >= {"libturbojpeg", "libopencv_core",
                                                                   "libopencv_imgproc"}, out["libs"]
    for x in out["libs"]:
        assert x.startswith(lib + "/") or x.startswith(str(bundle / "python")), out["libs"]
