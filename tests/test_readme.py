"""The README's usage commands, run as written except for the data set (digits instead of Fashion-MNIST) and
one epoch per training run: each flag must exist and each command must find what the one before it wrote."""
import itertools
import re
import shlex

import pytest

from conftest import ROOT, cli

pytestmark = pytest.mark.timeout(900)


def usage_commands():
    """The `python ...` lines of the bash blocks in README's "## Use" section, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Use\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("python "):
                lines.append(line)
    return lines


def test_readme_usage_commands_run(tmp_path):
    commands = usage_commands()
    assert [shlex.split(c)[1:3] for c in commands][:2] == [["ferkd.py", "train"], ["labels.py", "build"]]
    assert len(commands) >= 9, commands  # train, build, inspect, show, fkd, ferkd, eval, export, plot
    for command in commands:
        args = [a.replace("--data=fashion-mnist", "--data=digits") for a in shlex.split(command)[1:]]
        if args[1] == "train":
            args = [a for a in args if not a.startswith("--epochs=")] + ["--epochs=1", "--batch_size=64"]
        p = cli(ROOT / args[0], *args[1:], cwd=tmp_path, check=False, timeout=600)
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    for out in ("runs/teacher/final.pt", "data/fm.beton", "regions.png", "runs/fkd/final.pt",
                "runs/ferkd/final.pt", "fkd.pt2", "curves.png"):
        assert (tmp_path / out).is_file(), out


@pytest.mark.parametrize("command, expect", [
    (["kernels_triton.py"], "FerKD + SelfMix"),
    (["bench.py", "labels", "--images=20"], "bytes"),
    (["bench.py", "loader", "--images=300", "--epochs=2", "--batch=64"], "ratio"),
    (["bench.py", "step", "--arch=small16", "--batch=32", "--steps=2"], "ratio to eager fp32"),
])
def test_readme_benchmark_commands_run(command, expect):
    """Benchmark commands the README quotes run and print their tables: the loss benchmark whole, bench.py's
    other parts at toy sizes (their README runs take minutes; the step part still compiles a model once)."""
    p = cli(*command, timeout=600)
    assert expect in p.stdout, p.stdout[-2000:]


EQUAL_TIME = ["online KD", "FKD", "FKD equal time", "best FerKD equal time"]


@pytest.mark.parametrize("study, base, ce, settings, least", [
    ("regime", "online KD", "CE ls=0", None, 5), ("cluttered", "FKD", "CE ls=0", None, 5),
    ("cluttered", "online KD", "FKD", EQUAL_TIME, 3), ("fashion", "online KD", "FKD", None, 7)])
def test_readme_study_table_reads_the_results(capsys, study, base, ce, settings, least):
    """The README's study tables are rows of `python ablation.py table --study=STUDY --base=BASE --ce=CE
    [--settings=...] --short` over the study's results file as committed: a rerun or a new seed changes both."""
    import ablation
    ablation.table(study, base=base, ce=ce, settings=settings, short=True)
    made = capsys.readouterr().out.splitlines()
    text = (ROOT / "README.md").read_text().splitlines()
    assert made[0] in text, made[0]
    tables = [list(itertools.takewhile(lambda line: line.startswith("|"), text[i + 2:]))
              for i, line in enumerate(text) if line == made[0]]  # tables of two studies may share a header
    stale = [set(rows) - set(made[2:]) for rows in tables if len(rows) >= least]
    assert set() in stale, stale


def test_readme_demo_noise_table_reads_the_results(capsys):
    """results/README.md's seed-noise table for the demo is `python ablation.py table --study=demo
    --base="online KD" --short` over results/demo_noise.jsonl as committed (issue 36)."""
    import ablation
    ablation.table("demo", base="online KD", short=True)
    made = capsys.readouterr().out.splitlines()
    text = (ROOT / "results" / "README.md").read_text().splitlines()
    assert made[0] in text, made[0]
    start = text.index(made[0]) + 2
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), text[start:]))
    assert rows == made[2:], (rows, made[2:])
