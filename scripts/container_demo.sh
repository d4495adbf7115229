#!/usr/bin/env bash
# Builds the image of Containerfile with buildah and runs `make demo` inside it: the check that
# the recipe works (not part of `make test`: it installs the whole stack, minutes to an hour).
# These machines cannot pull images, so the default base is made here: a Debian bookworm root
# filesystem (Python 3.11, venv, headers, gcc/g++, make) bootstrapped from Debian's packages with
# mmdebstrap and committed as segprobe-base:bookworm. Storage: vfs (each layer a full copy: about
# 25 GB of free disk for the CUDA build of torch that setup.sh installs).
#   bash scripts/container_demo.sh [BASE_IMAGE]        (default segprobe-base:bookworm)
# Optional: MMCV_WHEELS=DIR (a folder with a matching mmcv-full wheel, mounted at /wheels),
# PIP_MIRROR=DIR (a folder holding a simple/ index, mounted read-only and used as an extra
# index), PIP_CA=FILE (a CA bundle pip must trust here, mounted read-only while building).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${1:-segprobe-base:bookworm}"
IMAGE="${IMAGE:-segprobe:demo}"
buildah() { command buildah --storage-driver vfs "$@"; }  # no overlay mounts needed
log() { echo "[container] $*" >&2; }
for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "error: scripts/container_demo.sh: $tool not found (Debian package $tool)" >&2; exit 2; }
done
start=$(date +%s)
scratch="$(mktemp -d)" ctr=""
trap 'rm -rf "$scratch"; [ -z "$ctr" ] || buildah rm "$ctr" >/dev/null' EXIT
if [ "$BASE" = segprobe-base:bookworm ] && ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  rootfs="$scratch/bookworm.tar"
  log "bootstrapping $BASE from Debian's packages (mmdebstrap)"
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python3-dev,gcc,g++,make,ca-certificates,libgomp1 \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$rootfs" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --quiet "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
  ctr="" && rm -f "$rootfs"
  log "base image $BASE: $(( $(date +%s) - start )) s"
fi
volumes=() args=(--build-arg "BASE=$BASE")
if [ -n "${MMCV_WHEELS:-}" ]; then volumes+=(-v "$(cd "$MMCV_WHEELS" && pwd):/wheels:ro"); fi
if [ -n "${PIP_MIRROR:-}" ]; then
  volumes+=(-v "$(cd "$PIP_MIRROR" && pwd):/mirror:ro")
  args+=(--build-arg "PIP_EXTRA_INDEX_URL=file:///mirror/simple")
fi
if [ -n "${PIP_CA:-}" ]; then
  volumes+=(-v "$(realpath "$PIP_CA"):/etc/segprobe-build-ca.crt:ro")
  args+=(--build-arg "PIP_CERT=/etc/segprobe-build-ca.crt")
fi
built=$(date +%s)
log "building $IMAGE from $BASE"
buildah build --quiet --isolation chroot --layers=false -f "$ROOT/Containerfile" "${args[@]}" \
  "${volumes[@]}" -t "$IMAGE" "$ROOT" >/dev/null
log "image $IMAGE built in $(( $(date +%s) - built )) s"
ctr=$(buildah from "$IMAGE")
demo=$(date +%s)
log "make demo inside $IMAGE"
buildah run --isolation chroot "$ctr" -- make demo
log "make demo inside the image: $(( $(date +%s) - demo )) s; all: $(( $(date +%s) - start )) s"
