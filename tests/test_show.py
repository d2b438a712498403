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


def test_pgt_spread_counts_the_stored_values_beyond_the_bounds():
    """A synthetic table with known p_gt, as stored (round(255 p)): 0.1 is stored as 26/255 = 0.102 and
    0.898 as 229/255, in neither share; 0.098 (25/255) and 0.902 (230/255) are in them."""
    import numpy as np
    import beton
    import labels
    N, R, k = 40, 10, 5
    pgt = np.array([0.0, 0.05, 0.098, 0.1, 0.5, 0.898, 0.902, 0.95, 1.0, 0.3] * N).reshape(N, R)  # 3 low,
    # 3 high
    rng = np.random.default_rng(0)
    table = beton.pack_regions(np.tile(beton.full_boxes(1), (N, R, 1)), np.zeros((N, R), bool),
                               rng.integers(0, 10, (N, R, k)), np.full((N, R, k), 0.1), pgt, 10)
    counts = labels.pgt_histogram(table, k)[0]
    assert counts.sum() == N * R
    assert labels.pgt_spread(counts) == (0.3, 0.3)
    assert labels.spread_text(counts) == "p_gt < 0.1 on 30.0% of regions, > 0.9 on 30.0%"


def test_inspect_and_show_report_the_spread_of_pgt(built, tmp_path):
    """Both commands state the shares of regions with p_gt < 0.1 and > 0.9 over the whole file (issue 35),
    as the trainer's decoder reads p_gt."""
    import numpy as np
    import torch
    import beton
    _, path = built
    header = beton.read_header(path)
    pgt = beton.unpack_regions(torch.from_numpy(np.array(beton.read_regions(path, header))), header["k"])[2]
    low, high = (pgt < 0.1).double().mean().item(), (pgt > 0.9).double().mean().item()
    assert 0 < low < 1 and 0 < high < 1  # the teacher is neither sure nor lost on every region
    expected = f"p_gt < 0.1 on {low:.1%} of regions, > 0.9 on {high:.1%}"
    p = cli("labels.py", "inspect", path, "--rows=1")
    assert f"{len(pgt)} images x {header['regions']} regions: {expected}" in p.stdout, p.stdout
    p = cli("labels.py", "show", path, f"--out={tmp_path / 's.png'}", "--images=1")
    assert expected in p.stdout, p.stdout
