#!/usr/bin/env bash
# Set-up for `make gpu-sweep` / `make gpu-check` on the GPU machine: its python3 (3.12) already
# has torch + CUDA, torchvision, opencv, numpy, pandas, pyarrow and matplotlib, and it has no
# network. BUNDLE is what scripts/gpu_bundle.sh built here (site.tar.xz: Ray, MLflow, optuna,
# pydantic, mmseg 0.30 and mmcv's pure-Python needs; mmcv-full's source) or a folder of wheels
# (../shared/wheels/gpu-py312). mmcv-full 1.7.2 is compiled there (CPU ops only, -std=c++20 for
# torch 2.x headers; about 130 s on 16 cores).
#   bash scripts/gpu_setup.sh BUNDLE SITE      (then PYTHONPATH=SITE; a second run returns at once)
set -euo pipefail
[ -d "${1:?usage: gpu_setup.sh BUNDLE SITE}" ] || {
  echo "error: scripts/gpu_setup.sh: $1: no such folder (build it here with make gpu-bundle, then carry it)" >&2
  exit 2; }
BUNDLE="$(cd "$1" && pwd)"
SITE="${2:?usage: gpu_setup.sh BUNDLE SITE}"
PY="${PYTHON:-python3}"
mkdir -p "$SITE"
SITE="$(cd "$SITE" && pwd)"
if [ -f "$BUNDLE/site.tar.xz" ]; then
  stamp="$SITE/.bundle-$(stat -c %s-%Y "$BUNDLE/site.tar.xz")"
  if [ ! -f "$stamp" ]; then
    echo "[gpu-setup] unpacking $BUNDLE/site.tar.xz into $SITE" >&2
    tar -xJf "$BUNDLE/site.tar.xz" -C "$SITE"
    touch "$stamp"
  fi
elif ! PYTHONPATH="$SITE" "$PY" -c 'import mmseg' 2>/dev/null; then
  echo "[gpu-setup] wheels from $BUNDLE into $SITE" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SITE" "$BUNDLE"/*.whl
fi
# the bundle's mmcv-full, when it has one built for this torch, imports: nothing to build
if PYTHONPATH="$SITE" "$PY" -c 'import mmcv.ops, mmseg' 2>/dev/null; then exit 0; fi
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
tar xzf "$BUNDLE"/mmcv-full-1.7.2.tar.gz -C "$BUILD"
sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$BUILD"/mmcv-full-1.7.2/setup.py
echo "[gpu-setup] building mmcv-full 1.7.2 (CPU ops) with $(nproc) jobs" >&2
(cd "$BUILD"/mmcv-full-1.7.2 && PYTHONPATH="$SITE" CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 \
  MAX_JOBS="$(nproc)" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
  --disable-pip-version-check --upgrade --target "$SITE" .)
PYTHONPATH="$SITE" "$PY" -c 'import mmcv.ops, mmseg; print("[gpu-setup] mmcv", mmcv.__version__, "mmseg", mmseg.__version__)' >&2
