"""Online KD (`--kd=kd --teacher=T`), the method FKD approximates, and training on the first R' stored regions
(`--regions`). On scikit-learn's digits, on CPU."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cli, last_json
from test_train_extras import one_error_line

pytestmark = pytest.mark.timeout(600)


def test_online_kd_loss_is_its_definition():
    """T^2 x the mean over rows of -sum_c softmax(teacher(x') / T)_c log softmax(z / T)_c, where x' is the
    student's input renormalized to the teacher's statistics, against float64 (the teacher run in float64 on
    x' made by hand), loss and gradient with an upstream gradient != 1. The teacher gets no gradient and stays
    in eval mode: its BatchNorm statistics do not move."""
    import beton
    import ferkd
    import models
    torch.manual_seed(0)
    C, T, B = 10, 2.0, 12
    teacher = models.build_model("small16", C)
    for m in teacher.modules():  # statistics that differ from a batch's own, so train mode would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    teacher.train()  # the loss must put it in eval mode itself
    reference = copy.deepcopy(teacher).double().eval()
    before = copy.deepcopy(teacher.state_dict())
    teacher_id = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    c = ferkd.TrainConfig(kd="kd", teacher="t", temperature=T)
    loss_fn = ferkd.online_kd_loss(c, teacher, teacher_id, None)
    x = torch.randn(B, 3, 16, 16)
    logits = (torch.randn(B, C) * 3).requires_grad_()
    loss = loss_fn(x, logits, torch.zeros(B, dtype=torch.long), None, None, None, None)
    (2.5 * loss).backward()

    mean = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)
    pixels = x.double() * mean(beton.STD) + mean(beton.MEAN)              # what the student's x stands for
    with torch.no_grad():
        p = F.softmax(reference((pixels - mean(teacher_id["mean"])) / mean(teacher_id["std"])) / T, 1)
    z = logits.detach().double().requires_grad_()
    want = T * T * -(p * F.log_softmax(z / T, 1)).sum(1).mean()
    (2.5 * want).backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), z.grad, rtol=1e-4, atol=1e-7)
    assert not teacher.training and all(q.grad is None and not q.requires_grad for q in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_online_kd_trains_from_a_teacher(built, tmp_path):
    """--kd=kd trains a student from the digits teacher; config.json names the teacher and its T; the
    metrics are the other modes'."""
    ckpt, _ = built
    p = cli("ferkd.py", "train", "--data=digits", "--kd=kd", f"--teacher={ckpt}", "--temperature=2",
            "--arch=small16", "--epochs=2", "--batch_size=64", f"--run_dir={tmp_path / 'kd'}")
    m = last_json(p.stdout)
    assert m["epoch"] == 2 and m["top1"] > 30 and m["images_per_s"] > 0  # percent: 3x chance, 10 classes
    config = json.loads((tmp_path / "kd" / "config.json").read_text())
    assert config["kd"] == "kd" and config["temperature"] == 2.0 and config["teacher_id"]["kind"] == "ferkd"


def test_online_kd_refuses_a_teacher_of_another_class_count(tmp_path):
    import models
    ckpt = tmp_path / "three.pt"
    models.save_checkpoint(ckpt, dict(model=models.build_model("small16", 3).state_dict(),
                                      config=dict(arch="small16", data="digits"), classes=["a", "b", "c"]))
    line = one_error_line(cli("ferkd.py", "train", "--data=digits", "--kd=kd", f"--teacher={ckpt}",
                              "--arch=small16", "--epochs=1", f"--run_dir={tmp_path / 'r'}", check=False))
    assert "predicts 3 classes, the dataset has 10" in line, line


@pytest.mark.parametrize("flags, words", [
    (["--kd=kd"], "--kd=kd (online KD) takes --teacher"),
    (["--kd=fkd", "--labels=x.beton", "--teacher=t.pt"], "--teacher acts only with it"),
    (["--kd=none", "--temperature=2"], "--temperature must be > 0 and acts only with --kd=kd"),
    (["--kd=none", "--regions=2"], "--regions must be >= 0 and acts only with"),
])
def test_online_kd_and_regions_flags_are_checked(flags, words, tmp_path):
    line = one_error_line(cli("ferkd.py", "train", "--data=digits", *flags, f"--run_dir={tmp_path / 'r'}",
                              check=False))
    assert words in line, line


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba at loader collection
def test_regions_replays_only_the_first_stored_regions(built, tmp_path):
    """--regions=R' replays each image's first R' stored regions only (a pool of R' without rebuilding the
    labels), every one of them over the epochs; more than the file holds is one error line."""
    import beton
    import ferkd
    _, path = built
    c = ferkd.TrainConfig(data="digits", labels=str(path), kd="fkd", regions=2, crops=1, batch_size=64)
    data = ferkd.training_data(c, 0, 1, torch.device("cpu"))
    header = beton.read_header(path)
    assert np.array_equal(data.table, beton.read_regions(path, header)[:, :2])  # the first 2, not any 2
    seen = np.concatenate([data.fill_plan(epoch).numpy().ravel() for epoch in range(6)])
    assert set(seen.tolist()) == {0, 1}
    # the boxes the decoder cuts are those regions' own, box and flip, as labels.py stored them
    h, w = beton.image_sizes(path)
    plan, fill, _, _ = ferkd.region_plans(c, header, data.table, h, w)
    choice = fill(3).numpy()
    boxes, flips = beton.seeded_regions(header["seed"], 7, header["regions"], h[7], w[7],
                                        header["scale"][0])
    want = beton.region_plan(boxes[:2], flips[:2], h[7], w[7])  # image 7's first two regions
    assert np.array_equal(plan[7], want[choice[7]])
    line = one_error_line(cli("ferkd.py", "train", "--data=digits", f"--labels={path}", "--kd=fkd",
                              "--regions=7", f"--run_dir={tmp_path / 'r'}", check=False))
    assert "--regions=7" in line and "holds 6 per image" in line, line
