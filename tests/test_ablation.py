"""The study tables the README quotes are computed from the raw rows: means over seeds and seed-paired
differences."""
import json
import shutil
from pathlib import Path

import pytest

import ablation
from conftest import ROOT, cli
from test_pipeline import one_error_line


def test_table_pairs_runs_by_seed(tmp_path, monkeypatch, capsys):
    """Δ is the mean of per-seed differences over the seeds both settings ran (here seeds 0 and 1: the base
    lacks seed 2), not the difference of the means; `short` keeps the full schedule only."""
    rows = [("CE", 0, 30, 89.0), ("CE", 1, 30, 90.0), ("CE", 2, 30, 91.0), ("CE", 0, 8, 80.0),
            ("FKD", 0, 30, 90.0), ("FKD", 1, 30, 92.0),
            ("online KD", 0, 30, 89.5), ("online KD", 1, 30, 90.5), ("FKD log code", 1, 30, 91.0)]
    results = tmp_path / "study.jsonl"
    results.write_text("".join(json.dumps(dict(setting=n, seed=s, epochs=e, top1=t, top1_per_epoch=[t],
                                               train_s_per_epoch=10.0 * (1 + (n == "online KD"))))
                               + "\n" for n, s, e, t in rows))
    monkeypatch.setitem(ablation.STUDIES["regime"], "results", results)
    ablation.table("regime", base="online KD", settings=["CE", "online KD", "FKD", "FKD log code"], short=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" | ")[2:4] == ["Δ vs CE (paired)", "Δ vs online KD (paired)"], lines[0]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert len(lines) == 6, lines  # the 8-epoch CE run is left out
    assert cells["CE"][0] == "90.00 ± 1.00 (3)" and cells["CE"][1] == "", cells["CE"]
    assert cells["FKD"][1] == "1.50 ± 0.71 (2)", cells["FKD"]  # (90 - 89, 92 - 90); the means differ by 1.00
    assert cells["FKD"][2] == "1.00 ± 0.71 (2)", cells["FKD"]  # (90 - 89.5, 92 - 90.5)
    assert cells["online KD"][3] == "20.0" and cells["FKD"][3] == "10.0", cells
    assert cells["FKD log code"][:3] == ["91.00 (1)", "1.00 (1)", "0.50 (1)"], cells  # one seed: no spread


def test_table_gives_seconds_per_epoch_by_machine(tmp_path, monkeypatch, capsys):
    """Seconds per epoch from two machines are not averaged together: one mean per machine."""
    rows = [("FKD", 0, 8.0, None), ("FKD", 1, 10.0, None), ("FKD", 2, 31.0, "B"), ("CE", 0, 9.0, None)]
    results = tmp_path / "study.jsonl"
    results.write_text("".join(json.dumps(dict(setting=n, seed=s, epochs=30, top1=80.0, top1_per_epoch=[80.0],
                                               train_s_per_epoch=t, **({"host": h} if h else {}))) + "\n"
                               for n, s, t, h in rows))
    monkeypatch.setitem(ablation.STUDIES["regime"], "results", results)
    ablation.table("regime", base="CE", settings=["CE", "FKD"], short=True)
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert cells["FKD"][3] == "9.0 / 31.0" and cells["CE"][3] == "9.0", cells


@pytest.mark.parametrize("args, words", [
    # a string was matched by substring: this one would have run "FKD" (its teacher first)
    (["run", "--study=regime", "--settings=FKD log cod"], "has no setting 'FKD log cod'"),
    (["table", "--study=regime", "--ce=CE ls=1"], "has no setting 'CE ls=1'"),  # an empty Δ column
    (["table", "--study=regim"], "no study 'regim'")])
def test_unknown_study_or_setting_is_one_error_line(args, words, tmp_path):
    """Run away from the repository: a study that did start would fail at once, finding no ferkd.py there,
    instead of training its teacher."""
    assert words in one_error_line(cli(ROOT / "ablation.py", *args, cwd=tmp_path, check=False))


def fake_study(tmp_path, monkeypatch, top1, seconds):
    """The cluttered study with its teacher and label file faked and `one_run` replaced by a row written at
    once: top1(name, seed) and seconds(name) per epoch. Returns the list of runs made, in order."""
    s = ablation.STUDIES["cluttered"]
    runs, results = tmp_path / "runs", tmp_path / "cluttered.jsonl"
    (runs / "teacher").mkdir(parents=True)
    for name in ablation.KEPT_FILES:
        (runs / "teacher" / name).write_text(f"the teacher's {name}")
    (runs / "teacher" / "final.json").write_text('{"top1": 90.0}')
    (runs / "labels.beton").write_bytes(b"")
    monkeypatch.setitem(s, "runs", runs)
    monkeypatch.setitem(s, "results", results)
    monkeypatch.setitem(s, "kept", tmp_path / "kept")
    made = []

    def one_run(study, name, seed, epochs, flags, decided, files, label_file, teacher_top1):
        if "--labels={labels_k10}" in flags:
            label_file("labels_k10")
        made.append((name, seed, epochs, decided))
        row = dict(setting=name, seed=seed, epochs=epochs, flags=flags, top1=top1(name, seed),
                   train_s_per_epoch=seconds(name), top1_per_epoch=[top1(name, seed)],
                   **({"decided": decided} if decided else {}))
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
    monkeypatch.setattr(ablation, "one_run", one_run)

    def sh(*args):  # the k=10 label build
        made.append(args)
        Path(next(a for a in args if a.startswith("--out="))[6:]).write_bytes(b"")
    monkeypatch.setattr(ablation, "sh", sh)
    return made


def test_cluttered_protocol_runs_each_rule_once_its_rows_exist(tmp_path, monkeypatch, capsys):
    """Issue 35's protocol, fixed before its runs: the grid of the better family only (here "FerKD paper"),
    the best FerKD arm and FKD at online KD's 30 epochs of time by the study's own seconds per epoch, seeds 3
    and 4 for the pairs within a standard error after seeds 0-2 and for no other."""
    grid_best = "FerKD paper 0.1/0.5/0.995"
    base = {"CE ls=0": 85.0, "online KD": 88.0, "FKD": 87.0, "FKD k=10": 87.1, "FerKD defaults": 86.0,
            "FerKD paper": 86.5, grid_best: 88.0, "FKD equal time": 89.0, "best FerKD equal time": 92.0}
    noise = {0: 0.0, 1: 0.5, 2: -0.5, 3: 0.2, 4: -0.2}
    top1 = lambda name, seed: base.get(name, 86.6) + noise[seed] * (name != "FKD k=10")
    seconds = lambda name: 30.0 if name == "online KD" else 10.0 if name != grid_best else 12.0
    made = fake_study(tmp_path, monkeypatch, top1, seconds)
    ablation.run("cluttered")
    runs = [m for m in made if len(m) == 4]
    runs_dir = tmp_path / "runs"
    assert [args for args in made if len(args) != 4] == [  # the k=10 labels, built once from the one teacher
        ("labels.py", "build", "--data=cluttered-fashion-mnist", f"--teacher={runs_dir}/teacher/final.pt",
         f"--out={runs_dir}/labels-k10.beton", "--regions=32", "--k=10", "--seed=0", "--subset=10000")]
    by = {}
    for name, seed, epochs, decided in runs:
        by.setdefault(name, set()).add((seed, epochs))
    assert len(runs) == sum(len(v) for v in by.values())  # nothing ran twice
    assert not [n for n in by if n.startswith("FerKD defaults ")]  # the worse family's grid never ran
    assert all(by[n] == {(s, 30) for s in (0, 1, 2)} for n in ablation.grid("FerKD paper"))
    assert by["FKD equal time"] == {(s, 90) for s in (0, 1, 2)}  # 30 x 30.0 / 10.0
    assert by["best FerKD equal time"] == {(s, 75) for s in (0, 1, 2)}  # its own cost: 30 x 30.0 / 12.0
    best = [d for n, _, _, d in runs if n == "best FerKD equal time"]
    assert all(d["best_of"] == grid_best for d in best) and best[0]["time_ratio"] == 2.5, best
    assert all(d["epochs_from"] == "the arm's first row" for d in best[1:]), best  # later seeds follow it
    # within one standard error of zero after seeds 0-2: FKD k=10 - FKD (0.1 against 0.29) and every grid
    # arm at 86.6 against FKD's 87.0 (-0.4 against 0.29 is not: no more seeds for them)
    five = {n for n, v in by.items() if len(v) == 5}
    assert five == {"FKD k=10", "FKD"}, five
    assert "FKD equal time" in capsys.readouterr().out  # the table at the end


def test_cluttered_teacher_is_kept_and_outlives_runs(tmp_path, monkeypatch):
    """The study's teacher is copied into results/ once trained, and a session whose runs/ is gone takes it
    from there instead of training another (its 30 epochs cost 100 min of CPU)."""
    made = fake_study(tmp_path, monkeypatch, lambda name, seed: 80.0, lambda name: 10.0)
    teacher, kept = tmp_path / "runs" / "teacher", tmp_path / "kept"
    ablation.run("cluttered", settings=["CE ls=0"], seeds=[0])
    assert {f: (kept / f).read_text() for f in ablation.KEPT_FILES} == {
        f: (teacher / f).read_text() for f in ablation.KEPT_FILES}
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "cluttered.jsonl").unlink()
    ablation.run("cluttered", settings=["CE ls=0"], seeds=[0])
    assert not [m for m in made if len(m) != 4]  # no teacher trained (nor labels built)
    assert (teacher / "config.json").read_text() == "the teacher's config.json"
    assert [m[:3] for m in made] == [("CE ls=0", 0, 30)] * 2


def test_arms_that_read_other_rows_wait_for_them(tmp_path, monkeypatch):
    """Before any row: the grid, the best FerKD arm and the equal-time arms say what they wait for."""
    rows = {}
    assert "waits for seeds [0, 1, 2] of FerKD defaults and FerKD paper" == ablation.resolve(
        "cluttered", "FerKD paper 0.1/0.5/0.995", rows)
    assert "waits for 30-epoch rows of 'online KD' and 'FKD'" in ablation.resolve("cluttered", "FKD equal time",
                                                                                   rows)
    assert "every FerKD arm" in ablation.resolve("cluttered", "best FerKD equal time", rows)
    assert ablation.resolve("cluttered", "FKD k=10", rows) == (["--kd=fkd", "--labels={labels_k10}"], 30, {})


def test_equal_time_compares_seconds_measured_on_one_machine(monkeypatch):
    """Sessions get different machines (8.5 against 31.6 s an epoch for one arm): the ratio of online KD's
    seconds to an arm's is taken from rows of one machine, this one's where both arms have rows there."""
    row = lambda n, seed, s, host: ((n, seed, 30), dict(top1=80.0, train_s_per_epoch=s, host=host))
    rows = dict([row("online KD", 0, 30.0, "A"), row("online KD", 1, 120.0, "B"), row("FKD", 0, 10.0, "A")])
    monkeypatch.setattr(ablation, "host", lambda: "B")
    flags, epochs, decided = ablation.resolve("cluttered", "FKD equal time", rows)
    assert (epochs, decided["time_ratio_on"]) == (90, "A"), decided  # B has no FKD row: A's 30 / 10
    rows.update([row("FKD", 1, 60.0, "B")])
    assert ablation.resolve("cluttered", "FKD equal time", rows)[1] == 60  # this machine's 120 / 60
    apart = dict([row("online KD", 1, 120.0, "B"), row("FKD", 0, 10.0, "A")])  # no machine ran both
    assert "on one machine" in ablation.resolve("cluttered", "FKD equal time", apart)


def test_fashion_study_takes_the_better_rank_setting_at_equal_time():
    """Issue 35's Fashion-MNIST arms: the rank setting named for today's --kd=ferkd defaults states them, and
    the equal-time FerKD arm takes the better of the two rank settings by mean top-1 over seeds 0-2, at the
    epochs that cost online KD's 30 by its own seconds."""
    import models
    named = ablation.STUDIES["fashion"]["settings"]["FerKD rank 0.3/0.5/1"]
    assert {f"--{k}={v:g}" if isinstance(v, float) else f"--{k}={v}"
            for k, v in models.FERKD_DEFAULTS.items()} <= set(named)
    row = lambda n, seed, top1, s=10.0: ((n, seed, 30), dict(top1=top1, train_s_per_epoch=s, host="A"))
    rows = dict([row("online KD", seed, 70.0, 30.0) for seed in range(3)]
                + [row("FerKD rank 0.05/0.25/0.95", seed, 69.0 + seed, 12.0) for seed in range(3)])
    assert "every FerKD arm" in ablation.resolve("fashion", "best FerKD equal time", rows)
    rows.update([row("FerKD rank 0.3/0.5/1", seed, 71.0 - seed / 2, 10.0) for seed in range(3)])  # mean 70.5
    flags, epochs, decided = ablation.resolve("fashion", "best FerKD equal time", rows)
    assert decided["best_of"] == "FerKD rank 0.3/0.5/1" and flags == named and epochs == 90, decided
    rows[("FerKD rank 0.05/0.25/0.95", 0, 30)]["top1"] = 75.0  # mean 71.0: the other one wins
    flags, epochs, decided = ablation.resolve("fashion", "best FerKD equal time", rows)
    assert decided["best_of"] == "FerKD rank 0.05/0.25/0.95" and epochs == 75, decided  # 30 * 30 / 12
