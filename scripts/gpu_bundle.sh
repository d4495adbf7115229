#!/usr/bin/env bash
# What `make gpu-sweep` needs on the GPU machine beyond its image (Python 3.12 with torch + CUDA,
# numpy, pandas, pyarrow, matplotlib, opencv, click, requests, pyyaml, protobuf, ...; no network):
# Ray (Tune), MLflow's client and sqlite store (mlflow imports fastapi, databricks-sdk and
# cryptography at import), optuna, pydantic, mmseg 0.30 and the pure-Python
# parts mmcv needs, as one xz archive of an unpacked site folder, and mmcv-full's source (compiled
# there by scripts/gpu_setup.sh). Built here, where PyPI answers; the folder travels with the
# checkout (`carry`: its 64 MiB limit; on 2026-12-06 site.tar.xz was 42.0 MB without a prebuilt
# mmcv-full, 47.6 MB with one, and mmcv's source 0.6 MB). Versions: this checkout's .venv
# (what the suite ran with), else the pins below.
#   bash scripts/gpu_bundle.sh [BUNDLE]          (default .gpu-bundle; `make gpu-bundle`)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${1:-$ROOT/.gpu-bundle}"
PY="$ROOT/.venv/bin/python"   # any Python with pip and torch (mmcv's sdist metadata needs torch)
[ -x "$PY" ] || { echo "error: scripts/gpu_bundle.sh: $PY: run 'make setup' first" >&2; exit 2; }
# name==version for each; a name alone takes this checkout's .venv version
PACKAGES=(ray mlflow-skinny mlflow-tracing sqlalchemy alembic mako optuna colorlog pydantic
  pydantic-core annotated-types typing-inspection typing-extensions jsonschema
  jsonschema-specifications referencing rpds-py cachetools sqlparse python-dotenv
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  fastapi starlette databricks-sdk cryptography cffi pycparser
  mmsegmentation mmcls addict yapf==0.40.1 prettytable wcwidth importlib-metadata==8.7.0 zipp
  platformdirs tomli packaging setuptools==80.9.0)
# Not needed by a sweep, and most of Ray's size: Java jars, RLlib, Serve, LLM
PRUNE=(ray/jars ray/rllib ray/serve ray/llm)

pins=()
for p in "${PACKAGES[@]}"; do
  if [[ "$p" == *==* ]]; then pins+=("$p"); continue; fi
  v="$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))" 2>/dev/null)" || {
    echo "error: scripts/gpu_bundle.sh: $p is not installed in $PY's environment: pin it" >&2
    exit 2; }
  pins+=("$p==$v")
done
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PIP=("$PY" -m pip --disable-pip-version-check)
quiet() { "$@" 2> >(grep -v "^WARNING: Location '" >&2); }
echo "[gpu-bundle] ${#pins[@]} wheels for CPython 3.12 (manylinux x86_64)" >&2
TARGET=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_34_x86_64
  --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)
quiet "${PIP[@]}" download -q --no-deps "${TARGET[@]}" -d "$WORK/wheels" "${pins[@]}"
quiet "${PIP[@]}" install -q --no-index --no-deps --no-compile "${TARGET[@]}" \
  --target "$WORK/site" "$WORK"/wheels/*.whl
# mmcv-full compiled for the GPU machine's torch (GPU_TORCH, cp312), where this machine has one
# in .cache/mmcv-full/torch-$GPU_TORCH-cp312/: there it then imports at once, no 130 s build
# (scripts/gpu_setup.sh still builds from source when it does not import). How it was built: with
# python3.12, PYTHONPATH holding torch==$GPU_TORCH from PyPI (installed --no-deps, with CUDA 13
# libraries that `import torch` loads), `pip wheel --no-build-isolation` of mmcv-full 1.7.2's
# sdist with -std=c++20, MMCV_WITH_OPS=1 FORCE_CUDA=0 (CPU ops, as gpu_setup.sh builds there).
GPU_TORCH="${GPU_TORCH:-2.11.0}"
wheels=("$ROOT/.cache/mmcv-full/torch-$GPU_TORCH-cp312"/mmcv_full-*-cp312-*.whl)
if [ "${#wheels[@]}" -gt 1 ]; then
  echo "error: scripts/gpu_bundle.sh: ${#wheels[@]} mmcv-full wheels in $(dirname "${wheels[0]}"): keep one" >&2
  exit 2
fi
for wheel in "${wheels[@]}"; do
  [ -f "$wheel" ] || continue
  echo "[gpu-bundle] with $(basename "$wheel") (built for torch $GPU_TORCH)" >&2
  quiet "${PIP[@]}" install -q --no-index --no-deps --no-compile --python-version 3.12 \
    --implementation cp --only-binary=:all: --platform linux_x86_64 --target "$WORK/site" "$wheel"
  echo "mmcv-full==1.7.2 built for torch $GPU_TORCH" >> "$WORK/pins.extra"
  find "$WORK/site/mmcv" -name '*.so' -exec strip --strip-debug {} +  # 78 MB -> 1.8 MB
done
for p in "${PRUNE[@]}"; do rm -rf "${WORK:?}/site/$p"; done
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +
{ printf '%s\n' "${pins[@]}"; cat "$WORK/pins.extra" 2>/dev/null || true; } > "$WORK/site/BUNDLE_PINS.txt"
mkdir -p "$BUNDLE"
echo "[gpu-bundle] compressing ($(du -sh "$WORK/site" | cut -f1) unpacked)" >&2
tar -cf - -C "$WORK/site" . | xz -T0 -6 > "$BUNDLE/site.tar.xz.tmp"
mv "$BUNDLE/site.tar.xz.tmp" "$BUNDLE/site.tar.xz"
if ! ls "$BUNDLE"/mmcv-full-1.7.2.tar.gz >/dev/null 2>&1; then
  quiet "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
    "mmcv-full==1.7.2" -d "$BUNDLE"
fi
du -sh "$BUNDLE" >&2
echo "$BUNDLE"
