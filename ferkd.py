"""
Train a student from stored region soft labels: FKD (Shen & Xing, ECCV 2022) and FerKD (Shen et al., 2023).

    python ferkd.py train --data=fashion-mnist --kd=none --arch=small64 --run_dir=runs/teacher
    python labels.py build --data=fashion-mnist --teacher=runs/teacher/final.pt --out=data/fm.beton
    python ferkd.py train --data=fashion-mnist --labels=data/fm.beton --kd=fkd --arch=small16 --run_dir=runs/fkd
    torchrun --nproc_per_node=8 ferkd.py train ...     # one process per device

Modes: `--kd=none` trains with RandomResizedCrop and label-smoothed cross-entropy (no label file, the baseline
and the way to train a teacher); `--kd=fkd` replays the stored regions of a label file and learns from the
teacher's top-k soft labels, never running a teacher; `--kd=ferkd` adds FerKD's calibration by p_gt.
The final line printed is a JSON object of the final metrics; `RUN_DIR/final.pt` holds the student.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from labels import (UserError, box_pixels, center_boxes, dataset_beton, full_boxes, image_sizes, load_dataset,
                    parse_config, pick_device, quantize_boxes, random_boxes, read_header, read_regions,
                    region_loader, run_cli, to_model_input, unpack_regions)

# -----------------------------------------------------------------------------
# Config

@dataclass(frozen=True)
class TrainConfig:
    data: str = "fashion-mnist"   # digits | fashion-mnist | imagefolder:/path (test split for evaluation)
    labels: str = ""              # label file from `labels.py build` (kd=fkd|ferkd)
    kd: str = "none"              # none: CE baseline | fkd: stored soft labels | ferkd: + calibration
    arch: str = "small32"         # see ARCHS
    epochs: int = 5
    batch_size: int = 256         # images per optimizer step, all processes together
    crops: int = 1                # regions decoded per image per step (FKD's num_crops); rows = batch_size*crops
    lr: float = 0.2               # peak SGD learning rate for batch_size*crops = 256 rows, scaled linearly
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.5    # linear warm-up, then cosine to zero
    label_smoothing: float = 0.1  # kd=none only
    res: int = 0                  # training resolution; 0: the label file's, or the dataset default
    scale_min: float = 0.08       # kd=none RandomResizedCrop area range (labels fix it for fkd/ferkd)
    t_low: float = 0.0            # FerKD: regions with p_gt < t_low are dropped
    t_mid: float = 0.0            # FerKD: t_low <= p_gt < t_mid is a hard region, trained on softened truth
    t_top: float = 1.0            # FerKD: regions with p_gt > t_top are dropped
    eps: float = 0.1              # FerKD: smoothing of hard regions' ground truth
    mix: str = "none"             # none | cutmix | mixup: SelfMix (needs --crops >= 2), rows mix two regions
    mix_prob: float = 0.0         # probability that a row is mixed
    mix_alpha: float = 1.0        # lambda ~ Beta(alpha, alpha): the share of the row's own region
    mix_source: str = "self"      # self: the other region of the same image (SelfMix) | batch: another image
    subset: int = 0               # train on the first N images only (0: all); for quick runs
    seed: int = 0
    run_dir: str = "runs/default"
    num_workers: int = 2          # FFCV decoding threads per process
    device: str = "auto"          # auto | cpu | cuda
    amp: bool = True              # bf16 autocast (fp16 + GradScaler where bf16 is unsupported)
    compile: bool = False         # torch.compile the model (in place)
    overwrite: bool = False       # allow an existing run_dir


def check_config(c):
    if c.kd not in ("none", "fkd", "ferkd"):
        raise UserError(f"--kd must be none, fkd or ferkd, got {c.kd!r}")
    if c.kd != "none" and not c.labels:
        raise UserError(f"--kd={c.kd} needs --labels=FILE.beton (build it with `python labels.py build`)")
    if c.arch not in ARCHS:
        raise UserError(f"unknown --arch={c.arch}; choose one of {', '.join(ARCHS)}")
    for name in ("epochs", "batch_size", "crops", "num_workers"):
        if getattr(c, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(c, name)}")
    if c.lr <= 0 or c.weight_decay < 0 or not 0 <= c.momentum < 1 or c.warmup_epochs < 0:
        raise UserError("--lr must be > 0, --weight_decay >= 0, --momentum in [0, 1), --warmup_epochs >= 0")
    if not 0 <= c.t_low <= c.t_mid <= 1 or not c.t_low <= c.t_top <= 1 or not 0 <= c.eps < 1:
        raise UserError(f"FerKD thresholds need 0 <= t_low <= t_mid <= 1, t_low <= t_top <= 1, 0 <= eps < 1; "
                        f"got t_low={c.t_low} t_mid={c.t_mid} t_top={c.t_top} eps={c.eps}")
    if c.kd == "fkd" and (c.t_low, c.t_mid, c.t_top) != (0.0, 0.0, 1.0):
        raise UserError("--t_low/--t_mid/--t_top act only with --kd=ferkd")
    if c.mix not in ("none", "cutmix", "mixup") or c.mix_source not in ("self", "batch"):
        raise UserError(f"--mix must be none, cutmix or mixup and --mix_source self or batch")
    if not 0 <= c.mix_prob <= 1 or c.mix_alpha <= 0:
        raise UserError("--mix_prob must be in [0, 1] and --mix_alpha > 0")
    if c.mix != "none" and c.kd == "none":
        raise UserError("--mix mixes stored regions and their labels: use it with --kd=fkd or --kd=ferkd")
    if c.mix != "none" and c.mix_source == "self" and c.crops < 2:
        raise UserError("SelfMix mixes two regions of one image: it needs --crops >= 2")
    if c.subset < 0 or c.res < 0:
        raise UserError("--subset and --res must be >= 0")

# -----------------------------------------------------------------------------
# Distributed: torchrun sets the environment, one process per device; plain `python` is one process

def setup_distributed(device_name):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# Models

def small_resnet(width, num_classes):
    """A three-stage ResNet for 16-32 px images (CIFAR-style stem, one basic block per stage)."""
    from torchvision.models.resnet import BasicBlock

    def down(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        BasicBlock(w, w), BasicBlock(w, 2 * w, 2, down(w, 2 * w)), BasicBlock(2 * w, 4 * w, 2, down(2 * w, 4 * w)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))


ARCHS = {  # an allow-list: checkpoints name their architecture, never code to import
    "small16": lambda c: small_resnet(16, c), "small32": lambda c: small_resnet(32, c),
    "small64": lambda c: small_resnet(64, c),
    "resnet18": lambda c: torchvision.models.resnet18(num_classes=c),
    "resnet34": lambda c: torchvision.models.resnet34(num_classes=c),
    "resnet50": lambda c: torchvision.models.resnet50(num_classes=c),
}


def build_model(arch, num_classes):
    return ARCHS[arch](num_classes)


def save_checkpoint(path, model, optimizer, epoch, config, header, classes):
    """Atomic: a killed or failed save leaves the previous file whole."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
                 config=dataclasses.asdict(config), label_header=header, classes=list(classes))
    tmp = Path(str(path) + f".tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write checkpoint {path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    """(model, checkpoint dict) from a file written by `save_checkpoint`; loads tensors only (no pickles)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        arch = ckpt["config"]["arch"]
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path} is not a readable ferkd checkpoint ({type(e).__name__})") from None
    if arch not in ARCHS:
        raise UserError(f"{path} names unknown architecture {arch!r}")
    model = build_model(arch, len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt

# -----------------------------------------------------------------------------
# Data: which regions each epoch replays, and the targets the loss sees

def region_plans(c, header, table, heights, widths):
    """Returns (fill(epoch) -> choice, kept image indices). `fill` writes the epoch's pixel boxes into the
    decoder's plan (N, crops, 5) in place and returns the region chosen for each (image, crop), or None.
    Chosen once per run, so the step never branches on the mode."""
    N = len(heights)
    plan = np.zeros((N, c.crops, 5), np.int32)
    if c.kd == "none":  # fresh RandomResizedCrop boxes every epoch, drawn by the label builder's rule
        def fill(epoch):
            rng = np.random.default_rng([c.seed, epoch, 1 << 20])
            b, f = random_boxes(rng, N * c.crops, scale=(c.scale_min, 1.0))
            q = quantize_boxes(b).reshape(N, c.crops, 4)
            plan[..., :4] = box_pixels(q, heights[:, None], widths[:, None])
            plan[..., 4] = f.reshape(N, c.crops)
            return None
        return plan, fill, np.arange(N)

    R, k = header["regions"], header["k"]
    from kernels_triton import region_category
    _, _, pgt, flip = unpack_regions(torch.from_numpy(table), k)
    keep = (region_category(pgt, c.t_low, c.t_mid, c.t_top) > 0).numpy()  # FerKD: dropped ones never replayed
    count = keep.sum(1)
    images = np.flatnonzero(count > 0)
    boxes = box_pixels(table[..., :4], heights[:, None], widths[:, None])  # (N, R, 4)
    flip = flip.numpy()

    def fill(epoch):
        # kept regions first in a random order per image, then crop j takes the ((start + j) mod count)-th:
        # distinct regions while crops <= count, every kept region equally likely
        rng = np.random.default_rng([c.seed, epoch])
        order = np.argsort(np.where(keep, rng.random((N, R)), 2.0), axis=1)
        start = rng.integers(0, R, N)
        pos = (start[:, None] + np.arange(c.crops)) % np.maximum(count, 1)[:, None]
        choice = np.take_along_axis(order, pos, axis=1)  # (N, crops)
        rows = np.arange(N)[:, None]
        plan[..., :4] = boxes[rows, choice]
        plan[..., 4] = flip[rows, choice]
        return torch.from_numpy(choice)
    return plan, fill, images


def ce_loss(label_smoothing):
    def loss(logits, labels, index, choice, partner, share):
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    return loss


def region_targets(table, k, index, choice, device):
    """Stored labels of the regions replayed in a batch: ids (B*n, k), probs (B*n, k), p_gt (B*n,)."""
    rec = table[index[:, None], choice[index]].to(device, non_blocking=True)  # (B, n, D) uint8
    ids, probs, pgt, _ = unpack_regions(rec.flatten(0, 1), k)
    return ids, probs, pgt


def kd_loss(c, table, k):
    """Soft-label loss over stored regions through the fused FerKD loss (FKD: thresholds 0, 0, 1).
    `partner`/`share` come from `mix_batch`: row r mixes its own region (weight share) with row partner[r]'s."""
    from kernels_triton import ferkd_loss
    table = torch.from_numpy(table)

    def loss(logits, labels, index, choice, partner, share):
        ids, probs, pgt = region_targets(table, k, index, choice, logits.device)
        ids, probs, pgt = (torch.stack([t, t[partner]], 1) for t in (ids, probs, pgt))  # M = 2 regions a row
        if c.mix_source == "batch":  # the partner is another image: its hard region's truth is its own class
            ids[:, 1], probs[:, 1], pgt[:, 1] = as_soft_label(ids[:, 1], probs[:, 1], pgt[:, 1], labels[partner],
                                                              logits.shape[1], c)
        mix = torch.stack([share, 1 - share], 1)
        return ferkd_loss(logits, ids, probs, pgt, labels, mix, t_low=c.t_low, t_mid=c.t_mid, t_top=c.t_top,
                          eps=c.eps)
    return loss


def as_soft_label(ids, probs, pgt, truth, C, c):
    """A region's FerKD target written as a kept teacher label, for a region mixed into a row of another class
    (ferkd_loss applies the hard-region rule with the row's class). A softened one-hot is a top-k label with
    1 - eps on the truth and eps/(C-1) on k-1 other classes, the rest spread evenly: exactly eps/(C-1) each."""
    from kernels_triton import region_category
    cat = region_category(pgt, c.t_low, c.t_mid, c.t_top)
    k = ids.shape[1]
    hard_ids = (truth[:, None] + torch.arange(k, device=ids.device)) % C
    hard_probs = torch.full_like(probs, c.eps / (C - 1))
    hard_probs[:, 0] = 1 - c.eps
    hard = (cat == 1)[:, None]
    kept_soft = torch.full_like(pgt, max(c.t_mid, c.t_low))  # a p_gt that ferkd_loss files as a kept soft region
    return (torch.where(hard, hard_ids, ids), torch.where(hard, hard_probs, probs),
            torch.where(cat == 1, kept_soft, pgt))


def mix_batch(c, generator):
    """SelfMix (FerKD): each row's region gets a patch of (cutmix) or is blended with (mixup) another region of
    the same image; `--mix_source=batch` takes it from another image instead (ordinary CutMix/Mixup).
    Returns mix(x) -> (x, partner (rows,), share (rows,)): share is the exact fraction of the row that is its
    own region (the pasted area for cutmix), so labels mix by area. Vectorized on the device."""
    def none(x, n):
        rows = torch.arange(len(x), device=x.device)
        return x, rows, torch.ones(len(x), device=x.device)

    def mix(x, n):
        R, _, H, W = x.shape
        rows = torch.arange(R, device=x.device)
        if c.mix_source == "self":  # row (b, j) takes region (b, j+1 mod n)
            partner = (rows // n) * n + (rows % n + 1) % n
        else:  # row (b, j) takes the same crop of the next image in the batch
            partner = (rows + n) % R
        u = torch.rand(R, device=x.device, generator=generator)
        lam = torch.distributions.Beta(c.mix_alpha, c.mix_alpha).sample((R,)).to(x.device)
        on = torch.rand(R, device=x.device, generator=generator) < c.mix_prob
        if c.mix == "mixup":
            share = torch.where(on, lam, torch.ones_like(lam))
            x = share.view(R, 1, 1, 1) * x + (1 - share.view(R, 1, 1, 1)) * x[partner]
            return x, partner, share
        # cutmix: a box of area ~ (1 - lam) centred uniformly, clipped to the image
        cut = torch.sqrt(1 - lam)
        cy, cx = torch.rand(R, device=x.device, generator=generator) * H, u * W
        y0, y1 = (cy - cut * H / 2).clamp(0, H).round(), (cy + cut * H / 2).clamp(0, H).round()
        x0, x1 = (cx - cut * W / 2).clamp(0, W).round(), (cx + cut * W / 2).clamp(0, W).round()
        ys = torch.arange(H, device=x.device).view(1, H, 1)
        xs = torch.arange(W, device=x.device).view(1, 1, W)
        inside = (ys >= y0.view(R, 1, 1)) & (ys < y1.view(R, 1, 1)) & (xs >= x0.view(R, 1, 1)) \
            & (xs < x1.view(R, 1, 1)) & on.view(R, 1, 1)
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


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype):
    """Top-1/top-5 over the whole test split; exact under DDP (each image counted once, sums all-reduced)."""
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # top1 hits, top5 hits, images
    for images, labels, _ in loader:
        x = to_model_input(images, device)
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=device)])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    top1, top5, n = sums.tolist()
    return dict(top1=100 * top1 / n, top5=100 * top5 / n)


def eval_loader(data, res, batch_size, num_workers, rank, world):
    path, ds = dataset_beton(data, "test")
    h, w = image_sizes(path)
    boxes = box_pixels(full_boxes(len(h)), h, w) if isinstance(ds.images, np.ndarray) else \
        center_boxes(h, w, 224 / 256)
    plan = np.ascontiguousarray(np.concatenate([boxes, np.zeros((len(h), 1), np.int32)], 1)[:, None])
    shard = np.arange(rank, len(h), world)  # disjoint shards: no padding duplicates in the accuracy
    return region_loader(path, plan.astype(np.int32), res, batch_size, num_workers, indices=shard), ds

# -----------------------------------------------------------------------------
# `ferkd.py train`

def train(**flags):
    c = parse_config(TrainConfig, flags)
    check_config(c)
    rank, world, device = setup_distributed(c.device)
    torch.manual_seed(c.seed)
    run_dir = Path(c.run_dir)
    if rank == 0:
        if (run_dir / "final.pt").exists() and not c.overwrite:
            raise UserError(f"{run_dir} already holds a finished run; pass --overwrite or another --run_dir")
        run_dir.mkdir(parents=True, exist_ok=True)

    # data
    header, table = None, None
    if c.kd == "none":
        train_path, ds = dataset_beton(c.data, "train")
    else:
        header = read_header(c.labels, f"re-run `python labels.py build --data={c.data} --out={c.labels} ...`")
        ds = load_dataset(c.data, "train")
        if header["fingerprint"] != ds.fingerprint() or header["num_classes"] != len(ds.classes):
            raise UserError(f"{c.labels} was built for {header['dataset']} ({header['num_classes']} classes, "
                            f"fingerprint {header['fingerprint']}), not --data={c.data} ({len(ds.classes)} "
                            f"classes, {ds.fingerprint()}); re-run `python labels.py build --data={c.data} ...`")
        if c.res and c.res != header["res"]:
            raise UserError(f"{c.labels} was built for crops at {header['res']} px, not --res={c.res}")
        train_path, table = Path(c.labels), read_regions(c.labels, header)
    res = (header or {}).get("res") or c.res or ds.res
    num_classes = len(ds.classes)
    heights, widths = image_sizes(train_path)
    plan, fill_plan, images = region_plans(c, header, table, heights, widths)
    if c.subset:
        images = images[images < c.subset]
    if c.batch_size % world:
        raise UserError(f"--batch_size={c.batch_size} must divide among {world} processes")
    per_rank = c.batch_size // world
    loader = region_loader(train_path, plan, res, per_rank, c.num_workers, order="random", seed=c.seed,
                           indices=images, drop_last=True, distributed=world > 1)
    test_loader, _ = eval_loader(c.data, res, 512, c.num_workers, rank, world)
    steps_per_epoch = len(images) // c.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"{len(images)} training images give no full batch of --batch_size={c.batch_size}")
    total_steps = steps_per_epoch * c.epochs
    if c.kd == "ferkd":
        from kernels_triton import region_category
        cat = region_category(unpack_regions(torch.from_numpy(table), header["k"])[2], c.t_low, c.t_mid, c.t_top)
        share = [(cat == i).float().mean().item() for i in range(3)]
        print0(f"regions at t_low={c.t_low} t_mid={c.t_mid} t_top={c.t_top}: dropped {share[0]:.1%}, "
               f"hard {share[1]:.1%}, soft {share[2]:.1%}; {len(images)} of {len(heights)} images keep one")

    # model, optimizer, mode
    model = build_model(c.arch, num_classes).to(device, memory_format=torch.channels_last)
    if c.compile:
        model.compile()
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    peak_lr = c.lr * c.batch_size * c.crops / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=c.momentum, nesterov=True,
                                weight_decay=c.weight_decay)
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    amp_dtype = (torch.bfloat16 if bf16 else torch.float16) if c.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=c.amp and not bf16)
    loss_fn = ce_loss(c.label_smoothing) if c.kd == "none" else kd_loss(c, table, header["k"])
    warmup = int(c.warmup_epochs * steps_per_epoch)
    mix_fn = mix_batch(c, torch.Generator(device).manual_seed(c.seed + 1000 * rank))

    config = dict(dataclasses.asdict(c), world_size=world, per_rank_batch=per_rank, rows_per_step=c.batch_size
                  * c.crops, steps_per_epoch=steps_per_epoch, total_steps=total_steps, peak_lr=peak_lr, res=res,
                  device=str(device), train_images=len(images), num_classes=num_classes,
                  torch=torch.__version__, label_header=header)
    print0(json.dumps({k: v for k, v in config.items() if k != "label_header"}))
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(config, indent=1))

    # train
    step, metrics, t_train = 0, {}, 0.0
    log = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    for epoch in range(c.epochs):
        choice = fill_plan(epoch)
        t0, loss_sum = time.time(), torch.zeros((), device=device)
        for images_u8, labels, index in loader:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total_steps, warmup, peak_lr)
            x, partner, share = mix_fn(to_model_input(images_u8, device), c.crops)
            labels = labels.to(device, non_blocking=True).repeat_interleave(c.crops)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = ddp(x)
            loss = loss_fn(logits, labels, index, choice, partner, share)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            step += 1
        t_train += time.time() - t0
        mean_loss = loss_sum.item() / steps_per_epoch
        if not math.isfinite(mean_loss):
            raise UserError(f"loss is {mean_loss} in epoch {epoch} (step {step}); the last good checkpoint is "
                            f"{run_dir / 'last.pt'}; lower --lr or check the labels")
        metrics = dict(epoch=epoch + 1, loss=mean_loss, **evaluate(model, test_loader, device, amp_dtype),
                       train_seconds=round(t_train, 1),
                       images_per_s=round(steps_per_epoch * c.batch_size * c.crops / (time.time() - t0), 1))
        print0(json.dumps(metrics))
        if rank == 0:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            save_checkpoint(run_dir / "last.pt", model, optimizer, epoch + 1, c, header, ds.classes)
    if rank == 0:
        log.close()
        os.replace(run_dir / "last.pt", run_dir / "final.pt")
        (run_dir / "final.json").write_text(json.dumps(metrics))
    print0(json.dumps(metrics))
    if dist.is_initialized():
        dist.destroy_process_group()
    return None


if __name__ == "__main__":
    run_cli({"train": train})
