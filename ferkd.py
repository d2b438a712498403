"""
Train a student from stored region soft labels: FKD (Shen & Xing, ECCV 2022) and FerKD (Shen et al., 2023).

    python ferkd.py train --data=fashion-mnist --kd=none --arch=small64 --run_dir=runs/teacher
    python labels.py build --data=fashion-mnist --teacher=runs/teacher/final.pt --out=data/fm.beton
    python ferkd.py train --data=fashion-mnist --labels=data/fm.beton --kd=fkd --arch=small16 \
        --run_dir=runs/fkd
    torchrun --nproc_per_node=8 ferkd.py train ...     # one process per device
    python ferkd.py eval --ckpt=runs/fkd/final.pt      # top-1, top-5, per-class accuracy
    python ferkd.py export --ckpt=runs/fkd/final.pt --out=fkd.pt2
    python ferkd.py plot runs/teacher runs/fkd         # top-1 vs epoch and vs wall time -> runs/plot.png

Modes: `--kd=none` trains with RandomResizedCrop and label-smoothed cross-entropy (no label file, the baseline
and the way to train a teacher); `--kd=fkd` replays the stored regions of a label file and learns from the
teacher's top-k soft labels, never running a teacher (`--regions=R'` replays the first R' of each image's
stored regions only); `--kd=ferkd` adds FerKD's calibration by p_gt; `--kd=kd --teacher=T` is online KD, the
method FKD approximates: the teacher scores every training crop of every step (Hinton et al. 2015).
The final line printed is a JSON object of the final metrics; `RUN_DIR/final.pt` holds the student.
Checkpoints (`RUN_DIR/ckpt-STEP.pt`, every --ckpt_every steps and each epoch) resume bit-exactly on CPU:
re-run the same command, or add --resume to insist on it.
"""
import csv
import dataclasses
import functools
import importlib.metadata
import io
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from beton import (MEAN, STD, center_boxes, dataset_beton, epoch_batches, grid_boxes, image_sizes,
                   load_dataset, random_boxes, read_header, read_regions, region_loader, region_plan,
                   subset_images, to_model_input, unpack_regions, whole_image_plan)
from kernels_triton import ferkd_loss, region_category
from models import (ARCHS, CHUNK_IMAGES, FERKD_DEFAULTS, PRECISION_NAMES, autocast_dtype, build_model, cpuinfo,
                    check_teacher, check_thresholds, checkpoint_eval, checkpoint_res, load_checkpoint,
                    load_teacher, category_lut, category_shares, region_scores, save_checkpoint,
                    threshold_defaults)
from runtime import BOOL_WORDS, UserError, atomic_write, parse_config, print0, run_cli, setup_distributed

# -----------------------------------------------------------------------------
# Config

@dataclass(frozen=True)
class TrainConfig:
    data: str = "fashion-mnist"   # digits | fashion-mnist | imagefolder:/path (test split for evaluation)
    labels: str = ""              # label file from `labels.py build` (kd=fkd|ferkd)
    kd: str = "none"              # none: CE baseline | fkd: stored soft labels | ferkd: + calibration |
                                  # kd: online KD, --teacher scores every training crop (Hinton et al.)
    teacher: str = ""             # kd=kd: the teacher (any `labels.py build` teacher: CKPT.pt, torchvision:,
                                  # timm:), run in eval mode without gradients on each step's crops
    temperature: float = 1.0      # kd=kd: T of both softmaxes, loss x T^2 (fkd/ferkd: the label file's T)
    regions: int = 0              # fkd/ferkd: replay only each image's first R' stored regions (0: all R)
    arch: str = "small32"         # see models.ARCHS
    epochs: int = 5
    batch_size: int = 256         # images per optimizer step, all processes together
    crops: int = 1                # regions decoded per image per step (FKD's num_crops); rows: batch*crops
    lr: float = 0.2               # peak SGD learning rate for batch_size*crops = 256 rows, scaled linearly
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.5    # linear warm-up, then cosine to zero
    label_smoothing: float = 0.1  # kd=none only
    res: int = 0                  # training resolution; 0: the label file's, or the dataset default (a stored
                                  # region is a box on the image: it is cut at any size)
    min_res: int = 0              # progressive resizing (ffcv-imagenet): train at min_res until --ramp_start,
                                  # then rise linearly to --res at --ramp_end (rounded to --res_step between
                                  # them, never outside [min_res, res]); 0: off
    ramp_start: int = 0           # epoch (0-based) where the ramp leaves min_res
    ramp_end: int = 0             # epoch where it reaches --res
    res_step: int = 32            # the ramp's resolutions are multiples of this (ImageNet: 32)
    eval_res: int = 0             # evaluation resolution; 0: the (final) training resolution
    eval_ratio: float = 224 / 256  # image folders: evaluation centre crop's side / the image's shorter side
    scale_min: float = 0.08       # kd=none RandomResizedCrop area range (labels fix it for fkd/ferkd)
    thresholds: str = ""          # FerKD: p_gt: t_* compare each region's p_gt | rank: its place in its image
                                  # by p_gt, 0 (lowest) to 1 (highest): per-image hard-region mining
    t_low: float = -1.0           # FerKD: regions with p_gt < t_low are dropped
    t_mid: float = -1.0           # FerKD: t_low <= p_gt < t_mid is a hard region, trained on softened truth
    t_top: float = -1.0           # FerKD: regions with p_gt > t_top are dropped
    eps: float = 0.1              # FerKD: smoothing of hard regions' ground truth
    mix: str = "none"             # none | cutmix | mixup: SelfMix (needs --crops >= 2), rows mix two regions
    mix_prob: float = 0.0         # probability that a row is mixed
    mix_alpha: float = 1.0        # lambda ~ Beta(alpha, alpha): the share of the row's own region
    mix_source: str = "self"      # self: the other region of the same image (SelfMix) | batch: another image
    subset: int = 0               # train on N images only (0: all): a class-stratified sample (each class's
                                  # share kept), the same N images at every --seed, on every rank and on
                                  # resume, and those of `labels.py build --subset=N` (beton.subset_images)
    seed: int = 0
    run_dir: str = "runs/default"
    num_workers: int = 2          # FFCV decoding threads per process
    device: str = "auto"          # auto | cpu | cuda
    amp: str = "auto"             # auto | true | false: autocast precision (models.autocast_dtype): auto =
                                  # bf16 on native-bf16 hardware, fp16 + GradScaler on older GPUs, else fp32
    compile: str = "auto"         # true | false | auto: torch.compile the model in place; auto = on CUDA only
    loss_kernel: str = "auto"     # fkd/ferkd loss: auto = the Triton kernel on CUDA, the definition on CPU |
                                  # triton | torch (kernels_triton.ferkd_loss; the same loss either way)
    ckpt_every: int = 1000        # steps between checkpoints (and one at each epoch's end); 0: epochs only
    keep_ckpts: int = 2           # how many of the newest ckpt-STEP.pt files to keep
    resume: bool = False          # insist on resuming (an error if run_dir holds no checkpoint)
    overwrite: bool = False       # discard what run_dir holds and start again
    tensorboard: bool = True      # also log to RUN_DIR/tb when the tensorboard package is installed

    def __post_init__(self):  # calibration flags left unset ("", -1) take the mode's defaults
        defaults = FERKD_DEFAULTS if self.kd == "ferkd" else NEUTRAL
        object.__setattr__(self, "thresholds", self.thresholds or defaults["thresholds"])
        for name, value in threshold_defaults(self.thresholds, defaults).items():
            if getattr(self, name) == -1.0:
                object.__setattr__(self, name, value)


# --kd=ferkd's defaults are FERKD_DEFAULTS (models.py, where `labels.py show` reads them too, with the study
# that chose them)
NEUTRAL = dict(thresholds="p_gt", t_low=0.0, t_mid=0.0, t_top=1.0)  # every region kept as labelled: FKD


# Flags that may change between a run and its resumption: they do not change what is computed
# (device: a run may move machines, at the price of bit-exactness; amp with it, since auto's precision
# follows the device)
RESUME_HARMLESS = {"run_dir", "num_workers", "device", "amp", "compile", "loss_kernel", "ckpt_every",
                   "keep_ckpts", "resume",
                   "overwrite", "tensorboard"}


def check_config(c):
    if c.kd not in ("none", "fkd", "ferkd", "kd"):
        raise UserError(f"--kd must be none, fkd, ferkd or kd, got {c.kd!r}")
    if c.kd in ("fkd", "ferkd") and not c.labels:
        raise UserError(f"--kd={c.kd} needs --labels=FILE.beton (build it with `python labels.py build`)")
    if (c.kd == "kd") != bool(c.teacher) or (c.kd == "kd" and c.labels):
        raise UserError("--kd=kd (online KD) takes --teacher=T and no --labels; --teacher acts only with it")
    if c.temperature <= 0 or (c.temperature != 1 and c.kd != "kd"):
        raise UserError("--temperature must be > 0 and acts only with --kd=kd (fkd/ferkd use the labels' T)")
    if c.regions < 0 or (c.regions and c.kd not in ("fkd", "ferkd")):
        raise UserError("--regions must be >= 0 and acts only with --kd=fkd or --kd=ferkd")
    if c.arch not in ARCHS:
        raise UserError(f"unknown --arch={c.arch}; choose one of {', '.join(ARCHS)}")
    for name in ("epochs", "batch_size", "crops", "num_workers", "keep_ckpts"):
        if getattr(c, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(c, name)}")
    if c.lr <= 0 or c.weight_decay < 0 or not 0 <= c.momentum < 1 or c.warmup_epochs < 0:
        raise UserError("--lr must be > 0, --weight_decay >= 0, --momentum in [0, 1), --warmup_epochs >= 0")
    if c.thresholds not in ("p_gt", "rank") or (c.thresholds == "rank" and c.kd != "ferkd"):
        raise UserError(f"--thresholds takes p_gt or rank (rank with --kd=ferkd), got {c.thresholds!r}")
    check_thresholds(c.t_low, c.t_mid, c.t_top, c.thresholds)
    if not 0 <= c.eps < 1:
        raise UserError(f"--eps must be in [0, 1), got {c.eps}")
    if c.kd == "fkd" and (c.t_low, c.t_mid, c.t_top) != (0.0, 0.0, 1.0):
        raise UserError("--t_low/--t_mid/--t_top act only with --kd=ferkd")
    if c.mix not in ("none", "cutmix", "mixup") or c.mix_source not in ("self", "batch"):
        raise UserError("--mix must be none, cutmix or mixup and --mix_source self or batch")
    if not 0 <= c.mix_prob <= 1 or c.mix_alpha <= 0:
        raise UserError("--mix_prob must be in [0, 1] and --mix_alpha > 0")
    if c.mix != "none" and c.kd in ("none", "kd"):
        raise UserError("--mix mixes stored regions and their labels: use it with --kd=fkd or --kd=ferkd")
    if c.mix != "none" and c.mix_source == "self" and c.crops < 2:
        raise UserError("SelfMix mixes two regions of one image: it needs --crops >= 2")
    if c.subset < 0 or c.res < 0 or c.eval_res < 0 or c.ckpt_every < 0:
        raise UserError("--subset, --res, --eval_res and --ckpt_every must be >= 0")
    ramp_ok = 0 <= c.ramp_start < c.ramp_end <= c.epochs and c.res_step >= 1
    if c.min_res < 0 or (c.min_res and not ramp_ok):
        raise UserError("progressive resizing (--min_res > 0) needs 0 <= --ramp_start < --ramp_end <= "
                        "--epochs and --res_step >= 1")
    if c.min_res and c.res and c.min_res > c.res:  # (a --res taken from the label file: training_data)
        raise UserError(f"--min_res={c.min_res} is above --res={c.res}: the ramp rises from min_res to res")
    if not 0 < c.eval_ratio <= 1:
        raise UserError(f"--eval_ratio must be in (0, 1], got {c.eval_ratio}")
    if c.loss_kernel not in ("auto", "triton", "torch"):
        raise UserError(f"--loss_kernel takes auto, triton or torch, got {c.loss_kernel!r}")
    if c.compile.lower() not in (*BOOL_WORDS, "auto"):
        raise UserError(f"--compile takes true or false (or auto: on CUDA only), got {c.compile!r}")
    check_amp(c.amp)
    check_flags_act(c)


# Flags that act only in some modes: (flag, does it act under config c, where it acts). Set to anything but
# its default where it does not act, a flag would be silently ignored: refused instead (issue 32).
FLAGS_ACT = [
    ("label_smoothing", lambda c: c.kd == "none", "--kd=none (the others learn a teacher's soft labels)"),
    ("scale_min", lambda c: c.kd in ("none", "kd"),
     "--kd=none or --kd=kd (fkd/ferkd replay the label file's stored regions)"),
    ("ramp_start", lambda c: c.min_res > 0, "--min_res (progressive resizing)"),
    ("ramp_end", lambda c: c.min_res > 0, "--min_res (progressive resizing)"),
    ("res_step", lambda c: c.min_res > 0, "--min_res (progressive resizing)"),
    ("eps", lambda c: c.kd == "ferkd" and c.t_mid > c.t_low,
     "--kd=ferkd with hard regions (--t_mid > --t_low): it smooths their ground truth"),
    ("mix_prob", lambda c: c.mix != "none", "--mix=cutmix or --mix=mixup"),
    ("mix_alpha", lambda c: c.mix != "none", "--mix=cutmix or --mix=mixup"),
    ("mix_source", lambda c: c.mix != "none", "--mix=cutmix or --mix=mixup"),
]


def check_flags_act(c):
    """One error line for a flag set where it does nothing (FLAGS_ACT), and for a mix that mixes nothing."""
    defaults = TrainConfig()
    for name, acts, where in FLAGS_ACT:
        if getattr(c, name) != getattr(defaults, name) and not acts(c):
            raise UserError(f"--{name}={getattr(c, name)} acts only with {where}")
    if c.mix != "none" and c.mix_prob == 0:
        raise UserError(f"--mix={c.mix} with --mix_prob=0 mixes no row: set --mix_prob > 0")


def check_amp(amp):
    if amp.lower() not in (*BOOL_WORDS, "auto"):
        raise UserError(f"--amp takes auto, true or false, got {amp!r}")


def use_compile(c, device):
    """auto: compile on CUDA only. On this CPU a cold compile costs 1-2 min against a ~1.07x steady gain
    (NOTES.md), which small CPU runs never earn back."""
    return device.type == "cuda" if c.compile.lower() == "auto" else BOOL_WORDS[c.compile.lower()]

# -----------------------------------------------------------------------------
# Data: which regions each epoch replays, and the targets the loss sees

def threshold_scores(c, header, table):
    """What FerKD's thresholds compare for every stored region (models.region_scores): the stored p_gt byte, a
    view of the table, or with --thresholds=rank its place in the image, which reads the whole table (4.1-4.7
    s at 1.28M x 300 on 2 cores, `bench.py plan`): computed once per run, for the plan's categories and the
    loss alike."""
    return region_scores(table, header["k"], c.thresholds == "rank")


def region_plans(c, header, table, heights, widths, scores=None):
    """Returns (plan, fill(epoch) -> choice, kept image indices, category_lut or None: a region's category is
    lut[its score]).
    `scores`: threshold_scores(c, header, table), if already computed.
    `fill` writes the epoch's pixel boxes into the decoder's plan (N, crops, 5) in place and returns the
    region chosen for each (image, crop), or None. Chosen once per run, so the step never branches on the
    mode. Per region it holds a bit (kept or dropped); the table is mapped and the rank scores are a byte; wider
    temporaries are per chunk."""
    N = len(heights)
    plan = np.zeros((N, c.crops, 5), np.int32)
    if table is None:  # CE and online KD: fresh RandomResizedCrop boxes every epoch, by the builder's rule
        H, W = np.repeat(heights, c.crops), np.repeat(widths, c.crops)

        def fill(epoch):
            px, flip = random_boxes(np.random.default_rng([c.seed, epoch, 1 << 20]), H, W,
                                    scale=(c.scale_min, 1.0))
            plan[:] = region_plan(grid_boxes(px, H, W), flip, H, W).reshape(N, c.crops, 5)
            return None
        return plan, fill, np.arange(N), None

    R, k = table.shape[1], header["k"]  # R: the regions replayed (--regions may take the first R' only)
    scores = threshold_scores(c, header, table) if scores is None else scores
    lut = category_lut(c.t_low, c.t_mid, c.t_top)
    if (lut > 0).all():  # FKD (0, 0, 1): every region kept, and the scores (a view of the table) are never read
        kept, count = None, np.full(N, R)
    else:  # FerKD's dropped regions are never replayed: which are kept, a bit per region (48 MB at 1.28M x 300)
        kept, count = np.empty((N, -(-R // 8)), np.uint8), np.empty(N, np.int64)
        for s in range(0, N, CHUNK_IMAGES):
            is_kept = np.take(lut > 0, scores[s:s + CHUNK_IMAGES])  # (n, R) bool; np.take: 2x lut[...] here
            kept[s:s + CHUNK_IMAGES], count[s:s + CHUNK_IMAGES] = np.packbits(is_kept, axis=1), is_kept.sum(1)
    kept_images = np.flatnonzero(count > 0)

    def fill(epoch):  # per image, `crops` distinct kept regions (while crops <= count), uniformly
        choice = np.empty((N, c.crops), np.int64)
        for s in range(0, N, CHUNK_IMAGES):
            e = min(N, s + CHUNK_IMAGES)
            pos = distinct_positions(np.random.default_rng([c.seed, epoch, s]), count[s:e], c.crops)
            choice[s:e] = kept_regions(kept if kept is None else kept[s:e], R, count[s:e], pos)
            rec = table[np.arange(s, e)[:, None], choice[s:e]]                # (n, crops, D)
            flip = unpack_regions(torch.from_numpy(rec), k)[3].numpy()
            plan[s:e] = region_plan(rec[..., :4], flip, heights[s:e, None], widths[s:e, None])
        return torch.from_numpy(choice)
    return plan, fill, kept_images, lut


def distinct_positions(rng, count, n):
    """(len(count), n) places among each row's `count` kept regions: an ordered sample without replacement
    (crop j draws uniformly among the places crops 0..j-1 did not take); past `count` the row repeats its
    first places in turn. O(n^2) per row, where a random order of all R regions per image (an argsort of N x
    R numbers, several seconds per epoch at 1.28M x 300) would be O(R log R)."""
    pos = np.zeros((len(count), n), np.int64)
    for j in range(n):
        p = rng.integers(0, np.maximum(count - j, 1))        # the p-th place not yet taken ...
        for q in np.sort(pos[:, :j], axis=1).T:              # ... is p shifted past each taken place below it
            p += p >= q
        again = np.take_along_axis(pos, (j % np.maximum(count, 1))[:, None], 1)[:, 0]
        pos[:, j] = np.where(j < count, p, again)
    return pos


def kept_regions(kept, R, count, pos):
    """The region index of each place: the pos-th kept region of its row; `kept`: (n, ceil(R / 8)) bits, a
    row's R regions packed (np.packbits), or None where every region is kept; `count`: the kept per row."""
    choice = pos.copy()
    rows = np.flatnonzero(count < R)  # rows where FerKD dropped regions (none with FKD)
    if len(rows):
        bits = np.unpackbits(kept[rows], axis=1, count=R)
        kept_so_far = np.cumsum(bits, axis=1, dtype=np.int32)   # (m, R)
        choice[rows] = (kept_so_far[:, None, :] <= pos[rows][..., None]).sum(2)
    return np.minimum(choice, R - 1)  # an image with no kept region (never loaded) gets a valid index


def ce_loss(label_smoothing):
    def loss(x, logits, labels, index, choice, partner, share):
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    return loss


def to_device_async(t, device):
    """A host tensor on `device` without the host waiting for the device: copied from pinned memory. From
    pageable memory even a non_blocking copy first synchronizes the stream (CUDA runtime API, "API
    synchronization behavior"): a host-device sync in every step. Torch's caching host allocator keeps the
    pinned buffer until the copy has run."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def region_targets(table, k, index, choice, device, scores=None):
    """Stored labels of the regions replayed in a batch: ids (B*n, k), probs (B*n, k), p_gt (B*n,); with
    `scores` (N, R) uint8 (--thresholds=rank) each region's score in p_gt's place. One copy to the device."""
    rec = table[index[:, None], choice[index]]                                # (B, n, D) uint8, on the host
    if scores is not None:                                                    # (B, n, D + 1): the score last
        rec = torch.cat([rec, scores[index[:, None], choice[index]][..., None]], 2)
    rec = to_device_async(rec, device).flatten(0, 1)
    ids, probs, pgt, _ = unpack_regions(rec[:, :table.shape[2]], k)
    return ids, probs, (pgt if scores is None else rec[:, -1].float() / 255)


def stored_label_loss(c, table, header, scores=None):
    """Soft-label loss over stored regions through the fused FerKD loss (FKD: thresholds 0, 0, 1), at the
    temperature T the labels were built with: student logits / T, loss x T^2 (FKD, Hinton et al.).
    `partner`/`share` come from `mix_batch`: row r mixes its own region (weight share) with row
    partner[r]'s. `scores`: threshold_scores(c, header, table), if already computed."""
    k, temperature = header["k"], float(header["temperature"])
    # with --thresholds=rank the loss compares each region's place in its image where it would compare p_gt
    if c.thresholds == "rank":
        scores = torch.from_numpy(threshold_scores(c, header, table) if scores is None else scores)
    else:
        scores = None  # p_gt: unpacked from each record the loss reads
    with warnings.catch_warnings():  # a read-only memory map (beton.read_regions) that is never written to:
        warnings.simplefilter("ignore", UserWarning)  # torch's warning about writes does not apply
        table = torch.from_numpy(table)

    def loss(x, logits, labels, index, choice, partner, share):
        ids, probs, pgt = region_targets(table, k, index, choice, logits.device, scores)
        ids, probs, pgt = (torch.stack([t, t[partner]], 1) for t in (ids, probs, pgt))  # M = 2 regions a row
        if c.mix_source == "batch":  # the partner is another image: its hard region's truth is its own class
            ids[:, 1], probs[:, 1], pgt[:, 1] = as_soft_label(ids[:, 1], probs[:, 1], pgt[:, 1],
                                                              labels[partner], logits.shape[1], c)
        mix = torch.stack([share, 1 - share], 1)
        return ferkd_loss(logits, ids, probs, pgt, labels, mix, t_low=c.t_low, t_mid=c.t_mid, t_top=c.t_top,
                          eps=c.eps, temperature=temperature, kernel=c.loss_kernel)
    return loss


def online_kd_loss(c, teacher, teacher_id, amp_dtype):
    """Online KD (Hinton et al. 2015), the method FKD approximates: the teacher scores the step's own crops
    x (the student's input, renormalized to the statistics the teacher was trained with), in eval mode and
    without gradients, and the student learns from its full softmax at T with FKD's soft cross-entropy:
    T^2 x mean over rows of -sum_c softmax(teacher / T)_c log softmax(student / T)_c."""
    teacher.eval().requires_grad_(False)
    T = c.temperature
    device = next(teacher.parameters()).device
    t_mean, t_std, s_mean, s_std = (torch.tensor(v, device=device).view(1, 3, 1, 1)
                                    for v in (teacher_id["mean"], teacher_id["std"], MEAN, STD))
    scale, shift = s_std / t_std, (s_mean - t_mean) / t_std  # x_teacher = x * scale + shift

    def loss(x, logits, labels, index, choice, partner, share):
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            target = F.softmax(teacher(x * scale + shift).float() / T, dim=1)   # (rows, C)
        return T * T * F.cross_entropy(logits.float() / T, target)
    return loss


def as_soft_label(ids, probs, pgt, truth, C, c):
    """A region's FerKD target written as a kept teacher label, for a region mixed into a row of another class
    (ferkd_loss applies the hard-region rule with the row's class). A softened one-hot is a top-k label with
    1 - eps on the truth and eps/(C-1) on k-1 other classes, the rest spread evenly: exactly eps/(C-1)
    each."""
    cat = region_category(pgt, c.t_low, c.t_mid, c.t_top)
    k = ids.shape[1]
    hard_ids = (truth[:, None] + torch.arange(k, device=ids.device)) % C
    hard_probs = torch.full_like(probs, c.eps / (C - 1))
    hard_probs[:, 0] = 1 - c.eps
    hard = (cat == 1)[:, None]
    kept_soft = torch.full_like(pgt, max(c.t_mid, c.t_low))  # a p_gt ferkd_loss files as a kept soft region
    return (torch.where(hard, hard_ids, ids), torch.where(hard, hard_probs, probs),
            torch.where(cat == 1, kept_soft, pgt))


def sample_beta(alpha, n, generator, device, rounds=16):
    """n draws of Beta(alpha, alpha) from the run's `generator`, made on `device` (no host copy, no sync):
    X / (X + Y) with X, Y ~ Gamma(alpha) by Marsaglia and Tsang's method (ACM TOMS 26(3), 2000), vectorized
    over a fixed number of rounds. Each round accepts > 95% of the draws still pending when the shape is >= 1,
    so one still pending after 16 rounds (probability < 1e-20) takes the mode d. Shapes below 1 use
    Gamma(a) = Gamma(a + 1) U^(1/a). (torch.distributions.Beta takes no generator: it drew from the global
    stream and was copied to the device.)"""
    a = alpha + 1 if alpha < 1 else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)

    def gamma():
        out = torch.full((n,), d, device=device)
        pending = torch.ones(n, dtype=torch.bool, device=device)
        for _ in range(rounds):
            x = torch.randn(n, generator=generator, device=device)
            u = torch.rand(n, generator=generator, device=device)
            v = (1 + c * x) ** 3
            log_accept = 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30))
            ok = pending & (v > 0) & (torch.log(u) < log_accept)
            out = torch.where(ok, d * v, out)
            pending &= ~ok
        if alpha < 1:
            out = out * torch.rand(n, generator=generator, device=device) ** (1 / alpha)
        return out
    x, y = gamma(), gamma()
    return x / (x + y).clamp_min(1e-30)


def mix_batch(c, generator):
    """SelfMix (FerKD): each row's region gets a patch of (cutmix) or is blended with (mixup) another region
    of the same image; `--mix_source=batch` takes it from another image instead (ordinary CutMix/Mixup).
    Returns mix(x) -> (x, partner (rows,), share (rows,)): share is the exact fraction of the row that is its
    own region (the pasted area for cutmix), so labels mix by area. Vectorized on the device."""
    def none(x, n):  # every row its own partner, all of it its own region
        row = torch.arange(len(x), device=x.device)
        return x, row, torch.ones(len(x), device=x.device)

    def mix(x, n):
        rows, _, H, W = x.shape
        row = torch.arange(rows, device=x.device)
        if c.mix_source == "self":  # row (b, j) takes region (b, j+1 mod n)
            partner = (row // n) * n + (row % n + 1) % n
        else:  # row (b, j) takes the same crop of the next image in the batch
            partner = (row + n) % rows
        u = torch.rand(rows, device=x.device, generator=generator)
        lam = sample_beta(c.mix_alpha, rows, generator, x.device)
        on = torch.rand(rows, device=x.device, generator=generator) < c.mix_prob
        if c.mix == "mixup":
            share = torch.where(on, lam, torch.ones_like(lam))
            x = share.view(rows, 1, 1, 1) * x + (1 - share.view(rows, 1, 1, 1)) * x[partner]
            return x, partner, share
        # cutmix: a box of area ~ (1 - lam) centred uniformly, clipped to the image
        cut = torch.sqrt(1 - lam)
        cy, cx = torch.rand(rows, device=x.device, generator=generator) * H, u * W
        y0, y1 = (cy - cut * H / 2).clamp(0, H).round(), (cy + cut * H / 2).clamp(0, H).round()
        x0, x1 = (cx - cut * W / 2).clamp(0, W).round(), (cx + cut * W / 2).clamp(0, W).round()
        ys = torch.arange(H, device=x.device).view(1, H, 1)
        xs = torch.arange(W, device=x.device).view(1, 1, W)
        inside = (ys >= y0.view(rows, 1, 1)) & (ys < y1.view(rows, 1, 1)) & (xs >= x0.view(rows, 1, 1)) \
            & (xs < x1.view(rows, 1, 1)) & on.view(rows, 1, 1)
        x = torch.where(inside[:, None], x[partner], x)
        share = 1 - inside.flatten(1).float().mean(1)
        return x, partner, share
    return none if c.mix == "none" else mix

# -----------------------------------------------------------------------------
# Schedule, step, evaluation

def lr_at(step, total, warmup, peak):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def res_at(c, epoch, res):
    """The training resolution of an epoch (0-based): `res` throughout, or with --min_res ffcv-imagenet's
    ramp (its get_resolution): min_res up to --ramp_start, `res` from --ramp_end on, and in between
    np.interp(epoch, [ramp_start, ramp_end], [min_res, res]) rounded to a multiple of --res_step, kept
    within [min_res, res] (rounding alone gave 0 px below res_step and 192 for res 200)."""
    if not c.min_res or epoch >= c.ramp_end:
        return res
    if epoch <= c.ramp_start:
        return c.min_res
    ramp = np.interp(epoch, [c.ramp_start, c.ramp_end], [c.min_res, res])
    return int(min(max(np.round(ramp / c.res_step) * c.res_step, c.min_res), res))


def make_train_step(model, optimizer, scaler, loss_fn, mix_fn, amp_dtype, device, crops):
    """One optimizer step on a batch of decoded regions; returns the loss as a device tensor (no host sync:
    the caller checks losses for NaN/Inf in one transfer at each checkpoint). `model` may be compiled in place
    and/or wrapped in DDP; `loss_fn` and `mix_fn` carry the mode, chosen once before the loop."""
    def train_step(images_u8, labels, index, choice):
        x, partner, share = mix_fn(to_model_input(images_u8, device), crops)
        labels = labels.to(device).repeat_interleave(crops)            # a no-op: the loader put them there
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)                                       # (B*crops, C)
        loss = loss_fn(x, logits, labels, index, choice, partner, share)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return train_step


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, num_classes):
    """Top-1/top-5 over the whole test split, and per class; exact under DDP (each image counted once, sums
    all-reduced). Returns (metrics dict, per-class (C, 3) float64 tensor: top-1 hits, top-5 hits, images)."""
    model.eval()
    sums = torch.zeros(num_classes, 3, device=device, dtype=torch.float64)
    for images_u8, labels, _ in epoch_batches(loader, 0):  # sequential: the same images every time
        x = to_model_input(images_u8, device)
        labels = labels.to(device)
        if len(x) < loader.batch_size:  # the ragged last batch, padded: a compiled model keeps its one static
            pad = x[-1:].expand(loader.batch_size - len(x), -1, -1, -1)  # graph instead of compiling a dynamic
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)  # one (eval: rows independent)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)[:len(labels)]
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        row = torch.stack([hits[:, 0], hits.any(1), torch.ones_like(hits[:, 0])], 1)  # (B, 3)
        sums.index_add_(0, labels, row.double())
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    top1, top5, n = sums.sum(0).tolist()
    return dict(top1=100 * top1 / n, top5=100 * top5 / n, test_images=int(n)), sums.cpu()


def eval_loader(data, res, ratio, batch_size, num_workers, rank, world, device):
    """The test split at res x res: small built-in images whole; an image folder's images as the centre square
    of side ratio x the shorter side, resized (ffcv-imagenet's centre crop: 224 / 256 at res 224)."""
    path, ds = dataset_beton(data, "test")
    h, w = image_sizes(path)
    if isinstance(ds.images, np.ndarray):
        plan = whole_image_plan(h, w)
    else:
        plan = np.concatenate([center_boxes(h, w, ratio), np.zeros((len(h), 1), np.int32)], 1)[:, None]
    shard = np.arange(rank, len(h), world)  # disjoint shards: no padding duplicates in the accuracy
    return region_loader(path, np.ascontiguousarray(plan, np.int32), res, batch_size, num_workers,
                         indices=shard, device=device), ds

# -----------------------------------------------------------------------------
# Resume: what a checkpoint holds beyond the model, and which run directory may be continued

def rng_states(generator, device):
    """Every random stream the step draws from, for each rank (gathered on rank 0: a collective). The region
    plans need none: they are functions of (seed, epoch)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)
    mine = dict(torch=torch.get_rng_state(), mix=generator.get_state(), cuda=cuda)
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def set_rng_states(states, rank, generator, device):
    mine = states[rank % len(states)]  # a changed world size resumes, but not bit-exactly
    torch.set_rng_state(mine["torch"])
    if len(mine["mix"]) == len(generator.get_state()):
        generator.set_state(mine["mix"])
    else:  # saved on another kind of device (a CPU generator's state is 5,056 bytes, a CUDA one's 16): SelfMix
        # goes on with a new stream, a function of the saved one (--device may change, not bit-exactly)
        generator.manual_seed(int(np.random.SeedSequence(mine["mix"].numpy()).generate_state(1)[0]))
    if device.type == "cuda" and len(mine["cuda"]):
        torch.cuda.set_rng_state(mine["cuda"], device)


def checkpoints(run_dir):
    """ckpt-STEP.pt files of a run directory, oldest first."""
    return sorted(Path(run_dir).glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def config_differences(saved, config, header, saved_header):
    """Flags whose values differ from the run directory's config (harmless ones excepted), and whether the
    label file changed (its header, apart from the build time)."""
    defaults = dataclasses.asdict(TrainConfig())
    diff = [f"--{k}={saved.get(k, defaults[k])!r} -> {v!r}" for k, v in dataclasses.asdict(config).items()
            if k not in RESUME_HARMLESS and saved.get(k, defaults[k]) != v]
    strip = lambda h: {k: v for k, v in (h or {}).items() if k != "built"}
    if strip(header) != strip(saved_header):
        diff.append(f"--labels={config.labels}: the label file's header changed")
    return diff


def run_metadata(device):
    """What reproducing a run needs besides its config: library versions, git revision, device."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "ffcv", "numba", "triton", "fire"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    here = Path(__file__).resolve().parent
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,
                                        timeout=10).stdout
        revision = git("rev-parse", "HEAD").strip() or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except OSError:
        revision, dirty = None, None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpuinfo('model name') or platform.processor()}, {os.cpu_count()} cores"
    return dict(versions=versions, git_revision=revision, git_dirty=dirty, device_name=name,
                host=platform.node())

def write_metrics(run_dir, history):
    """metrics.jsonl and metrics.csv, rewritten whole from the checkpointed history at each epoch end: a run
    resumed from a checkpoint drops the epochs a kill lost with it instead of logging them twice."""
    atomic_write(run_dir / "metrics.jsonl", lambda p: p.write_text("".join(json.dumps(m) + "\n"
                                                                           for m in history)))
    columns = list(dict.fromkeys(k for m in history for k in m))
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(run_dir / "metrics.csv", lambda p: p.write_text(table.getvalue()))


def tensorboard_writer(c, run_dir, epochs_done):
    """A SummaryWriter for RUN_DIR/tb when asked for and installed (an optional dependency), else None.
    `purge_step` hides events a killed run wrote after its last checkpoint."""
    if not c.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer imports the tensorboard package
        print0("tensorboard is not installed: metrics go to metrics.jsonl and metrics.csv only")
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=epochs_done + 1)

# -----------------------------------------------------------------------------
# `ferkd.py train`

@dataclass
class TrainData:
    """What `training_data` sets up for one rank: the label file, loaders, epoch plan and derived numbers."""
    header: dict            # the label file's header; None with --kd=none
    table: np.ndarray       # (N, R, D) uint8 region records; None with --kd=none
    classes: list           # class names, in label order
    res: int                # (final) training resolution, px
    loader: object          # loader(res): this rank's batches (images_u8, labels, index) at res, drop_last
    test_loader: object     # this rank's disjoint shard of the test split
    fill_plan: object       # fill_plan(epoch) -> choice (N, crops) int64 tensor, or None with --kd=none
    kept_images: np.ndarray  # indices of the images trained on: one kept region at least, within --subset
    category_lut: np.ndarray  # (256,) int8 FerKD category of each score byte; None with --kd=none
    scores: np.ndarray      # (N, R) uint8 what FerKD's thresholds compare (threshold_scores); None likewise
    per_rank_batch: int     # images per step in this process
    steps_per_epoch: int    # this rank's full batches per epoch
    region_shares: list     # dropped, hard, soft fractions of the stored regions; None with --kd=none


def training_data(c, rank, world, device):
    """The label file checked against --data (or the dataset's own images for --kd=none), the region table,
    each epoch's plan and the loaders; prints what the thresholds keep."""
    header, table = None, None
    if c.kd in ("none", "kd"):
        train_path, ds = dataset_beton(c.data, "train")
    else:
        hint = f"re-run `python labels.py build --data={c.data} --out={c.labels} ...`"
        header = read_header(c.labels, hint)
        ds = load_dataset(c.data, "train")
        if header["fingerprint"] != ds.fingerprint() or header["num_classes"] != len(ds.classes):
            raise UserError(f"{c.labels} was built for {header['dataset']} ({header['num_classes']} classes, "
                            f"fingerprint {header['fingerprint']}), not --data={c.data} ({len(ds.classes)} "
                            f"classes, {ds.fingerprint()}); {hint}")
        if header.get("subset") and header["subset"] != c.subset:  # a file of `build --subset=N` holds those
            raise UserError(f"{c.labels} holds the --subset={header['subset']} images of {c.data} only: "
                            f"train with --subset={header['subset']}")  # N images only, in index order
        train_path, table = Path(c.labels), read_regions(c.labels, header)
        if c.regions > header["regions"]:
            raise UserError(f"--regions={c.regions}: {c.labels} holds {header['regions']} per image")
        table = table[:, :c.regions or None]  # a view: the first R' regions of every image
    res = c.res or (header or {}).get("res") or ds.res
    if c.min_res > res:
        raise UserError(f"--min_res={c.min_res} is above the training resolution {res} (--res)")
    heights, widths = image_sizes(train_path)
    scores = None if table is None else threshold_scores(c, header, table)  # once: plan and loss read them
    plan, fill_plan, kept_images, lut = region_plans(c, header, table, heights, widths, scores)
    if c.subset and not (header or {}).get("subset"):  # every mode trains on the same images (FerKD may drop
        kept_images = np.intersect1d(kept_images, subset_images(ds.labels, c.subset))  # some of them)
    if c.batch_size % world:
        raise UserError(f"--batch_size={c.batch_size} must divide among {world} processes")
    per_rank = c.batch_size // world

    @functools.lru_cache  # one FFCV loader per resolution, all reading the one plan that fill_plan fills
    def loader(res):
        return region_loader(train_path, plan, res, per_rank, c.num_workers, order="random", seed=c.seed,
                             indices=kept_images, drop_last=True, distributed=world > 1, device=device)
    test_loader, _ = eval_loader(c.data, c.eval_res or res, c.eval_ratio, 512, c.num_workers, rank, world,
                                 device)
    # under DDP each rank gets ceil(N / world) images (FFCV pads like DistributedSampler): count its batches
    steps_per_epoch = len(loader(res_at(c, 0, res)))
    if steps_per_epoch < 1:
        raise UserError(f"{len(kept_images)} training images give no full batch of "
                        f"--batch_size={c.batch_size}")
    shares = None
    if table is not None:
        shares = category_shares(scores, lut).tolist()
        by = " by their place in the image" if c.thresholds == "rank" else ""
        print0(f"regions{by} at t_low={c.t_low} t_mid={c.t_mid} t_top={c.t_top}: dropped {shares[0]:.1%}, "
               f"hard {shares[1]:.1%}, soft {shares[2]:.1%}; {len(kept_images)} of {len(heights)} images "
               f"keep one")
        if header.get("pgt_estimated"):  # imported FKD labels keep only the top-k (labels.py import)
            print0(f"{c.labels}: p_gt is estimated as (1 - sum of top-k) / (C - k) on "
                   f"{header['pgt_estimated']:.1%} of regions, where the true class is not in the top-k"
                   + ("; --kd=ferkd calibrates by it" if c.kd == "ferkd" else ""))
    return TrainData(header, table, list(ds.classes), res, loader, test_loader, fill_plan, kept_images,
                     lut, scores, per_rank, steps_per_epoch, shares)


def open_run_dir(c, run_dir, header):
    """The checkpoint to continue from, or None for a fresh start. Every rank reads the same files and reaches
    the same verdict, so an error stops all of them."""
    if c.overwrite:
        return None
    if (run_dir / "final.pt").exists():
        raise UserError(f"{run_dir} already holds a finished run; pass --overwrite or another --run_dir")
    ckpts = checkpoints(run_dir)
    if c.resume and not ckpts:
        raise UserError(f"--resume: {run_dir} holds no checkpoint (ckpt-STEP.pt) to resume from")
    state, saved = None, None
    if ckpts:
        try:
            state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged file; saves are atomic, so rare
            raise UserError(f"{ckpts[-1]} is not readable ({type(e).__name__}); delete it to resume from the "
                            f"one before, or pass --overwrite") from None
        saved, saved_header = state["config"], state["label_header"]
    elif (run_dir / "config.json").exists():  # killed before its first checkpoint
        saved = json.loads((run_dir / "config.json").read_text())
        saved_header = saved.get("label_header")
    if saved is not None:
        diff = config_differences(saved, c, header, saved_header)
        if diff:
            raise UserError(f"{run_dir} holds a run with another config ({'; '.join(diff)}); resume with the "
                            f"same flags, or pass --overwrite or another --run_dir")
    return state


def open_run(c, run_dir, header, steps_per_epoch, rank):
    """The checkpoint to continue from (`open_run_dir`), or None; then rank 0 makes the run directory and, for
    a fresh start, clears what an earlier run left in it."""
    state = open_run_dir(c, run_dir, header)
    if state is not None and state["steps_per_epoch"] != steps_per_epoch:
        raise UserError(f"{run_dir} was trained with {state['steps_per_epoch']} steps per epoch, this "
                        f"launch has {steps_per_epoch} (another number of processes?); resume it as it was "
                        f"launched")
    if dist.is_initialized():
        dist.barrier()  # every rank has read the run directory before rank 0 changes it
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            for p in [*checkpoints(run_dir), run_dir / "final.pt", run_dir / "final.json"]:
                p.unlink(missing_ok=True)
    return state


def make_model(c, num_classes, device, world, amp_dtype, peak_lr, state):
    """The student, its optimizer and gradient scaler, with their checkpointed state when resuming; then
    compiled in place (when asked) and wrapped in DDP (several processes). Returns (model, ddp, optimizer,
    scaler, compiled): `ddp` is what the step calls, `model` what is saved and evaluated."""
    model = build_model(c.arch, num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=c.momentum, nesterov=True,
                                weight_decay=c.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and scaler.is_enabled():  # a disabled scaler saves {}: a run moved onto fp16
            scaler.load_state_dict(state["scaler"])    # starts a fresh scale
    compiled = use_compile(c, device)
    if compiled:  # in place: state_dict keys keep their names (no `_orig_mod.`); DDP then wraps the compiled
        # module, never the reverse (compiling a DDP wrapper compiled nothing, NOTES.md). The all-reduce still
        # overlaps the backward: inside DDP's forward dynamo splits the compiled graph at DDP's bucket
        # boundaries (DDPOptimizer; tests/test_gpu_paths.py checks it). dynamic=False: one static graph per
        # input shape (each size of the ramp, evaluation's batch), never a dynamic-shape graph, which dynamo
        # otherwise makes at the second shape it sees (slower kernels, sympy's warnings, and on a GPU a first
        # evaluation that compiled 3 graphs); the recompile limit is raised so that no size falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        model.compile(dynamic=False)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return model, ddp, optimizer, scaler, compiled


@dataclass
class Progress:
    """Where a run stands: what a checkpoint saves besides the model, the optimizer and the random streams."""
    step: int = 0                 # optimizer steps taken
    history: list = dataclasses.field(default_factory=list)       # one metrics dict per finished epoch
    epoch_losses: list = dataclasses.field(default_factory=list)  # this epoch's checked losses, so far
    train_seconds: float = 0.0    # training time, evaluation and checkpointing excluded


def resume(state, rank, generator, device):
    """The Progress where the checkpoint `state` stopped, with every random stream put back as it was
    (torch's, SelfMix's `generator`, CUDA's); a fresh Progress for a fresh start."""
    if state is None:
        return Progress()
    set_rng_states(state["rng"], rank, generator, device)
    return Progress(*(state[k] for k in ("step", "history", "epoch_losses", "train_seconds")))


def mix_generator(c, rank, device):
    """SelfMix's random stream on `device`, seeded by a hash of (seed, rank): c.seed + 1000 * rank made seed s
    on rank 1 the stream of seed s + 1000 on rank 0."""
    seed = int(np.random.SeedSequence([c.seed, rank]).generate_state(1)[0])
    return torch.Generator(device).manual_seed(seed)


def choose_loss(c, data, device, compiled, amp_dtype):
    """The mode, chosen once: (loss function, the online teacher's identity or None). The step calls the
    function and never branches on flags."""
    if c.kd == "none":
        return ce_loss(c.label_smoothing), None
    if c.kd in ("fkd", "ferkd"):
        return stored_label_loss(c, data.table, data.header, data.scores), None
    teacher, teacher_id = load_teacher(c.teacher)
    check_teacher(teacher, c.teacher, data.res, len(data.classes))
    teacher.to(device, memory_format=torch.channels_last)
    if compiled:
        teacher.compile()
    return online_kd_loss(c, teacher, teacher_id, amp_dtype), teacher_id


def run_config(c, data, world, device, peak_lr, amp_dtype, compiled, step, teacher_id):
    """The resolved config and the derived numbers: printed once and written as RUN_DIR/config.json."""
    shares = data.region_shares and dict(zip(("dropped", "hard", "soft"), data.region_shares))
    return dict(dataclasses.asdict(c), world_size=world, per_rank_batch=data.per_rank_batch,
                rows_per_step=c.batch_size * c.crops, steps_per_epoch=data.steps_per_epoch,
                total_steps=data.steps_per_epoch * c.epochs, peak_lr=peak_lr, train_res=data.res,
                device=str(device), precision=PRECISION_NAMES[amp_dtype],
                compiled=compiled, train_images=len(data.kept_images), num_classes=len(data.classes),
                resumed_at_step=step, region_shares=shares, teacher_id=teacher_id, **run_metadata(device),
                label_header=data.header)


def start_log(c, run_dir, config, precision, progress, rank):
    """Print the config (and where a resumed run stands); rank 0 writes config.json and the metrics so far
    and returns the TensorBoard writer (or None)."""
    print0(json.dumps({k: v for k, v in config.items() if k != "label_header"}))
    print0(f"precision: {precision}")
    if config["resumed_at_step"]:
        step, per_epoch = progress.step, config["steps_per_epoch"]
        print0(f"resuming {run_dir} at step {step} of {config['total_steps']} "
               f"(epoch {step // per_epoch + 1}, batch {step % per_epoch})")
    if rank != 0:
        return None
    atomic_write(run_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=1)))
    write_metrics(run_dir, progress.history)
    return tensorboard_writer(c, run_dir, len(progress.history))


def save_run(path, c, data, progress, model, optimizer, scaler, generator, device, rank):
    """A checkpoint: a collective (every rank's random streams are gathered), rank 0 writes it and removes
    the oldest ckpt-STEP.pt files beyond --keep_ckpts. It carries the evaluation settings, so that `ferkd.py
    eval` scores what training logged (models.checkpoint_eval)."""
    rng = rng_states(generator, device)
    if rank != 0:
        return
    save_checkpoint(path, dict(
        model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        step=progress.step, epoch=progress.step // data.steps_per_epoch, steps_per_epoch=data.steps_per_epoch,
        rng=rng, history=progress.history, epoch_losses=progress.epoch_losses,
        train_seconds=progress.train_seconds, res=data.res, eval_res=c.eval_res or data.res,
        eval_ratio=c.eval_ratio, config=dataclasses.asdict(c), label_header=data.header,
        classes=data.classes))
    for old in checkpoints(path.parent)[:-c.keep_ckpts]:
        old.unlink(missing_ok=True)


def last_good(run_dir):
    """The checkpoint a stopped run can go back to, for finite_losses' error."""
    ckpts = checkpoints(run_dir)
    return str(ckpts[-1]) if ckpts else "none (no checkpoint was saved yet)"


def epoch_res(c, epoch, data_res, res, compiled):
    """This epoch's training resolution (`res_at`), announced when it changes."""
    new = res_at(c, epoch, data_res)
    if new != res:  # progressive resizing: a new size (compiled: a new graph)
        print0(f"epoch {epoch + 1}: training at {new} px" + (" (torch.compile recompiles once for it)"
                                                             if compiled and epoch else ""))
    return new


def progress_bar(c, epoch, images, rank):
    return tqdm(total=images, unit="img", unit_scale=True, leave=False, desc=f"epoch {epoch + 1}/{c.epochs}",
                disable=rank != 0 or not sys.stderr.isatty())


def epoch_metrics(data, epoch, progress, test, lr, steps, seconds, first_step_seconds, rows, choice):
    """The line logged at an epoch's end: loss, test metrics, the clock, and with stored labels the FerKD
    categories of the regions replayed this epoch (all ranks' images)."""
    losses = progress.epoch_losses
    metrics = dict(epoch=epoch + 1, loss=math.fsum(losses) / len(losses), **test, lr=lr,
                   train_seconds=round(progress.train_seconds, 1),
                   images_per_s=round(steps_per_s(steps, seconds, first_step_seconds) * rows, 1),
                   first_step_s=round(first_step_seconds, 2))
    if choice is not None:
        kept = data.kept_images
        replayed = data.category_lut[data.scores[kept[:, None], choice[kept]]]
        metrics.update(hard_regions=int((replayed == 1).sum()), soft_regions=int((replayed == 2).sum()))
    return metrics


def log_epoch(run_dir, history, tb, rank):
    """Rank 0 rewrites metrics.jsonl/.csv and adds the epoch's scalars to TensorBoard."""
    if rank != 0:
        return
    write_metrics(run_dir, history)
    if tb is not None:
        for key, value in history[-1].items():
            if key != "epoch":
                tb.add_scalar(key, value, history[-1]["epoch"])
        tb.flush()


def finish_log(run_dir, metrics, tb, rank):
    if rank == 0:
        atomic_write(run_dir / "final.json", lambda p: p.write_text(json.dumps(metrics)))
        if tb is not None:
            tb.close()


def steps_per_s(steps, seconds, first_step_seconds):

    """An epoch's steady rate: its first step (where a compiled model compiles) left out, if it has others."""
    return (steps - 1) / (seconds - first_step_seconds) if steps > 1 else steps / seconds


def finite_losses(pending, first_step, model, what):
    """The losses of the steps since the last check as floats, in one host transfer. Stops the run at the
    first NaN/Inf loss or weight (whichever rank sees it), naming the step; the last checkpoint stays the good
    one, since every save comes after this check."""
    if not pending:
        return []
    losses = torch.stack(pending).float()
    n = len(pending)
    first_bad = torch.where(losses.isfinite(), n, torch.arange(n, device=losses.device)).min()
    # buffers too: a huge activation can overflow BatchNorm's running variance while the loss, computed with
    # the batch's own statistics, and the parameters stay finite (seen with --lr=1e6)
    state = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    weights_bad = ~torch.stack([t.isfinite().all() for t in state]).all()
    flags = torch.stack([first_bad, -weights_bad.long()])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    first_bad, weights_bad = flags.tolist()
    if first_bad < n or weights_bad:
        where = f"the loss was NaN/Inf at step {first_step + first_bad}" if first_bad < n else \
            f"the weights (or BatchNorm statistics) became NaN/Inf by step {first_step + n - 1}"
        raise UserError(f"{where}; stopped. The last good checkpoint is {what}; lower --lr or check the "
                        f"labels")
    return losses.tolist()


def train(**flags):
    c = parse_config(TrainConfig, flags)
    check_config(c)
    rank, world, device = setup_distributed(c.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes (full batches, eval padded): cuDNN's fastest kernels
    torch.manual_seed(c.seed)  # the student's initial weights
    run_dir = Path(c.run_dir)

    # data, model, where the run stands
    data = training_data(c, rank, world, device)
    steps_per_epoch, total_steps = data.steps_per_epoch, data.steps_per_epoch * c.epochs
    state = open_run(c, run_dir, data.header, steps_per_epoch, rank)
    (amp_dtype, precision), peak_lr = autocast_dtype(device, c.amp), c.lr * c.batch_size * c.crops / 256
    model, ddp, optimizer, scaler, compiled = make_model(c, len(data.classes), device, world, amp_dtype,
                                                         peak_lr, state)
    generator = mix_generator(c, rank, device)
    run = resume(state, rank, generator, device)

    # the mode, chosen once: the loss and the mixing are functions, the step never branches on flags
    loss_fn, teacher_id = choose_loss(c, data, device, compiled, amp_dtype)
    train_step = make_train_step(ddp, optimizer, scaler, loss_fn, mix_batch(c, generator), amp_dtype, device,
                                 c.crops)
    warmup = int(c.warmup_epochs * steps_per_epoch)

    # what reproducing the run needs, printed once and written beside it
    config = run_config(c, data, world, device, peak_lr, amp_dtype, compiled, run.step, teacher_id)
    tb = start_log(c, run_dir, config, precision, run, rank)
    checkpoint = functools.partial(save_run, c=c, data=data, progress=run, model=model, optimizer=optimizer,
                                   scaler=scaler, generator=generator, device=device, rank=rank)

    # train: epochs of steps, a checkpoint every --ckpt_every steps and at each epoch's end
    rows = c.batch_size * c.crops
    metrics = run.history[-1] if run.history else {}
    res = None
    for epoch in range(run.step // steps_per_epoch, c.epochs):
        choice = data.fill_plan(epoch)
        skip = run.step - epoch * steps_per_epoch
        res = epoch_res(c, epoch, data.res, res, compiled)
        pending, t_epoch, t0, t_first = [], 0.0, time.time(), None
        bar = progress_bar(c, epoch, (steps_per_epoch - skip) * rows, rank)
        for images_u8, labels, index in epoch_batches(data.loader(res), epoch, skip):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(run.step, total_steps, warmup, peak_lr)
            pending.append(train_step(images_u8, labels, index, choice))
            run.step += 1
            if t_first is None:  # timed apart: a compiled model's cold compile, the allocator's first batch
                t_first = time.time() - t0
            bar.update(rows)
            if c.ckpt_every and run.step % c.ckpt_every == 0 and run.step % steps_per_epoch:  # (epoch ends:
                run.epoch_losses += finite_losses(pending, run.step - len(pending) + 1, model,  # below)
                                                  last_good(run_dir))
                pending, now = [], time.time()
                t_epoch, run.train_seconds = t_epoch + now - t0, run.train_seconds + now - t0  # clock stops
                checkpoint(run_dir / f"ckpt-{run.step:08d}.pt")                               # while saving
                t0 = time.time()
        bar.close()
        run.epoch_losses += finite_losses(pending, run.step - len(pending) + 1, model, last_good(run_dir))
        now = time.time()
        t_epoch, run.train_seconds = t_epoch + now - t0, run.train_seconds + now - t0

        # evaluate, log, checkpoint (the clock is stopped)
        test, _ = evaluate(model, data.test_loader, device, amp_dtype, len(data.classes))
        metrics = epoch_metrics(data, epoch, run, test, optimizer.param_groups[0]["lr"],
                                steps_per_epoch - skip, t_epoch, t_first, rows, choice)
        run.history.append(metrics)
        run.epoch_losses = []
        print0(json.dumps(metrics))
        checkpoint(run_dir / ("final.pt" if epoch + 1 == c.epochs else f"ckpt-{run.step:08d}.pt"))
        log_epoch(run_dir, run.history, tb, rank)
    finish_log(run_dir, metrics, tb, rank)
    print0(json.dumps(metrics))
    return None

# -----------------------------------------------------------------------------
# `ferkd.py eval`, `ferkd.py export`, `ferkd.py plot`

@dataclass(frozen=True)
class EvalConfig:  # --eval_res/--eval_ratio as in `train`, whose values the checkpoint carries
    ckpt: str = ""          # checkpoint written by `ferkd.py train` (final.pt or ckpt-STEP.pt)
    data: str = ""          # dataset whose test split is evaluated; "": the one the checkpoint trained on
    eval_res: int = 0       # input resolution; 0: the run's own (its --eval_res, or its final training res)
    eval_ratio: float = 0.0  # image folders: centre crop's side / the image's shorter side; 0: the run's own
    batch_size: int = 512   # images per forward, all processes together
    num_workers: int = 2    # FFCV decoding threads per process
    device: str = "auto"    # auto | cpu | cuda
    amp: str = "auto"       # auto | true | false, as in training (models.autocast_dtype)


def evaluate_checkpoint(**flags):
    """Top-1, top-5 and per-class top-1 of a checkpoint on a test split; the last line printed is JSON."""
    c = parse_config(EvalConfig, flags)
    if not c.ckpt:
        raise UserError("--ckpt=FILE.pt is required")
    if c.batch_size < 1 or c.num_workers < 1 or c.eval_res < 0 or not 0 <= c.eval_ratio <= 1:
        raise UserError("--batch_size and --num_workers must be >= 1, --eval_res >= 0, --eval_ratio in "
                        "(0, 1] (0: the checkpoint's)")
    check_amp(c.amp)
    rank, world, device = setup_distributed(c.device)
    model, ckpt = load_checkpoint(c.ckpt)
    run_res, run_ratio = checkpoint_eval(ckpt)
    data, res, ratio = c.data or ckpt["config"]["data"], c.eval_res or run_res, c.eval_ratio or run_ratio
    loader, ds = eval_loader(data, res, ratio, max(1, c.batch_size // world), c.num_workers, rank, world,
                             device)
    if list(ds.classes) != list(ckpt["classes"]):
        raise UserError(f"{c.ckpt} predicts {len(ckpt['classes'])} classes "
                        f"({', '.join(ckpt['classes'][:4])}, ...), --data={data} has {len(ds.classes)} "
                        f"({', '.join(ds.classes[:4])}, ...)")
    model.to(device, memory_format=torch.channels_last)
    metrics, per_class = evaluate(model, loader, device, autocast_dtype(device, c.amp)[0], len(ds.classes))
    acc = (100 * per_class[:, 0] / per_class[:, 2].clamp(min=1)).tolist()
    print0(json.dumps(dict(ckpt=str(c.ckpt), data=data, eval_res=res, eval_ratio=ratio, **metrics,
                           per_class_top1={name: round(a, 2) for name, a in zip(ds.classes, acc)})))


@dataclass(frozen=True)
class ExportConfig:
    ckpt: str = ""          # checkpoint written by `ferkd.py train`
    out: str = ""           # the .pt2 file to write; "": the checkpoint's path with .pt2
    overwrite: bool = False  # replace an existing --out


def export(**flags):
    """Write the model with torch.export (TorchScript is deprecated since torch 2.5): a .pt2 whose program
    takes (N, 3, H, W) float32 images normalized by beton.MEAN/STD and returns (N, C) logits; its extra file
    ferkd.json names the classes, res, eval_res, eval_ratio, mean and std. Load with
    torch.export.load(path).module(). N, H and W are dynamic: traced at the training res, the program takes
    other sizes too (the run's eval_res, say) within the shape guards torch.export derives from the model
    (Dim.AUTO): a torchvision ResNet traced at 33 px or more takes any size from 33 px up, one traced at
    32 px or less no size above 32; a size outside them raises the program's guard error."""
    c = parse_config(ExportConfig, flags)
    if not c.ckpt:
        raise UserError("--ckpt=FILE.pt is required")
    if not c.out:
        c = dataclasses.replace(c, out=str(Path(c.ckpt).with_suffix(".pt2")))
    if not c.out.endswith(".pt2"):
        raise UserError(f"--out={c.out} should end in .pt2 (torch.export's archive format)")
    if Path(c.out).exists() and not c.overwrite:
        raise UserError(f"{c.out} exists; pass --overwrite to replace it")
    if not Path(c.out).resolve().parent.is_dir():
        raise UserError(f"output directory {Path(c.out).parent} does not exist")
    model, ckpt = load_checkpoint(c.ckpt)
    model.eval()
    res, (eval_res, eval_ratio) = checkpoint_res(ckpt), checkpoint_eval(ckpt)
    example = torch.randn(2, 3, res, res)
    auto = torch.export.Dim.AUTO  # dynamic where the model allows it, specialized where it does not
    program = torch.export.export(model, (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1), 2: auto, 3: auto},))
    meta = dict(arch=ckpt["config"]["arch"], classes=list(ckpt["classes"]), res=res, eval_res=eval_res,
                eval_ratio=eval_ratio, mean=MEAN, std=STD, source=str(c.ckpt),
                input="(N, 3, H, W) float32 RGB: (pixel - 255 mean) / (255 std); trained at res x res, "
                      "evaluated at eval_res x eval_res (a centre crop of side eval_ratio x the shorter one)")
    extra = {"ferkd.json": json.dumps(meta)}
    atomic_write(c.out, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    print(json.dumps(dict(out=c.out, arch=meta["arch"], res=res, num_classes=len(meta["classes"]))))


@dataclass(frozen=True)
class PlotConfig:
    out: str = ""  # the PNG to write; "": plot.png beside the first run directory


def plot(*run_dirs, **flags):
    """Test top-1 of runs against epochs and against training time (the clock stops during evaluation and
    checkpointing), from each run directory's metrics.jsonl, in one PNG."""
    c = parse_config(PlotConfig, flags)
    if not run_dirs:
        raise UserError("name at least one run directory: python ferkd.py plot RUN_DIR [RUN_DIR ...]")
    runs = []
    for d in map(Path, run_dirs):
        log = d / "metrics.jsonl"
        if not log.is_file():
            raise UserError(f"{log} not found: is {d} a run directory of `ferkd.py train`?")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if not rows:
            raise UserError(f"{log} holds no finished epoch yet")
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        runs.append((f"{d.name} ({cfg.get('kd', '?')}, {cfg.get('arch', '?')})", rows))
    import matplotlib  # imported here: only this command draws
    import matplotlib.ticker
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, rows in runs:
        top1 = [m["top1"] for m in rows]
        axes[0].plot([m["epoch"] for m in rows], top1, marker="o", label=name)
        axes[1].plot([m["train_seconds"] for m in rows], top1, marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="test top-1 %", title="top-1 vs epoch")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].set(xlabel="training time, s (evaluation excluded)", title="top-1 vs time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(c.out or Path(run_dirs[0]).parent / "plot.png")
    if not out.resolve().parent.is_dir():
        raise UserError(f"output directory {out.parent} does not exist")
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110))
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli({"train": train, "eval": evaluate_checkpoint, "export": export, "plot": plot})
