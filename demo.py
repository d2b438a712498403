"""
The whole method on Fashion-MNIST (real data, offline), on a 2-core CPU in about a quarter of an hour: the
regime of ablation.py's study (issue 16), at demo size.

    1. train a teacher without label smoothing     python ferkd.py train --kd=none --arch=small32
    2. build its region labels                     python labels.py build --regions=8
    3. train three students of one small architecture on the first 10,000 training images, 2 crops per image,
       for the same epochs and data order: cross-entropy (CE), FKD (the teacher's stored soft labels, no
       teacher forward) and FerKD (--kd=ferkd with its defaults: each image's regions ranked by p_gt, the
       extremes dropped, the lowest fifth above them trained on softened truth)
    4. print teacher / CE / FKD / FerKD top-1 and wall time.

Every step is the command a user types; the commands are printed as they run. Runs land in runs/demo/.
The study runs the same kind of students for 30 epochs against a stronger teacher with 32 regions per image,
over 3 seeds; the demo runs one seed of each, so read its table as a working pipeline, and the README's
Results for what the method gains.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/demo")
TEACHER_EPOCHS, STUDENT_EPOCHS, REGIONS = 4, 12, 8
STUDENT = ["--arch=small16", "--batch_size=128", "--crops=2", "--subset=10000", f"--epochs={STUDENT_EPOCHS}"]


def run(*args):
    print("$ python " + " ".join(args), flush=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:])
        sys.exit(f"demo: step failed: {' '.join(args)}")
    last = p.stdout.strip().splitlines()[-1]
    print("  " + last, flush=True)
    return last, time.time() - t0


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    data = ["--data=fashion-mnist", "--overwrite"]
    rows = []
    line, t = run("ferkd.py", "train", "--kd=none", "--arch=small32", f"--epochs={TEACHER_EPOCHS}",
                  "--batch_size=256", "--label_smoothing=0", f"--run_dir={OUT}/teacher", *data)
    rows.append(("teacher small32 (CE, all 60,000 images)", TEACHER_EPOCHS, json.loads(line)["top1"], t))
    _, t = run("labels.py", "build", "--data=fashion-mnist", f"--teacher={OUT}/teacher/final.pt",
               f"--out={OUT}/labels.beton", f"--regions={REGIONS}", "--k=5")
    print(f"  (label build {t:.0f} s)")
    labels = f"--labels={OUT}/labels.beton"
    for name, kd in (("CE", ["--kd=none"]), ("FKD", ["--kd=fkd", labels]), ("FerKD", ["--kd=ferkd", labels])):
        line, t = run("ferkd.py", "train", *kd, *STUDENT, f"--run_dir={OUT}/{name.lower()}", *data)
        rows.append((f"student small16 ({name})", STUDENT_EPOCHS, json.loads(line)["top1"], t))
    print(f"\nFashion-MNIST test set (10,000 images), one seed, this machine; students on 10,000 training "
          f"images, {REGIONS} regions per image:")
    print(f"{'model':<40} {'epochs':>6} {'top-1 %':>8} {'wall s':>7}")
    for name, epochs, top1, t in rows:
        print(f"{name:<40} {epochs:>6} {top1:>8.2f} {t:>7.0f}")


if __name__ == "__main__":
    main()
