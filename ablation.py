"""
The FerKD ablation on Fashion-MNIST that chooses ferkd's defaults (issue: FerKD in training).

    python ablation.py run      # resumable: finished runs are read back from results/ablation.jsonl
    python ablation.py table    # mean ± std per setting, from the raw results, as markdown

Set-up (CPU-sized; every number is a command you can re-run): a small32 teacher trained with CE for 4 epochs
on all 60,000 training images (88.5% test top-1; the demo's teacher); its labels with 4 regions per image,
top-5; students small16 trained on the first 10,000 images only (a low-data student, where distillation has
room to help), 2 crops per image, 4 epochs, 3 seeds.
Every setting trains with the same images, schedule and rows per step; CE uses fresh RandomResizedCrop
boxes, the others replay stored regions.
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

RUNS = Path("runs/ablation")
RESULTS = Path("results/ablation.jsonl")
TEACHER = ["--kd=none", "--arch=small32", "--epochs=4", "--batch_size=256"]  # the demo's teacher
LABELS = ["--regions=4", "--k=5", "--seed=0"]  # the demo's labels
STUDENT = ["--arch=small16", "--epochs=4", "--batch_size=128", "--crops=2", "--subset=10000"]
SEEDS = (0, 1, 2)

FERKD = ["--kd=ferkd", "--t_low=0.02", "--t_mid=0.2", "--t_top=0.995", "--eps=0.1"]
SETTINGS = {  # name -> extra flags for `ferkd.py train`
    "CE": ["--kd=none"],
    "FKD": ["--kd=fkd"],
    "FerKD calibration": FERKD,
    "FerKD + SelfMix cutmix": FERKD + ["--mix=cutmix", "--mix_prob=0.5"],
    "FerKD + cutmix across images": FERKD + ["--mix=cutmix", "--mix_prob=0.5", "--mix_source=batch"],
    "FKD + SelfMix cutmix": ["--kd=fkd", "--mix=cutmix", "--mix_prob=0.5"],
    # the threshold / smoothing sweep (run after the settings above; see `run --settings=...`)
    "hard only t_mid=0.2": ["--kd=ferkd", "--t_low=0", "--t_mid=0.2", "--t_top=1"],
    "FerKD t_mid=0.4": ["--kd=ferkd", "--t_low=0.02", "--t_mid=0.4", "--t_top=0.995", "--eps=0.1"],
    "drop only 0.02/0.995": ["--kd=ferkd", "--t_low=0.02", "--t_mid=0.02", "--t_top=0.995"],
    "FerKD eps=0.3": ["--kd=ferkd", "--t_low=0.02", "--t_mid=0.2", "--t_top=0.995", "--eps=0.3"],
    "FerKD t_top=0.95": ["--kd=ferkd", "--t_low=0.02", "--t_mid=0.2", "--t_top=0.95", "--eps=0.1"],
}


def sh(*args):
    print("$ python " + " ".join(args), flush=True)
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"ablation: failed: {' '.join(args)}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    return p.stdout


def git_revision():
    """The commit the run trained at, `-dirty` if the tree had changes: every raw row carries it."""
    rev = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                         text=True)
    return rev.stdout.strip() or "unknown"


def done():
    if not RESULTS.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["setting"], r["seed"]): r for r in rows}


def run(settings=None, seeds=SEEDS):
    """Train every (setting, seed) not yet in results/ablation.jsonl; appends one line per finished run."""
    RESULTS.parent.mkdir(exist_ok=True)
    teacher, labels = RUNS / "teacher", RUNS / "labels.beton"
    if not (teacher / "final.pt").exists():
        sh("ferkd.py", "train", "--data=fashion-mnist", *TEACHER, f"--run_dir={teacher}", "--overwrite")
    if not labels.exists():
        sh("labels.py", "build", "--data=fashion-mnist", f"--teacher={teacher / 'final.pt'}",
           f"--out={labels}", *LABELS)
    names = list(SETTINGS) if settings is None else [s for s in SETTINGS if s in settings]
    for seed in seeds:  # seeds outermost: an interrupted ablation still has every setting at seed 0
        for name in names:
            if (name, seed) in done():
                continue
            extra = SETTINGS[name] + ([] if name == "CE" else [f"--labels={labels}"])
            run_dir = RUNS / f"{name.replace(' ', '_').replace('/', '-')}-s{seed}"
            t0 = time.time()
            out = sh("ferkd.py", "train", "--data=fashion-mnist", *STUDENT, *extra, f"--seed={seed}",
                     f"--run_dir={run_dir}", "--overwrite")
            log = (run_dir / "metrics.jsonl").read_text().splitlines()
            curve = [json.loads(line)["top1"] for line in log]
            top1 = json.loads(out.strip().splitlines()[-1])["top1"]
            row = dict(setting=name, seed=seed, flags=extra, top1=top1, top1_per_epoch=curve,
                       wall_s=round(time.time() - t0, 1), git=git_revision())
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {name} seed {seed}: top-1 {row['top1']:.2f}", flush=True)
    table()


def table():
    """Markdown table: mean ± std of the final top-1 per setting, and the mean curve over epochs."""
    rows = done()
    print("| setting | runs | top-1 % (mean ± std) | top-1 by epoch (mean) | flags |")
    print("|---|---|---|---|---|")
    for name in SETTINGS:
        got = [r for (n, _), r in rows.items() if n == name]
        if not got:
            continue
        top1 = [r["top1"] for r in got]
        std = statistics.stdev(top1) if len(top1) > 1 else float("nan")
        curve = [statistics.mean(c) for c in zip(*[r["top1_per_epoch"] for r in got])]
        flags = " ".join(f for f in got[0]["flags"] if not f.startswith("--labels"))
        print(f"| {name} | {len(got)} | {statistics.mean(top1):.2f} ± {std:.2f} | "
              f"{' '.join(f'{v:.1f}' for v in curve)} | `{flags}` |")


if __name__ == "__main__":
    fire.Fire({"run": run, "table": table})
