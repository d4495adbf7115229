#!/usr/bin/env bash
# One set-up entry point for both README commands (`make demo`, `make test`).
# Creates .venv, installs the pinned stack in the order it needs, then the project in editable mode.
# Idempotent: a second run with unchanged inputs returns in well under a second (stamp file).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The Python to set up with: $PYTHON (a command or a path), else the first of python3.11 and
# python3.12 that runs here (CI keeps 3.11).
fits() { "$1" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12))' 2>/dev/null; }
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12; do
    if fits "$candidate"; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: scripts/setup.sh: neither python3.11 nor python3.12 runs here: set PYTHON=/path/to/python3.11 (or 3.12)" >&2
  exit 2
elif ! fits "$PY"; then
  echo "error: scripts/setup.sh: PYTHON=$PY: not a Python 3.11 or 3.12 that runs here" >&2
  exit 2
fi
VENV="$ROOT/.venv"
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=1.7.2
# A wheel of mmcv-full is only valid for the torch it was built against: the cache is keyed on it.
MMCV_CACHE="$ROOT/.cache/mmcv-full/torch-${TORCH_VERSION}-$($PY -c 'import sys;print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
SHARED_WHEELS="${MMCV_WHEEL_DIR:-$ROOT/../shared/wheels}"

stamp_inputs() { cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16; }
STAMP="$VENV/.setup-$(stamp_inputs)"
if [ -f "$STAMP" ]; then exit 0; fi

log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP=(pip_quiet "$VENV/bin/python" -m pip --disable-pip-version-check)
# This machine's pip config lists local index folders that may be absent; pip then warns per
# package ("WARNING: Location ... is ignored"). Drop those lines, keep everything else.
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location '" >&2); }

# setuptools<81: mmcv-full's setup.py imports pkg_resources (gone in setuptools 84; 80.9 measured to work).
log "build tools"
"${PIP[@]}" install -q --progress-bar off "pip>=24" "setuptools==80.9.0" wheel ninja

log "torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
"${PIP[@]}" install -q --progress-bar off "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

log "project (editable) and its pinned dependencies"
"${PIP[@]}" install -q --progress-bar off -e "$ROOT[test]"

mmcv_ok() {
  "$VENV/bin/python" - <<PYEOF 2>/dev/null
import importlib.metadata as md, torch
assert md.version("mmcv-full") == "$MMCV_VERSION"
assert torch.__version__.split("+")[0] == "$TORCH_VERSION"
import mmcv.ops  # loads the compiled extension: fails if built against another torch
PYEOF
}

build_mmcv_wheel() {
  # Build mmcv-full from its sdist against the torch in .venv (no build isolation), C++20 for torch 2.14 headers.
  local work; work="$(mktemp -d)"
  log "building mmcv-full $MMCV_VERSION from source (CPU ops; 15-25 min on 2 cores)"
  # --no-build-isolation: reading the sdist's metadata runs its setup.py, which needs pkg_resources + torch.
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation --no-cache-dir \
    "mmcv-full==$MMCV_VERSION" -d "$work"
  tar -xzf "$work"/mmcv-full-"$MMCV_VERSION".tar.gz -C "$work"
  sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$work/mmcv-full-$MMCV_VERSION/setup.py"
  mkdir -p "$MMCV_CACHE"
  (cd "$work/mmcv-full-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 CUDA_VISIBLE_DEVICES= MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
     "${PIP[@]}" wheel -q --no-build-isolation --no-deps --no-cache-dir . -w "$MMCV_CACHE")
  rm -rf "$work"
}

if mmcv_ok; then
  log "mmcv-full $MMCV_VERSION already installed for torch $TORCH_VERSION"
else
  wheel="$(ls "$MMCV_CACHE"/mmcv_full-"$MMCV_VERSION"-*.whl 2>/dev/null | head -1 || true)"
  if [ -z "$wheel" ]; then
    # The shared wheel was built here against torch 2.14.1 / cp311; use it only when it matches.
    shared="$(ls "$SHARED_WHEELS"/mmcv_full-"$MMCV_VERSION"-cp311-*.whl 2>/dev/null | head -1 || true)"
    if [ -n "$shared" ] && [ "$TORCH_VERSION" = 2.14.1 ] && "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2]==(3,11)' 2>/dev/null; then
      log "using prebuilt $shared"
      mkdir -p "$MMCV_CACHE" && cp "$shared" "$MMCV_CACHE/" && wheel="$MMCV_CACHE/$(basename "$shared")"
    else
      build_mmcv_wheel
      wheel="$(ls "$MMCV_CACHE"/mmcv_full-"$MMCV_VERSION"-*.whl | head -1)"
    fi
  fi
  # --no-deps: mmcv-full's metadata asks for opencv-python (GUI build); we install the headless build
  # instead (pyproject), so exactly one cv2 lives in the environment. --no-cache-dir: pip's wheel
  # cache does not key on the torch version.
  "${PIP[@]}" install -q --progress-bar off --no-deps --no-cache-dir --force-reinstall "$wheel"
  mmcv_ok || { log "mmcv-full installed but 'import mmcv.ops' fails against torch $TORCH_VERSION"; exit 1; }
fi

"$VENV/bin/python" -c "import mmseg_custom, orchestrator, ray, mlflow, mmseg, mmcv.ops" \
  || { log "import check failed"; exit 1; }
rm -f "$VENV"/.setup-*
touch "$STAMP"
log "done: $VENV"
