#!/usr/bin/env bash
# Set-up for `make gpu-check` on the GPU machine of ../shared/wheels/gpu-py312/README.md: its
# python3 (3.12) already has torch + CUDA, torchvision and opencv, and it has no network. What
# mmseg 0.30 needs beyond that comes as wheels from WHEELS; mmcv-full 1.7.2 is compiled there from
# its source (CPU ops only, -std=c++20 for torch 2.x headers; about 130 s on 16 cores).
#   bash scripts/gpu_setup.sh WHEELS SITE      (then PYTHONPATH=SITE; a second run returns at once)
set -euo pipefail
WHEELS="$(cd "${1:?usage: gpu_setup.sh WHEELS SITE}" && pwd)"
SITE="${2:?usage: gpu_setup.sh WHEELS SITE}"
PY="${PYTHON:-python3}"
mkdir -p "$SITE"
SITE="$(cd "$SITE" && pwd)"
if PYTHONPATH="$SITE" "$PY" -c 'import mmcv.ops, mmseg' 2>/dev/null; then exit 0; fi
echo "[gpu-setup] wheels from $WHEELS into $SITE" >&2
"$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
  --target "$SITE" "$WHEELS"/*.whl
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
tar xzf "$WHEELS"/mmcv-full-1.7.2.tar.gz -C "$BUILD"
sed -i 's/-std=c++17/-std=c++20/' "$BUILD"/mmcv-full-1.7.2/setup.py
echo "[gpu-setup] building mmcv-full 1.7.2 (CPU ops) with $(nproc) jobs" >&2
(cd "$BUILD"/mmcv-full-1.7.2 && PYTHONPATH="$SITE" CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 \
  MAX_JOBS="$(nproc)" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
  --disable-pip-version-check --target "$SITE" .)
PYTHONPATH="$SITE" "$PY" -c 'import mmcv.ops, mmseg; print("[gpu-setup] mmcv", mmcv.__version__, "mmseg", mmseg.__version__)' >&2
