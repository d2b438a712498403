"""
What distillation buys, on Fashion-MNIST (real data, offline), on a 2-core CPU in about eight minutes after
set-up: a teacher trained on all 60,000 training images, then three students of one small architecture that
see only 2,000 of them (issue 36).

    1. train a teacher without label smoothing     python ferkd.py train --kd=none --arch=small16 --epochs=6
    2. label the students' images                  python labels.py build --regions=48 --k=10 --subset=2000
    3. train three students on those 2,000 training images (200 per class), 2 crops per image, 24 epochs:
       cross-entropy (CE), FKD (the teacher's stored soft labels over all 10 classes, a stored region for
       every crop of every epoch, no teacher at train time) and online KD (--kd=kd: the teacher scores every crop of every step,
       the method FKD approximates)
    4. print each model's test top-1, each student's gain over CE and its training seconds per epoch.

Every step is the command a user types; the commands are printed as they run. Runs land in runs/demo/.
FerKD is left out to keep the demo near 15 minutes with set-up; ablation.py's "regime" study compares it.
The regime is ablation.py's "demo" study; its seed noise (every student at seeds 0-4, the same teacher and
labels) is in results/demo_noise.jsonl and the README's demo section: `python ablation.py run --study=demo
--seeds='[0,1,2,3,4]'` after this demo re-uses its teacher, its labels and its seed-0 students.
"""
import json
import shutil
import subprocess
import sys
import time

from ablation import STUDIES, done, paired, setting_flags, student_dir

DEMO = STUDIES["demo"]
OUT = DEMO["runs"]
DATA = "--data=fashion-mnist"


def run(*args):
    """Run one of the project's commands as a user would; returns its last line (a JSON object for `train`)
    and its wall time."""
    print("$ python " + " ".join(args), flush=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:])
        sys.exit(f"demo: step failed: {' '.join(args)}")
    last = p.stdout.strip().splitlines()[-1]
    print("  " + last, flush=True)
    return last, time.time() - t0


def flag(flags, name):
    return next(f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}="))


def main():
    t_start = time.time()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    teacher = OUT / "teacher"
    line, t = run("ferkd.py", "train", DATA, *DEMO["teacher"], f"--run_dir={teacher}")
    teacher_top1 = json.loads(line)["top1"]
    rows = [(f"teacher {flag(DEMO['teacher'], 'arch')} (CE, all 60,000 images)",
             flag(DEMO["teacher"], "epochs"), teacher_top1, None, None, t)]
    _, t = run("labels.py", "build", DATA, f"--teacher={teacher / 'final.pt'}",
               f"--out={OUT / 'labels.beton'}", *DEMO["labels"])
    print(f"  (label build {t:.0f} s)")
    epochs, ce = DEMO["epochs"], None
    for name in DEMO["settings"]:
        run_dir = student_dir(DEMO, name, epochs, seed=0)  # the demo study's seed 0 (ablation.py)
        line, t = run("ferkd.py", "train", DATA, *DEMO["student"], f"--epochs={epochs}",
                      *setting_flags(DEMO, name), "--seed=0", f"--run_dir={run_dir}")
        final = json.loads(line)
        gain = None if ce is None else final["top1"] - ce
        ce = final["top1"] if ce is None else ce  # CE is the first setting
        rows.append((f"student {flag(DEMO['student'], 'arch')} ({name})", epochs, final["top1"], gain,
                     final["train_seconds"] / epochs, t))
    subset = int(flag(DEMO["student"], "subset"))
    print(f"\nFashion-MNIST test set (10,000 images), one seed, this machine; students on {subset:,} "
          f"training images, {flag(DEMO['labels'], 'regions')} stored regions per image; "
          f"{time.time() - t_start:.0f} s in all:")
    print(f"{'model':<42} {'epochs':>6} {'top-1 %':>8} {'Δ vs CE':>8} {'train s/epoch':>13} {'wall s':>7}")
    for name, epochs, top1, gain, per_epoch, t in rows:
        print(f"{name:<42} {epochs:>6} {top1:>8.2f} {'' if gain is None else f'{gain:+.2f}':>8} "
              f"{'' if per_epoch is None else f'{per_epoch:.2f}':>13} {t:>7.0f}")
    per_epoch = {name: r[4] for name, r in zip(DEMO["settings"], rows[1:])}
    print(f"online KD trains {per_epoch['online KD'] / per_epoch['FKD']:.1f}x as long per epoch as FKD (the "
          f"teacher's forward on every crop).")
    measured = done("demo")  # the regime's seed noise, measured once: results/demo_noise.jsonl
    print(f"This regime's seed noise (Δ vs CE paired by seed, mean ± std (seeds), {DEMO['results']}): "
          + ", ".join(f"{name} {paired(measured, name, 'CE', epochs)}" for name in DEMO["settings"]
                      if name != "CE"))


if __name__ == "__main__":
    main()
