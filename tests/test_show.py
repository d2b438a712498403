"""`labels.py show` draws a label file's regions and its p_gt histogram into a PNG (issue 4)."""
import pytest

from conftest import cli
from models import FERKD_DEFAULTS
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
    d = FERKD_DEFAULTS
    assert out.is_file() and (f"--thresholds={d['thresholds']} t_low={d['t_low']:g} t_mid={d['t_mid']:g} "
                              f"t_top={d['t_top']:g}:") in p.stdout, p.stdout


def test_show_colours_by_either_threshold_mode(built, tmp_path):
    """`show` takes --thresholds as training does; the mode FerKD's defaults are not for needs all three."""
    _, path = built
    shares = {}
    for mode in ("p_gt", "rank"):
        p = cli("labels.py", "show", path, f"--out={tmp_path / (mode + '.png')}", "--images=1",
                f"--thresholds={mode}", "--t_low=0.3", "--t_mid=0.6", "--t_top=0.9")
        shares[mode] = p.stdout.split(": ")[-1]
        assert f"--thresholds={mode} t_low=0.3" in p.stdout
    # by rank, about 30% of each image's regions fall below t_low whatever the teacher; by p_gt, not so
    assert shares["p_gt"] != shares["rank"], shares
    other = {"p_gt": "rank", "rank": "p_gt"}[FERKD_DEFAULTS["thresholds"]]
    p = cli("labels.py", "show", path, f"--out={tmp_path / 'x.png'}", f"--thresholds={other}", "--t_low=0.1",
            check=False)
    assert "needs --t_low, --t_mid and --t_top" in one_error_line(p)
    assert not (tmp_path / "x.png").exists()


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
