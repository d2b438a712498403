"""--amp=auto (issue 25): bf16 where the hardware does it natively, fp16 + GradScaler on older GPUs, fp32 on
other CPUs; the capability is faked (the CPU's flags file, torch's CUDA query), the choice checked in
`models.autocast_dtype` and in what `ferkd.py train` records."""
import json

import pytest
import torch

import models

# /proc/cpuinfo's flags lines, cut down: a Xeon with AVX-512 but no bf16 (the machine), a Zen 5 with
# avx512_bf16, a Sapphire Rapids with AMX
INTEL_NO_BF16 = "fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni"
ZEN5 = "fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16"
SPR_AMX = "fpu sse2 avx2 avx512f avx512_fp16 amx_bf16 amx_tile amx_int8"
CPU = torch.device("cpu")


def fake_cpu(monkeypatch, tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: fake\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                    f"flags\t\t: {flags}\n")
    monkeypatch.setattr(models, "CPUINFO", str(path))


@pytest.mark.parametrize("flags, auto", [(INTEL_NO_BF16, None), (ZEN5, torch.bfloat16),
                                         (SPR_AMX, torch.bfloat16), (None, None)])
def test_cpu_precision_follows_native_bf16(monkeypatch, tmp_path, flags, auto):
    if flags is None:  # no flags file at all (not Linux): fp32
        monkeypatch.setattr(models, "CPUINFO", str(tmp_path / "absent"))
    else:
        fake_cpu(monkeypatch, tmp_path, flags)
    assert models.autocast_dtype(CPU, "auto")[0] is auto
    assert models.autocast_dtype(CPU, "true")[0] is torch.bfloat16  # asked for: bf16, emulated or not
    assert models.autocast_dtype(CPU, "false")[0] is None
    assert models.autocast_dtype(CPU, True)[0] is torch.bfloat16   # fire's bool, as before the flag was a word
    if auto is None:
        assert "fp32" in models.autocast_dtype(CPU, "auto")[1]
    import ablation  # a study row names the machine from the same file: its CPU and whether bf16 is native
    assert ablation.host().startswith("unknown CPU," if flags is None else "fake,")
    assert ablation.host().endswith("bf16 native" if auto else "bf16 emulated")


@pytest.mark.parametrize("major, dtype", [(9, torch.bfloat16), (8, torch.bfloat16), (7, torch.float16)])
def test_cuda_precision_counts_native_bf16_only(monkeypatch, major, dtype):
    """A V100 (7.0) or T4 (7.5) emulates bf16, which `is_bf16_supported()` counts by default: it must get fp16."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return major >= 8 or including_emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    for amp in ("auto", "true"):
        assert models.autocast_dtype(torch.device("cuda"), amp)[0] is dtype
    assert asked == [False, False]
    assert models.autocast_dtype(torch.device("cuda"), "false")[0] is None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags, name", [(INTEL_NO_BF16, "fp32"), (ZEN5, "bf16")])
def test_train_records_the_precision(monkeypatch, tmp_path, capsys, flags, name):
    import ferkd
    fake_cpu(monkeypatch, tmp_path, flags)
    run = tmp_path / "run"
    ferkd.train(data="digits", kd="none", arch="small16", epochs=1, batch_size=256, device="cpu",
                tensorboard=False, run_dir=str(run))
    config = json.loads((run / "config.json").read_text())
    assert config["amp"] == "auto" and config["precision"] == name
    assert f"precision: {name}" in capsys.readouterr().out
    scaler = torch.load(run / "final.pt", weights_only=True)["scaler"]
    assert scaler == {}  # no GradScaler on a CPU


def test_amp_flag_values():
    import ferkd
    from beton import UserError
    ferkd.check_config(ferkd.TrainConfig(amp="False"))  # fire's --amp=false arrives as False, parsed to a word
    with pytest.raises(UserError, match="--amp takes auto, true or false"):
        ferkd.check_config(ferkd.TrainConfig(amp="fp8"))
