"""
Benchmarks, each a ratio measured side by side in one run on the same machine (README quotes the output):

    python bench.py all          # or: labels | loader | step | loss
    python bench.py loader --images=4000 --workers=2

1. labels: bytes per region of our label file vs FKD's format (one torch-saved file per image, fp32 / fp16).
2. loader: region replay, images/s: our FFCV loader vs the torchvision way (ImageFolder-style PNG files and one
   torch-saved label file per image read per sample, crop + flip + resize, DataLoader workers).
3. step: train-step images/s, torch.compile + bf16 autocast + channels-last vs eager fp32, same model and batch.
4. loss: `ferkd_loss` vs FKD's dense recover-then-cross-entropy (kernels_triton.py's own benchmark).
No timing here is asserted by a test: the machines are shared and noisy; read the ratios.
"""
import atexit
import os
import shutil
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
    for name, fdtype, idtype in (("FKD fp32", torch.float32, torch.int32), ("FKD fp16", torch.float16, torch.int16)):
        total = raw = 0
        for i in range(images):  # FKD: per image, [coords (R,4), flip (R,), top-k probs (R,k), ids (R,k)]
            rec = [torch.from_numpy(rng.random((regions, 4))).to(fdtype), torch.from_numpy(rng.random(regions) < .5),
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
    print("(ferkd's on-disk cost adds FFCV's 8-byte pointer and 24-byte allocation entry per image, 32 B / R.)")


def _fashion_subset(n):
    import beton
    ds = beton.load_dataset("fashion-mnist", "train")
    ds.images, ds.labels = ds.images[:n], ds.labels[:n]
    return ds


def bench_loader(images=4000, workers=2, batch=256, regions=4, res=32, epochs=3):
    """Images/s of region replay: FFCV + RegionCrop vs torch DataLoader over PNG files + per-image label files."""
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
    table = beton.pack_regions(boxes, flips, rng.integers(0, 10, (N, regions, 5)), rng.random((N, regions, 5)) / 5,
                                rng.random((N, regions)))
    path = d / "bench.beton"
    beton.write_beton(path, ds, table, workers)
    for i in range(N):  # the torchvision way: encoded image files and one label file per image
        Image.fromarray(ds.images[i]).save(d / f"{i}.png")
        torch.save({"boxes": torch.from_numpy(boxes[i].astype(np.float32) / 255), "flip": torch.from_numpy(flips[i]),
                    "probs": torch.rand(regions, 5), "ids": torch.randint(0, 10, (regions, 5))}, d / f"{i}.pth")

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
    print(f"\n2. region replay loading, {N} Fashion-MNIST images at {res} px, {workers} workers, batch {batch}")
    print("| loader | images/s |\n|---|---|")
    print(f"| FFCV + RegionCrop (ferkd) | {ours:,.0f} |\n| torch DataLoader, PNG + per-image .pth labels | "
          f"{theirs:,.0f} |\n| ratio | {ours / theirs:.1f}x |")


def bench_step(arch="small32", batch=256, res=32, steps=20, device="cpu", classes=10):
    """Train-step images/s: compiled + bf16 + channels-last vs eager fp32 (same model, batch, optimizer), with
    the FKD loss on synthetic top-5 labels (on CUDA: the Triton kernel). torchvision's resnet* need no FFCV:
    `python bench.py step --device=cuda --arch=resnet50 --res=224 --batch=256 --classes=1000`."""
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
              torch.ones(batch, 1, device=device))                                            # p_gt, target, mix
    fkd = dict(t_low=0.0, t_mid=0.0, t_top=1.0, eps=0.0)
    out = {}
    for name, compiled, amp, cl in (("eager fp32", False, False, False),
                                    ("compiled bf16 channels-last", True, True, True)):
        torch.manual_seed(0)
        if arch.startswith("resnet"):
            model = getattr(torchvision.models, arch)(num_classes=classes)
        else:
            import ferkd
            model = ferkd.build_model(arch, classes)
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
    print(f"\n3. train step (FKD loss), {arch} at {res} px, batch {batch}, {classes} classes, {where}, "
          f"torch {torch.__version__}")
    print("| step | images/s | warm-up s |\n|---|---|---|")
    for name, (r, w) in out.items():
        print(f"| {name} | {r:,.0f} | {w:.1f} |")
    a, b = out.values()
    print(f"| ratio | {b[0] / a[0]:.2f}x | |")


def bench_loss():
    import kernels_triton
    print("\n4. loss")
    kernels_triton.benchmark()


def all(images=4000):
    bench_labels()
    bench_loader(images=images)
    bench_step()
    bench_loss()


if __name__ == "__main__":
    import fire
    fire.Fire({"all": all, "labels": bench_labels, "loader": bench_loader, "step": bench_step, "loss": bench_loss})
