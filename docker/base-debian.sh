#!/usr/bin/env bash
# A stand-in for python:3.12-slim-bookworm made without a container registry:
# Debian 12 "bookworm" (debootstrap --variant=minbase from a Debian mirror)
# with a CPython 3.12 and a virtual environment /opt/venv first on PATH, so
# that `python` and `pip` behave as in the official image. One layer.
#
#   docker/base-debian.sh [IMAGE]          (default localhost/dptoolkit-base:bookworm-py312)
#   buildah bud --build-arg BASE=IMAGE -f docker/Dockerfile -t dptoolkit:cpu .
#
# Debian 12 packages Python 3.11 only, and the pinned stack needs 3.12 (numpy
# 2.5 and scipy 1.18 require it), so the interpreter is copied from this
# machine, at its own prefix: DPT_BASE_PYTHON (default: python3.12 on PATH,
# then pyenv's 3.12.*). It must be a CPython 3.12 built with --enable-shared
# for glibc <= 2.36 (Debian 12's), e.g. pyenv's on a Debian 12 host; the
# import check at the end says so when it is not.
#
# Needs root, debootstrap and buildah. Storage: buildah's usual configuration
# (STORAGE_DRIVER=vfs where overlay mounts are not allowed, as in gVisor).
# DEBIAN_MIRROR overrides http://deb.debian.org/debian.
set -euo pipefail
IMAGE="${1:-localhost/dptoolkit-base:bookworm-py312}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_DIR="${DPT_BASE_CA_DIR-/usr/local/share/ca-certificates}"
log() { printf '[base-debian] %s\n' "$*" >&2; }
# buildah with the storage driver STORAGE_DRIVER names, else its configured one.
bh() { buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} "$@"; }

for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null 2>&1 || { log "error: $tool is not installed (apt-get install $tool; ./run setup installs both)"; exit 2; }
done

py="${DPT_BASE_PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
    if "$cand" -c 'import sys' >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
[ -n "$py" ] || { log "error: no python3.12 found; set DPT_BASE_PYTHON to a CPython 3.12"; exit 2; }
# The real installation behind PYTHON (a venv's python points at its base).
read -r prefix version shared < <("$py" -c 'import sys, sysconfig
print(sys.base_prefix, "%d.%d.%d" % sys.version_info[:3], sysconfig.get_config_var("Py_ENABLE_SHARED"))')
case "$version" in 3.12.*) ;; *) log "error: $py is Python $version, not 3.12"; exit 2 ;; esac
[ "$prefix" != /usr ] || { log "error: $py lives in /usr; copy a CPython 3.12 with a prefix of its own (pyenv, /usr/local, /opt)"; exit 2; }

root="$(mktemp -d "${TMPDIR:-/var/tmp}/dptoolkit-base.XXXXXX")"
ctr=""
cleanup() {
  [ -z "$ctr" ] || bh rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$root"
}
trap cleanup EXIT

# What python:3.12-slim-bookworm has beside Python (ca-certificates, netbase,
# tzdata) and the shared libraries CPython's extension modules link to.
libs=ca-certificates,netbase,tzdata,libssl3,libffi8,libsqlite3-0,libreadline8,libncursesw6,libbz2-1.0,liblzma5,zlib1g,libuuid1,libexpat1,libnsl2,libcrypt1
log "debootstrap bookworm (minbase) into $root"
debootstrap --variant=minbase --include="$libs" bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
cat > "$root/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
# The certificate authorities this machine adds to Debian's (a proxy that
# inspects TLS, a company CA), so that the image's pip reaches PyPI from here.
if compgen -G "$CA_DIR/*.crt" >/dev/null; then
  log "adding the local CAs of $CA_DIR"
  cp "$CA_DIR"/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi

log "copying Python $version from $prefix"
mkdir -p "$root$prefix"
tar -C "$prefix" --exclude=./lib/python3.12/test --exclude=./lib/python3.12/idlelib/idle_test \
    --exclude='__pycache__' --exclude=./lib/python3.12/site-packages -cf - . | tar -C "$root$prefix" -xf -
mkdir -p "$root$prefix/lib/python3.12/site-packages"
for name in python3.12 python3 python; do ln -sf "$prefix/bin/python3.12" "$root/usr/local/bin/$name"; done
[ "$shared" = 1 ] && echo "$prefix/lib" > "$root/etc/ld.so.conf.d/python3.12.conf" && chroot "$root" ldconfig
in_root() { chroot "$root" /usr/bin/env -i PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
# Every extension module must load on Debian 12's libraries.
in_root python3.12 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, readline, uuid, pyexpat, hashlib, decimal, venv, ensurepip' \
  || { log "error: Python $version from $prefix does not run on Debian 12 (built for a newer glibc?)"; exit 1; }

# The virtual environment the Dockerfile's pip installs into, with the pip
# ./run pins (it verifies TLS with the system's CAs; ensurepip's older one
# only with its own bundle).
in_root python3.12 -m venv /opt/venv
[ -e "$root/etc/resolv.conf" ] || { cp /etc/resolv.conf "$root/etc/resolv.conf"; made_resolv=1; }
in_root pip install -q --disable-pip-version-check --no-cache-dir --cert /etc/ssl/certs/ca-certificates.crt "pip==26.3"
[ -z "${made_resolv:-}" ] || rm -f "$root/etc/resolv.conf"

log "committing $IMAGE"
ctr="$(bh from scratch)"
bh copy --quiet "$ctr" "$root" / >/dev/null
bh config \
  --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --env PYTHON_VERSION="$version" \
  --label org.opencontainers.image.description="Debian 12 (debootstrap minbase) with CPython $version in /opt/venv: a stand-in for python:3.12-slim-bookworm" \
  --label dptoolkit.base.python="$version" \
  --cmd python3 "$ctr"
bh commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
ctr=""
log "built $IMAGE"
