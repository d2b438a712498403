"""
Benchmarks, each a ratio measured side by side in one run on the same machine (README quotes the output):

    python bench.py all          # or: labels | loader | step | loss
    python bench.py loader --images=4000 --workers=2
    python bench.py scale        # ImageNet-shaped: 1.28M images, R=300 (not part of `all`: ~8 GB, minutes)

1. labels: bytes per region of our label file vs FKD's format (one torch-saved file per image, fp32 / fp16).
2. loader: region replay, images/s: our FFCV loader vs the torchvision way (ImageFolder-style PNG files and
   one torch-saved label file per image read per sample, crop + flip + resize, DataLoader workers).
3. step: train-step images/s, eager fp32 vs channels-last fp32 and bf16 autocast vs torch.compile + bf16 +
   channels-last, same model, batch (`--compile=false` skips the compile).
4. loss: `ferkd_loss` on CPU vs FKD's dense target, and on CUDA the Triton kernel (kernels_triton.py's own).
5. scale: an ImageNet-shaped label file written as `labels.py build` writes it (a seeded generator in the
   teacher's place), then the trainer's start-up, steps and loader on it: seconds and peak resident memory.
6. build: `labels.py build`'s crops/s against its teacher's pure forward, and its user/kernel time and page
   faults with glibc's default allocator and with freed memory kept (`python bench.py build`).
7. loss_step: the fused loss inside the trainer's own step, --loss_kernel=triton against torch, alternating.
8. kd_step: the trainer's step with stored labels (FKD) against online KD's teacher forward on every crop.
9. loader_imagenet: region replay's rows/s per core on ImageNet-like JPEGs (~500 x 375, quality 90) at
   160-224 px, --crops=1 and 4, 1 and 2 workers (the README's cores per GPU come from it).
No timing here is asserted by a test: the machines are shared and noisy; read the ratios.
"""
import atexit
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# beton (and with it FFCV) is imported by the parts that need it: `step` and `loss` also run on a GPU machine
# that has PyTorch and Triton but no FFCV (.ci/gpu-check)


def scratch_dir():
    """A temporary folder for a benchmark's files, removed when the process exits."""
    d = Path(tempfile.mkdtemp(prefix="ferkd-bench-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def bench_labels(regions=16, k=5, images=200):
    """Bytes per region: ours (all included: box, flip, top-k ids and probabilities, p_gt) vs FKD's files."""
    rng = np.random.default_rng(0)
    d = scratch_dir()
    sizes = {}
    for name, fdtype, idtype in (("FKD fp32", torch.float32, torch.int32),
                                 ("FKD fp16", torch.float16, torch.int16)):
        total = raw = 0
        for i in range(images):  # FKD: per image, [coords (R,4), flip (R,), top-k probs (R,k), ids (R,k)]
            rec = [torch.from_numpy(rng.random((regions, 4))).to(fdtype),
                   torch.from_numpy(rng.random(regions) < .5),
                   torch.from_numpy(rng.random((regions, k))).to(fdtype),
                   torch.from_numpy(rng.integers(0, 1000, (regions, k))).to(idtype)]
            path = d / f"{name[-4:]}_{i}.pth"
            torch.save(rec, path)
            total += path.stat().st_size
            raw += sum(t.numel() * t.element_size() for t in rec)
        sizes[name] = (raw / (images * regions), total / (images * regions))
    from beton import region_bytes
    ours = region_bytes(k)
    print(f"\n1. label bytes per region (R={regions}, k={k}, C=1000)")
    print("| format | payload B/region | on disk B/region | ours smaller by (payload / disk) |")
    print("|---|---|---|---|")
    for name, (raw, disk) in sizes.items():
        print(f"| {name}, one torch.save file per image | {raw:.1f} | {disk:.1f} | {raw / ours:.2f}x / "
              f"{disk / ours:.1f}x |")
    print(f"| ferkd (.beton records, p_gt included) | {ours} | {ours} + {32 / regions:.0f} | 1 |")
    print("(ferkd's on-disk cost adds FFCV's 8-byte pointer and 24-byte allocation entry per image, "
          "32 B / R.)")


def _fashion_subset(n):
    import beton
    ds = beton.load_dataset("fashion-mnist", "train")
    ds.images, ds.labels = ds.images[:n], ds.labels[:n]
    return ds


def bench_loader(images=4000, workers=2, batch=256, regions=4, res=32, epochs=3):
    """Images/s of region replay: FFCV + RegionCrop vs torch DataLoader over PNG files + per-image label
    files."""
    import beton
    from beton import box_pixels, grid_boxes, random_boxes
    from PIL import Image
    ds = _fashion_subset(images)
    N = len(ds.labels)
    d = scratch_dir()
    rng = np.random.default_rng(0)
    H, W = ds.images.shape[1:3]
    boxes = grid_boxes(random_boxes(rng, np.full(N * regions, H), np.full(N * regions, W))[0], H, W)
    boxes = boxes.reshape(N, regions, 4)
    flips = rng.random((N, regions)) < 0.5
    table = beton.pack_regions(boxes, flips, rng.integers(0, 10, (N, regions, 5)),
                               rng.random((N, regions, 5)) / 5, rng.random((N, regions)), 10)
    path = d / "bench.beton"
    beton.write_beton(path, ds, table)
    for i in range(N):  # the torchvision way: encoded image files and one label file per image
        Image.fromarray(ds.images[i]).save(d / f"{i}.png")
        torch.save({"boxes": torch.from_numpy(boxes[i].astype(np.float32) / 255),
                    "flip": torch.from_numpy(flips[i]), "probs": torch.rand(regions, 5),
                    "ids": torch.randint(0, 10, (regions, 5))}, d / f"{i}.pth")

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            img = np.array(Image.open(d / f"{i}.png").convert("RGB"))
            lab = torch.load(d / f"{i}.pth", weights_only=True)
            r = np.random.randint(regions)
            t, l, b, rr = box_pixels((lab["boxes"][r].numpy() * 255).round().astype(np.uint8), 32, 32)
            x = torch.from_numpy(np.ascontiguousarray(img[t:b, l:rr])).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size=(res, res), mode="area")[0]
            if lab["flip"][r]:
                x = x.flip(2)
            return x.to(torch.uint8), lab["probs"][r], lab["ids"][r]

    def rate(make_iter):
        seen, t0 = 0, None
        for e in range(epochs):
            if e == 1:
                seen, t0 = 0, time.time()  # epoch 0 warms up (FFCV's JIT, worker start)
            for batch_ in make_iter():
                seen += len(batch_[0])
        return seen / (time.time() - t0)

    hw = beton.image_sizes(path)
    plan = np.zeros((N, 1, 5), np.int32)

    def ffcv_epoch():
        choice = rng.integers(0, regions, N)
        plan[:, 0, :4] = box_pixels(boxes[np.arange(N), choice], hw[0], hw[1])
        plan[:, 0, 4] = flips[np.arange(N), choice]
        return beton.region_loader(path, plan, res, batch, workers, order="random")

    loader = ffcv_epoch()
    ours = rate(lambda: loader)
    dl = torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True, num_workers=workers,
                                     persistent_workers=True)
    theirs = rate(lambda: dl)
    print(f"\n2. region replay loading, {N} Fashion-MNIST images at {res} px, {workers} workers, "
          f"batch {batch}")
    print("| loader | images/s |\n|---|---|")
    print(f"| FFCV + RegionCrop (ferkd) | {ours:,.0f} |\n| torch DataLoader, PNG + per-image .pth labels | "
          f"{theirs:,.0f} |\n| ratio | {ours / theirs:.1f}x |")


def bench_step(arch="small32", batch=256, res=32, steps=20, device="cpu", classes=10, compile=True,
               figures=None):
    """Train-step images/s: eager fp32, then channels-last in fp32 and in bf16 autocast (the precision
    question of `--amp=auto`: is bf16 native here?), then compiled + bf16 + channels-last (with --compile),
    same model, batch, optimizer, with the FKD loss on synthetic top-5 labels (on CUDA: the Triton kernel).
    torchvision's resnet* need no FFCV:
    `python bench.py step --device=cuda --arch=resnet50 --res=224 --batch=256 --classes=1000`.
    A dict passed as `figures` receives each variant's images/s and warm-up seconds (.ci/gpu-check)."""
    import torchvision
    from kernels_triton import ferkd_loss
    device = torch.device(device)
    if device.type == "cpu":
        # FFCV's Loader (bench_loader runs before this in `all`) leaves torch at its num_workers threads
        torch.set_num_threads(os.cpu_count())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, res, res), generator=g).float().div_(255).to(device)
    w = torch.rand(batch, 1, 6, generator=g)
    labels = (torch.rand(batch, 1, classes, generator=g).argsort(2)[..., :5].to(device),  # (B, 1, 5) top-5
              (w / w.sum(2, keepdim=True))[..., :5].to(device), torch.ones(batch, 1, device=device),
              torch.randint(0, classes, (batch,), generator=g).to(device),
              torch.ones(batch, 1, device=device))                                  # p_gt, target, mix
    fkd = dict(t_low=0.0, t_mid=0.0, t_top=1.0, eps=0.0)
    out = {}
    from runtime import BOOL_WORDS
    compile = BOOL_WORDS.get(str(compile).lower(), False)  # fire passes --compile=false as the word 'false'
    variants = [("eager fp32", False, False, False), ("eager fp32 channels-last", False, False, True),
                ("eager bf16 channels-last", False, True, True)]
    for name, compiled, amp, cl in variants + [("compiled bf16 channels-last", True, True, True)] * compile:
        torch.manual_seed(0)
        if arch.startswith("resnet"):
            model = getattr(torchvision.models, arch)(num_classes=classes)
        else:
            import models
            model = models.build_model(arch, classes)
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(device, memory_format=fmt)
        if compiled:
            model.compile()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        xb = x.contiguous(memory_format=fmt)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
            loss = ferkd_loss(logits.float(), *labels, **fkd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t0 = time.time()
        for _ in range(3 if device.type == "cuda" else 1):  # warm-up: compiles, autotunes, fills caches
            step()
        sync()
        warm = time.time() - t0
        t0 = time.time()
        for _ in range(steps):
            step()
        sync()
        out[name] = (batch * steps / (time.time() - t0), warm)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({threads} threads)"
    if device.type == "cpu":
        import models
        where += f", native bf16: {'yes' if models.cpu_has_native_bf16() else 'no'}"
    print(f"\n3. train step (FKD loss), {arch} at {res} px, batch {batch}, {classes} classes, {where}, "
          f"torch {torch.__version__}")
    print("| step | images/s | ratio to eager fp32 | warm-up s |\n|---|---|---|---|")
    base = out["eager fp32"][0]
    for name, (r, w) in out.items():
        print(f"| {name} | {r:,.0f} | {r / base:.2f}x | {w:.1f} |")
    if figures is not None:
        figures.update({name: dict(images_per_s=round(r, 1), warmup_s=round(w, 1))
                        for name, (r, w) in out.items()})


def synthetic_labels(images, classes, regions=4, k=5, seed=0):
    """A region table (images, regions, D) uint8 as labels.py writes it (random top-k, p_gt over [0, 1]) and
    its header: stored labels for the trainer's own loss without a label file."""
    import beton
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, classes, (images, regions, k))  # repeats allowed: the loss sums them
    probs = rng.dirichlet(np.ones(k + 1), (images, regions))[..., :k]
    table = beton.pack_regions(np.zeros((images, regions, 4), np.uint8), np.zeros((images, regions), bool), ids,
                               probs, rng.random((images, regions)), classes)
    return table, dict(regions=regions, k=k, temperature=1.0)


def trainer_steps(arch, batch, res, classes, device, crops=2, compile=True, kd="fkd", kernels=("auto",),
                  teachers=()):
    """ferkd.py's own training step (make_model, make_train_step, its losses) on one synthetic batch already on
    the device, with one student: {name: step()} for each --loss_kernel in `kernels` (stored labels, --kd=kd's
    way of making the loss aside) and each online-KD teacher in `teachers` (torchvision resnet* or a models.py
    arch, random weights, eval mode, eager), and the rows of a step. Every variant trains the same model, so
    variants can alternate in blocks."""
    import torchvision
    import beton
    import ferkd
    import models
    device = torch.device(device)
    amp_dtype = models.autocast_dtype(device)[0]
    table, header = synthetic_labels(batch, classes)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, crops, res, res, 3), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    index = torch.arange(batch)
    choice = torch.stack([torch.randperm(4, generator=g)[:crops] for _ in range(batch)])
    c = ferkd.TrainConfig(labels="synthetic", kd=kd, arch=arch, crops=crops, batch_size=batch,
                          compile=str(compile).lower())
    torch.manual_seed(0)
    model, ddp, opt, scaler, _ = ferkd.make_model(c, classes, device, 1, amp_dtype, 0.1, None)
    mix = ferkd.mix_batch(c, None)

    def make(loss_fn):
        step = ferkd.make_train_step(ddp, opt, scaler, loss_fn, mix, amp_dtype, device, crops)
        return lambda: step(images, labels, index, choice)
    steps = {kernel: make(
        ferkd.stored_label_loss(dataclasses.replace(c, loss_kernel=kernel), table, header))
             for kernel in kernels}
    for name in teachers:
        torch.manual_seed(0)
        teacher = (getattr(torchvision.models, name)(num_classes=classes) if name.startswith("resnet") else
                   models.build_model(name, classes)).to(device, memory_format=torch.channels_last)
        kd = ferkd.TrainConfig(kd="kd", teacher=name, crops=crops, batch_size=batch)
        steps[f"online KD, {name} teacher"] = make(ferkd.online_kd_loss(kd, teacher, dict(mean=beton.MEAN,
                                                                                            std=beton.STD),
                                                                         amp_dtype))
    return steps, batch * crops


def alternate(steps, blocks=6, per_block=10, sync=lambda: None):
    """Seconds per step of each variant, timed in `blocks` rounds of `per_block` steps, the order reversed every
    round (so that neither order nor the state of caches and clocks can favour one): the median round."""
    names, times = list(steps), {name: [] for name in steps}
    for name in names:  # warm-up: compiles, cuDNN's choices, the allocator
        for _ in range(3):
            steps[name]()
    sync()
    for round_ in range(blocks):
        for name in names if round_ % 2 == 0 else names[::-1]:
            t0 = time.time()
            for _ in range(per_block):
                steps[name]()
            sync()
            times[name].append((time.time() - t0) / per_block)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def bench_loss_step(arch="small16", batch=128, res=32, classes="10,1000", device="cpu", compile=False,
                    blocks=6, per_block=10, figures=None, trace_dir=""):
    """The fused loss inside the step `ferkd.py train` runs (compiled model, bf16, SelfMix, stored labels):
    --loss_kernel=triton against torch (the definition), alternating in blocks in one process, at each class
    count; rows/s and the ratio. With --trace_dir, a profiler table of 3 steps of each (CUDA time by kernel,
    and the host syncs) is written there. On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1):
    a check that the comparison runs, not a speed. On a GPU:
    `python bench.py loss_step --device=cuda --arch=resnet50 --res=224 --batch=256 --compile=true`."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for C in names(classes, int):
        steps, rows = trainer_steps(arch, batch, res, C, device, compile=compile, kernels=("triton", "torch"))
        seconds = alternate(steps, blocks, per_block, sync)
        out[C] = {name: rows / s for name, s in seconds.items()}
        if trace_dir:
            profile_steps(steps, Path(trace_dir) / f"loss-step-{arch}-C{C}.txt", device, sync)
    print(f"\n7. the fused loss in the trainer's step: {arch} at {res} px, {batch} images x 2 crops, FKD labels "
          f"(k=5), SelfMix off, {'compiled' if compile else 'eager'}, {blocks} alternating blocks of {per_block} "
          f"steps, {where(device)}")
    print("| classes | kernel rows/s | definition rows/s | kernel / definition |\n|---|---|---|---|")
    for C, r in out.items():
        print(f"| {C:,} | {r['triton']:,.0f} | {r['torch']:,.0f} | {r['triton'] / r['torch']:.3f} |")
    if figures is not None:
        figures.update({C: dict(kernel_rows_per_s=round(r["triton"], 1), definition_rows_per_s=round(r["torch"], 1),
                                ratio=round(r["triton"] / r["torch"], 4)) for C, r in out.items()})


def profile_steps(steps, path, device, sync, n=3):
    """torch.profiler over n steps of each variant: the top kernels by device time and the host's syncs."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for name, step in steps.items():
            with profile(activities=activities) as prof:
                for _ in range(n):
                    step()
                sync()
            events = prof.key_averages()
            syncs = {e.key: e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpy"}
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            f.write(f"== {name}: {n} steps; host syncs {syncs}\n{events.table(sort_by=sort, row_limit=25)}\n")


def bench_kd_step(arch="small16", batch=128, res=32, classes=10, teachers="small32", device="cpu",
                  compile=False, blocks=4, per_block=5, figures=None):
    """What FKD saves: the trainer's step with stored labels (--kd=fkd) against online KD (--kd=kd), whose
    teacher scores every crop (eval mode, no gradients, the step's autocast), one compiled student, alternating
    blocks. The teachers run eager here (the trainer compiles them, which would narrow the gap). On a GPU:
    `python bench.py kd_step --device=cuda --arch=resnet50 --res=224 --batch=128 --classes=1000
    --teachers=resnet50,resnet152 --compile=true`."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps, rows = trainer_steps(arch, batch, res, classes, device, compile=compile,
                                teachers=names(teachers))
    steps["FKD (stored labels)"] = steps.pop("auto")
    rates = {name: rows / s for name, s in alternate(steps, blocks, per_block, sync).items()}
    fkd = rates["FKD (stored labels)"]
    print(f"\n8. FKD against online KD in the trainer's step: {arch} student at {res} px, {batch} images x 2 "
          f"crops, {classes} classes, {'compiled' if compile else 'eager'}, {blocks} alternating blocks of "
          f"{per_block} steps, {where(device)}")
    print("| step | rows/s | FKD's speed-up |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r:,.0f} | {fkd / r:.2f}x |")
    if figures is not None:
        figures.update({name: dict(rows_per_s=round(r, 1), fkd_speedup=round(fkd / r, 3))
                        for name, r in rates.items()})


def names(value, kind=str):
    """A comma-separated flag as a list: fire hands `--classes=10,1000` over as a tuple, `--classes=10` as an
    int."""
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    return [kind(v) for v in items]


def where(device):
    """The device in words, for a table's caption."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def bench_build(arch="small64", regions=16, batch=255, res=16):
    """`labels.py build` on digits (1,437 images x (R + 1) crops at `res` px) against the teacher's pure
    forward at the same batch, resolution and memory format; and where the build's CPU time goes (user and
    kernel seconds, minor page faults): as it runs (`runtime.keep_freed_memory` at start-up), and with the
    same malloc settings given by environment variables, as a check that the built-in ones take."""
    import resource
    import subprocess
    import sys
    import models
    import runtime
    d = scratch_dir()
    chunk = batch // (regions + 1) * 9  # whole teacher batches: 9 per chunk, 10 chunks
    here = Path(__file__).resolve().parent
    run = lambda *args, env=None: subprocess.run([sys.executable, *map(str, args)], cwd=here, check=True,
                                                 capture_output=True, text=True, env=env)
    run("ferkd.py", "train", "--data=digits", "--kd=none", f"--arch={arch}", "--epochs=1",
        f"--run_dir={d / 't'}")
    torch.set_num_threads(os.cpu_count())
    runtime.keep_freed_memory()  # as labels.py build does at start-up
    model = models.build_model(arch, 10).eval().to(memory_format=torch.channels_last)  # untrained: same speed
    x = torch.rand(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        t0, n = time.time(), 30
        for _ in range(n):
            model(x)
    forward = n * batch / (time.time() - t0)
    print(f"\n6. label build: {arch} teacher on digits at {res} px, R={regions}, {batch} crops per forward, "
          f"fp32, {torch.get_num_threads()} threads")
    print("| | crops/s | vs pure forward | user s | kernel s | minor faults/s |\n|---|---|---|---|---|---|")
    print(f"| teacher's pure forward | {forward:,.0f} | 1.00 | | | |")
    keep = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 31))
    for name, env in (("build", None), ("build, MALLOC_*_THRESHOLD_ in the environment", keep)):
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        p = run("labels.py", "build", "--data=digits", f"--teacher={d / 't' / 'final.pt'}",
                f"--out={d / 'l.beton'}", f"--regions={regions}", f"--batch_size={batch}", f"--chunk={chunk}",
                f"--res={res}", "--overwrite", env=env)
        wall, after = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        # per-chunk lines give the mean rate since the first batch: the rate between the first chunk's end and
        # the last full chunk's leaves out FFCV's compile on the first batch
        lines = re.findall(r"chunk (\d+)/\d+: ([\d.]+) images/s", p.stdout)[:-1]
        done = [(int(c) * chunk, int(c) * chunk / float(r)) for c, r in lines]  # (images, seconds) at its end
        rate = (done[-1][0] - done[0][0]) / (done[-1][1] - done[0][1]) * (regions + 1)
        print(f"| {name} | {rate:,.0f} | {rate / forward:.2f} | {after.ru_utime - before.ru_utime:.1f} | "
              f"{after.ru_stime - before.ru_stime:.1f} | "
              f"{(after.ru_minflt - before.ru_minflt) / wall:,.0f} |")


def bench_loss():
    import kernels_triton
    print("\n4. loss")
    kernels_triton.benchmark()



# -----------------------------------------------------------------------------
# 5. scale: an ImageNet-shaped label file (1.28M non-square JPEGs, 1,000 classes, R=300) on one machine

class SyntheticImages:
    """n ImageNet-shaped stand-ins made on demand (nothing on disk): image i is landscape (H x 4H/3) or
    portrait (4H/3 x H) by its index, a smooth colour gradient plus noise, so it compresses like a photo."""

    def __init__(self, n, side=32):
        self.n, self.side = n, side

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        h, w = (self.side, self.side * 4 // 3) if i % 2 else (self.side * 4 // 3, self.side)
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3) + (y * rng.integers(-3, 4) + x * rng.integers(-3, 4))[..., None]
        return np.clip(base + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)


def memory():
    """This process's peak resident memory, and what is resident now: anonymous (its own arrays) and
    file-backed (pages of memory-mapped files, e.g. FFCV's reads of the .beton: page cache, shared, and the
    kernel maps up to 64 KiB of cached neighbours on each fault). "Now" is after malloc_trim: freed
    temporaries that glibc keeps for reuse (how many depends on the process's history and threads, e.g. a
    process group's) are handed back first, so it reads what the process holds."""
    import ctypes
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    ctypes.CDLL(None).malloc_trim(0)
    now = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in open("/proc/self/status")
           if line.startswith(("RssAnon", "RssFile"))}
    return (f"peak RSS {peak:,.0f} MB (now anonymous {now['RssAnon']:,.0f} MB, "
            f"file-backed {now['RssFile']:,.0f} MB)")


def scale_write(path, images, regions, k=5, classes=1000, seed=0):
    """`labels.py build`'s file, minus the teacher: phase 1 (the images through the same FFCV writer, zero
    records), phase 2's boxes and decoder plan (the same calls, same arrays), records whose top-k and p_gt
    come from a seeded generator instead of a teacher, and phase 3 (streamed CRC, header). Prints seconds and
    peak RSS after each phase."""
    import beton
    N, R, D = images, regions, beton.region_bytes(k)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, N)
    ds = beton.Dataset("synthetic", "train", [str(c) for c in range(classes)], labels, SyntheticImages(N), 32)
    t0 = time.time()
    beton.write_beton(path, ds, np.broadcast_to(np.zeros((1, R, D), np.uint8), (N, R, D)))
    t1 = time.time()
    print(f"ingest: {N / (t1 - t0):,.0f} images/s, {t1 - t0:.0f} s, {memory()}", flush=True)
    heights, widths = beton.image_sizes(path)
    qboxes, flips = np.zeros((N, R, 4), np.uint8), np.zeros((N, R), bool)
    plan = np.zeros((N, R + 1, 5), np.int32)
    slots, fd = beton.region_slots(path), os.open(path, os.O_RDWR)
    for i in range(N):  # as build phase 2, with a seeded generator in the teacher's place
        qboxes[i], flips[i] = beton.seeded_regions(seed, i, R, heights[i], widths[i])
        plan[i, :R] = beton.region_plan(qboxes[i], flips[i], heights[i], widths[i])
        plan[i, R] = beton.whole_image_plan(heights[i:i + 1], widths[i:i + 1])[0, 0]
        g = np.random.default_rng([seed, i, 1])
        ids = (g.integers(0, classes, (R, 1)) + np.arange(k)) % classes  # distinct top-k classes
        probs = g.dirichlet(np.ones(k + 1), R)[:, :k]
        rec = beton.pack_regions(qboxes[i], flips[i], ids, probs, g.random(R), classes)
        os.pwrite(fd, rec.tobytes(), slots[i])
    os.fsync(fd)
    os.close(fd)
    t2 = time.time()
    print(f"boxes, plan and records: {N / (t2 - t1):,.0f} images/s, {t2 - t1:.0f} s, {memory()}",
          flush=True)
    header = dict(schema=beton.SCHEMA_VERSION, dataset="synthetic", fingerprint="synthetic", images=N,
                  classes=ds.classes, num_classes=classes,
                  teacher=dict(kind="synthetic", name="seeded generator", checksum="", mean=beton.MEAN,
                               std=beton.STD), temperature=1.0, k=k, regions=R, seed=seed, res=32,
                  region_bytes=D, regions_crc32=beton.regions_crc32(path, R * D))
    beton.attach_header(path, header)
    t3 = time.time()
    print(f"checksum and header: {t3 - t2:.0f} s, {memory()}; label file "
          f"{os.path.getsize(path) / 2**30:.2f} GiB, records {N * R * D / 2**30:.2f} GiB", flush=True)


def scale_train(path, steps=300, batch=256, crops=1, workers=2):
    """`ferkd.py train`'s start-up on a label file (header, region table, FerKD categories, the first epoch's
    plan, the loader), then `steps` FKD steps of small16 at 32 px, then loader rows/s alone. Under torchrun
    each process does this on its share of the images and prints its own lines (`train start-up (rank r/w)`):
    the region table is one mapped copy per node, written by the first process if missing."""
    import beton
    import ferkd
    import torch.distributed as dist
    t0 = time.time()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # not runtime.setup_distributed: its malloc settings keep freed temporaries resident, which
        dist.init_process_group("gloo")  # would read as held memory below (they are reused, per chunk)
    who = f" (rank {rank}/{world})" if world > 1 else ""

    def say(line):  # one write per line: the processes share stdout
        os.write(sys.stdout.fileno(), (line + "\n").encode())

    header = beton.read_header(path)
    table = beton.read_regions(path, header)
    heights, widths = beton.image_sizes(path)
    c = ferkd.TrainConfig(kd="ferkd", labels=str(path), crops=crops, batch_size=batch)
    scores = ferkd.threshold_scores(c, header, table)  # as train: once, for the plan and the loss
    plan, fill, images, _ = ferkd.region_plans(c, header, table, heights, widths, scores)
    choice = fill(0)
    loader = beton.region_loader(path, plan, header["res"], batch, workers, order="random",
                                 indices=images[rank::world], drop_last=True)
    if world > 1:
        dist.barrier()  # every process started: what each holds now is its own start-up's
    t1 = time.time()
    say(f"train start-up{who}: {t1 - t0:.0f} s, {memory()} (records {table.nbytes / 2**20:,.0f} MB)")
    if steps:
        scale_steps(header, table, scores, c, choice, loader, steps, batch, crops, say, who)


def bench_plan(images=1_281_167, regions=300, k=5, crops=1, side=500):
    """The part of `ferkd.py train`'s start-up that grows with images x regions, at ImageNet's size without its
    label file: the thresholds' scores, the kept regions per image and first epoch's plan (ferkd.region_plans), and a
    later epoch's plan, on an in-memory region table (its p_gt bytes random, the rest zero; 8 GiB at 1.28M x
    300) for FKD and FerKD by p_gt and by rank. The loader and the table's mapping are not in it
    (`scale_train` times them on a real file)."""
    import beton
    import ferkd
    N, R = images, regions
    table = np.zeros((N, R, beton.region_bytes(k)), np.uint8)
    table[..., 4 + 3 * k] = np.random.default_rng(0).integers(0, 256, (N, R), np.uint8)  # the stored p_gt
    header, sizes = dict(k=k, regions=R), np.full(N, side, np.int64)
    print(f"table {table.nbytes / 2**30:.1f} GiB ({N:,} x {R} x {table.shape[2]} B), {memory()}", flush=True)
    for name, flags in [("FKD", dict(kd="fkd")), ("FerKD p_gt", dict(kd="ferkd", thresholds="p_gt")),
                        ("FerKD rank", dict(kd="ferkd", thresholds="rank"))]:
        c = ferkd.TrainConfig(**flags, crops=crops)
        t0 = time.time()
        scores = ferkd.threshold_scores(c, header, table)
        t1 = time.time()
        plan, fill, kept, _ = ferkd.region_plans(c, header, table, sizes, sizes, scores)
        t2 = time.time()
        fill(0)
        t3 = time.time()
        fill(1)
        t4 = time.time()
        print(f"{name}: scores {t1 - t0:.2f} s, kept counts {t2 - t1:.2f} s, first plan {t3 - t2:.2f} s: "
              f"{t3 - t0:.2f} s of start-up; a later epoch's plan {t4 - t3:.2f} s; {memory()}", flush=True)
        del scores, plan, fill, kept


def scale_steps(header, table, scores, c, choice, loader, steps, batch, crops, say, who):
    """scale_train's FKD steps (the first 20 warm up), then the loader alone."""
    import beton
    import ferkd
    import models
    device = torch.device("cpu")
    model = models.build_model("small16", header["num_classes"]).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = ferkd.make_train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False),
                                 ferkd.stored_label_loss(c, table, header, scores), ferkd.mix_batch(c, None),
                                 models.autocast_dtype(device)[0], device, crops)
    n, t2, batches = 0, time.time(), beton.epoch_batches(loader, 0)
    for images_u8, labels, index in batches:
        step(images_u8, labels, index, choice)
        n += 1
        if n == 20:
            t2 = time.time()  # the first steps warm up (FFCV's JIT, allocator)
        if n == steps:
            break
    batches.close()  # stops FFCV's pipeline thread mid-epoch
    t3 = time.time()
    say(f"train steps{who}: {(n - 20) * batch * crops / (t3 - t2):,.0f} rows/s over {n - 20} steps after 20, "
        f"{memory()}")
    n, t4, batches = 0, time.time(), beton.epoch_batches(loader, 1)
    for images_u8, labels, index in batches:
        n += 1
        if n == steps:
            break
    batches.close()
    say(f"loader alone{who}: {n * batch * crops / (time.time() - t4):,.0f} rows/s")


def is_label_file(path, images, regions):
    import beton
    try:
        header = beton.read_header(path)
    except beton.UserError:
        return False
    return (header["images"], header["regions"]) == (images, regions)


def scale(images=1_281_167, regions=300, steps=300, out="", nproc=1):
    """The ImageNet-shaped run: writes the label file (to --out, else a temporary folder; an existing --out of
    the same size is reused), then measures the trainer on it, each part in its own process so each peak RSS
    is its own; with --nproc=P the trainer's part runs as P processes under torchrun, as on one node."""
    import subprocess
    path = Path(out) if out else scratch_dir() / "scale.beton"
    print(f"\n5. scale: {images:,} synthetic non-square JPEG images (32 x 42 and 42 x 32), 1,000 classes, "
          f"R={regions}, top-5; records from a seeded generator (no teacher); trainer in {nproc} process(es)",
          flush=True)
    here = Path(__file__).resolve()
    if not is_label_file(path, images, regions):
        subprocess.run([sys.executable, "-c", f"import bench; bench.scale_write({str(path)!r}, {images}, "
                        f"{regions})"], cwd=here.parent, check=True)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] * (nproc > 1)
    subprocess.run([sys.executable, *torchrun, "bench.py", "scale_train", str(path), f"--steps={steps}"],
                   cwd=here.parent, check=True)


# -----------------------------------------------------------------------------
# 9. loader_imagenet: region replay's rate per core at ImageNet size (how many cores a GPU's step needs)

def photo_like(i, height=375, width=500, amplitude=20.0):
    """Image i of a synthetic photo set: a random colour plus Gaussian noise at five octaves (cells of 128
    to 1 px, bilinear, the same amplitude at each: roughly the 1/f spectrum of photos). At amplitude 20 a
    500 x 375 image is ~110 KB as JPEG quality 90, ImageNet-1k's mean file size (~140 GB / 1.28M), so
    TurboJPEG has as many bits to decode per pixel as on real photos; a smooth image decodes much faster."""
    import cv2
    rng = np.random.default_rng(i)
    img = rng.uniform(60, 200, 3).astype(np.float32) + np.zeros((height, width, 3), np.float32)
    for cell in (128, 32, 8, 2, 1):
        g = rng.normal(0, amplitude, (-(-height // cell) + 1, -(-width // cell) + 1, 3)).astype(np.float32)
        img += cv2.resize(g, (g.shape[1] * cell, g.shape[0] * cell), interpolation=cv2.INTER_LINEAR)[:height,
                                                                                                       :width]
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_photo(args):
    path, i, height, width = args
    from PIL import Image
    Image.fromarray(photo_like(i, height, width)).save(path, quality=90)


def imagenet_like_folder(root, images=2000, classes=100, val=0, side=375):
    """An ImageFolder (root/train/cCCC/*.jpg, root/val/...) of `photo_like` JPEGs (quality 90), landscape
    (side x 4 side / 3) and portrait by turns, written on every core; `val` images per class in val/."""
    import multiprocessing
    root = Path(root)
    jobs = []
    for split, n in (("train", images), ("val", val * classes)):
        for i in range(n):
            folder = root / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (side, side * 4 // 3) if i % 2 == 0 else (side * 4 // 3, side)
            jobs.append((folder / f"{i:06d}.jpg", i + (split == "val") * 10**6, h, w))
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_write_photo, jobs, chunksize=16)
    return root


def bench_loader_imagenet(images=2000, res="160,176,192,224", crops="1,4", workers="1,2", rows=256,
                          regions=16, epochs=1, side=375, figures=None):
    """Rows/s of region replay (`ferkd.py train`'s loader: FFCV + RegionCrop) on ImageNet-like JPEGs stored
    as `labels.py build` stores an image folder (longest side <= 512, JPEG quality 90), at each --res,
    --crops and worker count; batches of `rows` rows (rows / crops images). RegionCrop decodes an image once
    for all its crops, so a row costs 1 / crops JPEG decodes plus one crop-resize (`replay_rate`). `side`: the
    images' shorter side (ImageNet's typical 375; 4/3 of it the longer)."""
    import beton
    import models
    d = scratch_dir()
    t0 = time.time()
    ds = beton.load_dataset(f"imagefolder:{imagenet_like_folder(d / 'folder', images, side=side)}",
                            "train")
    N = len(ds.labels)
    jpeg_kb = np.mean([os.path.getsize(p) for p in ds.images]) / 1e3
    path = d / "imagenet-like.beton"
    beton.write_beton(path, ds)  # images only: the loader's cost does not depend on the label records
    heights, widths = beton.image_sizes(path)
    qboxes = np.stack([beton.seeded_regions(0, i, regions, heights[i], widths[i])[0] for i in range(N)])
    flips = np.random.default_rng(1).random((N, regions)) < 0.5
    print(f"\n9. region replay at ImageNet size: {N:,} photo-like JPEGs ({heights.min()} x {widths.max()} "
          f"and {heights.max()} x {widths.min()}, {jpeg_kb:.0f} KB each at quality 90; set-up "
          f"{time.time() - t0:.0f} s), R={regions} stored boxes, batches of {rows} rows, CPU: "
          f"{os.cpu_count()} cores, {models.cpuinfo('model name') or 'unknown CPU'}", flush=True)
    print("| res | crops | workers | rows/s | rows/s per worker | JPEG decodes per row |")
    print("|---|---|---|---|---|---|")
    out = []
    for r in names(res, int):
        for n in names(crops, int):
            for w in names(workers, int):
                rate, per_row = replay_rate(path, qboxes, flips, r, n, w, rows, epochs)
                out.append(dict(res=r, crops=n, workers=w, rows_per_s=round(rate), per_worker=round(rate / w),
                                decodes_per_row=round(per_row, 3)))
                print(f"| {r} | {n} | {w} | {rate:,.0f} | {rate / w:,.0f} | {per_row:.2f} |", flush=True)
    if figures is not None:
        figures["rows"] = out


def replay_rate(path, qboxes, flips, res, crops, workers, rows=256, epochs=1, seed=2):
    """(rows/s, JPEG decodes per row) of `ferkd.py train`'s loader on the images of an FFCV file: per image,
    `crops` distinct regions among its stored boxes `qboxes` (N, R, 4) uint8 and flips (N, R), batches of
    `rows` rows (rows / crops images), `workers` FFCV threads. Epoch 0 warms up (FFCV's JIT of the pipeline,
    its threads), then `epochs` whole epochs are timed."""
    import beton
    heights, widths = beton.image_sizes(path)
    pick = np.argsort(np.random.default_rng(seed).random(flips.shape), axis=1)[:, :crops]  # distinct regions
    plan = np.ascontiguousarray(beton.region_plan(
        np.take_along_axis(qboxes, pick[..., None], 1), np.take_along_axis(flips, pick, 1), heights[:, None],
        widths[:, None]), np.int32)
    loader = beton.region_loader(path, plan, res, max(1, rows // crops), workers, order="random")
    for _ in beton.epoch_batches(loader, 0):
        pass
    decoded = seen = 0
    t0 = time.time()
    for e in range(1, 1 + epochs):
        for imgs, _, _ in beton.epoch_batches(loader, e):  # (B, crops, res, res, 3): B decodes
            decoded += imgs.shape[0]
            seen += imgs.shape[0] * imgs.shape[1]
    return seen / (time.time() - t0), decoded / seen


def build_rate(stdout, chunk, regions):
    """Regions/s of a `labels.py build` from its log's chunk lines ("chunk c/n: X images/s, ..."), each the
    mean rate since the first batch: the rate between the first chunk's end and the last full chunk's, which
    leaves out FFCV's compile on the first batch (the last chunk may be partial). None under 3 chunks."""
    lines = re.findall(r"chunk (\d+)/\d+: ([\d.]+) images/s", stdout)[:-1]
    done = [(int(c) * chunk, int(c) * chunk / float(r)) for c, r in lines]  # (images, seconds) at its end
    if len(done) < 2:
        return None
    return (done[-1][0] - done[0][0]) / (done[-1][1] - done[0][1]) * regions


def all(images=4000):
    bench_labels()
    bench_loader(images=images)
    bench_step()
    bench_loss()


if __name__ == "__main__":
    from runtime import run_cli  # leaves scale_train's torchrun group on exit, as every command does
    run_cli({"all": all, "labels": bench_labels, "loader": bench_loader, "step": bench_step,
               "loss": bench_loss, "loss_step": bench_loss_step, "kd_step": bench_kd_step, "scale": scale,
               "scale_train": scale_train, "build": bench_build, "plan": bench_plan,
               "loader_imagenet": bench_loader_imagenet})
