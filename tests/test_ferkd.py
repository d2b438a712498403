"""FerKD in training: region selection by p_gt, SelfMix, and the trainer's loss against its definition."""
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

import ferkd
import models
import beton
import runtime
from kernels_triton import region_category
from conftest import cli

pytestmark = pytest.mark.timeout(600)


def fake_table(N=50, R=6, k=5, seed=0):
    rng = np.random.default_rng(seed)
    b, f = beton.random_boxes(rng, np.full(N * R, 32), np.full(N * R, 32))
    pgt = rng.random((N, R)) ** 2
    pgt[0] = 0.0  # image 0: every region dropped at t_low > 0
    return beton.pack_regions(beton.grid_boxes(b, 32, 32).reshape(N, R, 4), f.reshape(N, R),
                               rng.integers(0, 10, (N, R, k)), rng.random((N, R, k)) / k, pgt, 10)


@pytest.mark.parametrize("t_low, t_mid, t_top", [(0.1, 0.3, 0.9), (0.0, 0.0, 1.0), (0.25, 0.25, 0.6)])
def test_region_selection_respects_thresholds(t_low, t_mid, t_top):
    table = fake_table()
    N, R = table.shape[:2]
    c = ferkd.TrainConfig(kd="ferkd", labels="x", crops=2, thresholds="p_gt", t_low=t_low, t_mid=t_mid,
                          t_top=t_top)
    h = w = np.full(N, 32)
    plan, fill, images, lut = ferkd.region_plans(c, dict(regions=R, k=5), table, h, w)
    pgt = beton.unpack_regions(torch.from_numpy(table), 5)[2]
    cat = lut[models.region_scores(table, 5, False)]  # a region's category: the lookup of its score byte
    assert np.array_equal(cat, region_category(pgt, t_low, t_mid, t_top).numpy())
    shares = models.category_shares(models.region_scores(table, 5, False), lut)  # as train states them
    assert np.allclose(shares, np.bincount(cat.ravel(), minlength=3) / cat.size)
    kept = (region_category(pgt, t_low, t_mid, t_top) > 0).numpy()
    assert np.array_equal(images, np.flatnonzero(kept.any(1)))  # images with no kept region are never loaded
    seen = np.zeros_like(kept)
    for epoch in range(30):
        choice = fill(epoch).numpy()
        rows = np.arange(N)[:, None]
        assert kept[images[:, None], choice[images]].all()  # only kept regions are replayed
        many = kept.sum(1) >= 2
        assert (choice[many, 0] != choice[many, 1]).all()  # two crops of an image are distinct regions
        box = beton.box_pixels(table[rows, choice, :4], 32, 32)
        assert np.array_equal(plan[..., :4], box)  # the decoder's plan holds the chosen regions' boxes
        seen[rows, choice] = True
    assert np.array_equal(seen[images], kept[images])  # and every kept region comes up over epochs


def test_crops_are_an_ordered_sample_of_kept_regions():
    """fill's sampler: an image's crops are distinct kept regions while crops <= its kept count, every ordered
    tuple of them equally likely; past the count the crops repeat in turn; an image with none gets an index
    that exists (it is never loaded)."""
    n, R = 24000, 6
    cat = np.zeros((n, R), np.int8)
    cat[:, [0, 2, 3, 5]] = 2
    cat[n // 2:, [2, 5]] = 0          # the second half keeps regions 0 and 3 only
    cat[-1] = 0                      # and the last image none
    count = (cat > 0).sum(1)
    choice = ferkd.kept_regions(np.packbits(cat > 0, axis=1), R, count,
                                ferkd.distinct_positions(np.random.default_rng(0), count, 3))
    assert choice.shape == (n, 3) and choice.min() >= 0 and choice.max() < R
    four, two = choice[:n // 2], choice[n // 2:-1]
    assert np.isin(four, [0, 2, 3, 5]).all() and np.isin(two, [0, 3]).all()
    assert all((four[:, i] != four[:, j]).all() for i, j in ((0, 1), (0, 2), (1, 2)))
    assert (two[:, 0] != two[:, 1]).all() and (two[:, 2] == two[:, 0]).all()  # 2 kept: the third repeats the first
    for rows, tuples in ((four, 24), (two[:, :2], 2)):  # ordered tuples: 4 x 3 x 2 and 2 x 1
        _, counts = np.unique(rows, axis=0, return_counts=True)
        expected = len(rows) / tuples
        assert len(counts) == tuples and np.abs(counts - expected).max() < 5 * np.sqrt(expected), counts


def test_selfmix_labels_are_the_pasted_area():
    for mix in ("cutmix", "mixup"):
        c = ferkd.TrainConfig(kd="ferkd", labels="x", crops=2, mix=mix, mix_prob=0.7, mix_alpha=1.0)
        fn = ferkd.mix_batch(c, torch.Generator().manual_seed(0))
        n, R, H = 2, 64, 16
        # row r holds the constant value r: the mixed row's mean tells how much came from the partner
        x = torch.arange(R, dtype=torch.float32).view(R, 1, 1, 1).expand(R, 3, H, H).contiguous()
        out, partner, share = fn(x, n)
        assert ((partner // n) == (torch.arange(R) // n)).all() and (partner != torch.arange(R)).all()
        own = torch.arange(R).float()
        frac_own = (out - x[partner]) / (own - partner.float()).view(R, 1, 1, 1)  # 1: own pixel, 0: pasted
        # cutmix rows are exact pixel counts; mixup rows carry fp32 rounding of values up to R
        atol = 1e-6 if mix == "cutmix" else 2e-5
        torch.testing.assert_close(frac_own.mean((1, 2, 3)), share, atol=atol, rtol=0)
        assert ((share >= 0) & (share <= 1)).all()
        if mix == "cutmix":  # own area in whole pixels
            torch.testing.assert_close(share * H * H, (share * H * H).round(), atol=1e-3, rtol=0)
        else:
            assert (share > 0).all()
        assert (share < 1).float().mean() > 0.4  # about mix_prob of the rows are mixed
        mixw = torch.stack([share, 1 - share], 1)
        torch.testing.assert_close(mixw.sum(1), torch.ones(R))


def test_cross_image_hard_region_label_is_exact():
    """A hard region mixed into another image's row is relabelled as a top-k label whose dense form is the
    softened one-hot of its own class: 1 - eps on the truth, eps / (C - 1) elsewhere."""
    c = ferkd.TrainConfig(kd="ferkd", labels="x", t_low=0.1, t_mid=0.5, t_top=0.9, eps=0.2)
    C, k = 10, 5
    ids = torch.tensor([[3, 1, 2, 4, 5]])
    probs = torch.tensor([[0.3, 0.2, 0.1, 0.1, 0.1]])
    i2, p2, g2 = ferkd.as_soft_label(ids, probs, torch.tensor([0.3]), torch.tensor([7]), C, c)
    dense = torch.full((C,), (1 - p2.sum().item()) / (C - k))
    dense[i2[0]] = p2[0]
    want = torch.full((C,), 0.2 / 9)
    want[7] = 0.8
    torch.testing.assert_close(dense, want)
    assert region_category(g2, 0.1, 0.5, 0.9).item() == 2  # and the loss files it as a kept soft label


def test_ferkd_with_selfmix_trains(built, tmp_path):
    _, path = built
    p = cli("ferkd.py", "train", "--data=digits", f"--labels={path}", "--kd=ferkd", "--thresholds=p_gt",
            "--t_low=0.02", "--t_mid=0.2", "--t_top=0.995", "--mix=cutmix", "--mix_prob=0.5", "--crops=2",
            "--arch=small16", "--epochs=4", "--batch_size=64", f"--run_dir={tmp_path / 'r'}")
    assert "dropped" in p.stdout and "hard" in p.stdout  # category counts printed before training
    assert json.loads(p.stdout.strip().splitlines()[-1])["top1"] > 50
    # every epoch logs the categories of the regions it replayed, as JSONL, CSV and TensorBoard scalars
    run = tmp_path / "r"
    config = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 4 and sum(config["region_shares"].values()) == pytest.approx(1)
    for m in log:
        assert m["hard_regions"] > 0 and m["hard_regions"] + m["soft_regions"] == 2 * config["train_images"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    as_floats = lambda d: {k: float(v) for k, v in d.items()}
    assert [as_floats(r) for r in rows] == [as_floats(m) for m in log]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("top1")] == \
        [(m["epoch"], round(m["top1"], 4)) for m in log]


def test_threshold_defaults_follow_the_mode():
    calibration = lambda c: {name: getattr(c, name) for name in ("thresholds", "t_low", "t_mid", "t_top")}
    assert calibration(ferkd.TrainConfig(kd="fkd")) == dict(thresholds="p_gt", t_low=0, t_mid=0, t_top=1)
    d = ferkd.FERKD_DEFAULTS
    assert calibration(ferkd.TrainConfig(kd="ferkd")) == d
    c = ferkd.TrainConfig(kd="ferkd", t_low=d["t_low"] / 2)  # a flag given replaces only its own default
    assert calibration(c) == dict(d, t_low=d["t_low"] / 2)
    ferkd.check_config(dataclasses.replace(c, labels="x"))
    # the other mode has no defaults of its own: FerKD's values compare another quantity there
    other = {"p_gt": "rank", "rank": "p_gt"}[d["thresholds"]]
    with pytest.raises(runtime.UserError, match="needs --t_low, --t_mid and --t_top"):
        ferkd.check_config(ferkd.TrainConfig(kd="ferkd", labels="x", thresholds=other, t_low=0.1))
    ferkd.check_config(ferkd.TrainConfig(kd="ferkd", labels="x", thresholds=other, t_low=0.1, t_mid=0.2,
                                         t_top=0.9))
    with pytest.raises(runtime.UserError, match="act only with --kd=ferkd"):
        ferkd.check_config(ferkd.TrainConfig(kd="fkd", labels="x", t_top=0.9))


def dense_kd_loss(table, k, C, labels, index, choice, logits, partner, share, T, t_low, t_mid, t_top, eps,
                  by_rank=False):
    """FKD/FerKD's loss written out densely in float64, row by row, from the raw record bytes: each region's
    target is the teacher's top-k with the rest spread evenly (soft), 1 - eps on its own image's class and
    eps / (C - 1) elsewhere (hard), or nothing (dropped); a row mixes its region and its partner's by share,
    renormalized over the kept ones; T^2 x the mean cross-entropy with softmax(z / T) over rows that keep
    one. The thresholds compare the stored p_gt or, `by_rank`, the region's place among its image's regions
    by p_gt (how many come before it in ascending order, stored order breaking ties) / (R - 1), as a byte."""
    n, R = choice.shape[1], table.shape[1]
    image, region = np.repeat(index, n), choice[index].reshape(-1)
    rec = table[image, region]  # (rows, D) each row's region
    own_class = np.repeat(labels, n)
    total, kept_rows = 0.0, 0
    for r in range(len(rec)):
        y, a_sum = np.zeros(C), 0.0
        for m, a in ((r, share[r]), (partner[r], 1 - share[r])):
            ids = rec[m, 4:4 + 2 * k].view(np.uint16)
            code = rec[m, 4 + 2 * k:4 + 3 * k].astype(np.float64)     # the log code, decoded by its formula
            probs = np.where(code == 255, 0.0, 2.0 ** (-1 - code / 12))
            if rec[m, 4 + 3 * k + 1] & 2:                               # slot 0 holds the rest: top-1 derived
                probs[0] = 1 - probs.sum()
            p = np.float32(rec[m, 4 + 3 * k]) / np.float32(255)  # p_gt as the trainer reads it
            if by_rank:
                pgt = table[image[m], :, 4 + 3 * k].astype(int)
                place = (pgt < pgt[region[m]]).sum() + (pgt[:region[m]] == pgt[region[m]]).sum()
                p = np.float32(np.floor(255 * place / (R - 1) + 0.5)) / np.float32(255)
            if not t_low <= p <= t_top or a == 0:
                continue
            if p < t_mid:
                target = np.full(C, eps / (C - 1))
                target[own_class[m]] = 1 - eps
            else:
                target = np.full(C, (1 - probs.sum()) / (C - k))
                target[ids] = probs
            y += a * target
            a_sum += a
        if a_sum > 0:
            z = logits[r] / T
            total += -(y / a_sum * (z - z.max() - np.log(np.exp(z - z.max()).sum()))).sum()
            kept_rows += 1
    return T * T * total / max(kept_rows, 1)


@pytest.mark.parametrize("kd, thresholds, mix_source, T, by", [
    ("fkd", (0.0, 0.0, 1.0), "self", 1.0, "p_gt"), ("fkd", (0.0, 0.0, 1.0), "self", 2.0, "p_gt"),
    ("ferkd", (0.0, 0.0, 1.0), "self", 1.0, "p_gt"), ("ferkd", (0.1, 0.4, 0.9), "self", 1.0, "p_gt"),
    ("ferkd", (0.1, 0.4, 0.9), "batch", 2.0, "p_gt"), ("ferkd", (0.1, 0.6, 0.9), "batch", 1.0, "rank"),
    ("ferkd", (0.0, 0.6, 1.0), "self", 1.0, "rank")])
def test_kd_loss_is_its_definition(kd, thresholds, mix_source, T, by):
    """The trainer's loss on stored records (ferkd.stored_label_loss: record gather, unpacking, the partner's
    label under --mix_source, the loss at the header's temperature) against `dense_kd_loss` in float64. At neutral
    thresholds --kd=ferkd must give FKD's loss; at others, hard regions train on the softened truth of their
    own image (the partner's class when it comes from another image) and dropped ones not at all."""
    N, R, k, C, n = 8, 3, 5, 10, 2
    table = fake_table(N=N, R=R)
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(C)[:k] for _ in range(N * R)]).reshape(N, R, k)  # distinct classes
    table[..., 4:4 + 2 * k] = ids.astype(np.uint16).view(np.uint8).reshape(N, R, 2 * k)
    t_low, t_mid, t_top = thresholds
    c = ferkd.TrainConfig(kd=kd, labels="x", crops=n, t_low=t_low, t_mid=t_mid, t_top=t_top, eps=0.2,
                          mix="cutmix", mix_source=mix_source, thresholds=by)
    labels = rng.integers(0, C, N)
    index, choice = np.arange(N), rng.integers(0, R, (N, n))
    rows = np.arange(N * n)
    partner = (rows // n) * n + (rows % n + 1) % n if mix_source == "self" else (rows + n) % (N * n)
    share = np.where(rng.random(N * n) < 0.5, 1.0, rng.random(N * n))
    logits = rng.normal(size=(N * n, C)) * 3
    got = ferkd.stored_label_loss(c, table, dict(regions=R, k=k, temperature=T))(
        None, torch.tensor(logits, dtype=torch.float32), torch.from_numpy(np.repeat(labels, n)),
        torch.from_numpy(index), torch.from_numpy(choice), torch.from_numpy(partner),
        torch.tensor(share, dtype=torch.float32))
    want = dense_kd_loss(table, k, C, labels, index, choice, logits, partner, share, T, t_low, t_mid, t_top,
                         0.2, by_rank=by == "rank")
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.4, 1.0, 2.0])
def test_selfmix_lambda_is_beta_drawn_from_the_runs_generator(alpha):
    """SelfMix's lambda ~ Beta(alpha, alpha) comes from the run's generator (saved in checkpoints), leaves the
    global stream alone, and has Beta's distribution: KS distance to torch.distributions.Beta's samples below
    0.015 over 40,000 draws each (measured 0.004-0.010 for alpha in 0.1-5; 0.0138 is the 0.1% critical value
    for two samples of one distribution at this size)."""
    state = torch.get_rng_state()
    lam = ferkd.sample_beta(alpha, 40000, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(lam, ferkd.sample_beta(alpha, 40000, torch.Generator().manual_seed(0), "cpu"))
    assert ((lam >= 0) & (lam <= 1)).all()
    ref = torch.distributions.Beta(alpha, alpha).sample((40000,))
    grid = torch.linspace(0, 1, 1001)
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True) / len(s)
    assert (cdf(lam) - cdf(ref)).abs().max() < 0.015


def test_rank_thresholds_split_every_image_alike():
    """--thresholds=rank: the thresholds compare each region's place among its image's regions by p_gt, so
    every image is split the same way whatever its teacher's confidence. With R=11 places score 0, 0.1, ...,
    1 (as bytes): at (0.05, 0.45, 0.95) the lowest and the highest are dropped, the next four are hard, the
    five above them soft."""
    rng = np.random.default_rng(3)
    N, R, k = 40, 11, 5
    table = fake_table(N=N, R=R)
    top = rng.integers(R, 256, N)  # images from unsure (p_gt all below 11/255) to sure: distinct p_gt each
    table[..., 4 + 3 * k] = np.stack([rng.choice(t, R, replace=False) for t in top]).astype(np.uint8)
    lut = models.category_lut(0.05, 0.45, 0.95)
    cat = lut[models.region_scores(table, k, True)]
    ascending = np.take_along_axis(cat, np.argsort(table[..., 4 + 3 * k], axis=1, kind="stable"), axis=1)
    assert (ascending == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0]).all()
    by_value = lut[models.region_scores(table, k, False)]  # p_gt bytes split each image its own way
    assert len({tuple(np.bincount(row, minlength=3)) for row in by_value}) > 1


def test_rank_scores_are_places_in_the_stable_order():
    """A region's rank score is its place among its image's regions by p_gt, ties in stored order, as a byte:
    checked against the inverse of a stable argsort on rows full of ties (R = 300, 20 distinct values)."""
    rng = np.random.default_rng(5)
    for R in (2, 7, 300):
        pgt = rng.integers(100, 120, (50, R)).astype(np.uint8)
        place = np.argsort(np.argsort(pgt, axis=1, kind="stable"), axis=1)
        assert np.array_equal(models.rank_scores(pgt), np.floor(255 * place / (R - 1) + 0.5).astype(np.uint8))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba at loader collection
def test_rank_scores_are_computed_once_per_run(built, monkeypatch):
    """--thresholds=rank reads the whole table to rank each image's regions (seconds at ImageNet size, issue
    32): the trainer's start-up ranks it once, for the plan's categories and the loss alike."""
    _, path = built
    calls = []
    rank_scores = models.rank_scores
    monkeypatch.setattr(models, "rank_scores", lambda pgt: calls.append(len(pgt)) or rank_scores(pgt))
    c = ferkd.TrainConfig(data="digits", labels=str(path), kd="ferkd", crops=1, batch_size=64)
    assert c.thresholds == "rank"
    data = ferkd.training_data(c, 0, 1, torch.device("cpu"))
    ferkd.choose_loss(c, data, torch.device("cpu"), False, None)
    assert sum(calls) == len(data.table)  # every image's regions ranked, once


@pytest.mark.parametrize("res, min_res, start, end, step, want", [
    (24, 16, 0, 2, 32, [16, 24, 24, 24]),          # issue 32: epoch 1 trained at 0 px (16 rounded to 32 = 0)
    (200, 160, 0, 4, 32, [160, 160, 192, 192, 200, 200]),  # it ended at 192, config.json saying 200
    (192, 160, 1, 3, 32, [160, 160, 192, 192, 192]),  # min_res until ramp_start; 176 rounds to 192
])
def test_ramp_is_ffcv_imagenets_within_min_res_and_res(res, min_res, start, end, step, want):
    """min_res up to --ramp_start, res from --ramp_end on, rounded to --res_step only in between, and every
    size within [min_res, res]."""
    c = ferkd.TrainConfig(epochs=len(want), min_res=min_res, ramp_start=start, ramp_end=end, res_step=step)
    got = [ferkd.res_at(c, epoch, res) for epoch in range(len(want))]
    assert got == want
    assert [ferkd.res_at(dataclasses.replace(c, min_res=0), e, res) for e in range(3)] == [res] * 3


def test_decoder_refuses_an_empty_resolution_and_a_box_outside_its_image(tmp_path):
    """A crop resized to 0 px, or a box that is empty or leaves its image, is one error line: OpenCV's
    resize aborted the whole process (a C++ exception, SIGABRT, no error line), and an exception inside
    FFCV's pipeline thread would hang the loader. Run in a child process, which the old code killed."""
    code = f"""
import sys; sys.path.insert(0, {str(beton.__file__.rsplit('/', 1)[0])!r})
import numpy as np, beton
from runtime import UserError
path, ds = beton.dataset_beton("digits", "test", cache_dir={str(tmp_path)!r})
h, w = beton.image_sizes(path)
plan = np.ascontiguousarray(beton.whole_image_plan(h, w), np.int32)
try:
    beton.region_loader(path, plan, 0, 64, indices=np.arange(64))
except UserError as e:
    print("refused:", e)
plan[5, 0, 2] = h[5] + 3  # image 5's box ends below the image
try:
    for batch in beton.epoch_batches(beton.region_loader(path, plan, 8, 64, indices=np.arange(64)), 0):
        pass
except UserError as e:
    print("refused:", e)
"""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stdout.splitlines() if line.startswith("refused:")]
    assert p.returncode == 0 and len(lines) == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "at least 1 x 1 px" in lines[0] and "region box of image 5" in lines[1], lines


def test_subset_is_a_fixed_class_stratified_sample():
    """--subset=N keeps each class's share (an image folder is sorted by class: the first N images were one
    or two classes), and is a function of (labels, N) alone: the same on every rank, on resume, at every
    --seed and in `labels.py build --subset=N`."""
    labels = np.repeat(np.arange(10), [100] * 9 + [50])  # class 9 half as large
    got = beton.subset_images(labels, 95)
    assert len(got) == len(set(got)) == 95 and (np.diff(got) > 0).all()
    assert np.bincount(labels[got], minlength=10).tolist() == [10] * 9 + [5]
    assert np.array_equal(got, beton.subset_images(labels.copy(), 95))
    assert not np.isin(np.arange(10) * 100, got).all()  # a sample, not each class's first images
    assert not np.array_equal(got[got < 900] % 100, np.sort(got[got < 900] % 100))
    assert np.bincount(labels[beton.subset_images(labels, 7)]).max() == 1  # largest remainders: 7 classes
    assert np.array_equal(beton.subset_images(labels, 5000), np.arange(len(labels)))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba at loader collection
def test_training_data_trains_on_the_subset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the digits cache is written under ./data
    c = ferkd.TrainConfig(data="digits", subset=300, seed=4, batch_size=64)
    data = ferkd.training_data(c, 0, 1, torch.device("cpu"))
    labels = beton.load_dataset("digits", "train").labels
    assert np.array_equal(data.kept_images, beton.subset_images(labels, 300))
    assert data.steps_per_epoch == 300 // 64


@pytest.mark.parametrize("flags, words", [
    (["--kd=fkd", "--labels=x.beton", "--label_smoothing=0"], "--label_smoothing=0.0 acts only with"),
    (["--kd=kd", "--teacher=t.pt", "--label_smoothing=0.2"], "--label_smoothing=0.2 acts only with"),
    (["--kd=ferkd", "--labels=x.beton", "--scale_min=0.3"], "--scale_min=0.3 acts only with --kd=none or"),
    (["--ramp_end=3"], "--ramp_end=3 acts only with --min_res"),
    (["--ramp_start=1"], "--ramp_start=1 acts only with --min_res"),
    (["--res_step=16"], "--res_step=16 acts only with --min_res"),
    (["--kd=fkd", "--labels=x.beton", "--eps=0.2"], "--eps=0.2 acts only with --kd=ferkd with hard regions"),
    (["--kd=ferkd", "--labels=x.beton", "--t_low=0.1", "--t_mid=0.1", "--t_top=0.9", "--eps=0.2",
      "--thresholds=p_gt"], "--eps=0.2 acts only with --kd=ferkd with hard regions"),
    (["--mix_alpha=0.4"], "--mix_alpha=0.4 acts only with --mix="),
    (["--mix_source=batch"], "--mix_source=batch acts only with --mix="),
    (["--mix_prob=0.5"], "--mix_prob=0.5 acts only with --mix="),
    (["--kd=fkd", "--labels=x.beton", "--mix=cutmix", "--crops=2"], "--mix=cutmix with --mix_prob=0"),
    (["--res=24", "--min_res=32", "--ramp_end=2"], "--min_res=32 is above --res=24"),
])
def test_flags_that_would_do_nothing_are_refused(flags, words, tmp_path):
    """Each flag set where it does nothing is one error line, before any data is read (issue 32)."""
    from test_train_extras import one_error_line
    line = one_error_line(cli("ferkd.py", "train", "--data=digits", *flags, f"--run_dir={tmp_path / 'r'}",
                              check=False))
    assert words in line, line
