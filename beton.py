"""
The label file: the data contract between `labels.py build` (writer) and `ferkd.py train` (reader).

Both scripts import what they share from here, so that there is one copy of each rule: the region record
format and its boxes, the datasets and their fingerprints, the FFCV file writer, the one decoder that replays
a stored region (`RegionCrop`), the JSON header. Nothing else: the process plumbing the commands also share
(one-line errors, typed flags, atomic writes, ranks) is runtime.py's, which imports nothing from here.

File layout (schema 3). The `.beton` is a plain FFCV file with four fields per image:
    image    RGBImageField   raw pixels (small images) or JPEG (imagefolder)
    label    IntField        ground-truth class
    index    IntField        position of the image in the dataset (the trainer gathers region labels by it)
    regions  NDArrayField    uint8 (R, D), D = 4 + 3k + 2 bytes per region (21 for k=5):
               [0:4]          box (y0, x0, y1, x1) on a 0..255 grid of the stored image (`grid_boxes`,
                              `box_pixels`), drawn in its pixels by torchvision's RandomResizedCrop rule
               [4:4+2k]       top-k class ids, uint16 little-endian, by descending probability
               [4+2k:4+3k]    the teacher's target on a log scale, one byte each (`pack_regions`): the
                              top-k probabilities, or the rest's mass and the 2nd..k-th (the top-1 derived)
               [4+3k]         p_gt, round(255 p)
               [4+3k+1]       flags: bit 0 the flip, bit 1 "slot 0 holds the rest's mass"
Our JSON header (dataset fingerprint, teacher, T, k, R, seed, ...) sits between FFCV's data pages and its
allocation table, followed by its length, the table's length and the magic b"FERKDHDR"; FFCV's header points
past it, so FFCV reads the file as usual. `read_header` checks every length, so a truncated file is refused.

The same FFCV decoder (`RegionCrop`) crops, resizes and flips for the teacher in labels.py and for the student
in ferkd.py, so the teacher sees each region exactly as the trainer replays it.
"""
import collections
import contextlib
import ctypes
import dataclasses
import errno
import functools
import gzip
import hashlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numba
import torch
from numba.core import cgutils, types
from numba.extending import intrinsic

from kernels_triton import rest_share
from runtime import UserError, atomic_write, on_all_ranks, on_rank0

_torch_threads = torch.get_num_threads()
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402
from ffcv.traversal_order import Random  # noqa: E402
torch.set_num_threads(_torch_threads)  # importing FFCV sets torch to 1 thread (ffcv/pipeline/compiler.py);
# its Loader later sets torch's threads to its num_workers, for every epoch

SCHEMA_VERSION = 3  # 3: probabilities on a log code (2: round(255 p); 1: boxes in the unit square)
MAGIC = b"FERKDHDR"
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, used for every dataset so teachers transfer
STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# Region records: packing, unpacking, boxes

def region_bytes(k):
    return 4 + 3 * k + 2


# The probability code. A region's teacher target is k + 1 numbers that sum to 1: the top-k probabilities
# P_1 >= ... >= P_k and the rest's mass r = 1 - sum P (the trainer spreads r evenly over the other C - k
# classes, FKD's rule). Dark knowledge is in the small numbers (P_2..P_k of a confident region are often
# 1e-3..1e-5), and under KL(teacher || target) an underestimated r costs r log(r / r'), so every small number
# needs a *relative* error bound, not an absolute one. Hence: the largest of {P_1, r} is not stored but
# derived as 1 - (the others); the other k numbers are each <= 1/2 and stored as one byte on a log scale,
# 2^(-1 - c / 12) for c = 0..254 (12 steps per octave, relative error <= 2.9% down to 2e-7, about where
# the trainer's fp32 arithmetic of 1 - sum P stops resolving the rest), c = 255 for 0.
# round(255 p), the code of label schema 2, stored the 2nd..5th of a confident region as 0 and inverted their
# order against the rest (KL 5x FKD's fp16); this code's KL is within a few percent of exact top-k storage
# (`labels.py fidelity`).
LOG_STEPS = 12  # codes per octave
ZERO_CODE = 255
QUANTIZATION = (f"uint16 top-k ids; a byte per probability, 2^(-1 - c/{LOG_STEPS}) (c = {ZERO_CODE}: 0), the "
                f"largest of the top-1 and the rest's mass derived; p_gt round(255 p); flags byte")


def decode_probs(codes):
    """Log codes (..., k) uint8 -> values (..., k) float32: 2^(-1 - c / LOG_STEPS), 0 for ZERO_CODE. Looked up
    in a table made once in float64 on the host, so every device decodes the same fp32 bits (a GPU's exp2 may
    round differently from a CPU's: labels that differ by an ulp between devices)."""
    return _decode_table(codes.device)[codes.long()]


@functools.lru_cache(maxsize=None)
def _decode_table(device):
    c = np.arange(256)
    values = np.where(c == ZERO_CODE, 0.0, 2.0 ** (-1 - c / LOG_STEPS)).astype(np.float32)
    return torch.from_numpy(values).to(device)


def encode_probs(v):
    """Values (..., k) in [0, 1/2] -> the nearest log code (..., k) uint8 (nearest in ratio; 0 where a value
    is closer to 0 than to the smallest code)."""
    v = np.asarray(v, np.float64)
    smallest = 2.0 ** (-1 - (ZERO_CODE - 1) / LOG_STEPS)
    with np.errstate(divide="ignore"):
        c = np.rint(-LOG_STEPS * (np.log2(np.maximum(v, 1e-300)) + 1))
    return np.where(v < smallest / 2, ZERO_CODE, np.clip(c, 0, ZERO_CODE - 1)).astype(np.uint8)


def pack_regions(qbox, flip, ids, probs, pgt, num_classes):
    """qbox (..., 4) uint8, flip (...) bool, ids (..., k) int, probs (..., k) float, pgt (...) float
    -> (..., 4 + 3k + 2) uint8 records (numpy), with the top-k sorted by probability. The code is chosen
    per region (see above); then any stored class that the trainer would recover below the rest's share
    (kernels_triton.rest_share) although it is above it in `probs` (a near tie, within a code step) is
    raised until none is: the target keeps the teacher's order."""
    k = ids.shape[-1]
    p = np.asarray(probs, np.float64)
    order = np.argsort(-p, axis=-1, kind="stable")
    p, ids = np.take_along_axis(p, order, -1), np.take_along_axis(np.asarray(ids, np.int64), order, -1)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1)     # a top-k summing above 1 (fp16 files) to a sum of 1
    rest = np.clip(1 - p.sum(-1), 0, 1)
    rest_stored = rest <= p[..., 0]                     # then P_1 is derived, and slot 0 holds r
    stored = p.copy()
    stored[..., 0] = np.where(rest_stored, rest, p[..., 0])
    codes = encode_probs(np.minimum(stored, 0.5))
    flags = (np.asarray(flip, np.uint8) | (rest_stored.astype(np.uint8) << 1))[..., None]
    pgt = np.clip(np.rint(np.asarray(pgt, np.float64) * 255), 0, 255).astype(np.uint8)[..., None]
    rec = np.concatenate([np.asarray(qbox, np.uint8), ids.astype(np.uint16).view(np.uint8).reshape(
        *ids.shape[:-1], 2 * k), codes, pgt, flags], axis=-1)
    slack = 2.0 ** -21 / max(num_classes - k, 1)  # 2 fp32 ulps of 1 - sum P: above it in any summation order
    ordered = p >= rest_share(p, num_classes) - slack  # in `probs` (an FKD file may not be)
    for _ in range(32):  # near ties only. Each pass raises every low code a step (6%) at least, and the
        # share, recovered in fp32 as 1 - sum P, may move up an ulp with them: at C = 10 a teacher's region
        # of 2e-7s (its rest 8e-7) needed 5 passes
        got = unpack_regions(torch.from_numpy(rec), k)[1]          # (..., k) as the trainer recovers it
        share = rest_share(got, num_classes).numpy() + slack
        got = got.numpy()
        low = (got < share) & ordered                                # inversions the code made
        if not low.any():
            return rec
        # a low stored class goes up to the code of the share at least (one step at least); a low derived P_1
        # (near ties at C - k = 1) is raised by lowering r instead
        up = low & ~((np.arange(k) == 0) & rest_stored[..., None])
        down = low[..., 0] & rest_stored
        c = rec[..., 4 + 2 * k:4 + 3 * k]                          # a view: edits the records
        with np.errstate(divide="ignore"):
            ceil = np.floor(-LOG_STEPS * (np.log2(np.maximum(share, 1e-300)) + 1)).clip(0, ZERO_CODE - 1)
        c[...] = np.where(up & (c > 0), np.minimum(c.astype(np.int64) - 1, ceil), c)
        c[..., 0] = np.where(down & (c[..., 0] < ZERO_CODE), c[..., 0] + 1, c[..., 0])
    raise AssertionError("pack_regions: a stored class stays below the rest's share")


def unpack_regions(rec, k):
    """rec (..., D) uint8 torch tensor -> (ids (..., k) int64, probs (..., k) float32, pgt (...) float32,
    flip (...) bool). Works on any device; used by the trainer on every batch."""
    ids = rec[..., 4:4 + 2 * k:2].long() | (rec[..., 5:5 + 2 * k:2].long() << 8)
    v = decode_probs(rec[..., 4 + 2 * k:4 + 3 * k])        # (..., k) stored values
    flags = rec[..., 4 + 3 * k + 1]
    rest_stored = (flags & 2).bool()
    probs = torch.cat([torch.where(rest_stored, 1 - v.sum(-1), v[..., 0])[..., None], v[..., 1:]], -1)
    pgt = rec[..., 4 + 3 * k].float() / 255
    return ids, probs, pgt, (flags & 1).bool()


def random_boxes(rng, heights, widths, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """One RandomResizedCrop box per entry of heights/widths (n,), in the pixels of that image, by
    torchvision's rule (`RandomResizedCrop.get_params`), vectorized: an area share in [scale] of H*W and a
    log-uniform aspect w/h in [ratio], rounded to whole pixels, the first of `tries` draws that fits; if none
    fits, the centred crop of the image's aspect clamped to [ratio]. The offset is uniform over the places the
    box fits. Returns (n, 4) int64 pixel boxes (top, left, bottom, right), bottom/right exclusive, and (n,)
    bool flips."""
    H, W = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    n = len(H)
    area = (H * W)[:, None] * rng.uniform(scale[0], scale[1], (n, tries))        # (n, tries) target areas
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, tries)))  # (n, tries) w / h
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint rounds half to even, as Python's round
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    rows, first = np.arange(n), np.argmax(fits, axis=1)
    w, h = w[rows, first], h[rows, first]
    u_top, u_left = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    top = np.floor(u_top * (H - h + 1)).astype(np.int64)      # torch.randint(0, H - h + 1)
    left = np.floor(u_left * (W - w + 1)).astype(np.int64)
    # fallback: the whole image when its aspect is within [ratio], else its centre at the nearest bound
    none = ~fits.any(axis=1)
    in_ratio = W / H
    fw = np.where(in_ratio > ratio[1], np.rint(H * ratio[1]).astype(np.int64), W)
    fh = np.where(in_ratio < ratio[0], np.rint(W / ratio[0]).astype(np.int64), H)
    w, h = np.where(none, fw, w), np.where(none, fh, h)
    top, left = np.where(none, (H - h) // 2, top), np.where(none, (W - w) // 2, left)
    flip = rng.uniform(0, 1, n) < 0.5
    return np.stack([top, left, top + h, left + w], axis=1), flip


def grid_boxes(px, heights, widths):
    """Pixel boxes (..., 4) of images heights x widths (broadcastable) -> uint8 on the 0..255 grid of each
    image, the nearest grid line to each edge (integer-only), each side at least one grid step. `box_pixels`
    maps them back: exactly for sides up to 255 px, within side/510 + 1/2 px per edge above."""
    px = np.asarray(px, np.int64)
    h = np.asarray(heights, np.int64)[..., None]
    w = np.asarray(widths, np.int64)[..., None]
    side = np.concatenate([h, w, h, w], axis=-1)
    q = np.clip((px * 255 + side // 2) // side, 0, 255)
    q[..., 0:2] = np.minimum(q[..., 0:2], 254)
    q[..., 2:4] = np.maximum(q[..., 2:4], q[..., 0:2] + 1)
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


def seeded_regions(seed, i, n, height, width, scale_min=0.08):
    """Image i's n regions, a function of (seed, i) only: boxes on the image's 0..255 grid (n, 4) uint8 and
    flips (n,) bool. The label builder stores them; the trainer replays them from the file."""
    px, flip = random_boxes(np.random.default_rng([seed, i]), np.full(n, height), np.full(n, width),
                            scale=(scale_min, 1.0))
    return grid_boxes(px, height, width), flip


def region_plan(qbox, flip, heights, widths):
    """The decoder's plan rows (..., 5) int32 for stored boxes: the box in pixels (`box_pixels`), then the
    flip."""
    return np.concatenate([box_pixels(qbox, heights, widths), np.asarray(flip, np.int32)[..., None]], axis=-1)


def whole_image_plan(heights, widths):
    """(N, 1, 5) plan rows: every image whole, unflipped."""
    n = len(heights)
    return region_plan(full_boxes(n), np.zeros(n, bool), heights, widths)[:, None]


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
    "cluttered-fashion-mnist": dict(res=32),  # the same images on 48x48 cluttered canvases (issue 35)
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

    def subset(self, n):
        """The images of `subset_images(labels, n)`, in index order (`labels.py build --subset=N`)."""
        idx = subset_images(self.labels, n)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return dataclasses.replace(self, labels=self.labels[idx], images=images)


def subset_images(labels, n):
    """--subset=N: N image indices (sorted) drawn without replacement, each class keeping its share of the
    dataset (largest remainders). A function of (labels, n) only, like a split: every rank, every resumption,
    every --seed and `labels.py build --subset=N` take the same images, so runs at different seeds differ
    only in training's randomness. The first N images of an image folder (sorted by class) were one or two
    classes."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[:n - quota.sum()]] += 1
    rng = np.random.default_rng([0, 1 << 21])  # its own stream, fixed: not any run's seed
    chosen = [rng.permutation(np.flatnonzero(labels == k))[:q] for k, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen))


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


# Cluttered Fashion-MNIST (issue 35): FerKD's premise is that random-resized crops differ, some showing the
# object, some background, some another object. On Fashion-MNIST the object fills the frame, so almost every
# crop shows it. Here each image is scaled to a random side in OBJECT_SIDES and placed at a random position on
# a CANVAS x CANVAS black canvas over CLUTTER_PATCHES square patches (sides in PATCH_SIDES) cut at random
# places from OTHER images of the same split (any class, so some crops show another class): the pattern of
# Cluttered MNIST (Jaderberg et al. 2015, "Spatial Transformer Networks", section 4.1). Layers are composited
# by their maximum (the images are bright objects on black), so the result does not depend on paste order.
# Every choice comes from one seed per split, and the arithmetic is exact (integer-valued float64), so every
# machine makes the same bytes, and so the same fingerprint, which label files are checked against.
CANVAS, OBJECT_SIDES, CLUTTER_PATCHES, PATCH_SIDES = 48, (16, 36), 4, (10, 18)  # sides in pixels, inclusive
CLUTTER_SEEDS = {"train": 35_0, "test": 35_1}  # issue 35; a different stream for each split


RESIZE_ONE = 2 ** 16  # the integer weights' unit: ~0.006 of a grey level of error, sums far below 2**53


def resize_weights(n_in, n_out, one=RESIZE_ONE):
    """(n_out, n_in) float64 integer weights, each row summing to exactly `one`: antialiased linear resampling
    (a triangle filter widened by the downscale factor, pixel centres aligned, as PIL's and torch's
    `interpolate(mode="bilinear", antialias=True)`), rounded to integers so that `w @ x @ w.T` is exact in
    float64 (every partial sum an integer below 2**53) whatever the BLAS's order of summation."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale                          # (n_out,) in input pixels
    w = np.maximum(0, 1 - np.abs(np.arange(n_in) + 0.5 - centre[:, None]) / support)  # (n_out, n_in)
    w = np.floor(w / w.sum(1, keepdims=True) * one + 0.5)
    w[np.arange(n_out), w.argmax(1)] += one - w.sum(1)                  # rows sum to `one` exactly
    return w


def resize_squares(images, side):
    """(n, s, s) uint8 -> (n, side, side) uint8 by `resize_weights`, rounded half up."""
    (n, s, _), w = images.shape, resize_weights(images.shape[1], side)
    cols = images.astype(np.float64).reshape(n * s, s) @ w.T            # (n * s, side): each row resized
    acc = (cols.reshape(n, s, side).transpose(0, 2, 1).reshape(n * side, s) @ w.T)  # then each column:
    acc = acc.reshape(n, side, side).transpose(0, 2, 1)                 # (n, side, side), exact integers
    return ((acc + RESIZE_ONE ** 2 // 2) // RESIZE_ONE ** 2).astype(np.uint8)


def clutter_layout(n, seed, source_side=28):
    """Every random choice of `cluttered_canvases` for n images, drawn at once from `seed`: the object's side
    and top-left corner (n,) each; for each of the CLUTTER_PATCHES patches (n, P): its source image (never the
    image itself: an offset of 1..n-1), its side, its top-left corner in the source and on the canvas."""
    rng = np.random.default_rng(seed)
    P, (lo, hi), (plo, phi) = CLUTTER_PATCHES, OBJECT_SIDES, PATCH_SIDES
    side = rng.integers(lo, hi + 1, n)
    top, left = rng.integers(0, CANVAS - side + 1), rng.integers(0, CANVAS - side + 1)
    source = (np.arange(n)[:, None] + rng.integers(1, n, (n, P))) % n   # (n, P) another image of the split
    pside = rng.integers(plo, phi + 1, (n, P))
    ptop, pleft = rng.integers(0, source_side - pside + 1), rng.integers(0, source_side - pside + 1)
    ctop, cleft = rng.integers(0, CANVAS - pside + 1), rng.integers(0, CANVAS - pside + 1)
    return dict(side=side, top=top, left=left, source=source, patch_side=pside, patch_top=ptop,
                patch_left=pleft, canvas_top=ctop, canvas_left=cleft)


def _paste_max(canvas, rows, top, left, tiles):
    """canvas[rows[i], top[i]:+s, left[i]:+s] = max(itself, tiles[i]) for (m, s, s) tiles, rows distinct."""
    r, (_, h, w) = np.arange(tiles.shape[1]), canvas.shape
    at = (rows * (h * w) + top * w + left)[:, None, None] + (r[:, None] * w + r)  # (m, s, s) flat indices
    flat = canvas.reshape(-1)
    flat[at] = np.maximum(flat[at], tiles)


def cluttered_canvases(images, seed):
    """(n, 28, 28) uint8 images -> (n, CANVAS, CANVAS) uint8 canvases and their `clutter_layout`. Vectorized
    by side: one resize and one paste per object side, one gather and paste per patch slot and side."""
    n = len(images)
    lay = clutter_layout(n, seed, images.shape[1])
    canvas = np.zeros((n, CANVAS, CANVAS), np.uint8)
    for p in range(CLUTTER_PATCHES):
        for s in np.unique(lay["patch_side"][:, p]):
            rows = np.flatnonzero(lay["patch_side"][:, p] == s)
            r = np.arange(s)
            src, ptop, pleft = (lay[k][rows, p] for k in ("source", "patch_top", "patch_left"))
            patch = images[src[:, None, None], (ptop[:, None] + r)[:, :, None], (pleft[:, None] + r)[:, None]]
            _paste_max(canvas, rows, lay["canvas_top"][rows, p], lay["canvas_left"][rows, p], patch)
    for s in np.unique(lay["side"]):
        rows = np.flatnonzero(lay["side"] == s)
        _paste_max(canvas, rows, lay["top"][rows], lay["left"][rows], resize_squares(images[rows], s))
    return canvas, lay


def load_dataset(data, split):
    """`data`: "digits" | "fashion-mnist" | "cluttered-fashion-mnist" | "imagefolder:/path" (with train/ and
    val/ class folders)."""
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
    if data in ("fashion-mnist", "cluttered-fashion-mnist"):
        root = _fashion_mnist_dir()
        prefix = "train" if split == "train" else "t10k"
        img_path, lab_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        if not img_path.exists():
            raise UserError(f"{img_path} not found: install Debian's dataset-fashion-mnist (./setup.sh does)")
        x, y = _read_idx(img_path), _read_idx(lab_path).astype(np.int64)
        if data == "cluttered-fashion-mnist":  # evaluated on the whole canvas, trained on crops at 32 px
            x = cluttered_canvases(x, CLUTTER_SEEDS[split])[0]
        else:
            x = np.pad(x, ((0, 0), (2, 2), (2, 2)))  # 28 -> 32: crops and strides divide evenly
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
    raise UserError(f"unknown dataset {data!r}: use digits, fashion-mnist, cluttered-fashion-mnist or "
                    "imagefolder:/path")


class _FFCVSource:
    """Indexable view of a Dataset (plus precomputed region records) for FFCV's writer. Images that are not
    arrays in memory (image files, bench.py's synthetic source) come already resized and JPEG-encoded by
    `_EncodedImages`, in index order, which is the order FFCV's one writer asks for them."""

    def __init__(self, ds, regions, encoded):
        self.ds, self.regions, self.encoded = ds, regions, encoded

    def __len__(self):
        return len(self.ds.labels)

    def __getitem__(self, i):
        img = self.ds.images[i] if self.encoded is None else self.encoded[i]
        item = (img, int(self.ds.labels[i]), i)
        return item if self.regions is None else item + (self.regions[i],)


MAX_SIDE, JPEG_QUALITY = 512, 90  # how image files are stored: longest side at most 512 px, JPEG quality 90
_images = None                    # in the writing process: the image source, set before the pool forks
_writer = _writer_errors = None   # and FFCV's writer, and the queue that takes its error to the parent


def _encode_image(i):
    """Image i as RGBImageField(write_mode="jpg") stores it, by FFCV's own functions (so the bytes are those
    FFCV would write): decoded to RGB, shrunk to MAX_SIDE, JPEG-encoded. Or the error line."""
    from ffcv.fields.rgb_image import encode_jpeg, resizer
    img = _images[i]
    if not isinstance(img, np.ndarray):
        from PIL import Image
        try:
            with Image.open(img) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises many types for bad files
            return f"cannot decode image {img}: {e}"
    img = resizer(img, MAX_SIDE)
    return img.shape[:2], encode_jpeg(img, JPEG_QUALITY)


def _store_encoded(destination, item, malloc):
    """RGBImageField.encode for an image `_encode_image` has encoded: the same metadata and bytes."""
    (destination["height"], destination["width"]), data = item
    destination["mode"] = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


class _EncodedImages:
    """`_encode_image` of 0, 1, 2, ... on every core, `ahead` blocks of images in flight, handed out in
    order."""

    def __init__(self, n, pool, block=32, ahead=None):
        self.n, self.pool, self.block = n, pool, block
        self.ahead = ahead or 4 * os.cpu_count()
        self.pending, self.submitted = collections.deque(), 0
        self.start, self.items = 0, []

    def __getitem__(self, i):
        while not self.start <= i < self.start + len(self.items):
            if i < self.start:
                raise RuntimeError(f"images are encoded in order; asked for {i} after {self.start}")
            while len(self.pending) < self.ahead and self.submitted < self.n:
                stop = min(self.n, self.submitted + self.block)
                self.pending.append((self.submitted, self.pool.map_async(_encode_image, range(self.submitted,
                                                                                               stop))))
                self.submitted = stop
            self.start, result = self.pending.popleft()
            self.items = result.get()
        item = self.items[i - self.start]
        if isinstance(item, str):
            raise UserError(item)
        return item


class _WriterThread(threading.Thread):
    """FFCV's writer worker as a thread of the writing process. FFCV's writer polls a counter its workers
    raise, so a worker that fails (a bad image, a full disk) would leave it waiting forever (NOTES.md): here
    the worker's error ends the writing process, which `write_beton` reports."""

    def run(self):
        try:
            super().run()
        except BaseException as e:
            _writer_failed(e)


def _writer_failed(e):
    """In the writing process: report the error, free FFCV's shared memory (it frees it only when it
    finishes), exit."""
    _writer_errors.put(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
    with contextlib.suppress(Exception):
        _writer.metadata_sm.unlink()
    os._exit(1)


def write_beton(path, ds, regions=None, quiet=None):
    """Write `ds` (and per-image region records) to an FFCV file at `path` (not atomic: callers write to a
    temporary name and rename). The bytes are a function of the inputs only: images are encoded on every
    core, then one thread writes them in index order. The writing runs in a child process in its own
    session, which this process waits for, then reports its error as one line; killed, the child goes too."""
    if quiet is None:  # progress only for a person at a terminal: logs and captured stderr stay clean
        quiet = not sys.stderr.isatty()
    global _writer_errors
    ctx = multiprocessing.get_context("fork")
    _writer_errors = ctx.SimpleQueue()
    child = ctx.Process(target=_write, args=(path, ds, regions, quiet))
    child.start()
    try:
        child.join()
    finally:  # done, failed or interrupted: end whatever is left of its group (the encoding pool)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.join()
    if child.exitcode != 0:
        error = _writer_errors.get() if not _writer_errors.empty() else f"exit code {child.exitcode}"
        raise UserError(error if error.startswith("cannot decode") else f"could not write {path}: {error}")


def _write(path, ds, regions, quiet):
    """write_beton's child process."""
    os.setsid()  # its own process group, with its pool, ended together; a terminal's Ctrl-C: the parent's
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: ends when the parent does, however it ends
    try:
        import ffcv.writer
        from ffcv.fields import IntField, NDArrayField, RGBImageField
        global _images, _writer
        raw = isinstance(ds.images, np.ndarray)
        image = RGBImageField(write_mode="raw" if raw else "jpg", max_resolution=None if raw else MAX_SIDE,
                              jpeg_quality=JPEG_QUALITY)
        fields = {"image": image, "label": IntField(), "index": IntField()}
        if regions is not None:
            fields["regions"] = NDArrayField(np.dtype("uint8"), regions.shape[1:])
        encoded = None
        if not raw:
            _images = ds.images
            pool = multiprocessing.get_context("fork").Pool(os.cpu_count())  # before any thread starts
            encoded = _EncodedImages(len(ds.labels), pool)
            image.encode = _store_encoded
        ffcv.writer.tqdm = functools.partial(ffcv.writer.tqdm, disable=quiet, desc="images", unit="img")
        ffcv.writer.Process = _WriterThread
        _writer = ffcv.writer.DatasetWriter(str(path), fields, num_workers=1)
        _writer.from_indexed_dataset(_FFCVSource(ds, regions, encoded), chunksize=256)
    except BaseException as e:
        _writer_failed(e)
    os._exit(0)


def dataset_beton(data, split, cache_dir="data"):
    """The cached FFCV file of a dataset split, images only (for CE training and evaluation), built on first
    use; the file name carries the dataset fingerprint, so a changed dataset gets a new file."""
    ds = load_dataset(data, split)
    safe = ds.name.replace("imagefolder:", "folder-").replace("/", "_").strip("_")
    path = Path(cache_dir) / f"{safe}-{split}-{ds.fingerprint()}.beton"

    def write():  # under torchrun one rank writes it (8 writers of one file would race), the others wait
        if not path.exists():
            print(f"caching the {split} split of {ds.name} in {path}", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: write_beton(tmp, ds))
    on_rank0(write)
    return path, ds

# -----------------------------------------------------------------------------
# Replaying regions: one FFCV decoder for the teacher (labels.py) and the student (ferkd.py)

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
    the compiled code reads it through its address, since numba would freeze a captured array. A stored JPEG
    that does not decode (TurboJPEG's status, which FFCV's own decoder ignores) sets `failed[0]` to its index
    + 1, a box that is empty or leaves its image `failed[1]`, read by `epoch_batches` before it hands out a
    batch: OpenCV would abort the process on either (a C++ exception, no error line), and an exception
    inside FFCV's pipeline thread would hang the loader, so nothing is left for them to refuse."""

    def __init__(self, plan, res):
        super().__init__()
        assert plan.dtype == np.int32 and plan.flags.c_contiguous and plan.ndim == 3 and plan.shape[2] == 5
        if not isinstance(res, (int, np.integer)) or res < 1:
            raise UserError(f"a crop must be resized to at least 1 x 1 px, got res={res!r}")
        self.plan, self.res = plan, int(res)
        self.failed = np.zeros(2, np.int64)  # [image that did not decode, image with a bad box], index + 1

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
        addr, shape, failed_addr = self.plan.ctypes.data, self.plan.shape, self.failed.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            dst, tmp = my_storage
            plan = numba.carray(_voidptr(addr), shape, np.int32)
            failed = numba.carray(_voidptr(failed_addr), (2,), np.int64)
            for b in my_range(len(batch_indices)):
                i = batch_indices[b]
                field = metadata[i]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    img = tmp[b]
                    if imdecode_c(data, img, height, width, height, width, 0, 0, 1, 1, False, False) != 0:
                        failed[0] = i + 1
                    img = img.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    img = data.reshape(height, width, 3)
                for j in range(shape[1]):
                    top, left, bottom, right, flip = plan[i, j]
                    out = dst[b, j]
                    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
                        failed[1] = i + 1  # OpenCV aborts on an empty or outside box: never call it
                        continue
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
                  drop_last=False, distributed=False, device=None):
    """FFCV loader yielding (images (B, n, res, res, 3) uint8, labels (B,), indices (B,)). Images and labels
    are on `device` when one is given, else on the CPU; indices stay on the CPU (they index host tables).
    Batches are FFCV's reused buffers: copy or consume them before the next one.

    The copy to a GPU is FFCV's ToDevice inside the pipeline, as in ffcv-imagenet: from pinned memory on a
    stream of its own, overlapped with the step, and a batch's buffers are not reused before the compute
    stream has passed the events FFCV records (ffcv/loader/epoch_iterator.py). `.to(cuda, non_blocking=True)`
    of the CPU batch in the training loop would not be safe: FFCV's host buffers are pinned, so the copy is
    asynchronous, and FFCV may rewrite the buffer while a GPU that lags the host has not read it yet."""
    import ffcv.loader.loader
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    ffcv.loader.loader.OSCacheManager = _mapped_file()  # the name FFCV's Loader makes its os_cache manager by
    threads = torch.get_num_threads()
    to_device = [] if device is None else [ToDevice(torch.device(device), non_blocking=True)]
    crop = RegionCrop(plan, res)
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                    order={"sequential": OrderOption.SEQUENTIAL, "random": OrderOption.RANDOM}[order],
                    seed=seed, indices=indices, drop_last=drop_last, distributed=distributed, os_cache=True,
                    pipelines={"image": [crop, ToTensor(), *to_device],
                               "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device],
                               "index": [IntDecoder(), ToTensor(), Squeeze(1)],
                               "regions": None})
    torch.set_num_threads(threads)  # FFCV sets torch's global thread count to num_workers
    loader.failed_image = crop.failed  # for epoch_batches
    return loader


def _mapped_file():
    from ffcv.memory_managers.os_cache import OSCacheContext, OSCacheManager

    class MappedFile(OSCacheManager):
        """FFCV's os_cache memory manager (the file mapped, the page cache shared by a node's processes) without
        the tables its base class builds in a Python loop over every sample (sample_to_pages, page_to_samples,
        ptr_to_size), which only the process cache and QUASI_RANDOM order read, neither used here: 0.76 s of
        every loader's construction at 160,146 images, about 6 s per loader (one per training resolution) at
        ImageNet size (issue 32). What the reader needs: the allocations' addresses, sorted, and their sizes."""

        def __init__(self, reader):  # noqa: the base's __init__ is what is skipped
            self.reader = reader
            order = np.argsort(reader.alloc_table["ptr"])
            self.ptrs, self.sizes = reader.alloc_table["ptr"][order], reader.alloc_table["size"][order]
            self.context = OSCacheContext(self)
    return MappedFile


class _Epoch(EpochIterator):
    """FFCV's epoch: a thread that runs the pipeline a few batches ahead of the consumer. FFCV catches only
    StopIteration in that thread, so any other exception (a numba error, CUDA out of memory in ToDevice) left
    the consumer waiting forever (NOTES.md); here the thread keeps it and wakes the consumer."""
    error = None

    def run(self):
        try:
            super().run()
        except BaseException as e:  # noqa: B036 - whatever ends the thread must reach the consumer
            self.error = e
            self.output_queue.put(None)  # the consumer's next() ends the epoch; epoch_batches raises it


def epoch_order(loader, epoch):
    """The images of `epoch` in the order this rank reads them. FFCV seeds its random order with seed + epoch
    (one process) or seed + epoch through DistributedSampler (DDP), so seed s at epoch e + 1 replays seed
    s + 1 at epoch e and runs of nearby seeds share their data orders (NOTES.md). Here the permutation comes
    from a hash of (seed, epoch) (numpy's SeedSequence), the same on every rank, padded and dealt out as
    DistributedSampler does (ranks take every world-th image, the first images repeat to fill the last
    round), so the epoch has FFCV's length on every rank. Sequential order is FFCV's."""
    order = loader.traversal_order
    if not isinstance(order, Random):
        return order.sample_order(epoch)
    perm = np.random.default_rng([order.seed, epoch]).permutation(order.indices)
    if order.distributed:
        world, rank = order.sampler.num_replicas, order.sampler.rank
        perm = np.resize(perm, order.sampler.total_size)[rank::world]  # resize repeats from the start
    return perm


def epoch_batches(loader, epoch, skip=0):
    """FFCV's batches of `epoch`, starting after the first `skip` (a resumed epoch), as Loader.__iter__ makes
    them, plus four things it lacks: torch's thread count is kept (FFCV sets it to num_workers at every epoch
    start, which would run a CPU step or teacher on 2 threads on any machine); a failure in the pipeline
    thread is raised here instead of hanging; a stored image that does not decode stops the epoch before its
    batch is handed out, naming the image; a consumer that stops early never hangs (FFCV's thread can block
    forever on a full queue at the epoch's end). The order is `epoch_order`'s; skipped images are not decoded."""
    from ffcv.pipeline.compiler import Compiler
    threads = torch.get_num_threads()
    Compiler.set_num_threads(loader.num_workers)  # as __iter__ does (it also sets torch's thread count)
    order = epoch_order(loader, epoch)[:len(loader) * loader.batch_size]
    batches = _Epoch(loader, order[skip * loader.batch_size:])  # the Loader compiled its pipeline when made
    torch.set_num_threads(threads)
    try:
        for batch in batches:
            if loader.failed_image[0]:
                raise UserError(f"image {loader.failed_image[0] - 1} of {loader.reader.file_name} does not "
                                f"decode: the file is corrupt; rebuild it")
            if loader.failed_image[1]:
                raise UserError(f"a region box of image {loader.failed_image[1] - 1} of "
                                f"{loader.reader.file_name} is empty or outside the image (a label file made "
                                f"for other images?)")
            yield batch
        if batches.error is not None:
            raise UserError(f"the data loader failed ({type(batches.error).__name__}: {batches.error})")
    finally:  # also when the consumer stops early: stop the thread and wait for it (exiting under it aborts).
        batches.terminate_event.set()  # its puts of batches wait at most 0.5 s and then see this; its last put
        while batches.is_alive():      # (the epoch's end, or an error) waits for room: take what it holds
            try:
                batches.output_queue.get(timeout=0.05)
            except queue.Empty:
                pass
        batches.close()


def to_model_input(images, device, mean=MEAN, std=STD):
    """(B, n, H, W, 3) uint8 -> (B*n, 3, H, W) float normalized, channels-last, on `device`. The images
    should already be there (region_loader's `device`); a CPU batch is copied synchronously."""
    x = images.to(device).flatten(0, 1).permute(0, 3, 1, 2)
    m, s = _normalization(torch.device(device), tuple(mean), tuple(std))
    return ((x.float() - m) / s).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def _normalization(device, mean, std):
    """mean * 255 and std * 255 as (1, 3, 1, 1) tensors on `device`, made once: made per batch, each would be
    a copy from the host that waits for the GPU, on every training step."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (mean, std))

# -----------------------------------------------------------------------------
# The label file header

def _ffcv_header_type():
    """FFCV's file header dtype and the byte offset of its allocation table pointer."""
    from ffcv.types import HeaderType
    return HeaderType, HeaderType.fields["alloc_table_ptr"][1]


def alloc_table_ptr(path):
    """Where FFCV's allocation table starts in the file at `path` (FFCV's header points to it)."""
    HeaderType, _ = _ffcv_header_type()
    return int(np.fromfile(path, dtype=HeaderType, count=1)[0]["alloc_table_ptr"])


def set_alloc_table(path, ptr, table):
    """Write FFCV's allocation table `table` (bytes) at `ptr`, end the file after it, and point FFCV's
    header there. `attach_header` moves the table this way; a resumed build puts it back with it."""
    _, off = _ffcv_header_type()
    with open(path, "r+b") as f:
        f.seek(ptr)
        f.write(table)
        f.truncate()
        f.seek(off)
        f.write(struct.pack("<Q", ptr))
        f.flush()
        os.fsync(f.fileno())


def attach_header(path, header):
    """Insert our JSON header before FFCV's allocation table and point FFCV's header past it."""
    ptr = alloc_table_ptr(path)
    payload = json.dumps(header, sort_keys=True).encode()
    with open(path, "r+b") as f:
        f.seek(ptr)
        table = f.read()
        f.seek(ptr)
        f.write(payload + struct.pack("<QQ", len(payload), len(table)) + MAGIC)
    set_alloc_table(path, ptr + len(payload) + 24, table)


def read_header(path, rebuild_hint="re-run `python labels.py build ...`"):
    """Our header of a label file, after checking that the file is whole. Raises UserError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} not found; build it with "
                        f"`python labels.py build --out={path} ...`")
    HeaderType, _ = _ffcv_header_type()
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
        command = "import" if "source" in header else "build"  # what made it: a teacher, or FKD's label files
        raise UserError(f"{path} has label schema {header.get('schema')}, this code reads {SCHEMA_VERSION}; "
                        f"rebuild it: {rebuild_hint.replace('labels.py build', 'labels.py ' + command)}")
    return header


def region_slots(path):
    """(N,) int64 file offsets of each image's region record, from FFCV's metadata."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    return reader.metadata[f"f{reader.field_names.index('regions')}"].astype(np.int64)


def region_blocks(path, nbytes, slots=None):
    """Each image's nbytes of region records, in image order, read into one reused buffer (copy what you
    keep). Plain reads, not a memory map: a pass over the table maps no file pages into this process (they
    would count in its resident memory) and holds no per-region index or copy. A short read leaves zeros: the
    CRC fails."""
    buf = np.zeros(nbytes, np.uint8)
    with open(path, "rb", buffering=0) as f:
        for s in region_slots(path) if slots is None else slots:
            buf[:] = 0
            f.seek(s)
            f.readinto(buf)
            yield buf


def regions_crc32(path, nbytes):
    crc = 0
    for block in region_blocks(path, nbytes):
        crc = zlib.crc32(block, crc)
    return crc


def checked_blocks(path, header):
    """Each image's region records in image order (one reused buffer), then a UserError if they fail the
    header's CRC or count."""
    crc, n = 0, 0
    for block in region_blocks(path, header["regions"] * header["region_bytes"]):
        crc, n = zlib.crc32(block, crc), n + 1
        yield block
    if crc != header["regions_crc32"] or n != header["images"]:
        raise UserError(f"{path}: region records fail their checksum (corrupt file); "
                        f"re-run `python labels.py build`")

# -----------------------------------------------------------------------------
# The region table: one memory-mapped copy of the records beside the label file
#
# FFCV stores each image's records beside its pixels, so the file's own records cannot be mapped as one
# array. `read_regions` writes them once, in image order, to LABELS.CRC.regions (CRC: the header's
# regions_crc32, 8 hex digits) and every process maps that copy: the processes of a node share its pages in
# the page cache (at ImageNet size 7.5 GiB once per node, not once per rank). The copy starts with one page of
# its own header, which names the label file it was made from (size, modification time, CRC, shape): a start
# that finds a matching header maps the copy without reading the records again (issue 32: re-checksumming
# 7.5 GiB took most of a 30 s start-up), and a copy that does not match is written again. Files of the
# copy's protocol, all beside the label file and named after it:
#     LABELS.CRC.regions                 the copy (header page, then the (N, R, D) records)
#     .LABELS.CRC.regions.lock           held by the one process writing the copy: "host pid"
#     .LABELS.CRC.regions.tmp.HOST.PID   the copy being written; renamed into place when whole

COPY_HEADER = 4096     # bytes before the records: the copy's header, one page (the records map page-aligned)
COPY_WAIT_S = 1800.0   # the longest a process waits for another to write the copy, then one error line
COPY_STALE_S = 120.0   # a lock unchanged this long has lost its writer (a writer touches it every second)


def region_copy_path(path, header):
    return Path(f"{path}.{header['regions_crc32']:08x}.regions")


def read_regions(path, header, copy=True):
    """All region records of a label file as a read-only (N, R, D) uint8 array, checked against the header's
    CRC when read from the file. With copy=True (train, the label build's readers), the memory-mapped copy
    beside the file, written first if it is missing or stale. Of the processes that start together, on one
    node or several nodes sharing the folder, one writes it (it holds the lock) and the others wait, then map
    it. With copy=False (inspect, show, fidelity: commands that only read), an existing copy is mapped and
    nothing is written. Wherever there is no copy to map (a read-only folder, a full disk, copy=False), the
    process reads its own copy into memory: N R D bytes, one warning line when a copy was wanted."""
    path = Path(path)
    copy_path = region_copy_path(path, header)
    shape = (header["images"], header["regions"], header["region_bytes"])
    identity = _copy_identity(path, header)
    if not copy:
        table = _map_copy(copy_path, identity, shape)
        return table if table is not None else _private_table(path, header)
    result = []  # every rank goes through on_all_ranks: one rank's error stops all of them
    on_all_ranks(lambda: result.append(_shared_table(path, header, copy_path, identity)))
    return result[0]


def _copy_identity(path, header):
    """The copy's header page: what it was made from. Equal bytes prove the copy matches the label file."""
    st = path.stat()
    made_from = dict(label_file=path.name, size=st.st_size, mtime_ns=st.st_mtime_ns, schema=header["schema"],
                     regions_crc32=header["regions_crc32"], images=header["images"],
                     regions=header["regions"], region_bytes=header["region_bytes"])
    text = b"FERKD region copy 1\n" + json.dumps(made_from, sort_keys=True).encode() + b"\n"
    return text.ljust(COPY_HEADER, b"\0")


def _map_copy(copy_path, identity, shape):
    """The copy mapped read-only, or None if there is none or it was made from anything else."""
    try:
        with open(copy_path, "rb") as f:
            head, size = f.read(COPY_HEADER), os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if head != identity or size != COPY_HEADER + int(np.prod(shape)):
        return None
    return np.memmap(copy_path, np.uint8, "r", offset=COPY_HEADER, shape=shape)


def _private_table(path, header):
    """This process's own copy of the records, read from the label file and checked."""
    N = header["images"]
    table = np.empty((N, header["regions"] * header["region_bytes"]), np.uint8)
    for i, block in enumerate(checked_blocks(path, header)):
        if i < N:
            table[i] = block
    return table.reshape(N, header["regions"], header["region_bytes"])


def _fallback(path, header, why):
    print(f"warning: {why}; this process reads its own copy of {path}'s region records into memory "
          f"({header['images'] * header['regions'] * header['region_bytes'] / 2**30:.2f} GiB)",
          file=sys.stderr, flush=True)
    return _private_table(path, header)


def _shared_table(path, header, copy_path, identity):
    """The copy mapped, after this process wrote it or waited for the process that does (see read_regions).
    The lock is a file made with O_EXCL, which works on local and network filesystems alike. Its writer
    touches it every second; a waiter takes the lock over when its holder is a dead process of this host, or
    when the lock has not changed for COPY_STALE_S of the waiter's own clock (no clock is compared across
    nodes). Two writers at once would only cost time: each writes its own temporary, the same bytes."""
    shape = (header["images"], header["regions"], header["region_bytes"])
    lock = copy_path.with_name(f".{copy_path.name}.lock")
    me = f"{socket.gethostname()} {os.getpid()}"
    start, last, last_change, waited = time.monotonic(), None, 0.0, False
    while True:
        table = _map_copy(copy_path, identity, shape)
        if table is not None:
            return table
        if not os.access(copy_path.parent, os.W_OK):
            return _fallback(path, header, f"cannot write in {copy_path.parent}")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            return _fallback(path, header, f"cannot make {lock} ({e})")
        else:
            os.write(fd, me.encode())
            os.close(fd)
            return _write_copy(path, header, copy_path, identity, lock, me)
        try:  # another process holds the lock: wait for its copy
            with open(lock, "rb") as f:
                now = (f.read(200).decode(errors="replace"), os.fstat(f.fileno()).st_mtime_ns)
        except FileNotFoundError:  # released: its copy is there (the loop maps it), or its writer gave up
            if waited and _map_copy(copy_path, identity, shape) is None:
                return _fallback(path, header, f"the process that was writing {copy_path} gave up")
            continue
        clock = time.monotonic()
        if now != last:
            last, last_change, waited = now, clock, True
        holder = now[0].split()
        dead = len(holder) == 2 and holder[0] == socket.gethostname() and not _alive(holder[1])
        if dead or clock - last_change > COPY_STALE_S:
            print(f"{lock}: its writer ({now[0]}) is gone; taking over", file=sys.stderr, flush=True)
            for stale in (lock, copy_path.with_name(f".{copy_path.name}.tmp.{'.'.join(holder)}")):
                with contextlib.suppress(OSError):
                    stale.unlink()
            last, waited = None, False
            continue
        if clock - start > COPY_WAIT_S:
            raise UserError(f"waited {COPY_WAIT_S:.0f} s for {now[0]} to write {copy_path}; if no process is "
                            f"writing it, delete {lock} and start again")
        time.sleep(0.5)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True  # not ours to signal, or not a pid: assume it runs
    return True


def _write_copy(path, header, copy_path, identity, lock, me):
    """Write the copy under the lock: the stale copies of this label file go first (they may be what fills
    the disk), then a temporary, renamed into place when whole. Any OSError on the way (a full disk, a
    quota) removes the temporary and falls back to a private copy; a UserError (the records fail their
    checksum) is raised as is. The lock is released before either."""
    shape = (header["images"], header["regions"], header["region_bytes"])
    tmp = copy_path.with_name(f".{copy_path.name}.tmp.{me.replace(' ', '.')}")
    need, error = len(identity) + int(np.prod(shape)), None
    try:
        table = _map_copy(copy_path, identity, shape)  # written by the lock's last holder while we looked
        if table is not None:
            return table
        copy_path.unlink(missing_ok=True)  # a copy made from an earlier state of the file: its space first
        remove_stale_copies(path, header["regions_crc32"])
        free = shutil.disk_usage(copy_path.parent).free
        if free < need:
            raise OSError(errno.ENOSPC, f"{need / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free")
        print(f"writing {copy_path}, a copy of the region records ({need / 2**30:.2f} GiB), once for this "
              f"label file", flush=True)
        with open(tmp, "wb") as f:
            f.write(identity)
            beat = time.monotonic()
            for block in checked_blocks(path, header):
                f.write(block)
                if time.monotonic() - beat > 1:
                    os.utime(lock)  # the heartbeat waiters watch
                    beat = time.monotonic()
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the copy
        os.replace(tmp, copy_path)
    except OSError as e:
        error = f"could not write {copy_path} ({e})"
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        mine = False
        with contextlib.suppress(OSError), open(lock, "rb") as f:
            mine = f.read(200).decode(errors="replace") == me
        if mine:  # released after the rename: a waiter that finds no lock finds the copy
            with contextlib.suppress(OSError):
                lock.unlink()
    if error is not None:
        return _fallback(path, header, error)
    return _map_copy(copy_path, identity, shape)


def remove_stale_copies(path, keep_crc):
    """Delete this label file's copies for other CRCs (it was rebuilt since), with their leftover locks and
    temporaries: only files named by the copy's pattern for this file's name, in its folder."""
    name = re.escape(Path(path).name)
    ours = re.compile(rf"{name}\.([0-9a-f]{{8}})\.regions"                    # a copy
                      rf"|\.{name}\.([0-9a-f]{{8}})\.regions\.(?:lock|tmp\..+)")  # its lock, a temporary
    for p in Path(path).parent.iterdir():
        m = ours.fullmatch(p.name)
        if m and (m.group(1) or m.group(2)) != f"{keep_crc:08x}":
            with contextlib.suppress(OSError):  # a folder of that name, or not ours to delete: left alone
                p.unlink()
