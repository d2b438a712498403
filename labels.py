"""
Region soft labels for FKD / FerKD, stored beside the images in one FFCV `.beton`.

    python labels.py build --data=fashion-mnist --teacher=runs/teacher/final.pt --out=data/fm-labels.beton
    python labels.py build --data=imagefolder:/data/imagenet --teacher=torchvision:resnet50 --out=in1k.beton
    python labels.py build --data=imagefolder:/data/imagenet --teacher=timm:convnext_base --out=in1k.beton
    torchrun --nproc_per_node=8 labels.py build ...   # each process takes a share of the chunks; same bytes
    python labels.py inspect data/fm-labels.beton --rows=3   # the header, p_gt's spread, the first records
    python labels.py show data/fm-labels.beton --out=regions.png --thresholds=p_gt --t_low=0.1 --t_mid=0.5 \
        --t_top=0.99

Killed, a build is finished by re-running the same command; the finished file does not depend on where it
stopped or on the number of processes (see `build`).

A strong teacher is run once over R random-resized crops ("regions") of every training image (FKD, Shen &
Xing, ECCV 2022). For each region we keep what the trainer needs to replay it and learn from it (FerKD,
Zhiqiang Shen, ICCV 2023, arXiv 2312.17473): its box and flip, the teacher's top-k classes and probabilities,
and p_gt, the teacher's probability of the ground-truth class (FerKD's calibration needs it even when that
class is not in the top-k).

The file's layout and everything the trainer shares with this script (records, datasets, the FFCV writer, the
region decoder, the header) are in beton.py; the teachers (our checkpoints, torchvision, timm) and
FerKD's region categories that `show` draws are in models.py. This file holds the commands.
"""
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from beton import (MEAN, QUANTIZATION, SCHEMA_VERSION, STD, alloc_table_ptr, attach_header, box_pixels,
                   epoch_batches, grid_boxes, image_sizes, load_dataset, pack_regions, read_header,
                   read_regions, region_bytes, region_loader, region_plan, region_slots, regions_crc32,
                   seeded_regions, set_alloc_table, to_model_input, unpack_regions, whole_image_plan,
                   write_beton)
from kernels_triton import rest_share
from models import (CHUNK_IMAGES, FERKD_DEFAULTS, autocast_dtype, check_teacher, check_thresholds,
                    load_teacher, category_lut, region_scores, threshold_defaults)
from runtime import (UserError, atomic_write, barrier, on_all_ranks, on_rank0, parse_config, print0, run_cli,
                     setup_distributed)


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
    subset: int = 0              # label only the N images that `ferkd.py train --subset=N` trains on (the file
                                 # holds those N images; 0: all): R regions of N images cost R x N forwards
    num_workers: int = 2         # FFCV decoding threads
    device: str = "auto"         # auto | cpu | cuda
    overwrite: bool = False      # replace an existing --out, or discard an unfinished build of another config



def check_build_config(c):
    if not c.out:
        raise UserError("--out=FILE.beton is required")
    if not c.teacher:
        raise UserError("--teacher=CKPT or --teacher=torchvision:NAME is required")
    if c.subset < 0:
        raise UserError("--subset must be >= 0")
    if c.regions < 1 or c.k < 1 or c.batch_size < 1 or c.chunk < 1 or c.temperature <= 0:
        raise UserError("--regions, --k, --batch_size, --chunk and --temperature must be positive")
    if not 0 < c.scale_min <= 1:
        raise UserError("--scale_min must be in (0, 1]")
    if not Path(c.out).resolve().parent.is_dir():
        raise UserError(f"output directory {Path(c.out).parent} does not exist")


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
    ptr = json.loads((state / "build.json").read_text())["alloc_table_ptr"]
    set_alloc_table(partial, ptr, (state / "alloc.bin").read_bytes())


@torch.no_grad()
def teacher_probs(model, x, device, temperature):
    # autocast only on GPUs, by the trainer's --amp=auto rule (bf16 where native, else fp16: a forward needs
    # no GradScaler); fp32 on every CPU keeps CPU builds exact, so tests can compare files byte for byte
    amp_dtype = autocast_dtype(device)[0] if device.type == "cuda" else None
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x.to(device))
    return F.softmax(logits.float() / temperature, dim=1)


def teacher_topk(model, x, labels, R, k, device, temperature):
    """The teacher on a batch of B images' R regions + whole image, reduced on the device to what is stored:
    top-k probabilities and classes (B, R, k), p_gt (B, R) and the whole image's top-1 (B,), then copied to
    the host (a GPU build copied all (B, R + 1, C) fp32 probabilities: 22 MB a batch at C = 21,843)."""
    p = teacher_probs(model, x, device, temperature).view(len(labels), R + 1, -1)   # on the device
    top_p, top_i = p[:, :R].topk(k, dim=2)                                          # (B, R, k)
    gt = p[:, :R].gather(2, labels.to(p.device).view(-1, 1, 1).expand(-1, R, 1)).squeeze(2)  # (B, R) p_gt
    return tuple(t.cpu() for t in (top_p, top_i, gt, p[:, R].argmax(1)))


def write_images(mode, ds, partial, state, key, R, D):
    """Phase 1 (rank 0): the images, with all-zero region records, through `write_beton` (encoded on every
    core, written in index order by one thread, so the layout is the same every time); then the state that
    makes the rest resumable. Skipped when an earlier run got this far."""
    if mode == "finished":
        shutil.rmtree(state)
    if mode != "fresh":
        return
    shutil.rmtree(state, ignore_errors=True)
    partial.unlink(missing_ok=True)
    N = len(ds.labels)
    zeros = np.broadcast_to(np.zeros((1, R, D), np.uint8), (N, R, D))  # one record block, no N copies
    t_write = time.time()
    write_beton(partial, ds, zeros)
    print(f"wrote the {N} images in {time.time() - t_write:.0f} s "
          f"({N / (time.time() - t_write):.0f} images/s)", flush=True)
    state.mkdir()
    ptr = alloc_table_ptr(partial)
    with open(partial, "rb") as f:
        f.seek(ptr)
        table_bytes = f.read()
    atomic_write(state / "alloc.bin", lambda tmp: tmp.write_bytes(table_bytes))
    started = json.dumps(dict(key=key, alloc_table_ptr=ptr))
    atomic_write(state / "build.json", lambda tmp: tmp.write_text(started))


def label_chunks(c, model, teacher_id, device, partial, state, todo, chunk, rank0, C):
    """Phase 2 on this rank's unfinished chunks: each image's region boxes and flips, a function of (seed,
    image index) only, in the pixels of the stored image; the teacher on every region and on the whole image,
    decoded by the student's own decoder; the records written into the file, then the chunk marked done."""
    heights, widths = image_sizes(partial)
    N, R, k = len(heights), c.regions, c.k
    n_chunks = -(-N // chunk)
    indices = np.concatenate([np.arange(i * chunk, min(N, (i + 1) * chunk)) for i in todo])
    # np.zeros maps pages lazily, so these N-row arrays hold memory only for the rows this rank fills: its
    # share of the images (a plan row is one crop for the decoder: its box in pixels and its flip)
    qboxes, flips = np.zeros((N, R, 4), np.uint8), np.zeros((N, R), bool)
    plan = np.zeros((N, R + 1, 5), np.int32)
    for i in indices:
        qboxes[i], flips[i] = seeded_regions(c.seed, i, R, heights[i], widths[i], c.scale_min)
        plan[i, :R] = region_plan(qboxes[i], flips[i], heights[i], widths[i])  # what the student will replay
        plan[i, R] = whole_image_plan(heights[i:i + 1], widths[i:i + 1])[0, 0]  # and the whole image
    slots = region_slots(partial)
    fd = os.open(partial, os.O_RDWR)  # records go in with pwrite: no file pages mapped into this process
    loader = region_loader(partial, plan, c.res, max(1, c.batch_size // (R + 1)), c.num_workers,
                           indices=indices)
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(indices) * (R + 1), desc=f"teacher ({device.type})", unit="crop", unit_scale=True,
               disable=not rank0 or not tty)
    hits = np.zeros(2, np.int64)  # this chunk's (region top-1, whole-image top-1) hits
    t_chunks, n_done = time.time(), 0
    for images, labels, index in epoch_batches(loader, 0):
        x = to_model_input(images, device, teacher_id["mean"], teacher_id["std"])
        top_p, top_i, gt, whole_top1 = teacher_topk(model, x, labels, R, k, device, c.temperature)
        idx = index.numpy().astype(np.int64)
        rec = pack_regions(qboxes[idx], flips[idx], top_i.numpy(), top_p.numpy(), gt.numpy(), C)
        for s, r in zip(slots[idx], rec):                                   # (R, D) records per image
            os.pwrite(fd, r.tobytes(), s)
        hits += [(top_i[..., 0] == labels.view(-1, 1)).sum().item(),
                 (whole_top1 == labels).sum().item()]
        bar.update(len(idx) * (R + 1))
        ci = int(idx[0]) // chunk
        if idx[-1] == min(N, (ci + 1) * chunk) - 1:  # its last batch: make the chunk durable, then say so
            os.fsync(fd)
            chunk_hits = json.dumps(dict(region_hits=int(hits[0]), image_hits=int(hits[1])))
            atomic_write(state / f"c{ci:06d}.json", lambda tmp: tmp.write_text(chunk_hits))
            hits[:] = 0
            n_done += min(N, (ci + 1) * chunk) - ci * chunk
            if rank0 and not tty:  # a log file gets a line per chunk instead of the bar
                rate = n_done / (time.time() - t_chunks)
                print(f"chunk {ci + 1}/{n_chunks}: {rate:.0f} images/s, {rate * R:.0f} regions/s, "
                      f"ETA {(len(indices) - n_done) / rate:.0f} s", flush=True)
    bar.close()
    os.close(fd)


def finish(partial, state, out, header):
    """Phase 3 (rank 0): our header after FFCV's data (with the records' checksum), the rename into place,
    the state removed."""
    restore_alloc_table(partial, state)
    attach_header(partial, dict(header, regions_crc32=regions_crc32(partial, header["regions"] *
                                                                    header["region_bytes"])))
    os.replace(partial, out)
    shutil.rmtree(state)


def run_chunks(c, key, ds, R, D, chunk, rank, world, fill):
    """What `build` and `import` share around their phase 2: resume or start afresh (phase 1 on rank 0, the
    other ranks waiting for it or stopping with its error), then fill(partial, state, todo) on this rank's
    unfinished chunks (rank r takes chunks r, r + W, ...). Returns (partial, state, each chunk's state) on
    rank 0 once every chunk is done, for phase 3; None on the other ranks, or when an earlier run finished."""
    out = Path(c.out)
    partial, state = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.d")
    mode = previous_build(c, key, out, partial, state)
    barrier()  # every rank has read the old state before rank 0 changes it
    on_rank0(lambda: write_images(mode, ds, partial, state, key, R, D))
    if mode == "finished":
        print0(f"{out} was already built; removed the leftover {state}")
        return None
    N = len(ds.labels)
    n_chunks = -(-N // chunk)
    mine = range(rank, n_chunks, world)
    todo = [i for i in mine if not (state / f"c{i:06d}.json").exists()]
    print0(f"{N} images in {n_chunks} chunks of {chunk}, {world} process(es); "
           f"rank 0: {len(todo)} chunks to do, {len(mine) - len(todo)} done before")
    # an error on any rank (a full disk, a damaged image or label file) stops every rank with its one line;
    # the chunks done so far stay for the re-run
    on_all_ranks(lambda: todo and fill(partial, state, todo))
    if rank != 0:
        return None
    return partial, state, [json.loads((state / f"c{i:06d}.json").read_text()) for i in range(n_chunks)]


def build(**flags):
    """Build a label file: write the images (phase 1), run the teacher on every region through the trainer's
    own decoder chunk by chunk and write its top-k and p_gt in (phase 2), then attach the header and rename
    into place (phase 3). Killed and re-run, it goes on where it stopped; under torchrun each rank takes every
    W-th chunk. The bytes depend on neither."""
    c = parse_config(BuildConfig, flags)
    check_build_config(c)
    rank, world, device = setup_distributed(c.device)
    ds = load_dataset(c.data, "train")
    fingerprint = ds.fingerprint()  # of all the images: what the trainer checks --data against
    c = dataclasses.replace(c, res=c.res or ds.res, subset=c.subset if c.subset < len(ds.labels) else 0)
    ds = ds.subset(c.subset) if c.subset else ds
    C, N, R, k, D = len(ds.classes), len(ds.labels), c.regions, c.k, region_bytes(c.k)
    if k > C or C > 65536:
        raise UserError(f"--k={k} must be at most the class count {C} (<= 65536)")
    model, teacher_id = load_teacher(c.teacher)
    check_teacher(model, c.teacher, c.res, C)
    model.to(device).to(memory_format=torch.channels_last)
    per_batch = max(1, c.batch_size // (R + 1))  # images per teacher forward
    chunk = -(-c.chunk // per_batch) * per_batch  # whole batches, so batches never straddle two chunks
    print0(f"build: {json.dumps(dataclasses.asdict(c))}")
    # everything that can change a byte of the output: a partial build is only resumed under the same key
    key = json.loads(json.dumps(dict(
        schema=SCHEMA_VERSION, data=ds.name, fingerprint=fingerprint, teacher=teacher_id, regions=R, k=k,
        temperature=c.temperature, seed=c.seed, res=c.res, scale_min=c.scale_min, batch_images=per_batch,
        chunk=chunk, subset=c.subset, torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")))
    t0 = time.time()
    result = run_chunks(c, key, ds, R, D, chunk, rank, world, lambda partial, state, todo: label_chunks(
        c, model, teacher_id, device, partial, state, todo, chunk, rank == 0, C))
    if result is None:
        return None
    partial, state, done = result
    out = Path(c.out)
    # the teacher's accuracies summed over every chunk, whoever computed it
    region_hits, image_hits = sum(d["region_hits"] for d in done), sum(d["image_hits"] for d in done)
    finish(partial, state, out, dict(
        schema=SCHEMA_VERSION, dataset=ds.name, fingerprint=fingerprint, images=N, subset=c.subset,
        classes=ds.classes, num_classes=C, teacher=teacher_id, temperature=c.temperature, k=k, regions=R,
        seed=c.seed, res=c.res, scale=[c.scale_min, 1.0], ratio=[3 / 4, 4 / 3],
        boxes="torchvision RandomResizedCrop in stored-image pixels, on a 0..255 grid", region_bytes=D,
        quantization=QUANTIZATION, teacher_device=key["device"],
        teacher_batch_images=per_batch, teacher_region_top1=region_hits / (N * R),
        teacher_image_top1=image_hits / N))
    print(f"wrote {out}: {N} images x {R} regions, {D} bytes/region (labels {N * R * D / 2**20:.1f} MiB), "
          f"teacher top-1 {100 * region_hits / (N * R):.2f}% on regions, "
          f"{100 * image_hits / N:.2f}% on images, "
          f"{time.time() - t0:.0f} s")
    return None


@dataclass(frozen=True)
class InspectConfig:
    rows: int = 3  # images whose first three region records are printed


SPREAD = (0.1, 0.9)  # p_gt below the first is a region that hardly shows its class, above the second one
# that clearly does (issue 35): their shares tell whether the regions differ, FerKD's premise


def pgt_spread(counts):
    """(share of regions with p_gt < 0.1, share with p_gt > 0.9) from (256,) counts of the stored p_gt byte,
    decoded as `unpack_regions` decodes it (byte / 255)."""
    p = np.arange(256) / 255
    return counts[p < SPREAD[0]].sum() / counts.sum(), counts[p > SPREAD[1]].sum() / counts.sum()


def spread_text(counts):
    low, high = pgt_spread(counts)
    return f"p_gt < {SPREAD[0]:g} on {low:.1%} of regions, > {SPREAD[1]:g} on {high:.1%}"


def inspect(path, **flags):
    """Print a label file's header, the spread of p_gt over all its regions (one pass over the file), and its
    first region records: python labels.py inspect FILE [--rows=3]."""
    c = parse_config(InspectConfig, flags)
    if c.rows < 0:
        raise UserError(f"--rows must be >= 0, got {c.rows}")
    rows = c.rows
    header = read_header(path)
    print(json.dumps({k: v for k, v in header.items() if k != "classes"}, indent=1))
    table = read_regions(path, header, copy=False)
    counts = pgt_histogram(table, header["k"])[0]
    print(f"{len(table)} images x {header['regions']} regions: {spread_text(counts)}"
          + (" (p_gt estimated on some: see pgt_estimated)" if header.get("pgt_estimated") else ""))
    ids, probs, pgt, flip = unpack_regions(torch.from_numpy(np.array(table[:rows])), header["k"])
    for i in range(min(rows, len(table))):
        for r in range(min(3, header["regions"])):
            print(f"image {i} region {r}: box {table[i, r, :4].tolist()} flip {int(flip[i, r])} "
                  f"top-k {ids[i, r].tolist()} p {[round(v, 3) for v in probs[i, r].tolist()]} "
                  f"p_gt {pgt[i, r].item():.3f}")


# -----------------------------------------------------------------------------
# `labels.py fidelity`: how much of the teacher a label file keeps (issue 24)

@dataclass(frozen=True)
class FidelityConfig:
    teacher: str = ""         # the teacher to compare with: the file's own, or any `build` teacher
    samples: int = 2000       # regions re-scored: a random region from each of min(samples, N) random images,
                              # more per image when samples > N
    seed: int = 0             # which images and regions
    batch_size: int = 256     # crops per teacher forward
    num_workers: int = 2      # FFCV decoding threads
    device: str = "auto"      # auto | cpu | cuda


def recovered_targets(ids, probs, C):
    """The (n, C) float64 target the trainer learns from a stored top-k: P on the top-k, the rest's share
    max(1 - sum P, 0) / (C - k) (`rest_share`, the loss's own) on every other class, computed in float32 as
    the loss does; and the regions whose target puts a stored class below that share (the teacher's order
    inverted)."""
    probs = probs.float()
    share = rest_share(probs, C)                                                         # (n, 1) fp32
    target = share.double().expand(-1, C).clone().scatter_(1, ids, probs.double())
    return target, (probs < share).any(1)


def kl_stats(p, target, inverted):
    """KL(teacher's softmax || target) per region (target floored at 1e-12: a zero or negative share, as a
    float16 top-k summing past 1 leaves, is an infinite KL otherwise), its mean and median, and the share of
    regions with an inverted order."""
    kl = (p * (p.clamp_min(1e-300).log() - target.clamp_min(1e-12).log())).sum(1)
    return dict(kl_mean=kl.mean().item(), kl_median=kl.median().item(),
                inverted=inverted.double().mean().item())


def fidelity(path, **flags):
    """Re-run a teacher on a sample of a label file's stored regions, cut by the student's own decoder, and
    say how far the file's target is from the teacher's full softmax (at the file's temperature), beside what
    FKD's float16 top-k and an exact top-k would keep of the same softmax:
        python labels.py fidelity FILE --teacher=T [--samples=2000]
    The last line is JSON: KL mean and median and the share of inverted regions for each code. With the
    file's own teacher, "file" - "exact_topk" is what the code loses; "exact_topk" is what top-k loses."""
    c = parse_config(FidelityConfig, flags)
    if not c.teacher:
        raise UserError("--teacher=CKPT or --teacher=torchvision:NAME is required")
    if c.samples < 1 or c.batch_size < 1:
        raise UserError("--samples and --batch_size must be positive")
    header = read_header(path)
    ds = load_dataset(header["dataset"], "train")
    if ds.fingerprint() != header["fingerprint"]:
        raise UserError(f"{path} was built from other data than {header['dataset']} holds now")
    table = read_regions(path, header, copy=False)
    N, R, k, C, res, T = len(table), header["regions"], header["k"], header["num_classes"], header["res"], \
        header["temperature"]
    _, _, device = setup_distributed(c.device)
    model, teacher_id = load_teacher(c.teacher)
    check_teacher(model, c.teacher, res, C)
    model.to(device).to(memory_format=torch.channels_last)
    # the sample: m random images, n random regions of each
    rng = np.random.default_rng(c.seed)
    m = min(N, c.samples)
    n = min(R, -(-c.samples // m))
    images = np.sort(rng.choice(N, m, replace=False))
    regions = np.stack([rng.choice(R, n, replace=False) for _ in range(m)])           # (m, n)
    rec = table[images[:, None], regions]                                             # (m, n, D)
    heights, widths = image_sizes(path)
    _, _, _, flip = unpack_regions(torch.from_numpy(rec), k)
    plan = np.zeros((N, n, 5), np.int32)
    plan[images] = region_plan(rec[..., :4], flip.numpy(), heights[images, None], widths[images, None])
    loader = region_loader(path, plan, res, max(1, c.batch_size // n), c.num_workers, indices=images)
    where = {int(i): j for j, i in enumerate(images)}
    p = torch.empty(m, n, C, dtype=torch.float64)
    for crops, _, index in epoch_batches(loader, 0):
        x = to_model_input(crops, device, teacher_id["mean"], teacher_id["std"])
        rows = [where[int(i)] for i in index]
        p[rows] = teacher_probs(model, x, device, T).view(len(index), n, C).double().cpu()
    p = p.flatten(0, 1)                                                               # (m n, C)
    ids, probs, _, _ = unpack_regions(torch.from_numpy(rec.reshape(m * n, -1)), k)
    top_p, top_i = p.float().topk(k, dim=1)  # its own top-k
    result = dict(
        samples=m * n, classes=C, k=k, region_bytes=header["region_bytes"], teacher=c.teacher,
        file=kl_stats(p, *recovered_targets(ids, probs, C)),
        fp16_topk=kl_stats(p, *recovered_targets(top_i, top_p.half().float(), C)),
        exact_topk=kl_stats(p, *recovered_targets(top_i, top_p, C)))
    result["file_vs_fp16"] = {key: result["file"][key] / max(result["fp16_topk"][key], 1e-30)
                              for key in ("kl_mean", "kl_median")}
    for name in ("file", "fp16_topk", "exact_topk"):
        r = result[name]
        print(f"{name:>10}: KL mean {r['kl_mean']:.5f} median {r['kl_median']:.5f}, "
              f"order inverted on {r['inverted']:.1%} of regions")
    print(json.dumps(result))
    return None


# -----------------------------------------------------------------------------
# `labels.py import`: FKD's published soft labels in the teacher's place (issue 15)
#
# FKD (FKD_SLG/generate_soft_label.py) writes one file per training image, DIR/train/<class>/<stem>.tar, with
# torch.save([coords, flip, out]) of NumPy arrays: coords (N, 4) float32, or float16 with --use_fp16, are
# (i/H, j/W, h/H, w/W) of torchvision's RandomResizedCrop box in the original image; flip (N,) bool; out
# (N, 2, k) the top-k class ids as floats, then their probabilities. FKD trains on the top-k with the rest of
# the mass spread evenly over the other C - k classes, as ferkd does. The import is `build` with these files
# in the teacher's place: the same three phases, resume state and sharding.

@dataclass(frozen=True)
class ImportConfig:
    fkd: str = ""               # FKD's label folder: DIR/train/<class>/<image stem>.tar
    data: str = ""              # imagefolder:/path whose train/ images the labels were made from
    out: str = ""               # output .beton
    regions: int = 0            # R: each file's first R regions; 0: as many as the first image's file holds
    res: int = 0                # crop side the student trains at; 0: the dataset's default (224)
    chunk: int = 1024           # images per chunk, the unit of resume and sharding
    skip_missing: bool = False  # leave out the images that have no label file (counted) instead of stopping
    overwrite: bool = False     # replace an existing --out, or discard an unfinished import of another config


# What FKD's files name when unpickled (NumPy 1.x writes numpy.core, 2.x numpy._core): torch's weights-only
# unpickler refuses every other global, so a file that carries code or any other object runs nothing
_RECONSTRUCT = np._core.multiarray._reconstruct
FKD_SAFE_GLOBALS = [(_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                    (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
                    *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.bool_))]


def fkd_label_path(fkd_dir, image):
    """Where FKD keeps an image's labels: the image path's last three parts (split/class/name), the name cut
    at its first dot as FKD's `split('.')[0]` cuts it, then .tar (FKD_train/utils_FKD.py, ImageFolder_FKD)."""
    split, cls, name = Path(image).parts[-3:]
    return Path(fkd_dir) / split / cls / (name.split(".")[0] + ".tar")


def load_fkd(path):
    """One FKD label file -> (coords (N, 4), flip (N,), out (N, 2, k)) as stored, and the file's bytes.
    Loaded with torch's weights-only unpickler and only NumPy's array types allowed, never full unpickling."""
    try:
        data = Path(path).read_bytes()
        with torch.serialization.safe_globals(FKD_SAFE_GLOBALS):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"cannot read FKD label file {path}: {e.strerror}") from None
    except pickle.UnpicklingError as e:
        bad = re.search(r"GLOBAL (\S+)", str(e))
        if bad:
            raise UserError(f"FKD label file {path} needs {bad.group(1)} to load, which is not one of the "
                            f"NumPy types FKD's files hold: refused, nothing in it was run") from None
        raise UserError(f"cannot read FKD label file {path}: not a torch.save file (truncated?)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for a truncated or damaged archive
        raise UserError(f"cannot read FKD label file {path}: truncated or damaged "
                        f"({type(e).__name__})") from None
    if not (isinstance(obj, (list, tuple)) and len(obj) == 3 and all(isinstance(a, np.ndarray) for a in obj)):
        raise UserError(f"FKD label file {path} does not hold FKD's [coords, flip, out] NumPy arrays")
    coords, flip, out = obj
    n = len(coords)
    if (coords.shape != (n, 4) or flip.shape != (n,) or out.ndim != 3 or out.shape[:2] != (n, 2) or n < 1
            or coords.dtype.kind != "f" or flip.dtype != np.bool_ or out.dtype.kind != "f"):
        raise UserError(f"FKD label file {path} holds arrays {coords.dtype}{list(coords.shape)}, "
                        f"{flip.dtype}{list(flip.shape)}, {out.dtype}{list(out.shape)}; FKD writes float "
                        f"(N, 4), bool (N,), float (N, 2, k)")
    return (coords, flip, out), data


def check_fkd(path, arrays, R, k, C):
    """The first R regions of one file's arrays, checked against the import's R and k and the dataset's C
    classes: (coords (R, 4) float64, flip (R,) bool, ids (R, k) int64, probs (R, k) float64)."""
    coords, flip, out = arrays
    if out.shape[2] != k:
        raise UserError(f"FKD label file {path} keeps the top {out.shape[2]} classes, the first file the top "
                        f"{k}: an import takes one label type")
    if len(coords) < R:
        raise UserError(f"FKD label file {path} holds {len(coords)} regions, fewer than R={R}; pass "
                        f"--regions={len(coords)} or less (every image keeps the same R)")
    coords, out = coords[:R].astype(np.float64), out[:R].astype(np.float64)
    top, left, h, w = coords.T
    slack = 2 ** -10  # float16 rounding of i/H + h/H near 1
    if not (np.isfinite(coords).all() and (coords >= 0).all() and (coords <= 1).all() and (h > 0).all()
            and (w > 0).all() and (top + h <= 1 + slack).all() and (left + w <= 1 + slack).all()):
        raise UserError(f"FKD label file {path} has crop coords outside [0, 1] (or an empty crop)")
    ids, probs = out[:, 0], out[:, 1]
    if not (np.isfinite(ids).all() and (ids == np.rint(ids)).all() and (ids >= 0).all() and (ids < C).all()):
        raise UserError(f"FKD label file {path} has class ids outside 0..{C - 1}, the {C} classes of --data")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs.sum(1) <= 1 + 1e-2).all()):
        raise UserError(f"FKD label file {path} has top-k probabilities outside [0, 1] or summing above 1")
    return coords, flip[:R], ids.astype(np.int64), probs


def fkd_boxes(coords, height, width):
    """FKD's fractions (R, 4) -> boxes (R, 4) uint8 on the 0..255 grid of the stored image (height x width).
    The edges are those FKD's own crop takes from an image of that size: resized_crop of a PIL image crops
    (j, i, j + w, i + h) with i = fraction x side in float64, and PIL rounds each edge half to even. FFCV
    stores the image scaled as a whole (max side 512), so the fractions carry over; `grid_boxes` keeps these
    edges exactly for sides up to 255 px, within side/510 + 1/2 px above (tests/test_import.py)."""
    top, left = coords[:, 0] * height, coords[:, 1] * width
    px = np.rint(np.stack([top, left, top + coords[:, 2] * height, left + coords[:, 3] * width], 1))
    px = np.minimum(px, [height, width, height, width])  # float16 fractions may overshoot the edge a little
    return grid_boxes(px.astype(np.int64), height, width)


def fkd_pgt(ids, probs, label, C):
    """p_gt per region and whether it is estimated. Where the true class is in the top-k, its probability;
    elsewhere FKD kept only that it is below the k-th, and we store what FKD's marginal smoothing gives every
    class outside the top-k, (1 - sum of top-k) / (C - k)."""
    hit = ids == label                                                # (R, k)
    known = hit.any(1)
    return np.where(known, (probs * hit).sum(1), rest_share(probs, C)[:, 0]), ~known


def import_chunks(ds, label_paths, partial, state, todo, chunk, R, k, rank0):
    """Phase 2 on this rank's unfinished chunks: each image's FKD file loaded and checked, its regions packed
    as `build` packs a teacher's and written into the file, then the chunk marked done with its counts and
    the sha256 of the label files it read."""
    heights, widths = image_sizes(partial)
    slots = region_slots(partial)
    N, C = len(heights), len(ds.classes)
    t0, n_done = time.time(), 0
    fd = os.open(partial, os.O_RDWR)  # records go in with pwrite, as in `label_chunks`
    try:
        for ci in todo:
            sha, estimated, hits = hashlib.sha256(), 0, 0
            for i in range(ci * chunk, min(N, (ci + 1) * chunk)):
                arrays, data = load_fkd(label_paths[i])
                sha.update(data)
                coords, flip, ids, probs = check_fkd(label_paths[i], arrays, R, k, C)
                pgt, guessed = fkd_pgt(ids, probs, ds.labels[i], C)
                box = fkd_boxes(coords, heights[i], widths[i])
                rec = pack_regions(box, flip, ids, probs, pgt, C)  # (R, D)
                os.pwrite(fd, rec.tobytes(), int(slots[i]))
                estimated += int(guessed.sum())
                hits += int((ids[:, 0] == ds.labels[i]).sum())
            os.fsync(fd)
            done = json.dumps(dict(pgt_estimated=estimated, region_hits=hits, sha256=sha.hexdigest()))
            atomic_write(state / f"c{ci:06d}.json", lambda tmp: tmp.write_text(done))
            n_done += min(N, (ci + 1) * chunk) - ci * chunk
            if rank0:
                rate = n_done / (time.time() - t0)
                print(f"chunk {ci + 1}/{-(-N // chunk)}: {rate:.0f} images/s", flush=True)
    finally:
        os.close(fd)


def import_fkd(**flags):
    """`labels.py import`: a label file from FKD's soft-label folder and the image folder it was made from, no
    teacher. R is --regions, or the first image's file's region count; every file must hold at least R
    regions (the first R are taken) and the same k. Killed and re-run it goes on where it stopped; under
    torchrun each rank takes every W-th chunk; the bytes depend on neither."""
    c = parse_config(ImportConfig, flags)
    if not (c.fkd and c.data and c.out):
        raise UserError("--fkd=DIR, --data=imagefolder:/path and --out=FILE.beton are required")
    if c.regions < 0 or c.chunk < 1 or c.res < 0:
        raise UserError("--regions and --res must be >= 0 and --chunk positive")
    if not Path(c.out).resolve().parent.is_dir():
        raise UserError(f"output directory {Path(c.out).parent} does not exist")
    rank, world, _ = setup_distributed("cpu")
    ds = load_dataset(c.data, "train")
    if not c.data.startswith("imagefolder:"):
        raise UserError("--data must be imagefolder:/path, the images FKD's labels were made from")
    fkd_dir = Path(c.fkd).expanduser().resolve()
    split_dir = fkd_dir / Path(ds.images[0]).parts[-3]  # FKD's DIR/train
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is not a directory (--fkd=DIR needs DIR/train/<class>/<image>.tar)")
    fkd_classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if fkd_classes != ds.classes:  # class ids are the sorted folder names (ImageFolder's): both must agree
        odd = sorted(set(fkd_classes) ^ set(ds.classes))[:3]
        raise UserError(f"{split_dir} has {len(fkd_classes)} class folders, the images {len(ds.classes)}; "
                        f"the label ids would not fit the classes (e.g. {', '.join(odd)} is in only one)")

    # every image's label file before anything is written (stat only: the files are read in phase 2)
    N_all, C = len(ds.labels), len(ds.classes)
    label_paths = [fkd_label_path(fkd_dir, p) for p in ds.images]
    have = np.array([p.is_file() for p in label_paths])
    missing = int(N_all - have.sum())
    if missing and (not c.skip_missing or missing == N_all):
        first = int(np.argmin(have))
        raise UserError(f"no FKD label file {label_paths[first]} for image {ds.images[first]} ({missing} of "
                        f"{N_all} images have none)" + ("; pass --skip_missing to leave them out"
                                                          if missing < N_all else ""))
    if missing:
        print0(f"leaving out the {missing} of {N_all} images that have no FKD label file (--skip_missing)")
    keep = np.flatnonzero(have)
    fingerprint = ds.fingerprint()  # the whole folder's, which `ferkd.py train --data` checks
    ds = dataclasses.replace(ds, labels=ds.labels[keep], images=[ds.images[i] for i in keep])
    label_paths = [label_paths[i] for i in keep]
    # R and k from the first file (the records are one (N, R, D) array); every file is checked against them
    first, _ = load_fkd(label_paths[0])
    R, k = c.regions or len(first[0]), first[2].shape[2]
    if k >= C or C > 65536:
        raise UserError(f"FKD's labels keep the top {k} classes, --data has {C}: it needs more than k "
                        f"(and at most 65536)")
    res, N, D, chunk = c.res or ds.res, len(keep), region_bytes(k), c.chunk
    print0(f"import: {json.dumps(dict(dataclasses.asdict(c), regions=R, res=res))}")
    source = f"fkd:{fkd_dir}"
    key = json.loads(json.dumps(dict(
        schema=SCHEMA_VERSION, source=source, data=ds.name, fingerprint=fingerprint,
        images=hashlib.sha256(keep.tobytes()).hexdigest()[:16], regions=R, k=k, res=res, chunk=chunk)))
    t0 = time.time()
    result = run_chunks(c, key, ds, R, D, chunk, rank, world, lambda partial, state, todo: import_chunks(
        ds, label_paths, partial, state, todo, chunk, R, k, rank == 0))
    if result is None:
        return None
    partial, state, done = result
    out = Path(c.out)
    estimated, hits = sum(d["pgt_estimated"] for d in done), sum(d["region_hits"] for d in done)
    checksum = hashlib.sha256("".join(d["sha256"] for d in done).encode()).hexdigest()[:16]
    finish(partial, state, out, dict(
        schema=SCHEMA_VERSION, dataset=ds.name, fingerprint=fingerprint, images=N, classes=ds.classes,
        num_classes=C, source=source, skipped_images=missing,
        # mean/std: FKD's ImageNet teachers' normalization (generate_soft_label.py), which the trainer uses
        teacher=dict(kind="fkd", name=f"FKD labels {fkd_dir.name}", checksum=checksum, mean=MEAN, std=STD),
        temperature=1.0, k=k, regions=R, res=res,  # T = 1: FKD's students learn from the stored softmax as is
        boxes="FKD's RandomResizedCrop fractions of the original image, on a 0..255 grid of the stored image",
        region_bytes=D, quantization=QUANTIZATION,
        pgt="the true class's top-k probability; where it is not in the top-k, (1 - sum of top-k) / (C - k)",
        pgt_estimated=estimated / (N * R), teacher_region_top1=hits / (N * R)))
    print(f"wrote {out}: {N} images x {R} regions from {fkd_dir}, {D} bytes/region; p_gt estimated "
          f"(true class not in the top-{k}) on {estimated / (N * R):.1%} of regions, top-1 = true class on "
          f"{hits / (N * R):.1%}; {time.time() - t0:.0f} s")
    return None


# -----------------------------------------------------------------------------
# `labels.py show`: a picture of what the teacher said, and of FerKD's calibration (issue 4)

CATEGORY = (("dropped", "#d62728"), ("hard", "#ff7f0e"), ("soft", "#2ca02c"))  # region_category's 0, 1, 2


@dataclass(frozen=True)
class ShowConfig:
    out: str = "regions.png"  # the PNG to write
    thresholds: str = ""      # p_gt | rank, as `ferkd.py train --thresholds` ("": models.FERKD_DEFAULTS)
    t_low: float = -1.0       # FerKD thresholds the regions are coloured by (-1: models.FERKD_DEFAULTS)
    t_mid: float = -1.0
    t_top: float = -1.0
    images: int = 4           # images drawn, evenly spaced through the file
    regions: int = 5          # regions drawn per image (its first ones)


def show_thresholds(c):
    """The thresholds `show` colours by (FerKD's defaults where left unset, as `ferkd.py train --kd=ferkd`
    takes them), and its flags checked."""
    mode = c.thresholds or FERKD_DEFAULTS["thresholds"]
    if mode not in ("p_gt", "rank"):
        raise UserError(f"--thresholds takes p_gt or rank, got {c.thresholds!r}")
    t = {name: getattr(c, name) for name in ("t_low", "t_mid", "t_top")}
    t.update({name: value for name, value in threshold_defaults(mode).items() if t[name] == -1.0})
    check_thresholds(**t, mode=mode)
    for name in ("images", "regions"):
        if getattr(c, name) < 1:
            raise UserError(f"--{name} takes a positive integer, got {getattr(c, name)!r}")
    if not c.out.lower().endswith(".png"):
        raise UserError(f"--out must name a .png file, got {c.out!r}")
    if not Path(c.out).resolve().parent.is_dir():
        raise UserError(f"output directory {Path(c.out).parent} does not exist")
    return mode, t


def decode_whole(path, pick, heights, widths):
    """{image index: (H x W x 3 uint8 image, label)} for the images `pick`, decoded whole by the trainer's
    decoder (square, at most 256 px; drawn stretched back to their shape)."""
    side = int(min(256, max(heights.max(), widths.max())))
    plan = whole_image_plan(heights, widths)
    decoded = {}
    for imgs, labels, index in epoch_batches(region_loader(path, plan, side, len(pick), 1, indices=pick), 0):
        decoded.update((int(i), (img[0].numpy().copy(), int(y))) for img, y, i in zip(imgs, labels, index))
    return decoded


def pgt_histogram(table, k, score=None, lut=None):
    """(3, 256) counts of the stored p_gt byte per category over the whole file, a chunk of images at a time:
    a region's category is lut[its score] (models.category_lut; without them, all in row 0)."""
    hist = np.zeros(3 * 256, np.int64)
    for s in range(0, len(table), CHUNK_IMAGES):
        key = table[s:s + CHUNK_IMAGES, :, 4 + 3 * k].astype(np.int64)
        if lut is not None:
            key += lut[score[s:s + CHUNK_IMAGES]].astype(np.int64) * 256
        hist += np.bincount(key.ravel(), minlength=3 * 256)
    return hist.reshape(3, 256)


def show(path, **flags):
    """Write a PNG: for --images images, their first --regions regions drawn on the image, each with the
    teacher's top-k, p_gt and FerKD category under the thresholds (FERKD_DEFAULTS when not given);
    below, the histogram of p_gt over every stored region by category, with the thresholds marked where
    they compare p_gt (--thresholds=p_gt).
        python labels.py show FILE --out=regions.png [--thresholds= --t_low= --t_mid= --t_top= --images=4
                                                      --regions=5]"""
    c = parse_config(ShowConfig, flags)
    mode, t = show_thresholds(c)
    import matplotlib  # imported here: only this command draws
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    header = read_header(path)
    table = read_regions(path, header, copy=False)                          # (N, R, D) uint8
    N, R, k, names = len(table), header["regions"], header["k"], header["classes"]
    score, lut = region_scores(table, k, mode == "rank"), category_lut(**t)  # a region's category: lut[score]

    # the chosen images, each beside its regions' labels, two to a row
    pick = np.linspace(0, N - 1, min(c.images, N)).round().astype(np.int64)
    cat = lut[score[pick]]  # (n, R) 0 dropped, 1 hard, 2 soft
    ids, probs, pgt, flip = unpack_regions(torch.from_numpy(table[pick]), k)  # (n, R, k) x 2, (n, R) x 2
    heights, widths = image_sizes(path)
    decoded = decode_whole(path, pick, heights, widths)
    n_show = min(c.regions, R)
    cols = min(2, len(pick))
    rows = -(-len(pick) // cols)
    fig = plt.figure(figsize=(7.5 * cols, 3.6 * rows + 3.2), layout="constrained")
    grid = fig.add_gridspec(rows + 1, 2 * cols, height_ratios=[3.6] * rows + [3.2],
                            width_ratios=[1, 1.3] * cols)
    short = lambda cls: names[cls][:12]
    for n, i in enumerate(pick):
        img, y = decoded[int(i)]
        H, W = int(heights[i]), int(widths[i])
        ax = fig.add_subplot(grid[n // cols, 2 * (n % cols)])
        # tiny images enlarged, pixels kept sharp
        ax.imshow(img, extent=(0, W, H, 0), interpolation="nearest")
        ax.set_title(f"image {i}: {names[y]}", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        lines = []
        for r in range(n_show):
            top, left, bottom, right = box_pixels(table[i, r, :4], H, W)
            colour = CATEGORY[cat[n, r]][1]
            ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, lw=2, ec=colour))
            ax.text(left + 0.02 * W, top + 0.02 * H, str(r), color="white", fontsize=9, va="top",
                    bbox=dict(fc=colour, ec="none", pad=1))
            topk = ", ".join(f"{short(cls)} {p:.2f}" for cls, p in zip(ids[n, r].tolist()[:3],
                                                                        probs[n, r].tolist()))
            lines.append((f"{r}{' (flip)' if flip[n, r] else ''}: {topk}\n"
                          f"   p_gt {pgt[n, r]:.2f} → {CATEGORY[cat[n, r]][0]}", colour))
        tx = fig.add_subplot(grid[n // cols, 2 * (n % cols) + 1])
        tx.axis("off")
        tx.text(0, 1, f"region: teacher top-{min(3, k)}", fontsize=9, va="top", weight="bold")
        for r, (line, colour) in enumerate(lines):
            tx.text(0, 0.9 - r * 0.9 / max(n_show, 1), line, fontsize=9, va="top", color=colour,
                    family="monospace")

    # p_gt over the whole file, stacked by category (a bin that a threshold cuts shows both parts)
    ax = fig.add_subplot(grid[rows, :])
    hist = pgt_histogram(table, k, score, lut)
    edges, bottom = np.linspace(0, 1, 52), 0  # 51 bins: byte v = round(255 p) falls in bin min(v // 5, 50)
    for category, (name, colour) in enumerate(CATEGORY):
        counts = np.bincount(np.minimum(np.arange(256) // 5, 50), weights=hist[category], minlength=51)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", bottom=bottom, color=colour,
               label=name)
        bottom = bottom + counts
    for name in ("t_low", "t_mid", "t_top") if mode == "p_gt" else ():  # rank thresholds are not p_gt values
        ax.axvline(t[name], color="black", ls="--", lw=1)
        ax.text(t[name], 1.0, f"{name}={t[name]:g} ", transform=ax.get_xaxis_transform(), fontsize=9,
                va="top", ha="right", rotation=90)
    share = hist.sum(1) / hist.sum()
    # imported FKD labels (`import`) lack p_gt where the true class is not in the top-k: say how often
    guessed = (f"; p_gt estimated (1 - sum of top-k) / (C - k) on {header['pgt_estimated']:.1%} of regions"
               if header.get("pgt_estimated") else "")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("p_gt: the teacher's probability of the true class, per region (stored as round(255 p))")
    ax.set_ylabel("regions")
    spread = spread_text(hist.sum(0))
    ax.set_title(f"{path}: {N} images x {R} regions, teacher {header['teacher']['name']}; " + ", ".join(
        f"{name} {s:.1%}" for (name, _), s in zip(CATEGORY, share)) + f"\n{spread}" + guessed, fontsize=10)
    ax.legend(loc="upper center")
    try:
        atomic_write(c.out, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
    print(f"wrote {c.out}: {len(pick)} images, {n_show} regions each; regions dropped / hard / soft at "
          f"--thresholds={mode} t_low={t['t_low']:g} t_mid={t['t_mid']:g} t_top={t['t_top']:g}: "
          + " / ".join(f"{s:.1%}" for s in share) + f"; {spread}" + guessed)


if __name__ == "__main__":
    run_cli({"build": build, "import": import_fkd, "inspect": inspect, "show": show,
             "fidelity": fidelity})
