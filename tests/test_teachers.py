"""Teachers from torchvision and timm, loaded the way users load pretrained ones but from local weight files
(nothing can be downloaded here): the build must feed each teacher crops normalized as that teacher expects,
and store what it predicts on them."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cli, code_tolerance
from test_pipeline import one_error_line, reference_crop

pytestmark = pytest.mark.timeout(300)
R, K = 2, 3


def build(tmp_path, teacher, *extra, check=True):
    out = tmp_path / "labels.beton"
    p = cli("labels.py", "build", "--data=digits", f"--teacher={teacher}", f"--out={out}", f"--regions={R}",
            f"--k={K}", "--seed=1", *extra, check=check)
    return out if check else p


def spread(classifier):
    """Random weights give near-uniform probabilities; larger logits make a wrong normalization visible."""
    with torch.no_grad():
        classifier.weight.mul_(30)
    return classifier


def assert_stored_like(path, model, res, n=120):
    """p_gt and the top-k probabilities of the first n images' regions equal the model re-run on independently
    cut crops (OpenCV), normalized with the mean/std the header names, within quantization."""
    import beton
    header = beton.read_header(path)
    table, ds = beton.read_regions(path, header), beton.load_dataset("digits", "train")
    _, probs, pgt, flip = beton.unpack_regions(torch.from_numpy(table), K)
    boxes = beton.box_pixels(table[:n, :, :4], 16, 16)                # digits images are 16 x 16
    crops = np.stack([reference_crop(ds.images[i], boxes[i, r], bool(flip[i, r]), res)
                      for i in range(n) for r in range(R)])
    mean, std = (torch.tensor(header["teacher"][key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    x = (torch.from_numpy(crops).float().permute(0, 3, 1, 2) / 255 - mean) / std
    with torch.no_grad():
        p = F.softmax(model.eval()(x).float(), 1).view(n, R, -1)
    truth = torch.from_numpy(ds.labels[:n]).view(n, 1, 1).expand(n, R, 1)
    assert (pgt[:n] - p.gather(2, truth)[..., 0]).abs().max() <= 0.5 / 255 + 1e-4  # round(255 p)
    top = p.topk(K, dim=2).values
    assert ((probs[:n] - top).abs() <= code_tolerance(top.double(), atol=1e-4)).all()
    assert p.gather(2, truth).std() > 0.02  # the check can fail: probabilities vary from crop to crop
    return header


def test_torchvision_teacher_from_a_weights_file(tmp_path):
    """torchvision:NAME@FILE: a model fine-tuned on the user's classes (10 here, not ImageNet's 1000)."""
    import torchvision
    from models import file_sha256
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    spread(model.fc)
    weights = tmp_path / "resnet18-digits.pth"
    torch.save(model.state_dict(), weights)
    header = assert_stored_like(build(tmp_path, f"torchvision:resnet18@{weights}"), model, 16)
    assert header["teacher"] == dict(kind="torchvision", name="resnet18", checksum=file_sha256(weights),
                                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def test_timm_teacher_from_a_weights_file_uses_its_own_normalization(tmp_path):
    """timm:NAME@FILE.safetensors, with a model whose pretrained config normalizes with mean = std = 0.5, not
    ImageNet's: the stored probabilities match only if the build normalized crops the timm way."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", num_classes=10)
    spread(model.head.fc)
    weights = tmp_path / "convnext.safetensors"  # the format timm's hub weights come in
    from safetensors.torch import save_file
    save_file(model.state_dict(), weights)
    header = assert_stored_like(build(tmp_path, f"timm:test_convnext@{weights}", "--res=32"), model, 32)
    assert header["teacher"]["kind"] == "timm" and header["teacher"]["name"] == "test_convnext"
    assert header["teacher"]["mean"] == header["teacher"]["std"] == [0.5, 0.5, 0.5]


def test_teacher_errors_are_one_line(tmp_path):
    import timm
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    torch.save(timm.create_model("test_convnext", num_classes=10).state_dict(), tmp_path / "convnext.pth")
    for teacher, extra, message in [
        ("timm:no_such_model_x", [], "timm has no model 'no_such_model_x'"),
        (f"torchvision:resnet18@{bad}", [], "cannot read teacher weights"),
        (f"timm:test_convnext@{tmp_path / 'missing.pth'}", [], "not found"),
        (f"timm:test_convnext@{tmp_path / 'convnext.pth'}", [], "cannot take 16x16 crops"),  # digits' 16 px
    ]:
        line = one_error_line(build(tmp_path, teacher, *extra, check=False))
        assert message in line, line
    assert not (tmp_path / "labels.beton").exists()
