#!/usr/bin/env bash
# Set up ferkd: the Debian packages FFCV builds against, then .venv with requirements.txt.
# Idempotent: a second run checks dpkg and a stamp file and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")"

# Print exactly what runs, then run it.
run() { echo "+ $*"; "$@"; }

# --- Debian packages -------------------------------------------------------------------------
# ffcv 1.0.2 is an sdist whose setup.py calls `pkg-config opencv4 libturbojpeg` to compile its C++
# extension, so these must be present before pip runs; dataset-fashion-mnist is the real data set
# (`dpkg -L dataset-fashion-mnist` locates its IDX files).
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    # `dpkg -s` also succeeds for a removed package whose config files remain, so read its status.
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "apt packages present"
elif [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup.sh: needs root and apt-get to install Debian packages; install them, then re-run:" \
        "${missing[*]}" >&2
    exit 1
else
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update
    run apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- Python virtual environment --------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    run python3 -m venv .venv
fi
# pip runs only when requirements.txt changed since the last successful install (the stamp holds
# its sha256). One `pip install -r` works in a fresh venv: ffcv's setup.py imports neither numpy
# nor torch, so pip's default build isolation needs no install order.
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "python requirements up to date ($stamp)"
else
    run .venv/bin/python -m pip install -q -r requirements.txt
    echo "$want" >"$stamp"
fi
