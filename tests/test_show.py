"""`labels.py show` draws a label file's regions and its p_gt histogram into a PNG (issue 4)."""
import pytest

from conftest import cli
from test_pipeline import one_error_line

pytestmark = pytest.mark.timeout(300)


def test_show_writes_a_png(built, tmp_path):
    _, path = built
    out = tmp_path / "regions.png"
    p = cli("labels.py", "show", path, f"--out={out}", "--t_low=0.2", "--t_mid=0.6", "--t_top=0.99",
            "--images=2")
    assert "wrote" in p.stdout and "dropped / hard / soft" in p.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob("*.tmp*"))


def test_show_refuses_bad_thresholds(built, tmp_path):
    _, path = built
    p = cli("labels.py", "show", path, f"--out={tmp_path / 'x.png'}", "--t_low=0.9", "--t_mid=0.5",
            check=False)
    assert "thresholds" in one_error_line(p)
    p = cli("labels.py", "show", path, f"--out={tmp_path / 'x.png'}", "--t_mid=0.6", "--t_top=0.5",
            check=False)
    assert "t_mid <= t_top" in one_error_line(p)
    assert not (tmp_path / "x.png").exists()


def test_show_defaults_to_ferkd_thresholds(built, tmp_path):
    _, path = built
    out = tmp_path / "d.png"
    p = cli("labels.py", "show", path, f"--out={out}", "--images=1")
    assert out.is_file() and "t_low=0.02 t_mid=0.02 t_top=0.995" in p.stdout, p.stdout


def test_inspect_and_show_take_flags_like_every_command(built, tmp_path):
    """`inspect` and `show` parse their flags through a config (issue 14): --rows is read, unknown or
    ill-typed flags are one-line errors."""
    _, path = built
    p = cli("labels.py", "inspect", path, "--rows=2")
    assert '"schema"' in p.stdout and "image 1 region 2:" in p.stdout and "image 2 " not in p.stdout
    assert "unknown flag --nope" in one_error_line(cli("labels.py", "inspect", path, "--nope=1", check=False))
    p = cli("labels.py", "show", path, f"--out={tmp_path / 'x.png'}", "--images=many", check=False)
    assert "--images takes a" in one_error_line(p)
    assert not (tmp_path / "x.png").exists()
