"""`labels.py import` of FKD-format soft-label folders (issue 15).

Fixtures are written as FKD_SLG/generate_soft_label.py writes them: boxes drawn by torchvision's
RandomResizedCrop.get_params on each original image, stored as fractions (i/H, j/W, h/H, w/W), flips, and
the top-k of a softmax as `label_quantization` keeps it, saved with torch.save([coords, flip, out]) of NumPy
arrays (float32, or float16 as with --use_fp16). The oracle for a region's crop is torchvision's own crop of
those fractions (FKD's `resized_crop` crops before it resizes), on an image whose pixels hold their position.
"""
import os

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, cli, code_tolerance, last_json, torchrun
from test_pipeline import one_error_line

pytestmark = pytest.mark.timeout(300)
C = 12  # classes: k = 10 needs more than 10
# (H, W) of the training images: non-square both ways, and one FFCV stores scaled down (max side 512)
SIZES = [(32, 48), (48, 32)]
BIG = (427, 640)


class Anything:  # an object FKD's files never hold
    pass


def fkd_folders(root, k, n_regions, fp16, seed):
    """An ImageFolder (train/ and val/) and FKD's label folder for it, as FKD writes one."""
    import torchvision.transforms as T
    from PIL import Image
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images, fkd = root.resolve() / "images", root.resolve() / "fkd"
    written = {}  # image path -> (coords, flip, out) as saved
    for c in range(C):
        name = f"c{c:02d}"
        for split in ("train", "val"):
            (images / split / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(images / "val" / name / "v.jpg")
        (fkd / "train" / name).mkdir(parents=True)
        files = [(f"n{c}_{i}.JPEG", SIZES[(c + i) % 2]) for i in range(2)]
        if c == 0:
            files += [("big.jpg", BIG)]
        if c == 1:
            files += [("a.b.jpg", SIZES[0])]  # FKD names its labels by the part before the first dot: a.tar
        for fname, (H, W) in files:
            path = images / "train" / name / fname
            img = Image.fromarray(rng.integers(0, 256, (H, W, 3), np.uint8))
            img.save(path, quality=95)
            coords = []
            for _ in range(n_regions):  # RandomResizedCropWithCoords (FKD_SLG/utils.py)
                i, j, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                coords.append(torch.FloatTensor((i / img.size[1], j / img.size[0], h / img.size[1],
                                                 w / img.size[0])))
            coords = torch.stack(coords).numpy()
            flip = torch.rand(n_regions).numpy() < 0.5
            logits = torch.randn(n_regions, C) * 2
            logits[::2, c] += 4  # the true class is in the top-k on some regions, not on others
            p = torch.softmax(logits, 1)
            order = torch.argsort(p, 1, descending=True)[:, :k]
            out = torch.stack([order.float(), p.gather(1, order)], 1).numpy()  # (N, 2, k): ids, then probs
            if fp16:
                coords, out = np.float16(coords), np.float16(out)
            torch.save([coords, flip, out], fkd / "train" / name / (fname.split(".")[0] + ".tar"))
            written[str(path)] = (coords, flip, out)
    return images, fkd, written


# fp32 with k = 5 and every region; fp16 with k = 10 and the first 5 of 7
VARIANTS = {"fp32-k5": dict(k=5, n_regions=6, fp16=False, flags=[]),
            "fp16-k10": dict(k=10, n_regions=7, fp16=True, flags=["--regions=5"])}


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory):
    v = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    images, fkd, written = fkd_folders(root, v["k"], v["n_regions"], v["fp16"], seed=len(request.param))
    out = root / "labels.beton"
    args = ["labels.py", "import", f"--fkd={fkd}", f"--data=imagefolder:{images}", f"--out={out}", "--res=32",
            "--chunk=8", *v["flags"]]
    p = cli(*args)
    assert "p_gt estimated" in p.stdout, p.stdout
    return dict(v, root=root, images=images, fkd=fkd, written=written, out=out, args=args)


def fkd_crop_box(coords, H, W):
    """FKD's crop of these fractions in an H x W image, found by cropping with torchvision what FKD crops
    (RandomResizedCrop_FKD: i = coords[0] * H, ..., then resized_crop, which crops first) from an image whose
    pixels hold their own index: (top, left, bottom, right)."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    where = Image.fromarray(np.arange(H * W, dtype=np.int32).reshape(H, W))  # mode "I"
    i, j = coords[0].item() * H, coords[1].item() * W
    h, w = coords[2].item() * H, coords[3].item() * W
    crop = np.asarray(TF.crop(where, i, j, h, w))
    top, left = divmod(int(crop[0, 0]), W)
    return np.array([top, left, top + crop.shape[0], left + crop.shape[1]])


def test_imported_regions_are_fkds_crops_and_labels(imported):
    """Each stored region is FKD's crop of its fractions in the stored image: the same pixel box for sides up
    to 255 px, within side/510 + 1/2 px per edge above (the 0..255 grid); the replayed pixels are that crop's
    (OpenCV INTER_AREA, the decoder's resize); ids, flips and probabilities are the file's, p_gt is the true
    class's probability, or (1 - sum of top-k) / (C - k) where the file's top-k lacks it."""
    import beton
    path, k = imported["out"], imported["k"]
    header = beton.read_header(path)
    table = beton.read_regions(path, header)
    ds = beton.load_dataset(f"imagefolder:{imported['images']}", "train")
    R = header["regions"]
    assert R == (5 if imported["fp16"] else 6) and header["k"] == k and header["images"] == len(ds.labels)
    assert header["source"] == f"fkd:{imported['fkd'].resolve()}" and header["teacher"]["kind"] == "fkd"
    ids, probs, pgt, flip = (t.numpy() for t in beton.unpack_regions(torch.from_numpy(table), k))
    heights, widths = beton.image_sizes(path)
    estimated, step = 0, 0.5 / 255 + 1e-3  # quantization, and float16's rounding of the file's probabilities
    big = 0
    for n, (image, y) in enumerate(zip(ds.images, ds.labels)):
        coords, f_flip, out = (a[:R] for a in imported["written"][image])
        H, W = int(heights[n]), int(widths[n])
        order = np.argsort(-out[:, 1], axis=-1, kind="stable")
        assert np.array_equal(ids[n], np.take_along_axis(out[:, 0], order, -1).astype(np.int64))
        assert np.array_equal(flip[n], f_flip)
        f_top = torch.from_numpy(-np.sort(-out[:, 1].astype(np.float64), axis=-1))  # stored by probability
        assert (np.abs(probs[n] - f_top.numpy()) <= code_tolerance(f_top, atol=1e-6).numpy()).all()
        f_p = out[:, 1].astype(np.float64)
        known = (out[:, 0] == y).any(1)
        want = np.where(known, (f_p * (out[:, 0] == y)).sum(1), (1 - f_p.sum(1)) / (C - k))
        assert np.abs(pgt[n] - want).max() <= step
        estimated += int((~known).sum())
        ours = beton.box_pixels(table[n, :, :4], H, W)
        theirs = np.stack([fkd_crop_box(c, H, W) for c in coords])
        if max(H, W) <= 255:
            assert np.array_equal(ours, theirs), (image, ours, theirs)
        else:  # FFCV stored it scaled as a whole, and the grid step is above one pixel
            big += 1
            assert abs(H / W - BIG[0] / BIG[1]) < 1 / H and max(H, W) == 512
            bound = np.array([H, W, H, W]) / 510 + 0.5
            assert (np.abs(ours - theirs) <= bound).all() and (ours != theirs).any()
    assert big == 1 and 0 < estimated < len(ds.labels) * R
    assert header["pgt_estimated"] == estimated / (len(ds.labels) * R)

    # the pixels the trainer replays are FKD's crop, through the decoder both scripts share: regions at 32 px,
    # and two 32 x 32 identity crops that together give the stored image of the 32 x 48 / 48 x 32 ones
    small = np.flatnonzero(np.maximum(heights, widths) <= 48)
    plan = np.zeros((len(heights), R + 2, 5), np.int32)
    plan[:, :R] = beton.region_plan(table[..., :4], flip, heights[:, None], widths[:, None])
    plan[:, R + 1, :4] = np.stack([heights - 32, widths - 32, heights, widths], 1)
    plan[:, R, 2:4] = 32
    seen = 0
    for crops, _, index in beton.region_loader(path, plan, 32, 8, indices=small):
        for b, n in enumerate(index.tolist()):
            H, W = int(heights[n]), int(widths[n])
            img = np.zeros((H, W, 3), np.uint8)
            img[H - 32:, W - 32:] = crops[b, R + 1].numpy()
            img[:32, :32] = crops[b, R].numpy()
            for r, c in enumerate(imported["written"][ds.images[n]][0][:R]):
                top, left, bottom, right = fkd_crop_box(c, H, W)
                want = cv2.resize(img[top:bottom, left:right], (32, 32), interpolation=cv2.INTER_AREA)
                np.testing.assert_array_equal(crops[b, r].numpy(), want[:, ::-1] if flip[n, r] else want)
            seen += 1
    assert seen == len(small) == len(ds.labels) - 1


def test_label_files_are_loaded_safely_and_checked(imported, tmp_path):
    """Every bad FKD file is a UserError naming it: one that needs any global other than NumPy's array types
    (code is never run), a truncated one, another k, too few regions, coords outside [0, 1], ids outside the
    classes, another structure."""
    import labels
    from runtime import UserError
    image, (coords, flip, out) = next(iter(imported["written"].items()))
    k, R = imported["k"], 4
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    good = tmp_path / "good.tar"
    torch.save([coords, flip, out], good)
    arrays, _ = labels.load_fkd(good)
    assert labels.check_fkd(good, arrays, R, k, C)[2].shape == (R, k)
    # a NumPy 1.x file names numpy.core.multiarray._reconstruct
    reconstruct = np._core.multiarray._reconstruct
    reconstruct.__module__ = "numpy.core.multiarray"
    try:
        torch.save([coords, flip, out], tmp_path / "numpy1.tar")
    finally:
        reconstruct.__module__ = "numpy._core.multiarray"
    arrays, _ = labels.load_fkd(tmp_path / "numpy1.tar")
    assert np.array_equal(arrays[2], out)

    def refused(obj, words, R=R, raw=None):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.tar"
        if raw is None:
            torch.save(obj, bad)
        else:
            bad.write_bytes(raw)
        with pytest.raises(UserError) as e:
            labels.check_fkd(bad, labels.load_fkd(bad)[0], R, k, C)
        assert str(bad) in str(e.value) and words in str(e.value), str(e.value)

    refused([coords, flip, out, Payload()], "needs posix.system")
    refused([coords, flip, Anything()], "Anything")
    assert not marker.exists()
    refused(None, "truncated", raw=good.read_bytes()[:len(good.read_bytes()) // 2])
    refused(None, "not a torch.save file", raw=b"not a pickle at all")
    refused([coords, flip], "does not hold")
    refused([coords, flip.astype(np.float32), out], "FKD writes")
    refused([coords, flip, out[..., :k - 1]], f"top {k - 1} classes")
    refused([coords, flip, out], "fewer than R", R=len(coords) + 1)
    for i, v in ((0, 1.5), (2, -0.1), (3, np.nan)):
        c = coords.copy()
        c[1, i] = v
        refused([c, flip, out], "coords outside [0, 1]")
    c = coords.copy()
    c[1, 0], c[1, 2] = 0.7, 0.5
    refused([c, flip, out], "coords outside [0, 1]")
    o = out.copy()
    o[0, 0, 1] = C
    refused([coords, flip, o], f"outside 0..{C - 1}")


def test_missing_files_and_class_mismatch_are_refused(imported, tmp_path):
    """Checked before anything is written: a missing label file is named (or --skip_missing leaves its image
    out, counted), and a label folder with other classes than the images is refused. The refusals are called
    in-process (a UserError is one line from the command, as every other test of one shows)."""
    import shutil

    import beton
    import labels
    import runtime
    if imported["fp16"]:
        pytest.skip("one variant is enough")
    fkd = tmp_path / "fkd"
    shutil.copytree(imported["fkd"], fkd)
    out = tmp_path / "l.beton"
    flags = dict(fkd=str(fkd), data=f"imagefolder:{imported['images']}", out=str(out), res=32)
    (fkd / "train" / "extra").mkdir()
    with pytest.raises(runtime.UserError, match="13 class folders, the images 12.*extra"):
        labels.import_fkd(**flags)
    (fkd / "train" / "extra").rmdir()
    (fkd / "train" / "c03" / "n3_1.tar").unlink()
    with pytest.raises(runtime.UserError) as e:
        labels.import_fkd(**flags)
    assert str(fkd / "train" / "c03" / "n3_1.tar") in str(e.value) and "--skip_missing" in str(e.value)
    assert not list(tmp_path.glob("l.beton*"))
    p = cli("labels.py", "import", *(f"--{k}={v}" for k, v in flags.items()), "--skip_missing")
    assert "leaving out the 1 of 26 images" in p.stdout, p.stdout
    header = beton.read_header(out)
    assert header["images"] == 25 and header["skipped_images"] == 1
    folder = beton.load_dataset(f"imagefolder:{imported['images']}", "train")
    assert header["fingerprint"] == folder.fingerprint()  # the folder's, which `ferkd.py train --data` checks


def test_bad_file_mid_import_then_resume_gives_the_same_bytes(imported, tmp_path):
    """A truncated file in the last chunk stops the import with one line naming it; the chunks done before are
    kept, and once the file is whole again the same command finishes with the bytes of a clean import."""
    if imported["fp16"]:
        pytest.skip("one variant is enough")
    victim = imported["fkd"] / "train" / "c11" / "n11_1.tar"
    whole = victim.read_bytes()
    out = tmp_path / "r.beton"
    args = [a if not a.startswith("--out=") else f"--out={out}" for a in imported["args"]]
    victim.write_bytes(whole[:100])
    try:
        line = one_error_line(cli(*args, check=False))
    finally:
        victim.write_bytes(whole)
    assert str(victim) in line and "truncated" in line, line
    state = tmp_path / "r.beton.partial.d"
    assert len(list(state.glob("c*.json"))) == 3 and not out.exists()  # 26 images in chunks of 8: 4 chunks
    p = cli(*args)
    assert "1 chunks to do, 3 done before" in p.stdout, p.stdout
    assert out.read_bytes() == imported["out"].read_bytes()
    assert not state.exists()


def test_two_processes_give_the_same_bytes(imported, tmp_path):
    """Under torchrun each rank imports every other chunk; the file is the one-process import's."""
    import subprocess
    if imported["fp16"]:
        pytest.skip("one variant is enough")
    out = tmp_path / "two.beton"
    args = [a if not a.startswith("--out=") else f"--out={out}" for a in imported["args"]]
    p = subprocess.run([*torchrun(), *args], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout and "2 chunks to do" in p.stdout, p.stdout
    assert out.read_bytes() == imported["out"].read_bytes()


def test_train_on_imported_labels_and_show_says_pgt_is_estimated(imported, tmp_path):
    """`ferkd.py train --kd=fkd` runs on an imported file with no teacher; `labels.py show` says how much of
    p_gt is estimated."""
    if not imported["fp16"]:
        pytest.skip("one variant is enough")
    p = cli(ROOT / "ferkd.py", "train", f"--data=imagefolder:{imported['images']}",
            f"--labels={imported['out']}", "--kd=fkd", "--arch=small16", "--epochs=1", "--batch_size=8",
            f"--run_dir={tmp_path / 'fkd'}",
            cwd=tmp_path)
    assert last_json(p.stdout)["epoch"] == 1 and (tmp_path / "fkd" / "final.pt").is_file()
    p = cli("labels.py", "show", imported["out"], f"--out={tmp_path / 'r.png'}", "--images=2")
    assert "p_gt estimated (1 - sum of top-k) / (C - k) on " in p.stdout, p.stdout
