"""The label contract and the trainer, end to end on scikit-learn's digits (real data, small enough for CPU).

A session fixture trains a small teacher with `ferkd.py train --kd=none` and builds its label file with
`labels.py build`, both through the command line as a user would; the tests then check the file against
independent recomputations and train an FKD student from it.
"""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import K, R, cli, last_json

pytestmark = pytest.mark.timeout(600)


def reference_crop(img, box, flip, res):
    """What a region should look like, from OpenCV directly: crop, INTER_AREA resize, mirror."""
    top, left, bottom, right = box
    out = cv2.resize(img[top:bottom, left:right], (res, res), interpolation=cv2.INTER_AREA)
    return out[:, ::-1] if flip else out


def stored(path):
    """A label file's header and region table, and the digits training split it was built from."""
    import beton
    header = beton.read_header(path)
    return header, beton.read_regions(path, header), beton.load_dataset("digits", "train")


@pytest.mark.parametrize("device", [None, "cpu"])  # "cpu": through FFCV's ToDevice, the copy used on GPUs
def test_loader_replays_stored_boxes_pixel_exact(built, device):
    import beton
    _, path = built
    header, table, ds = stored(path)
    h, w = beton.image_sizes(path)
    boxes = beton.box_pixels(table[..., :4], h[:, None], w[:, None])
    _, _, _, flip = beton.unpack_regions(torch.from_numpy(table), K)
    assert 0 < flip.float().mean() < 1  # both flipped and unflipped regions are exercised
    plan = np.concatenate([boxes, flip.numpy()[..., None]], -1).astype(np.int32)
    seen = 0
    for images, lab, index in beton.region_loader(path, plan, header["res"], 100, device=device):
        for b, i in enumerate(index.tolist()):
            assert lab[b] == ds.labels[i]
            for r in range(R):
                want = reference_crop(ds.images[i], boxes[i, r], bool(flip[i, r]), header["res"])
                np.testing.assert_array_equal(images[b, r].numpy(), want)
        seen += len(index)
    assert seen == len(ds.labels)


def test_stored_labels_match_teacher_recomputed(built):
    """Each stored region equals the teacher re-run on an independently cropped region, within
    quantization."""
    import models
    import beton
    ckpt, path = built
    _, table, ds = stored(path)
    model, _ = models.load_checkpoint(ckpt)
    model.eval()
    ids, probs, pgt, flip = beton.unpack_regions(torch.from_numpy(table), K)
    n = 200
    boxes = beton.box_pixels(table[:n, :, :4], 16, 16)
    crops = np.stack([reference_crop(ds.images[i], boxes[i, r], bool(flip[i, r]), 16)
                      for i in range(n) for r in range(R)])
    x = torch.from_numpy(crops).float().permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(beton.MEAN).view(1, 3, 1, 1)) / torch.tensor(beton.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        p = F.softmax(model(x).float(), 1).view(n, R, -1)
    top_p, top_i = p.topk(K, dim=2)
    tol = 0.5 / 255 + 1e-4  # round(255 p); a top-k entry may be one step lower (its sum is capped at 255)
    assert (probs[:n] - top_p).abs().max() <= tol + 0.5 / 255
    uncapped = (probs[:n] * 255).round().sum(-1) < 255  # no entry was lowered: each within half a step
    assert (probs[:n] - top_p)[uncapped].abs().max() <= tol
    assert (pgt[:n] - p.gather(2, torch.from_numpy(ds.labels[:n]).view(n, 1, 1).expand(n, R, 1))[..., 0]
            ).abs().max() <= tol
    # ids agree except where two probabilities are closer than the quantization step
    clear = (top_p[..., :-1] - top_p[..., 1:]).abs().min(-1).values > 2e-3
    assert clear.float().mean() > 0.5
    assert torch.equal(ids[:n][clear], top_i[clear])


def test_region_records_pack_and_unpack():
    import beton
    rng = np.random.default_rng(0)
    qbox = rng.integers(0, 256, (7, 3, 4)).astype(np.uint8)
    flip = rng.random((7, 3)) < 0.5
    ids = rng.integers(0, 32768, (7, 3, K))
    probs, pgt = rng.dirichlet(np.ones(K + 1), (7, 3))[..., :K], rng.random((7, 3))  # top-k sums below 1
    rec = beton.pack_regions(qbox, flip, ids, probs, pgt)
    assert rec.shape == (7, 3, beton.region_bytes(K)) == (7, 3, 20)
    i2, p2, g2, f2 = beton.unpack_regions(torch.from_numpy(rec), K)
    assert np.array_equal(i2.numpy(), ids) and np.array_equal(f2.numpy(), flip)
    # each probability within one step (the top-k sum is capped at 1, see the next test), p_gt within half
    assert np.abs(p2.numpy() - probs).max() <= 1 / 255 + 1e-6 \
        and np.abs(g2.numpy() - pgt).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(rec[..., :4], qbox)


def torchvision_boxes(H, W, n, seed=0):
    """n boxes (top, left, bottom, right) from torchvision's own RandomResizedCrop.get_params."""
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(seed)
    img = torch.empty(3, H, W)
    out = [RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) for _ in range(n)]
    return np.array([(i, j, i + h, j + w) for i, j, h, w in out])


def box_stats(px, H, W):
    """log pixel aspect (w / h) and area share of pixel boxes on an H x W image."""
    h, w = px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]
    return np.log(w / h), h * w / (H * W)


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs (exact for the
    discrete values boxes of whole pixels take)."""
    v = np.union1d(a, b)
    cdf = lambda x: np.searchsorted(np.sort(x), v, side="right") / len(x)
    return np.abs(cdf(a) - cdf(b)).max()


@pytest.mark.parametrize("H, W", [(375, 500), (500, 375), (32, 48), (48, 32), (16, 16)])
def test_boxes_follow_torchvision_random_resized_crop(H, W):
    """Our vectorized draw, and the boxes a label file stores and replays (through the 0..255 grid), have the
    distribution of torchvision's RandomResizedCrop.get_params on images of every shape: the KS distance of
    log aspect and of area share below 0.025 with 20,000 draws each (two torchvision samples differ by
    0.007-0.011; 0.0195 is the 0.1% critical value). Unit-square boxes (schema 1) put the whole aspect range
    off by log(W / H): a KS distance near 0.5 on 500 x 375 images."""
    import beton
    n = 20000
    px, flip = beton.random_boxes(np.random.default_rng(1), np.full(n, H), np.full(n, W))
    assert (px[:, :2] >= 0).all() and (px[:, 2] <= H).all() and (px[:, 3] <= W).all()
    assert (px[:, 2] > px[:, 0]).all() and (px[:, 3] > px[:, 1]).all()
    assert 0.48 < flip.mean() < 0.52
    replayed = beton.box_pixels(beton.grid_boxes(px, H, W), H, W)
    if max(H, W) <= 255:
        np.testing.assert_array_equal(replayed, px)  # the grid is finer than the pixels: exact
    else:
        assert np.abs(replayed - px).max() <= 1      # side / 510 + 1/2 px, rounded
    theirs = box_stats(torchvision_boxes(H, W, n), H, W)
    for boxes in (px, replayed):
        for ours, ref in zip(box_stats(boxes, H, W), theirs):
            assert ks_distance(ours, ref) < 0.025


@pytest.mark.parametrize("H, W", [(10, 1000), (1000, 10), (30, 40)])
def test_box_fallback_is_torchvision_centre_crop(H, W):
    """When no draw fits (a very elongated image; a square area share of 1 on a 30x40 image), the box is
    torchvision's centred crop of clamped aspect, exactly."""
    import beton
    from torchvision.transforms import RandomResizedCrop
    px, _ = beton.random_boxes(np.random.default_rng(0), np.full(50, H), np.full(50, W), scale=(1.0, 1.0),
                               ratio=(1.0, 1.0) if (H, W) == (30, 40) else (3 / 4, 4 / 3))
    ratio = (1.0, 1.0) if (H, W) == (30, 40) else (3 / 4, 4 / 3)
    i, j, h, w = RandomResizedCrop.get_params(torch.empty(3, H, W), scale=(1.0, 1.0), ratio=ratio)
    assert (px == [i, j, i + h, j + w]).all(), (px[0], (i, j, h, w))


def test_fkd_student_learns_and_checkpoint_is_a_teacher(built, tmp_path):
    _, path = built
    p = cli("ferkd.py", "train", "--data=digits", f"--labels={path}", "--kd=fkd", "--arch=small16",
            "--epochs=4", "--batch_size=64", "--crops=2", f"--run_dir={tmp_path / 'fkd'}")
    m = last_json(p.stdout)
    assert m["top1"] > 50, m  # chance is 10%
    assert (tmp_path / "fkd" / "final.pt").is_file() and (tmp_path / "fkd" / "config.json").is_file()
    assert len((tmp_path / "fkd" / "metrics.jsonl").read_text().splitlines()) == 4
    # a student checkpoint can itself teach
    out = tmp_path / "again.beton"
    cli("labels.py", "build", "--data=digits", f"--teacher={tmp_path / 'fkd' / 'final.pt'}", f"--out={out}",
        "--regions=2")
    assert out.is_file()


def one_error_line(p):
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    return lines[0]


def test_header_mismatch_refused(built, tmp_path):
    _, path = built
    p = cli("ferkd.py", "train", "--data=fashion-mnist", f"--labels={path}", "--kd=fkd",
            f"--run_dir={tmp_path}", check=False)
    line = one_error_line(p)
    assert "built for digits" in line and "labels.py build --data=fashion-mnist" in line


def test_truncated_and_missing_label_files(built, tmp_path):
    _, path = built
    for cut in (100, path.stat().st_size // 2, path.stat().st_size - 10):
        bad = tmp_path / f"cut{cut}.beton"
        bad.write_bytes(path.read_bytes()[:cut])
        p = cli("ferkd.py", "train", "--data=digits", f"--labels={bad}", "--kd=fkd",
                f"--run_dir={tmp_path / 'r'}", check=False)
        assert "truncated" in one_error_line(p)
    p = cli("ferkd.py", "train", "--data=digits", f"--labels={tmp_path / 'nope.beton'}", "--kd=fkd",
            f"--run_dir={tmp_path / 'r'}", check=False)
    assert "not found" in one_error_line(p)


@pytest.mark.parametrize("args, words", [
    (["ferkd.py", "train", "--nope=1"], "unknown flag --nope"),
    (["ferkd.py", "train", "--epochs=-1"], "--epochs must be >= 1"),
    (["ferkd.py", "train", "--compile=maybe"], "--compile takes true or false"),
    (["ferkd.py", "train", "--kd=fkd"], "needs --labels"),
    (["ferkd.py", "train", "--kd=ferkd", "--labels=x", "--t_low=0.9", "--t_mid=0.5"], "thresholds"),
    (["ferkd.py", "train", "--kd=ferkd", "--labels=x", "--t_low=0.1", "--t_mid=0.6", "--t_top=0.5"],
     "t_mid <= t_top"),
    (["labels.py", "build", "--k=0", "--teacher=t", "--out=o"], "must be positive"),
    (["labels.py", "build", "--data=nowhere", "--teacher=torchvision:resnet18", "--out=/tmp/x.beton"],
     "unknown dataset"),
    (["labels.py", "build", "--teacher=torchvision:os.system", "--out=/tmp/x.beton", "--data=digits"],
     "not supported"),
])
def test_bad_flags_give_one_line(args, words):
    assert words in one_error_line(cli(*args, check=False))


def test_existing_output_refused(built):
    ckpt, path = built
    before = path.read_bytes()
    p = cli("labels.py", "build", "--data=digits", f"--teacher={ckpt}", f"--out={path}", check=False)
    assert "exists" in one_error_line(p)
    assert path.read_bytes() == before


def test_quantized_topk_mass_never_exceeds_one():
    """round(255 p) of each top-k probability can sum past 255 (0.5 + 0.5 rounds to 2 steps); the stored
    top-k is capped at a sum of 255, each entry within one step, so the target the loss trains on (top-k plus
    the remaining mass spread over the other C - k classes) is never negative. The target is read back from
    the loss's gradient: y = softmax(z) - N dL/dz for normalized targets (kernels_triton's docstring)."""
    import beton
    from kernels_triton import ferkd_loss
    rng = np.random.default_rng(0)
    B, C = 64, 1000
    # a confident teacher: p_1..p_4 at odd half steps (1.5/255, 3.5/255: each rounds up), p_0 the rest but a
    # little mass for the other classes, i.e. top-k sums just below 1
    rest = (rng.choice([1, 3], (B, K - 1)) + 0.5) / 255
    first = 1 - rest.sum(1, keepdims=True) - rng.uniform(0, 0.4, (B, 1)) / 255
    top_p = torch.from_numpy(np.concatenate([first, rest], 1))
    top_i = torch.from_numpy(np.stack([rng.permutation(C)[:K] for _ in range(B)]))
    p = torch.zeros(B, C, dtype=torch.float64).scatter_(1, top_i, top_p)
    assert (np.rint(top_p.numpy() * 255).sum(1) > 255).any()  # the case that overshoots is present
    rec = beton.pack_regions(np.zeros((B, 4), np.uint8), np.zeros(B, bool), top_i.numpy(), top_p.numpy(),
                             p[:, 0].numpy())
    q = rec[:, 4 + 2 * K:4 + 3 * K].astype(np.int64)
    assert (q.sum(1) <= 255).all()
    assert np.abs(q / 255 - top_p.numpy()).max() <= 1 / 255 + 1e-9
    ids, probs, pgt, _ = beton.unpack_regions(torch.from_numpy(rec), K)
    z = torch.zeros(B, C, requires_grad=True)
    ferkd_loss(z, ids[:, None], probs[:, None], pgt[:, None], torch.zeros(B, dtype=torch.long),
               torch.ones(B, 1), t_low=0.0, t_mid=0.0, t_top=1.0, eps=0.1).backward()
    target = torch.softmax(z.detach(), 1) - B * z.grad
    assert target.min() >= -1e-6, target.min()


def test_epochs_keep_torch_thread_count(built):
    """FFCV's Loader sets torch's thread count to its num_workers at every epoch start (a fresh epoch and a
    resumed one); epoch_batches puts it back, so a CPU step or teacher uses the machine's threads."""
    import beton
    _, path = built
    h, w = beton.image_sizes(path)
    plan = np.concatenate([beton.box_pixels(beton.full_boxes(len(h)), h, w), np.zeros((len(h), 1), np.int32)],
                          1)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        loader = beton.region_loader(path, np.ascontiguousarray(plan[:, None]), 16, 100, num_workers=1)
        for epoch, skip in ((0, 0), (1, 2)):
            batches = 0
            for _ in beton.epoch_batches(loader, epoch, skip):
                assert torch.get_num_threads() == 3
                batches += 1
            assert batches == len(loader) - skip
    finally:
        torch.set_num_threads(before)


@pytest.mark.timeout(120)  # FFCV's own epoch iterator waits forever here
def test_a_failing_loader_thread_is_an_error_not_a_hang(built, monkeypatch):
    """An exception in FFCV's pipeline thread (here simulated; on a GPU, e.g. CUDA out of memory in ToDevice)
    reaches the consumer as one error instead of leaving it waiting for a batch that never comes."""
    import beton
    import runtime
    _, path = built
    h, w = beton.image_sizes(path)
    plan = np.concatenate([beton.box_pixels(beton.full_boxes(len(h)), h, w), np.zeros((len(h), 1), np.int32)],
                          1)
    loader = beton.region_loader(path, np.ascontiguousarray(plan[:, None]), 16, 100, num_workers=1)

    def broken(self, b_ix, *args):
        raise RuntimeError("simulated failure in the pipeline")
    monkeypatch.setattr(beton._Epoch, "run_pipeline", broken)
    with pytest.raises(runtime.UserError, match="simulated failure"):
        for _ in beton.epoch_batches(loader, 0):
            pass


def test_epoch_orders_of_two_seeds_are_independent():
    """FFCV seeds its random order with seed + epoch, so seed s at epoch e + 1 is seed s + 1 at epoch e (shown
    here on FFCV's own order); `epoch_order` hashes (seed, epoch): no epoch of seed s repeats an epoch of
    seed s + 1. Under DDP every rank takes its share of the same permutation, padded as DistributedSampler
    pads it, so the ranks' shares cover every image."""
    from types import SimpleNamespace
    from ffcv.traversal_order import Random
    import beton
    from torch.utils.data import DistributedSampler

    def order(seed, world=1, rank=0):
        o = Random.__new__(Random)  # FFCV's traversal state without a Loader: what epoch_order reads
        o.seed, o.indices, o.distributed = seed, np.arange(3, 103), world > 1
        o.sampler = DistributedSampler(o.indices, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return o

    ffcv_a, ffcv_b = order(7).sample_order(1), order(8).sample_order(0)
    assert np.array_equal(ffcv_a, ffcv_b)  # FFCV's aliasing, which the hash removes
    ours = {(s, e): beton.epoch_order(SimpleNamespace(traversal_order=order(s)), e) for s in (7, 8)
            for e in range(5)}
    assert all(sorted(v.tolist()) == list(range(3, 103)) for v in ours.values())  # a permutation each epoch
    assert not any(np.array_equal(ours[7, e], ours[8, f]) for e in range(5) for f in range(5))
    assert np.array_equal(ours[7, 3], beton.epoch_order(SimpleNamespace(traversal_order=order(7)), 3))
    shares = [beton.epoch_order(SimpleNamespace(traversal_order=order(7, 3, r)), 2) for r in range(3)]
    assert [len(s) for s in shares] == [34] * 3 and set(np.concatenate(shares).tolist()) == set(range(3, 103))
    dealt = np.empty(102, np.int64)
    for r in range(3):
        dealt[r::3] = shares[r]
    assert np.array_equal(dealt, np.resize(ours[7, 2], 102))  # the one-process order, padded and dealt out
