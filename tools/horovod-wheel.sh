#!/usr/bin/env bash
# Build Horovod 0.28.1 against the TensorFlow installed beside PYTHON, with the
# project's patch, into WHEEL_DIR; reuse a wheel built there before. Prints the
# wheel's path. Used by ./run and by both Dockerfiles, so there is one recipe.
#
#   tools/horovod-wheel.sh PYTHON WHEEL_DIR
#
# Horovod's maintainers stopped at TF 2.15. Its sdist builds against TF 2.21
# once horovod/tensorflow/xla_mpi_ops.cc is left out of CPU builds; the patch
# (patches/horovod-0.28.1.patch, which says what each part does and why) also
# keeps horovodrun's build checks from printing TensorFlow's banners. A patch
# that stops applying fails the build here, loudly.
# GPU builds: set HOROVOD_GPU_OPERATIONS=NCCL (and HOROVOD_CUDA_HOME...) in
# the environment; the wheel is cached under a name of its own.
set -euo pipefail
PY="${1:?usage: tools/horovod-wheel.sh PYTHON WHEEL_DIR}"
OUT="${2:?usage: tools/horovod-wheel.sh PYTHON WHEEL_DIR}"
VERSION=0.28.1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PATCH="$root/patches/horovod-$VERSION.patch"

log() { printf '[horovod-wheel] %s\n' "$*" >&2; }

# The installed distribution's version (tensorflow-cpu, or tensorflow on GPU
# machines), read without importing TensorFlow, which takes seconds.
tf="$("$PY" - <<'PY' 2>/dev/null
from importlib import metadata
for name in ("tensorflow", "tensorflow-cpu"):
    try:
        print(metadata.version(name))
        break
    except metadata.PackageNotFoundError:
        pass
else:
    raise SystemExit(1)
PY
)" || { log "error: TensorFlow is not installed beside $PY; install requirements.txt first"; exit 1; }
pytag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
kind="cpu"; [ -n "${HOROVOD_GPU_OPERATIONS:-}" ] && kind="gpu-${HOROVOD_GPU_OPERATIONS,,}"
key="$VERSION-$pytag-tf$tf-$kind-$(sha256sum "$PATCH" | cut -c1-12)"
dir="$OUT/horovod-$key"
if compgen -G "$dir/horovod-$VERSION-*.whl" >/dev/null; then
  ls "$dir"/horovod-"$VERSION"-*.whl | head -1
  exit 0
fi

mkdir -p "$OUT"
work="$(mktemp -d "$OUT/.build-XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "fetching the horovod $VERSION sdist"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$work" "horovod==$VERSION" >&2
tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
src="$work/horovod-$VERSION"
if ! patch -d "$src" -p1 --forward --batch --dry-run < "$PATCH" >"$work/patch.log" 2>&1; then
  log "error: $PATCH does not apply to the horovod $VERSION sdist:"
  cat "$work/patch.log" >&2
  exit 1
fi
patch -d "$src" -p1 --forward --batch --quiet < "$PATCH"
log "building horovod $VERSION against TensorFlow $tf ($pytag, $kind; about 2 minutes on 2 cores)"
HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheel" "$src" >&2
rm -rf "$dir"
mv "$work/wheel" "$dir"
ls "$dir"/horovod-"$VERSION"-*.whl | head -1
