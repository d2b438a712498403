"""
The whole method on Fashion-MNIST (real data, offline), on a CPU in about ten minutes:

    1. train a teacher (cross-entropy, RandomResizedCrop)      python ferkd.py train --kd=none --arch=small32
    2. build its region labels                                 python labels.py build --regions=4
    3. train two students of the same small architecture for the same epochs and data order:
       cross-entropy (CE) and FKD (stored soft labels, no teacher forward)
    4. print teacher / CE / FKD top-1 and wall time.

Every step is the command a user types; the commands are printed as they run. Runs land in runs/demo/.
It is scaled down for a 2-core CPU (small models, few epochs, 4 regions per image): distillation needs long
schedules and a much stronger teacher to pay off (see README), so read the table as a working pipeline,
not as a verdict on FKD.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/demo")
TEACHER_EPOCHS, STUDENT_EPOCHS = 4, 4


def run(*args):
    cmd = [sys.executable, *args]
    print("$ python " + " ".join(args), flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:])
        sys.exit(f"demo: step failed: {' '.join(args)}")
    lines = p.stdout.strip().splitlines()
    print("  " + lines[-1], flush=True)
    return lines[-1], time.time() - t0


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    common = ["--data=fashion-mnist", "--batch_size=256", "--overwrite"]
    rows = []
    line, t = run("ferkd.py", "train", "--kd=none", "--arch=small32", f"--epochs={TEACHER_EPOCHS}",
                  f"--run_dir={OUT}/teacher", *common)
    rows.append(("teacher small32 (CE)", TEACHER_EPOCHS, json.loads(line)["top1"], t))
    _, t = run("labels.py", "build", "--data=fashion-mnist", f"--teacher={OUT}/teacher/final.pt",
               f"--out={OUT}/labels.beton", "--regions=4", "--k=5")
    print(f"  (label build {t:.0f} s)")
    for kd in ("none", "fkd"):
        extra = [f"--labels={OUT}/labels.beton"] if kd == "fkd" else []
        line, t = run("ferkd.py", "train", f"--kd={kd}", "--arch=small16", f"--epochs={STUDENT_EPOCHS}",
                      f"--run_dir={OUT}/{kd}", *extra, *common)
        rows.append((f"student small16 ({'CE' if kd == 'none' else 'FKD'})", STUDENT_EPOCHS,
                     json.loads(line)["top1"], t))
    print("\nFashion-MNIST test set (10,000 images), one seed, this machine:")
    print(f"{'model':<24} {'epochs':>6} {'top-1 %':>8} {'wall s':>7}")
    for name, ep, top1, t in rows:
        print(f"{name:<24} {ep:>6} {top1:>8.2f} {t:>7.0f}")


if __name__ == "__main__":
    main()
