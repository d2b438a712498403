"""
Region soft labels for FKD / FerKD, stored beside the images in one FFCV `.beton`.

    python labels.py build --data=fashion-mnist --teacher=runs/teacher/final.pt --out=data/fm-labels.beton
    python labels.py build --data=imagefolder:/data/imagenet --teacher=torchvision:resnet50 --out=in1k.beton
    torchrun --nproc_per_node=8 labels.py build ...   # each process takes a share of the chunks; same bytes
    python labels.py show data/fm-labels.beton --out=regions.png --t_low=0.1 --t_mid=0.5 --t_top=0.99

Killed, a build is finished by re-running the same command; the finished file does not depend on where it
stopped or on the number of processes (see `build`).

A strong teacher is run once over R random-resized crops ("regions") of every training image (FKD, Shen &
Xing, ECCV 2022). For each region we keep what the trainer needs to replay it and learn from it (FerKD, Shen
et al., arXiv 2312.17473): its box and flip, the teacher's top-k classes and probabilities, and p_gt, the
teacher's probability of the ground-truth class (FerKD's calibration needs it even when that class is not in
the top-k).

File layout (schema 1). The `.beton` is a plain FFCV file with four fields per image:
    image    RGBImageField   raw pixels (small images) or JPEG (imagefolder)
    label    IntField        ground-truth class
    index    IntField        position of the image in the dataset (the trainer gathers region labels by it)
    regions  NDArrayField    uint8 (R, D), D = 4 + 3k + 1 bytes per region (20 for k=5):
               [0:4]          box (y0, x0, y1, x1) on a 0..255 grid of the stored image (see `box_pixels`)
               [4:4+2k]       top-k class ids, uint16 little-endian; bit 15 of the first id is the flip
               [4+2k:4+3k]    top-k probabilities, round(255 p)
               [4+3k]         p_gt, round(255 p)
Our JSON header (dataset fingerprint, teacher, T, k, R, seed, ...) sits between FFCV's data pages and its
allocation table, followed by its length, the table's length and the magic b"FERKDHDR"; FFCV's header points
past it, so FFCV reads the file as usual. `read_header` checks every length, so a truncated file is refused.

The same FFCV decoder (`RegionCrop`) crops, resizes and flips for the teacher here and for the student in
ferkd.py, so the teacher sees each region exactly as the trainer replays it.
"""
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numba
import torch
import torch.nn.functional as F
from numba.core import cgutils, types
from numba.extending import intrinsic

_torch_threads = torch.get_num_threads()
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
torch.set_num_threads(_torch_threads)  # importing FFCV sets torch to 1 thread (ffcv/pipeline/compiler.py);
# its Loader later sets torch's threads to its num_workers, for every epoch

SCHEMA_VERSION = 1
MAGIC = b"FERKDHDR"
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, used for every dataset so teachers transfer
STD = (0.229, 0.224, 0.225)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2 (see `run_cli`)."""


def run_cli(commands):
    """fire.Fire over `commands`, turning UserError into one line on stderr and exit status 2."""
    import fire
    try:
        fire.Fire(commands)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a write that found the disk full anywhere else: finished files are intact (atomic)
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        print(f"error: out of disk space: {e}", file=sys.stderr)
        sys.exit(2)


def atomic_write(path, write):
    """write(tmp), fsync, then rename over `path`: a reader never sees half a file, and a failed or killed
    write (a full disk) leaves the previous file whole and no temporary behind. The temporary keeps the
    suffix (matplotlib and torch.export pick formats by it) and is hidden, so globs of the folder skip
    it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)

# -----------------------------------------------------------------------------
# Region records: packing, unpacking, boxes

def region_bytes(k):
    return 4 + 3 * k + 1


def pack_regions(qbox, flip, ids, probs, pgt):
    """qbox (..., 4) uint8, flip (...) bool, ids (..., k) int, probs (..., k) float, pgt (...) float
    -> (..., 4 + 3k + 1) uint8 records (numpy)."""
    k = ids.shape[-1]
    ids = ids.astype(np.uint16)
    ids[..., 0] |= flip.astype(np.uint16) << 15
    q = lambda p: np.clip(np.rint(np.asarray(p, np.float64) * 255), 0, 255).astype(np.uint8)
    out = np.concatenate([qbox.astype(np.uint8), ids.view(np.uint8).reshape(*ids.shape[:-1], 2 * k),
                          q(probs), q(pgt)[..., None]], axis=-1)
    return out


def unpack_regions(rec, k):
    """rec (..., D) uint8 torch tensor -> (ids (..., k) int64, probs (..., k) float32, pgt (...) float32,
    flip (...) bool). Works on any device; used by the trainer on every batch."""
    lo = rec[..., 4:4 + 2 * k:2].long()
    hi = rec[..., 5:5 + 2 * k:2].long()
    ids = lo | (hi << 8)
    flip = (ids[..., 0] >> 15).bool()
    ids = ids & 0x7FFF
    probs = rec[..., 4 + 2 * k:4 + 3 * k].float() / 255
    pgt = rec[..., 4 + 3 * k].float() / 255
    return ids, probs, pgt, flip


def random_boxes(rng, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """n RandomResizedCrop boxes in the unit square, torchvision's rule (10 tries, then a centred box of
    clamped aspect), vectorized. Returns (n, 4) float (y0, x0, y1, x1) and (n,) bool flips.
    Boxes are drawn for a unit square: `quantize_boxes` maps them to the 255-grid of any image size."""
    area = rng.uniform(scale[0], scale[1], (n, tries))
    logr = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, tries))
    ar = np.exp(logr)
    w, h = np.sqrt(area * ar), np.sqrt(area / ar)
    ok = (w <= 1) & (h <= 1)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    fallback = ~ok.any(axis=1)  # torchvision's fallback for a square image: the whole image
    w[fallback], h[fallback] = 1.0, 1.0
    y0 = rng.uniform(0, 1, n) * (1 - h)
    x0 = rng.uniform(0, 1, n) * (1 - w)
    flip = rng.uniform(0, 1, n) < 0.5
    return np.stack([y0, x0, y0 + h, x0 + w], axis=1), flip


def quantize_boxes(boxes):
    """(..., 4) unit-square boxes -> uint8 on the 0..255 grid, each side at least one grid step."""
    q = np.clip(np.rint(boxes * 255), 0, 255).astype(np.int32)
    q[..., 2] = np.maximum(q[..., 2], q[..., 0] + 1)
    q[..., 3] = np.maximum(q[..., 3], q[..., 1] + 1)
    q[..., 0] = np.minimum(q[..., 0], 254)
    q[..., 1] = np.minimum(q[..., 1], 254)
    q[..., 2:] = np.minimum(q[..., 2:], 255)
    return q.astype(np.uint8)


def box_pixels(qbox, height, width):
    """The one rule from a stored box to pixels, integer-only so it is exact on every machine.
    qbox (..., 4) uint8 grid coords, height/width broadcastable -> (..., 4) int32 (top, left, bottom, right),
    bottom/right exclusive, at least one pixel."""
    q = qbox.astype(np.int64)
    h = np.asarray(height, np.int64)[..., None]
    w = np.asarray(width, np.int64)[..., None]
    scale = np.concatenate([h, w, h, w], axis=-1)
    px = (q * scale + 127) // 255
    px[..., 2] = np.maximum(px[..., 2], px[..., 0] + 1)
    px[..., 3] = np.maximum(px[..., 3], px[..., 1] + 1)
    return px.astype(np.int32)


def full_boxes(n):
    return np.tile(np.array([0, 0, 255, 255], np.uint8), (n, 1))


def center_boxes(heights, widths, ratio):
    """Evaluation crop: a centred square of side `ratio` * min(H, W), as pixel boxes (N, 4) int32."""
    s = (np.minimum(heights, widths) * ratio).astype(np.int64)
    top, left = (heights - s) // 2, (widths - s) // 2
    return np.stack([top, left, top + s, left + s], axis=1).astype(np.int32)

# -----------------------------------------------------------------------------
# Datasets: built-in real ones (offline) and a user's image folders

DATASETS = {  # name -> stored image side, default crop resolution, eval crop ratio
    "digits": dict(res=16),         # scikit-learn's 1,797 8x8 digits, upscaled 2x; tests use it
    "fashion-mnist": dict(res=32),  # Debian's dataset-fashion-mnist, 28x28 padded to 32x32
}
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle-boot"]


@dataclass
class Dataset:
    name: str           # e.g. "fashion-mnist" or "imagefolder:/abs/path"
    split: str          # "train" | "test"
    classes: list       # class names, index = label
    labels: np.ndarray  # (N,) int64
    images: object      # (N, H, W, 3) uint8 array, or a list of image file paths
    res: int            # default training / evaluation resolution

    def fingerprint(self):
        """sha256 over what identifies the data: labels, class names and pixels (or file names and sizes)."""
        h = hashlib.sha256(json.dumps([self.name, self.split, self.classes]).encode())
        h.update(self.labels.astype(np.int64).tobytes())
        if isinstance(self.images, np.ndarray):
            h.update(self.images.tobytes())
        else:
            for p in self.images:
                h.update(f"{p}:{os.path.getsize(p)}\n".encode())
        return h.hexdigest()[:16]


def _fashion_mnist_dir():
    """Where Debian's dataset-fashion-mnist put its IDX files (asks dpkg, falls back to its usual place)."""
    try:
        files = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                               check=True).stdout.split()
        hits = [f for f in files if f.endswith("train-images-idx3-ubyte.gz")]
        if hits:
            return Path(hits[0]).parent
    except (OSError, subprocess.CalledProcessError):
        pass
    return Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _gray_to_rgb(x):
    return np.ascontiguousarray(np.repeat(x[..., None], 3, axis=-1))


def load_dataset(data, split):
    """`data`: "digits" | "fashion-mnist" | "imagefolder:/path" (with train/ and val/ class folders)."""
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}")
    if data == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x = (d.images * (255 / 16)).round().astype(np.uint8)
        x = np.kron(x, np.ones((1, 2, 2), np.uint8))  # 8x8 -> 16x16, exact
        test = np.arange(len(x)) % 5 == 0             # a fixed 80/20 split
        keep = test if split == "test" else ~test
        return Dataset(data, split, [str(i) for i in range(10)], d.target[keep].astype(np.int64),
                       _gray_to_rgb(x[keep]), DATASETS[data]["res"])
    if data == "fashion-mnist":
        root = _fashion_mnist_dir()
        prefix = "train" if split == "train" else "t10k"
        img_path, lab_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        if not img_path.exists():
            raise UserError(f"{img_path} not found: install Debian's dataset-fashion-mnist (./setup.sh does)")
        x = np.pad(_read_idx(img_path), ((0, 0), (2, 2), (2, 2)))  # 28 -> 32: crops and strides divide evenly
        y = _read_idx(lab_path).astype(np.int64)
        return Dataset(data, split, FASHION_MNIST_CLASSES, y, _gray_to_rgb(x), DATASETS[data]["res"])
    if data.startswith("imagefolder:"):
        root = Path(data.split(":", 1)[1]).expanduser().resolve()
        sub = root / ("train" if split == "train" else "val")
        if not sub.is_dir():
            raise UserError(f"{sub} is not a directory (imagefolder:PATH needs PATH/train and PATH/val)")
        classes = sorted(p.name for p in sub.iterdir() if p.is_dir())
        if split == "test":  # class ids come from the training folder, so both splits agree
            train_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
            if classes != train_classes:
                raise UserError(f"{sub} has other class folders than {root / 'train'}")
        exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
        paths, labels = [], []
        for c, name in enumerate(classes):
            for p in sorted((sub / name).iterdir()):
                if p.suffix.lower() in exts:
                    paths.append(str(p))
                    labels.append(c)
        if not paths:
            raise UserError(f"{sub} holds no images ({', '.join(sorted(exts))})")
        return Dataset(f"imagefolder:{root}", split, classes, np.array(labels, np.int64), paths, 224)
    raise UserError(f"unknown dataset {data!r}: use digits, fashion-mnist or imagefolder:/path")


class _FFCVSource:
    """Indexable view of a Dataset (plus precomputed region records) for FFCV's writer."""

    def __init__(self, ds, regions, max_side):
        self.ds, self.regions, self.max_side = ds, regions, max_side

    def __len__(self):
        return len(self.ds.labels)

    def __getitem__(self, i):
        img = self.ds.images[i]
        if not isinstance(img, np.ndarray):
            from PIL import Image
            img = np.asarray(Image.open(img).convert("RGB"))
        item = (img, int(self.ds.labels[i]), i)
        return item if self.regions is None else item + (self.regions[i],)


def _open_images(ds):
    """Decode every image file once before handing them to FFCV: an exception inside FFCV's writer hangs
    it instead of raising (NOTES.md), so a corrupt file must be found here, by name."""
    if isinstance(ds.images, np.ndarray):
        return
    from PIL import Image
    for p in ds.images:
        try:
            with Image.open(p) as im:
                im.convert("RGB").load()
        except Exception as e:  # PIL raises many types for bad files
            raise UserError(f"cannot decode image {p}: {e}") from None


def write_beton(path, ds, regions=None, num_workers=2, quiet=None):
    """Write `ds` (and per-image region records) to an FFCV file at `path` (not atomic: callers write to a
    temporary name and rename). With one worker the bytes are a function of the inputs only."""
    import functools
    import ffcv.writer
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter
    _open_images(ds)
    raw = isinstance(ds.images, np.ndarray)
    fields = {"image": RGBImageField(write_mode="raw" if raw else "jpg", max_resolution=None if raw else 512,
                                     jpeg_quality=90),
              "label": IntField(), "index": IntField()}
    if regions is not None:
        fields["regions"] = NDArrayField(np.dtype("uint8"), regions.shape[1:])
    if quiet is None:  # progress only for a person at a terminal: logs and captured stderr stay clean
        quiet = not sys.stderr.isatty()
    bar, process = ffcv.writer.tqdm, ffcv.writer.Process
    ffcv.writer.tqdm = functools.partial(bar, disable=quiet, desc="images", unit="img")  # its bar has no flag
    ffcv.writer.Process = _WriterProcess
    writer = DatasetWriter(str(path), fields, num_workers=num_workers)
    try:
        with _WriterProcess.watch():
            writer.from_indexed_dataset(_FFCVSource(ds, regions, None), chunksize=256)
    except _WriterDied as e:
        writer.metadata_sm.unlink()  # FFCV unlinks its shared memory only when it finishes
        raise UserError(f"could not write {path}: {e}") from None
    except OSError as e:  # the allocation table is written by this process
        raise UserError(f"could not write {path}: {e}") from None
    finally:
        ffcv.writer.tqdm, ffcv.writer.Process = bar, process


class _WriterDied(Exception):
    pass


class _WriterProcess(multiprocessing.Process):
    """FFCV's writer waits for its worker processes by polling a counter they raise, so a worker that fails
    (a full disk, a bad sample) leaves it waiting forever (NOTES.md). Its workers are made of this class: a
    failing one sends its error through a pipe and exits, and `watch` interrupts the waiting main thread."""
    errors = None    # multiprocessing.SimpleQueue of "Type: message" from failed workers
    started = []

    def start(self):
        _WriterProcess.started.append(self)
        super().start()

    def run(self):
        try:
            super().run()
        except BaseException as e:  # report it here: the parent prints one line, not the worker's traceback
            _WriterProcess.errors.put(f"{type(e).__name__}: {e}")
            os._exit(1)

    @classmethod
    @contextlib.contextmanager
    def watch(cls):
        import signal
        import threading
        cls.errors, cls.started, done, failed = multiprocessing.SimpleQueue(), [], threading.Event(), []

        def watchdog():
            while not done.wait(0.2):
                if any(p.exitcode not in (None, 0) for p in cls.started):
                    failed.append(cls.errors.get() if not cls.errors.empty() else "a writer process died")
                    # a real SIGINT, not _thread.interrupt_main(): the main thread may be blocked reading a pipe
                    # (FFCV's allocation queue), which only a delivered signal interrupts
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    return
        thread = threading.Thread(target=watchdog, daemon=True)
        thread.start()
        try:
            yield
        except KeyboardInterrupt:
            if not failed:
                raise
            for p in cls.started:
                p.kill()
            raise _WriterDied(failed[0]) from None
        finally:
            done.set()
            thread.join()


def dataset_beton(data, split, cache_dir="data"):
    """The cached FFCV file of a dataset split, images only (for CE training and evaluation), built on first
    use; the file name carries the dataset fingerprint, so a changed dataset gets a new file."""
    ds = load_dataset(data, split)
    safe = ds.name.replace("imagefolder:", "folder-").replace("/", "_").strip("_")
    path = Path(cache_dir) / f"{safe}-{split}-{ds.fingerprint()}.beton"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: write_beton(tmp, ds))
    return path, ds

# -----------------------------------------------------------------------------
# Replaying regions: one FFCV decoder for the teacher (here) and the student (ferkd.py)

@intrinsic
def _voidptr(typingctx, addr):
    """numba: an integer address as a void pointer, so compiled code can read an array updated in place."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(addr), codegen


class RegionCrop(SimpleRGBImageDecoder):  # FFCV takes a pipeline's first op as decoder by this type
    """FFCV decoder for an RGBImageField that, for sample i, crops the n pixel boxes plan[i, :, 0:4]
    (top, left, bottom, right), resizes each to `res` x `res` with FFCV's resize (OpenCV INTER_AREA) and
    mirrors it when plan[i, j, 4] is set. Output per sample: (n, res, res, 3) uint8.

    `plan` is an (N, n, 5) int32 array that the caller rewrites in place before each epoch (new regions);
    the compiled code reads it through its address, since numba would freeze a captured array."""

    def __init__(self, plan, res):
        super().__init__()
        assert plan.dtype == np.int32 and plan.flags.c_contiguous and plan.ndim == 3 and plan.shape[2] == 5
        self.plan, self.res = plan, res

    def declare_state_and_memory(self, previous_state):
        from ffcv.pipeline.allocation_query import AllocationQuery
        n = self.plan.shape[1]
        max_pixels = int(self.metadata["width"].max()) * int(self.metadata["height"].max()) * 3
        out_shape = (n, self.res, self.res, 3)
        return (dataclasses.replace(previous_state, jit_mode=True, shape=out_shape, dtype=np.dtype("uint8")),
                (AllocationQuery(out_shape, np.dtype("uint8")),
                 AllocationQuery((max_pixels,), np.dtype("uint8"))))

    def generate_code(self):
        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.libffcv import imdecode, resize_crop
        from ffcv.pipeline.compiler import Compiler
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        jpg = IMAGE_MODES["jpg"]
        addr, shape = self.plan.ctypes.data, self.plan.shape

        def decode(batch_indices, my_storage, metadata, storage_state):
            dst, tmp = my_storage
            plan = numba.carray(_voidptr(addr), shape, np.int32)
            for b in my_range(len(batch_indices)):
                i = batch_indices[b]
                field = metadata[i]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    img = tmp[b]
                    imdecode_c(data, img, height, width, height, width, 0, 0, 1, 1, False, False)
                    img = img.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    img = data.reshape(height, width, 3)
                for j in range(shape[1]):
                    top, left, bottom, right, flip = plan[i, j]
                    out = dst[b, j]
                    resize_crop_c(img, top, bottom, left, right, out)
                    if flip:
                        for y in range(out.shape[0]):
                            for x in range(out.shape[1] // 2):
                                for c in range(3):
                                    t = out[y, x, c]
                                    out[y, x, c] = out[y, out.shape[1] - 1 - x, c]
                                    out[y, out.shape[1] - 1 - x, c] = t
            return dst[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def image_sizes(path):
    """(heights, widths) of the images stored in an FFCV file, from its metadata (no decoding)."""
    from ffcv.reader import Reader
    meta = Reader(str(path)).metadata["f0"]
    return meta["height"].astype(np.int64), meta["width"].astype(np.int64)


def region_loader(path, plan, res, batch_size, num_workers=2, order="sequential", seed=0, indices=None,
                  drop_last=False, distributed=False):
    """FFCV loader yielding (images (B, n, res, res, 3) uint8, labels (B,), indices (B,)) on the CPU.
    Batches are FFCV's reused buffers: copy or consume them before the next one."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor
    threads = torch.get_num_threads()
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                    order={"sequential": OrderOption.SEQUENTIAL, "random": OrderOption.RANDOM}[order],
                    seed=seed, indices=indices, drop_last=drop_last, distributed=distributed, os_cache=True,
                    pipelines={"image": [RegionCrop(plan, res), ToTensor()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(1)],
                               "index": [IntDecoder(), ToTensor(), Squeeze(1)],
                               "regions": None})
    torch.set_num_threads(threads)  # FFCV sets torch's global thread count to num_workers
    return loader


def to_model_input(images, device, mean=MEAN, std=STD):
    """(B, n, H, W, 3) uint8 -> (B*n, 3, H, W) float normalized, channels-last, on `device`."""
    x = images.to(device, non_blocking=True).flatten(0, 1).permute(0, 3, 1, 2)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    return ((x.float() - m) / s).contiguous(memory_format=torch.channels_last)

# -----------------------------------------------------------------------------
# The label file header

def _alloc_ptr_offset():
    from ffcv.types import HeaderType
    return HeaderType.fields["alloc_table_ptr"][1], HeaderType


def attach_header(path, header):
    """Insert our JSON header before FFCV's allocation table and point FFCV's header past it."""
    off, HeaderType = _alloc_ptr_offset()
    ffcv_header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    ptr = int(ffcv_header["alloc_table_ptr"])
    payload = json.dumps(header, sort_keys=True).encode()
    with open(path, "r+b") as f:
        f.seek(ptr)
        alloc = f.read()
        f.seek(ptr)
        f.write(payload + struct.pack("<QQ", len(payload), len(alloc)) + MAGIC)
        new_ptr = f.tell()
        f.write(alloc)
        f.truncate()
        f.seek(off)
        f.write(struct.pack("<Q", new_ptr))
        f.flush()
        os.fsync(f.fileno())


def read_header(path, rebuild_hint="re-run `python labels.py build ...`"):
    """Our header of a label file, after checking that the file is whole. Raises UserError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} not found; build it with "
                        f"`python labels.py build --out={path} ...`")
    off, HeaderType = _alloc_ptr_offset()
    size = path.stat().st_size
    bad = f"{path} is truncated, corrupt or not a ferkd label file; {rebuild_hint}"
    if size < HeaderType.itemsize + 24:
        raise UserError(bad)
    with open(path, "rb") as f:
        ffcv_header = np.frombuffer(f.read(HeaderType.itemsize), dtype=HeaderType)[0]
        ptr = int(ffcv_header["alloc_table_ptr"])
        if ffcv_header["version"] != 2 or not 24 <= ptr <= size:
            raise UserError(bad)
        f.seek(ptr - 24)
        n_payload, n_alloc, magic = struct.unpack("<QQ8s", f.read(24))
        if magic != MAGIC or ptr + n_alloc != size or n_payload > ptr - 24:
            raise UserError(bad)
        f.seek(ptr - 24 - n_payload)
        try:
            header = json.loads(f.read(n_payload))
        except ValueError:
            raise UserError(bad) from None
    if header.get("schema") != SCHEMA_VERSION:
        raise UserError(f"{path} has label schema {header.get('schema')}, this code reads {SCHEMA_VERSION}; "
                        f"{rebuild_hint}")
    return header


def read_regions(path, header):
    """All region records of a label file as an (N, R, D) uint8 array, checked against the header's CRC."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    ptrs = reader.metadata[f"f{reader.field_names.index('regions')}"].astype(np.int64)
    n_bytes = header["regions"] * header["region_bytes"]
    mm = np.memmap(path, np.uint8, mode="r")
    table = np.asarray(mm[ptrs[:, None] + np.arange(n_bytes)]).reshape(len(ptrs), header["regions"], -1)
    if zlib.crc32(table.tobytes()) != header["regions_crc32"]:
        raise UserError(f"{path}: region records fail their checksum (corrupt file); "
                        f"re-run `python labels.py build`")
    return table

# -----------------------------------------------------------------------------
# Teachers

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


TORCHVISION_TEACHERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                        "efficientnet_b0", "convnext_tiny", "vit_b_16", "regnet_y_16gf")


def load_teacher(spec, num_classes):
    """A teacher from `spec`: a checkpoint written by `ferkd.py train`, or `torchvision:NAME` (pretrained
    ImageNet weights, downloaded by torchvision) / `torchvision:NAME@WEIGHTS.pth` (weights from a file).
    Returns (model in eval mode, identity dict for the label header)."""
    if spec.startswith("torchvision:"):
        import torchvision
        name, _, weights_file = spec.split(":", 1)[1].partition("@")
        if name not in TORCHVISION_TEACHERS:  # an allow-list: never resolve user strings to arbitrary code
            raise UserError(f"teacher {name!r} not supported; "
                            f"choose one of {', '.join(TORCHVISION_TEACHERS)}")
        if weights_file:
            if not Path(weights_file).is_file():
                raise UserError(f"teacher weights {weights_file} not found")
            model = getattr(torchvision.models, name)(weights=None)
            model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
            checksum = file_sha256(weights_file)
        else:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            model = getattr(torchvision.models, name)(weights=weights)
            checksum = str(weights)
        ident = dict(kind="torchvision", name=name, checksum=checksum, mean=MEAN, std=STD)
    else:
        from ferkd import load_checkpoint
        model, ckpt = load_checkpoint(spec)
        ident = dict(kind="ferkd", name=ckpt["config"]["arch"], checksum=file_sha256(spec), mean=MEAN,
                     std=STD)
    model.eval()
    n_out = _num_outputs(model)
    if n_out != num_classes:
        raise UserError(f"teacher {spec} predicts {n_out} classes, the dataset has {num_classes}")
    return model, ident


def _num_outputs(model):
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features

# -----------------------------------------------------------------------------
# `labels.py build`: chunk by chunk, so it can be killed and resumed, and sharded with torchrun
#
# Images are cut into chunks of whole teacher batches; a chunk is the unit of both resume and sharding (rank r
# takes chunks r, r + W, ...). While a build runs, beside --out:
#   OUT.partial                 the FFCV file; each chunk's region records are patched into it in place
#   OUT.partial.d/build.json    the configuration key, written once the FFCV file is whole (phase 1 done)
#   OUT.partial.d/alloc.bin     FFCV's allocation table, so attaching our header can be redone after a kill
#   OUT.partial.d/c000042.json  chunk 42's teacher hits, written after its records are flushed to the file
# Small files are written under a temporary name and renamed, so a kill leaves the old or the new one, whole.
# Every step is a function of the configuration only (fixed batches that start at chunk boundaries, fp32 on
# CPU, no time stamps), so a resumed or sharded build gives the bytes of an uninterrupted one-process build.

@dataclass(frozen=True)
class BuildConfig:
    data: str = "fashion-mnist"  # digits | fashion-mnist | imagefolder:/path
    teacher: str = ""            # ferkd checkpoint path, or torchvision:NAME[@weights.pth]
    out: str = ""                # output .beton
    regions: int = 16            # R: regions per image
    k: int = 5                   # teacher classes kept per region
    temperature: float = 1.0     # T: teacher softmax temperature
    seed: int = 0                # regions are a function of (seed, image index)
    res: int = 0                 # crop side the teacher sees and the student trains at; 0: dataset default
    scale_min: float = 0.08      # RandomResizedCrop area range (FKD's)
    batch_size: int = 256        # crops per teacher forward (R regions + the whole image per image)
    chunk: int = 1024            # images per chunk, the unit of resume and sharding (whole batches)
    num_workers: int = 2         # FFCV decoding threads
    device: str = "auto"         # auto | cpu | cuda
    overwrite: bool = False      # replace an existing --out, or discard an unfinished build of another config


def parse_config(cls, kwargs):
    """Build a frozen config from fire's keyword flags: unknown names and ill-typed values are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in kwargs.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown flag --{key}; known: {', '.join('--' + f for f in fields)}")
        want = type(fields[key].default)
        if want is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise UserError(f"--{key} takes true or false, got {value!r}")
        elif want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif want is str and not isinstance(value, str):
            value = str(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UserError(f"--{key} takes a {want.__name__}, got {value!r}")
        out[key] = value
    return cls(**out)


def pick_device(name, local_rank=0):
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def check_build_config(c):
    if not c.out:
        raise UserError("--out=FILE.beton is required")
    if not c.teacher:
        raise UserError("--teacher=CKPT or --teacher=torchvision:NAME is required")
    if c.regions < 1 or c.k < 1 or c.batch_size < 1 or c.chunk < 1 or c.temperature <= 0:
        raise UserError("--regions, --k, --batch_size, --chunk and --temperature must be positive")
    if not 0 < c.scale_min <= 1:
        raise UserError("--scale_min must be in (0, 1]")
    if not Path(c.out).resolve().parent.is_dir():
        raise UserError(f"output directory {Path(c.out).parent} does not exist")


def setup_distributed():
    """(rank, world, local_rank) from torchrun's environment; one process without it. gloo even on GPUs: the
    ranks only exchange barriers (the teacher's results meet in the shared file, not in collectives)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, 0
    import datetime
    import torch.distributed as dist
    # phase 1 (rank 0 writes the whole FFCV file) can take an hour at ImageNet scale: wait that long
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def previous_build(c, key, out, partial, state):
    """What an earlier run of this command left: "fresh" (nothing usable), "resume" (phase 1 done) or
    "finished" (renamed, only the clean-up was cut short). Reads only, so every rank can call it."""
    try:
        old = json.loads((state / "build.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        old = None  # no state, or killed before phase 1 finished: that work is redone
    if old is not None and old != key:
        if not c.overwrite:
            diff = sorted(n for n in set(key) | set(old) if key.get(n) != old.get(n))
            raise UserError(f"{partial} is an unfinished build with another configuration (differs in "
                            f"{', '.join(diff)}); re-run its command to finish it, "
                            f"or pass --overwrite to discard it")
        old = None
    if old is not None and partial.is_file():
        return "resume"
    if old is not None and out.is_file():
        return "finished"
    if out.exists() and not c.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    return "fresh"


def restore_alloc_table(partial, state):
    """Put FFCV's allocation table back where the writer left it (undoing a cut-short `attach_header`)."""
    off, _ = _alloc_ptr_offset()
    ptr = json.loads((state / "build.json").read_text())["alloc_table_ptr"]
    with open(partial, "r+b") as f:
        f.seek(ptr)
        f.write((state / "alloc.bin").read_bytes())
        f.truncate()
        f.seek(off)
        f.write(struct.pack("<Q", ptr))


def region_slots(path):
    """(N,) int64 file offsets of each image's region record, from FFCV's metadata."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    return reader.metadata[f"f{reader.field_names.index('regions')}"].astype(np.int64)


@torch.no_grad()
def teacher_probs(model, x, device, temperature):
    # bf16 only on GPUs; fp32 on CPU keeps CPU builds exact, so tests can compare files byte for byte
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x.to(device))
    return F.softmax(logits.float() / temperature, dim=1)


def build(**flags):
    """Build a label file: write the images with region boxes (phase 1), run the teacher on every region
    through the trainer's own decoder chunk by chunk and patch its top-k and p_gt in (phase 2), then attach
    the header and rename into place (phase 3). Killed and re-run, it goes on where it stopped; under torchrun
    each rank takes every W-th chunk. The bytes depend on neither."""
    c = parse_config(BuildConfig, flags)
    check_build_config(c)
    from tqdm import tqdm
    rank, world, local_rank = setup_distributed()
    device = pick_device(c.device, local_rank)
    ds = load_dataset(c.data, "train")
    res = c.res or ds.res
    C, N, R, k, D = len(ds.classes), len(ds.labels), c.regions, c.k, region_bytes(c.k)
    if k > C or C > 32768:
        raise UserError(f"--k={k} must be at most the class count {C} (<= 32768)")
    model, teacher_id = load_teacher(c.teacher, C)
    model.to(device).to(memory_format=torch.channels_last)
    per_batch = max(1, c.batch_size // (R + 1))  # images per teacher forward
    chunk = -(-c.chunk // per_batch) * per_batch  # whole batches, so batches never straddle two chunks
    n_chunks = -(-N // chunk)
    fingerprint = ds.fingerprint()
    # everything that can change a byte of the output: a partial build is only resumed under the same key
    key = json.loads(json.dumps(dict(
        schema=SCHEMA_VERSION, data=ds.name, fingerprint=fingerprint, teacher=teacher_id, regions=R, k=k,
        temperature=c.temperature, seed=c.seed, res=res, scale_min=c.scale_min, batch_images=per_batch,
        chunk=chunk, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__)))
    out = Path(c.out)
    partial, state = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.d")
    t0 = time.time()
    mode = previous_build(c, key, out, partial, state)
    barrier()  # every rank has read the old state before rank 0 changes it

    # 1. boxes and flips: a function of (seed, image index) only, so every rank computes the same ones
    boxes = np.empty((N, R, 4), np.uint8)
    flips = np.empty((N, R), bool)
    for i in range(N):
        b, f = random_boxes(np.random.default_rng([c.seed, i]), R, scale=(c.scale_min, 1.0))
        boxes[i], flips[i] = quantize_boxes(b), f
    if rank == 0 and mode == "finished":
        shutil.rmtree(state)
    if rank == 0 and mode == "fresh":
        shutil.rmtree(state, ignore_errors=True)
        partial.unlink(missing_ok=True)
        zeros = np.zeros((N, R, k))
        table = pack_regions(boxes, flips, zeros.astype(np.int64), zeros, zeros[..., 0])
        # one writer process: FFCV's workers take chunks from a queue, so with several the layout would vary
        write_beton(partial, ds, table, num_workers=1, quiet=not sys.stderr.isatty())
        del table
        state.mkdir()
        ptr = int(np.fromfile(partial, dtype=_alloc_ptr_offset()[1], count=1)[0]["alloc_table_ptr"])
        with open(partial, "rb") as f:
            f.seek(ptr)
            table_bytes = f.read()
        atomic_write(state / "alloc.bin", lambda tmp: tmp.write_bytes(table_bytes))
        started = json.dumps(dict(key=key, alloc_table_ptr=ptr))
        atomic_write(state / "build.json", lambda tmp: tmp.write_text(started))
    barrier()
    if mode == "finished":
        print(f"{out} was already built; removed the leftover {state}")
        return None

    # 2. the teacher on every region and on the whole image, replayed by the student's decoder
    heights, widths = image_sizes(partial)
    plan = np.concatenate([box_pixels(boxes, heights[:, None], widths[:, None]),
                           flips[..., None].astype(np.int32)], axis=-1)
    full = np.concatenate([box_pixels(full_boxes(N), heights, widths), np.zeros((N, 1), np.int32)], axis=1)
    plan = np.ascontiguousarray(np.concatenate([plan, full[:, None]], axis=1), dtype=np.int32)  # (N, R+1, 5)
    mine = range(rank, n_chunks, world)
    todo = [i for i in mine if not (state / f"c{i:06d}.json").exists()]
    if rank == 0:
        print(f"{N} images in {n_chunks} chunks of {chunk}, {world} process(es); "
              f"this rank: {len(todo)} chunks to do, {len(mine) - len(todo)} done before", flush=True)
    if todo:
        slots = region_slots(partial)
        mm = np.memmap(partial, np.uint8, mode="r+")
        indices = np.concatenate([np.arange(i * chunk, min(N, (i + 1) * chunk)) for i in todo])
        loader = region_loader(partial, plan, res, per_batch, c.num_workers, indices=indices)
        bar = tqdm(total=len(indices) * (R + 1), desc=f"teacher ({device.type})", unit="crop",
                   unit_scale=True,
                   disable=rank != 0 or not sys.stderr.isatty())
        hits = np.zeros(2, np.int64)  # this chunk's (region top-1, whole-image top-1) hits
        for images, labels, index in loader:
            x = to_model_input(images, device, teacher_id["mean"], teacher_id["std"])
            p = teacher_probs(model, x, device, c.temperature).view(len(index), R + 1, C).cpu()
            top_p, top_i = p[:, :R].topk(k, dim=2)                        # (B, R, k)
            gt = p[:, :R].gather(2, labels.view(-1, 1, 1).expand(-1, R, 1)).squeeze(2)  # (B, R) p_gt
            idx = index.numpy().astype(np.int64)
            rec = pack_regions(boxes[idx], flips[idx], top_i.numpy(), top_p.double().numpy(),
                               gt.double().numpy())
            mm[slots[idx, None] + np.arange(R * D)] = rec.reshape(len(idx), R * D)
            hits += [(top_i[..., 0] == labels.view(-1, 1)).sum().item(),
                     (p[:, R].argmax(1) == labels).sum().item()]
            bar.update(len(idx) * (R + 1))
            ci = int(idx[0]) // chunk
            if idx[-1] == min(N, (ci + 1) * chunk) - 1:  # its last batch: make the chunk durable, then say so
                mm.flush()
                done = json.dumps(dict(region_hits=int(hits[0]), image_hits=int(hits[1])))
                atomic_write(state / f"c{ci:06d}.json", lambda tmp: tmp.write_text(done))
                hits[:] = 0
        bar.close()
        del mm
    barrier()
    if rank != 0:
        return None

    # 3. header (the teacher's accuracies summed over every chunk, whoever computed it), rename, clean up
    done = [json.loads((state / f"c{i:06d}.json").read_text()) for i in range(n_chunks)]
    region_hits, image_hits = sum(d["region_hits"] for d in done), sum(d["image_hits"] for d in done)
    restore_alloc_table(partial, state)
    slots = region_slots(partial)
    mm = np.memmap(partial, np.uint8, mode="r")
    table = np.asarray(mm[slots[:, None] + np.arange(R * D)])
    del mm
    header = dict(schema=SCHEMA_VERSION, dataset=ds.name, fingerprint=fingerprint, images=N,
                  classes=ds.classes, num_classes=C, teacher=teacher_id, temperature=c.temperature, k=k,
                  regions=R, seed=c.seed, res=res, scale=[c.scale_min, 1.0], ratio=[3 / 4, 4 / 3],
                  region_bytes=D, quantization="uint8 round(255 p); uint16 ids, flip in bit 15 of ids[0]",
                  regions_crc32=zlib.crc32(table.tobytes()), teacher_device=key["device"],
                  teacher_batch_images=per_batch, teacher_region_top1=region_hits / (N * R),
                  teacher_image_top1=image_hits / N)
    attach_header(partial, header)
    os.replace(partial, out)
    shutil.rmtree(state)
    print(f"wrote {out}: {N} images x {R} regions, {D} bytes/region (labels {N * R * D / 2**20:.1f} MiB), "
          f"teacher top-1 {100 * region_hits / (N * R):.2f}% on regions, "
          f"{100 * image_hits / N:.2f}% on images, "
          f"{time.time() - t0:.0f} s")
    return None


def inspect(path, rows=3):
    """Print a label file's header and its first region records."""
    header = read_header(path)
    print(json.dumps({k: v for k, v in header.items() if k != "classes"}, indent=1))
    table = read_regions(path, header)
    ids, probs, pgt, flip = unpack_regions(torch.from_numpy(table[:rows]), header["k"])
    for i in range(min(rows, len(table))):
        for r in range(min(3, header["regions"])):
            print(f"image {i} region {r}: box {table[i, r, :4].tolist()} flip {int(flip[i, r])} "
                  f"top-k {ids[i, r].tolist()} p {[round(v, 3) for v in probs[i, r].tolist()]} "
                  f"p_gt {pgt[i, r].item():.3f}")


# -----------------------------------------------------------------------------
# `labels.py show`: a picture of what the teacher said, and of FerKD's calibration (issue 4)

CATEGORY = (("dropped", "#d62728"), ("hard", "#ff7f0e"), ("soft", "#2ca02c"))  # region_category's 0, 1, 2


def show(path, out="regions.png", t_low=None, t_mid=None, t_top=None, images=4, regions=5):
    """Write a PNG: for `images` images, their first `regions` regions drawn on the image, each with the
    teacher's top-k, p_gt and FerKD category under the thresholds (ferkd.py's defaults when not given);
    below, the histogram of p_gt over every stored region with the thresholds marked."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from ferkd import FERKD_DEFAULTS
    from kernels_triton import region_category
    t = {}
    for name, v in (("t_low", t_low), ("t_mid", t_mid), ("t_top", t_top)):
        v = FERKD_DEFAULTS[name] if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"--{name} takes a number, got {v!r}")
        t[name] = float(v)
    if not 0 <= t["t_low"] <= t["t_mid"] <= 1 or not t["t_low"] <= t["t_top"] <= 1:
        raise UserError(f"FerKD thresholds need 0 <= t_low <= t_mid <= 1, t_low <= t_top <= 1; got {t}")
    for name, v in (("images", images), ("regions", regions)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"--{name} takes a positive integer, got {v!r}")
    if not str(out).lower().endswith(".png"):
        raise UserError(f"--out must name a .png file, got {out!r}")
    if not Path(out).resolve().parent.is_dir():
        raise UserError(f"output directory {Path(out).parent} does not exist")
    header = read_header(path)
    table = read_regions(path, header)                                      # (N, R, D) uint8
    N, R, k, names = len(table), header["regions"], header["k"], header["classes"]
    ids, probs, pgt, flip = unpack_regions(torch.from_numpy(table), k)    # (N, R, k), (N, R, k), (N, R), (N, R)
    cat = region_category(pgt, **t).numpy()                                 # (N, R) 0 dropped, 1 hard, 2 soft

    # the chosen images, decoded whole by the trainer's decoder (square, then stretched back to their shape)
    pick = np.linspace(0, N - 1, min(images, N)).round().astype(np.int64)
    heights, widths = image_sizes(path)
    side = int(min(256, max(heights.max(), widths.max())))
    full = np.concatenate([box_pixels(full_boxes(N), heights, widths), np.zeros((N, 1), np.int32)], axis=1)
    plan = np.ascontiguousarray(full[:, None], dtype=np.int32)
    decoded = {}
    for imgs, labels, index in region_loader(path, plan, side, len(pick), 1, indices=pick):
        decoded.update((int(i), (img[0].numpy().copy(), int(y))) for img, y, i in zip(imgs, labels, index))

    n_show = min(regions, R)
    cols = min(2, len(pick))
    rows = -(-len(pick) // cols)
    fig = plt.figure(figsize=(7.5 * cols, 3.6 * rows + 3.2), layout="constrained")
    grid = fig.add_gridspec(rows + 1, 2 * cols, height_ratios=[3.6] * rows + [3.2], width_ratios=[1, 1.3] * cols)
    short = lambda c: names[c][:12]
    for n, i in enumerate(pick):
        img, y = decoded[int(i)]
        H, W = int(heights[i]), int(widths[i])
        ax = fig.add_subplot(grid[n // cols, 2 * (n % cols)])
        ax.imshow(img, extent=(0, W, H, 0), interpolation="nearest")  # tiny images enlarged, pixels kept sharp
        ax.set_title(f"image {i}: {names[y]}", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        lines = []
        for r in range(n_show):
            top, left, bottom, right = box_pixels(table[i, r, :4], H, W)
            colour = CATEGORY[cat[i, r]][1]
            ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, lw=2, ec=colour))
            ax.text(left + 0.02 * W, top + 0.02 * H, str(r), color="white", fontsize=9, va="top",
                    bbox=dict(fc=colour, ec="none", pad=1))
            topk = ", ".join(f"{short(c)} {p:.2f}" for c, p in zip(ids[i, r].tolist()[:3], probs[i, r].tolist()))
            lines.append((f"{r}{' (flip)' if flip[i, r] else ''}: {topk}\n"
                          f"   p_gt {pgt[i, r]:.2f} → {CATEGORY[cat[i, r]][0]}", colour))
        tx = fig.add_subplot(grid[n // cols, 2 * (n % cols) + 1])
        tx.axis("off")
        tx.text(0, 1, f"region: teacher top-{min(3, k)}", fontsize=9, va="top", weight="bold")
        for r, (line, colour) in enumerate(lines):
            tx.text(0, 0.9 - r * 0.9 / max(n_show, 1), line, fontsize=9, va="top", color=colour,
                    family="monospace")

    # p_gt over the whole file, stacked by category (a bin that a threshold cuts shows both parts)
    ax = fig.add_subplot(grid[rows, :])
    p_all, bottom = pgt.flatten().numpy(), 0
    for c, (name, colour) in enumerate(CATEGORY):
        counts, edges = np.histogram(p_all[cat.ravel() == c], bins=51, range=(0, 1))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", bottom=bottom, color=colour, label=name)
        bottom = bottom + counts
    for name in ("t_low", "t_mid", "t_top"):
        ax.axvline(t[name], color="black", ls="--", lw=1)
        ax.text(t[name], 1.0, f"{name}={t[name]:g} ", transform=ax.get_xaxis_transform(), fontsize=9,
                va="top", ha="right", rotation=90)
    share = np.bincount(cat.ravel(), minlength=3) / cat.size
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("p_gt: the teacher's probability of the true class, per region (stored as round(255 p))")
    ax.set_ylabel("regions")
    ax.set_title(f"{path}: {N} images x {R} regions, teacher {header['teacher']['name']}; " + ", ".join(
        f"{name} {s:.1%}" for (name, _), s in zip(CATEGORY, share)), fontsize=10)
    ax.legend(loc="upper center")
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
    print(f"wrote {out}: {len(pick)} images, {n_show} regions each; regions dropped / hard / soft at "
          f"t_low={t['t_low']:g} t_mid={t['t_mid']:g} t_top={t['t_top']:g}: "
          + " / ".join(f"{s:.1%}" for s in share))


if __name__ == "__main__":
    run_cli({"build": build, "inspect": inspect, "show": show})
