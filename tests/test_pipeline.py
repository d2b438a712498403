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
    """Each stored region equals the teacher re-run on an independently cropped region, within quantization."""
    import ferkd
    import beton
    ckpt, path = built
    _, table, ds = stored(path)
    model, _ = ferkd.load_checkpoint(ckpt)
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
    tol = 0.5 / 255 + 1e-4
    assert (probs[:n] - top_p).abs().max() <= tol
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
    probs, pgt = rng.random((7, 3, K)), rng.random((7, 3))
    rec = beton.pack_regions(qbox, flip, ids, probs, pgt)
    assert rec.shape == (7, 3, beton.region_bytes(K)) == (7, 3, 20)
    i2, p2, g2, f2 = beton.unpack_regions(torch.from_numpy(rec), K)
    assert np.array_equal(i2.numpy(), ids) and np.array_equal(f2.numpy(), flip)
    assert np.abs(p2.numpy() - probs).max() <= 0.5 / 255 + 1e-6 and np.abs(g2.numpy() - pgt).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(rec[..., :4], qbox)


def test_boxes_follow_random_resized_crop_rule():
    import beton
    b, f = beton.random_boxes(np.random.default_rng(1), 20000)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ratio = (b[:, 3] - b[:, 1]) / (b[:, 2] - b[:, 0])
    assert (b >= 0).all() and (b <= 1 + 1e-12).all()
    assert area.min() >= 0.08 - 1e-9 and ratio.min() >= 0.75 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9
    assert 0.45 < f.mean() < 0.55
    px = beton.box_pixels(beton.quantize_boxes(b), 32, 32)
    assert (px[:, 2] > px[:, 0]).all() and (px[:, 3] > px[:, 1]).all() and px.min() >= 0 and px.max() <= 32


def test_fkd_student_learns_and_checkpoint_is_a_teacher(built, tmp_path):
    _, path = built
    p = cli("ferkd.py", "train", "--data=digits", f"--labels={path}", "--kd=fkd", "--arch=small16", "--epochs=4",
            "--batch_size=64", "--crops=2", f"--run_dir={tmp_path / 'fkd'}")
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
    p = cli("ferkd.py", "train", "--data=fashion-mnist", f"--labels={path}", "--kd=fkd", f"--run_dir={tmp_path}",
            check=False)
    line = one_error_line(p)
    assert "built for digits" in line and "labels.py build --data=fashion-mnist" in line


def test_truncated_and_missing_label_files(built, tmp_path):
    _, path = built
    for cut in (100, path.stat().st_size // 2, path.stat().st_size - 10):
        bad = tmp_path / f"cut{cut}.beton"
        bad.write_bytes(path.read_bytes()[:cut])
        p = cli("ferkd.py", "train", "--data=digits", f"--labels={bad}", "--kd=fkd", f"--run_dir={tmp_path / 'r'}",
                check=False)
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
