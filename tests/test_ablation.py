"""The study tables the README quotes are computed from the raw rows: means over seeds and seed-paired
differences."""
import json

import pytest

import ablation
from conftest import ROOT, cli
from test_pipeline import one_error_line


def test_table_pairs_runs_by_seed(tmp_path, monkeypatch, capsys):
    """Δ is the mean of per-seed differences over the seeds both settings ran (here seeds 0 and 1: the base
    lacks seed 2), not the difference of the means; `short` keeps the full schedule only."""
    rows = [("CE", 0, 30, 89.0), ("CE", 1, 30, 90.0), ("CE", 2, 30, 91.0), ("CE", 0, 8, 80.0),
            ("FKD", 0, 30, 90.0), ("FKD", 1, 30, 92.0),
            ("online KD", 0, 30, 89.5), ("online KD", 1, 30, 90.5)]
    results = tmp_path / "study.jsonl"
    results.write_text("".join(json.dumps(dict(setting=n, seed=s, epochs=e, top1=t, top1_per_epoch=[t],
                                               train_s_per_epoch=10.0 * (1 + (n == "online KD"))))
                               + "\n" for n, s, e, t in rows))
    monkeypatch.setitem(ablation.STUDIES["regime"], "results", results)
    ablation.table("regime", base="online KD", settings=["CE", "online KD", "FKD"], short=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" | ")[2:4] == ["Δ vs CE (paired)", "Δ vs online KD (paired)"], lines[0]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert len(lines) == 5, lines  # the 8-epoch CE run is left out
    assert cells["CE"][0] == "90.00 ± 1.00 (3)" and cells["CE"][1] == "", cells["CE"]
    assert cells["FKD"][1] == "1.50 ± 0.71 (2)", cells["FKD"]  # (90 - 89, 92 - 90); the means differ by 1.00
    assert cells["FKD"][2] == "1.00 ± 0.71 (2)", cells["FKD"]  # (90 - 89.5, 92 - 90.5)
    assert cells["online KD"][3] == "20.0" and cells["FKD"][3] == "10.0", cells


@pytest.mark.parametrize("args, words", [
    # a string was matched by substring: this one would have run "FKD" (its teacher first)
    (["run", "--study=regime", "--settings=FKD log cod"], "has no setting 'FKD log cod'"),
    (["table", "--study=regime", "--ce=CE ls=1"], "has no setting 'CE ls=1'"),  # an empty Δ column
    (["table", "--study=regim"], "no study 'regim'")])
def test_unknown_study_or_setting_is_one_error_line(args, words, tmp_path):
    """Run away from the repository: a study that did start would fail at once, finding no ferkd.py there,
    instead of training its teacher."""
    assert words in one_error_line(cli(ROOT / "ablation.py", *args, cwd=tmp_path, check=False))
