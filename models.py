"""
The model zoo, the checkpoint format and the teachers: the contract between `ferkd.py train` (which writes
checkpoints, and scores crops with a teacher under --kd=kd) and `labels.py build` (which loads a teacher),
kept here so that neither script imports the other.

A checkpoint is a `torch.save` dict holding at least `model` (a state dict), `config` (the TrainConfig as a
dict, whose `arch` names an entry of ARCHS) and `classes`; it is loaded with `weights_only=True`, so a file
can name an architecture but never code to run.

Also here, for the same reason: FerKD's region categories under thresholds (their defaults, their check, and
the pass over a label file's table), which `ferkd.py train` replays and `labels.py show` draws.
And the precision rule (`autocast_dtype`) every command that autocasts follows.
"""
import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from beton import DATASETS, MEAN, STD
from kernels_triton import region_category
from runtime import BOOL_WORDS, UserError, atomic_write

# -----------------------------------------------------------------------------
# Models

def small_resnet(width, num_classes):
    """A three-stage ResNet for 16-32 px images (CIFAR-style stem, one basic block per stage)."""
    def down(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        BasicBlock(w, w), BasicBlock(w, 2 * w, 2, down(w, 2 * w)),
        BasicBlock(2 * w, 4 * w, 2, down(2 * w, 4 * w)),
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

# -----------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, state):
    """`state` holds at least model, config (with arch) and classes: what `load_checkpoint` needs.
    Serialized in memory first: torch.save into a file reports a full disk as an opaque RuntimeError from its
    zip writer, a plain write as the OSError the user can act on."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def load_checkpoint(path, arch=None):
    """(model, checkpoint dict) from a file written by `save_checkpoint`; loads tensors only (no pickles).
    With `arch`, a checkpoint of another architecture is refused."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt_arch = ckpt["config"]["arch"]
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path} is not a readable ferkd checkpoint ({type(e).__name__})") from None
    if ckpt_arch not in ARCHS:
        raise UserError(f"{path} names unknown architecture {ckpt_arch!r}")
    if arch is not None and arch != ckpt_arch:
        raise UserError(f"{path} holds a {ckpt_arch} model, not --arch={arch}")
    model = build_model(ckpt_arch, len(ckpt["classes"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:  # its message lists every mismatched tensor: one line is enough
        raise UserError(f"{path}: its weights do not fit architecture {ckpt_arch} with "
                        f"{len(ckpt['classes'])} classes") from None
    return model, ckpt


def checkpoint_res(ckpt):
    """The input resolution a checkpoint was trained at (older checkpoints did not store it)."""
    data = ckpt["config"]["data"]
    return ckpt.get("res") or ckpt["config"].get("res") or DATASETS.get(data, dict(res=224))["res"]


def checkpoint_eval(ckpt):
    """(eval_res, eval_ratio): how the run that wrote a checkpoint evaluated it (its --eval_res, 0 meaning
    the final training resolution, and --eval_ratio), for `ferkd.py eval` to score the recipe's number (the
    ImageNet recipe trains at 192 px and evaluates at 256). Checkpoints store both since issue 32; older ones
    hold them in their config, or predate --eval_ratio (224/256, its default then)."""
    res = ckpt.get("eval_res") or ckpt["config"].get("eval_res") or checkpoint_res(ckpt)
    return res, float(ckpt.get("eval_ratio") or ckpt["config"].get("eval_ratio") or 224 / 256)

# -----------------------------------------------------------------------------
# Teachers: any checkpoint of ours, torchvision's or timm's models, for `labels.py build` and online KD
# (`ferkd.py train --kd=kd`)

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


TORCHVISION_TEACHERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                        "efficientnet_b0", "convnext_tiny", "vit_b_16", "regnet_y_16gf")


def _classes_in(state_dict, classifier, spec):
    """The class count of the weights in `state_dict` for the classifier layer named `classifier` (fc,
    head.fc, classifier.1, ...), so that a model fine-tuned on the user's own classes loads as saved."""
    if isinstance(classifier, (tuple, list)):  # timm's distilled models name two heads: the first is the one
        classifier = classifier[0]
    weight = state_dict.get(f"{classifier}.weight")
    if weight is None or weight.ndim != 2:
        raise UserError(f"the weights of {spec} hold no {classifier}.weight classifier: another model's?")
    return weight.shape[0]


def _read_weights(path):
    """A state dict from a .pth (tensors only: no pickled code) or a .safetensors file."""
    if not Path(path).is_file():
        raise UserError(f"teacher weights {path} not found")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file  # here: only .safetensors weights need it (timm's)
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a damaged or foreign file
        raise UserError(f"cannot read teacher weights {path} ({type(e).__name__}): expected a state dict "
                        f"saved by torch.save, or a .safetensors file") from None


def _load_state(model, state, spec):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors: its first lines name them
        raise UserError(f"the weights do not fit {spec}: " + " ".join(str(e).split())[:300]) from None


def load_teacher(spec):
    """A teacher from `spec`, in eval mode, with its identity for the label header (kind, name, checksum and
    the input normalization the teacher was trained with):
        CKPT.pt                      a checkpoint written by `ferkd.py train`
        torchvision:NAME             torchvision's pretrained ImageNet weights (downloaded by torchvision)
        torchvision:NAME@FILE.pth    weights from a file, of any class count (fine-tuned on your classes)
        timm:NAME                    timm's pretrained weights (downloaded from the Hugging Face hub by timm)
        timm:NAME@FILE               weights from a .pth or .safetensors file; timm's normalization for NAME
    torchvision names come from an allow-list and timm names from timm's registry: a user string never names
    code to import."""
    kind, _, rest = spec.partition(":") if spec.startswith(("torchvision:", "timm:")) else ("ferkd", "", spec)
    name, _, weights_file = rest.partition("@")
    mean, std = MEAN, STD
    if kind == "torchvision":
        if name not in TORCHVISION_TEACHERS:
            raise UserError(f"teacher {name!r} not supported; "
                            f"choose one of {', '.join(TORCHVISION_TEACHERS)}")
        if weights_file:
            state = _read_weights(weights_file)
            model = getattr(torchvision.models, name)(weights=None)
            last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]  # classifier
            classes = _classes_in(state, last, spec)
            if classes != 1000:
                model = getattr(torchvision.models, name)(weights=None, num_classes=classes)
            _load_state(model, state, spec)
            checksum = file_sha256(weights_file)
        else:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            model = getattr(torchvision.models, name)(weights=weights)
            checksum = str(weights)
    elif kind == "timm":
        import timm  # here: an optional dependency, needed only for timm teachers
        if not timm.is_model(name):
            raise UserError(f"timm has no model {name!r} (see timm.list_models())")
        if weights_file:
            state = _read_weights(weights_file)
            model = timm.create_model(name, pretrained=False)
            model.reset_classifier(_classes_in(state, model.pretrained_cfg["classifier"], spec))
            _load_state(model, state, spec)
            checksum = file_sha256(weights_file)
        else:
            model = timm.create_model(name, pretrained=True)
            checksum = f"timm:{model.pretrained_cfg.get('hf_hub_id') or name}"
        config = timm.data.resolve_model_data_config(model)
        mean, std = tuple(config["mean"]), tuple(config["std"])
    else:
        model, ckpt = load_checkpoint(spec)
        name, checksum = ckpt["config"]["arch"], file_sha256(spec)
    return model.eval(), dict(kind=kind, name=name, checksum=checksum, mean=mean, std=std)


@torch.no_grad()
def check_teacher(model, spec, res, num_classes):
    """One forward pass on a blank crop: the teacher must take res x res input and predict num_classes."""
    try:
        n_out = model(torch.zeros(1, 3, res, res)).shape[-1]
    except RuntimeError as e:  # a stem that downsamples too far, a ViT with a fixed input size, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"teacher {spec} cannot take {res}x{res} crops ({first}); choose --res") from None
    if n_out != num_classes:
        raise UserError(f"teacher {spec} predicts {n_out} classes, the dataset has {num_classes}")


# -----------------------------------------------------------------------------
# Precision: the one rule for every command that autocasts (`ferkd.py train` and `eval`, `labels.py build`)

CPUINFO = "/proc/cpuinfo"  # where the CPU is described (a module constant, so tests can fake a CPU)


def cpuinfo(field):
    """The first value of `field` in CPUINFO ("model name", "flags"), or None where there is none (not Linux)."""
    try:
        text = Path(CPUINFO).read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == field), None)


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (the avx512_bf16 or amx_bf16 flag). Without either, bf16
    autocast is emulated: 2-3x slower than fp32 on an AVX-512 Xeon (small16 216 vs 401 img/s, small64 19 vs
    60; NOTES.md, December 2026), while on a Zen 5 with avx512_bf16 it is 1.15-2x faster (issue 25). Where
    the flags cannot be read (not Linux), no emulated bf16 by default."""
    flags = (cpuinfo("flags") or "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device, amp="auto"):
    """(autocast dtype or None for fp32, its name and why) for --amp on `device`. auto: bf16 where the hardware
    does it natively (CUDA compute capability >= 8; CPUs with avx512_bf16 or amx_bf16), fp16 (with a
    GradScaler in training) on older GPUs, fp32 on other CPUs. true: autocast even where bf16 is emulated
    (CPU), false: fp32. `is_bf16_supported()` alone counts emulated bf16 as supported, which would put a V100 or
    T4 on slow emulated bf16 instead of fp16."""
    amp = str(amp).lower()
    if amp in BOOL_WORDS and not BOOL_WORDS[amp]:
        return None, "fp32 (--amp=false)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "bf16 autocast (the GPU has native bf16)"
        return torch.float16, "fp16 autocast + GradScaler (the GPU has no native bf16)"
    if amp == "auto" and not cpu_has_native_bf16():
        return None, "fp32 (--amp=auto: this CPU has no avx512_bf16/amx_bf16, so bf16 would be emulated)"
    why = "the CPU has native bf16" if cpu_has_native_bf16() else "--amp=true: emulated bf16 on this CPU"
    return torch.bfloat16, f"bf16 autocast ({why})"


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# -----------------------------------------------------------------------------
# FerKD's region categories: what `ferkd.py train` replays and `labels.py show` draws

# --kd=ferkd's defaults: the best setting of issue 35's threshold grid, chosen by its rule fixed before any run
# (a FerKD setting above FKD by more than its seed-paired standard error becomes the defaults): ablation.py's
# "cluttered" study (results/README.md; results/cluttered.jsonl), cluttered-fashion-mnist, where random crops
# show the object, part of it or only clutter (FerKD's premise). Per-image rank thresholds, eps 0.1 (the flag's
# own default), no SelfMix: each image's lowest 30% of regions by p_gt are dropped, the next 20% are hard
# (softened ground truth), none is dropped at the top. 69.81 +- 0.40 top-1 over 3 seeds, +0.18 +- 0.12 paired
# against FKD (standard error 0.07; FKD's own seed spread +- 0.39): a fifth of a point. The defaults before
# (0.05 / 0.25 / 0.95, chosen on Fashion-MNIST, where no FerKD arm beat FKD) were -1.15 +- 0.79 on that data;
# the grid's settings that train 30% or more of the regions as hard ones lost 1.6-2 points. Two of the three
# seeds trained in fp32, FKD's in bf16. Untested with these values: Fashion-MNIST, other teachers and
# schedules, ImageNet.
FERKD_DEFAULTS = dict(thresholds="rank", t_low=0.3, t_mid=0.5, t_top=1.0)


def threshold_defaults(mode, defaults=FERKD_DEFAULTS):
    """The values thresholds left unset (-1) take under `mode` ("p_gt" or "rank"): `defaults`' own where
    `mode` is theirs, none under the other mode (its thresholds compare another quantity: all three must be
    given)."""
    if mode != defaults["thresholds"]:
        return {}
    return {name: value for name, value in defaults.items() if name.startswith("t_")}


def check_thresholds(t_low, t_mid, t_top, mode="p_gt"):
    """All three given (see threshold_defaults), and FerKD's bands nested: 0 <= t_low <= t_mid <= t_top <= 1
    (dropped < t_low <= hard < t_mid <= soft <= t_top < dropped); t_mid > t_top would silently drop regions
    meant to be hard, including mixed ones."""
    if -1.0 in (t_low, t_mid, t_top):
        raise UserError(f"--thresholds={mode} needs --t_low, --t_mid and --t_top: FerKD's defaults are for "
                        f"--thresholds={FERKD_DEFAULTS['thresholds']}")
    if not 0 <= t_low <= t_mid <= t_top <= 1:
        raise UserError(f"FerKD thresholds need 0 <= t_low <= t_mid <= t_top <= 1; "
                        f"got t_low={t_low} t_mid={t_mid} t_top={t_top}")


CHUNK_IMAGES = 8192  # passes over the region table go this many images at a time: bounded temporaries


def rank_scores(pgt):
    """Each region's place among its image's regions by p_gt, as a byte: round(255 place / (R - 1)), 0 for the
    image's lowest p_gt and 255 for its highest (ties in stored order). Under --thresholds=rank FerKD's
    thresholds compare this instead of p_gt: the paper's per-image hard-region mining, whose split adapts to
    each image and teacher. pgt (n, R) uint8 stored p_gt bytes -> (n, R) uint8, R >= 2."""
    n, R = pgt.shape
    bits = (R - 1).bit_length()  # sort keys (p_gt, stored place): distinct, so any sort is the stable order
    key = (pgt.astype(np.uint32 if bits <= 24 else np.uint64) << bits) | np.arange(R, dtype=np.uint32)
    key.sort(axis=1)  # 32-bit keys sort vectorised: 1.4x faster than a stable argsort of the bytes here
    out = np.empty((n, R), np.uint8)  # the inverse of the order, a scatter: region key & mask is at `place`
    out[np.arange(n)[:, None], key & ((1 << bits) - 1)] = (np.arange(R) * 510 + R - 1) // (2 * (R - 1))
    return out


def region_scores(table, k, by_rank):
    """What FerKD's thresholds compare for every stored region, (N, R) uint8 bytes of [0, 1]: the stored p_gt,
    or its `rank_scores` within the image, a chunk of images at a time."""
    pgt = table[..., 4 + 3 * k]
    if not by_rank:
        return pgt
    if pgt.shape[1] < 2:
        raise UserError(f"--thresholds=rank ranks each image's regions: the label file holds {pgt.shape[1]} "
                        f"per image")
    return np.concatenate([rank_scores(pgt[s:s + CHUNK_IMAGES]) for s in range(0, len(pgt), CHUNK_IMAGES)])


def category_lut(t_low, t_mid, t_top):
    """FerKD's category (0 dropped, 1 hard, 2 soft) of each of the 256 score bytes, (256,) int8: region_category
    on the byte as unpacked. A region's category is `lut[its score]` (`region_scores`: the stored p_gt byte, or
    its place in the image), looked up where it is read, so no N x R array of categories is held (384 MB per
    process at 1.28M x 300)."""
    return region_category(torch.arange(256, dtype=torch.uint8).float() / 255, t_low, t_mid, t_top).numpy()


def category_shares(score, lut):
    """The share of the stored regions in each category, (3,), from a histogram of their score bytes, a chunk
    of images at a time; with one category (FKD) the scores, a view of the table, are not read."""
    if (lut == lut[0]).all():
        return np.bincount(lut[:1], minlength=3).astype(float)
    hist = np.zeros(256, np.int64)
    for s in range(0, len(score), CHUNK_IMAGES):
        hist += np.bincount(score[s:s + CHUNK_IMAGES].ravel(), minlength=256)
    return np.bincount(lut, weights=hist, minlength=3) / hist.sum()
