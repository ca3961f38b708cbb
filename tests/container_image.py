"""docker/Dockerfile built for real with buildah, for tests/test_container.py.

No registry is reachable, so the image's BASE is the stand-in that
docker/base-debian.sh makes (Debian 12 by debootstrap, CPython 3.12 in
/opt/venv), tagged by a hash of that recipe and the Python it copies, and
built only when that tag is missing.

The Dockerfile is built with buildah's layer cache (--layers): its stack step
(apt, pip install -r requirements.txt, Horovod by tools/horovod-wheel.sh) is
reused while requirements.txt, patches/, tools/horovod-wheel.sh (COPYs, which
buildah caches by content) and the step's text are unchanged, so a code-only
change rebuilds only the project's COPY and RUN. After each build the images
of this project that no tag reaches any more (earlier builds, identified by
the Dockerfile's LABEL) and base images of other recipes are removed; images
still used by a container stay.

Storage: buildah's default graph root with the overlay driver, which works in
this gVisor sandbox and stores each layer as a diff. Measured on 2 cores: an
uncached build 406 s (base 90 s, stack ~5 min), 2.9 GB on disk for the base,
the stack and the project; a code-only change 6 s; nothing changed 1.5 s.
DPT_BUILDAH_DRIVER=vfs works too but copies the whole root per layer and per
working container: 910 s uncached, 9.7 GB kept and 18 GB at the peak."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORAGE_DRIVER = os.environ.get("DPT_BUILDAH_DRIVER", "overlay")
STORAGE_ROOT = "/var/lib/containers/storage"  # buildah's default graph root, as root
IMAGE = "localhost/dptoolkit-test:cpu"
BASE_REPO = "localhost/dptoolkit-test-base"  # not the README's dptoolkit-base: prune removes old tags
LABEL = "org.opencontainers.image.title=dptoolkit"  # docker/Dockerfile's LABEL
CONTAINER_PREFIX = "dptoolkit-test-"  # working containers: PREFIX + pid + name
LOCK = Path("/var/tmp/dptoolkit-container.lock")
BUILD_TIMEOUT = 3600  # uncached: 7 minutes measured (15 with vfs) on 2 busy cores


def missing_tools() -> str | None:
    missing = [t for t in ("buildah", "debootstrap") if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    return ", ".join(missing) or None


def buildah(*args, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["buildah", "--storage-driver", STORAGE_DRIVER, "--root", STORAGE_ROOT, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(map(str, args[:3]))}... exit {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def base_python() -> str:
    """The CPython 3.12 the base image copies: the one running the tests where
    it is 3.12 (./run's choice on this machine), else DPT_BASE_PYTHON, else
    the first python3.12 that runs, as docker/base-debian.sh picks it
    (pyenv's bare python3.12 shim is on PATH but refuses until a version is
    selected, so its versions folder is looked in too)."""
    if sys.version_info[:2] == (3, 12):
        return sys.executable
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [os.environ.get("DPT_BASE_PYTHON"), shutil.which("python3.12"),
                  *map(str, sorted(pyenv.glob("versions/3.12.*/bin/python3.12")))]
    for cand in filter(None, candidates):
        if subprocess.run([cand, "-c", "import sys"], capture_output=True).returncode == 0:
            return cand
    raise RuntimeError("the base image needs a CPython 3.12 (pyenv's, or set DPT_BASE_PYTHON for docker/base-debian.sh)")


def _image_exists(ref: str) -> bool:
    return buildah("inspect", "--type", "image", ref, check=False).returncode == 0


def base_image(log) -> str:
    py = base_python()
    ident = subprocess.run([py, "-c", "import sys; print(sys.base_prefix, sys.version)"],
                           capture_output=True, text=True, check=True).stdout
    recipe = (REPO / "docker" / "base-debian.sh").read_bytes()
    tag = f"{BASE_REPO}:{hashlib.sha256(recipe + ident.encode()).hexdigest()[:12]}"
    if _image_exists(tag):
        return tag
    t0 = time.monotonic()
    env = dict(os.environ, DPT_BASE_PYTHON=py, STORAGE_DRIVER=STORAGE_DRIVER)
    proc = subprocess.run([str(REPO / "docker" / "base-debian.sh"), tag], capture_output=True, text=True,
                          timeout=1800, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"docker/base-debian.sh failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    log(f"base image {tag} built in {time.monotonic() - t0:.0f} s")
    return tag


def build(workdir: Path, log) -> str:
    """Build docker/Dockerfile as IMAGE on the stand-in base; returns IMAGE.
    The build's full output goes to workdir/build.log."""
    base = base_image(log)
    t0 = time.monotonic()
    proc = buildah("bud", "--layers", "--isolation", "chroot", "--network", "host", "--force-rm",
                   "--build-arg", f"BASE={base}", "-f", REPO / "docker" / "Dockerfile", "-t", IMAGE, REPO,
                   timeout=BUILD_TIMEOUT, check=False)
    (workdir / "build.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"buildah bud failed (exit {proc.returncode}); the end of its output:\n"
                           f"{(proc.stdout + proc.stderr)[-5000:]}")
    cached = proc.stdout.count("Using cache")
    log(f"image {IMAGE} built in {time.monotonic() - t0:.0f} s ({cached} steps from the layer cache)")
    prune(base, log)
    return IMAGE


def prune(base: str, log) -> None:
    """Remove this project's images that no tag reaches: earlier builds of
    docker/Dockerfile (untagged now that IMAGE names the new one; removing one
    removes its untagged cache parents too) and base images of other recipes.
    An image a container still uses stays (buildah refuses), as do other
    projects' images."""
    dangling = buildah("images", "--all", "--noheading", "--no-trunc", "--format", "{{.ID}}",
                       "--filter", "dangling=true", "--filter", f"label={LABEL}").stdout.split()
    bases = [line.split() for line in buildah("images", "--noheading", "--no-trunc", "--format",
                                               "{{.Name}}:{{.Tag}} {{.ID}}", BASE_REPO, check=False).stdout.splitlines()]
    stale = dangling + [ref for ref, _ in (b for b in bases if len(b) == 2) if ref != base]
    removed = [ref for ref in stale if buildah("rmi", ref, check=False).returncode == 0]
    if removed:
        log(f"removed {len(removed)} stale image(s) of this project")


def remove_dead_containers() -> None:
    """Working containers this module made in earlier sessions whose process
    is gone (a killed run); by name, only ours."""
    for line in buildah("containers", "--noheading", "--format", "{{.ContainerName}} {{.ContainerID}}").stdout.splitlines():
        name, cid = line.split()
        if name.startswith(CONTAINER_PREFIX):
            pid = name[len(CONTAINER_PREFIX):].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                buildah("rm", cid, check=False)


@contextmanager
def locked():
    """One build or prune at a time on this machine (another checkout's test run)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Container:
    """A buildah working container of IMAGE; `run` is `buildah run` with a
    host directory mounted at /runs (the image's WORKDIR)."""

    def __init__(self, image: str, name: str):
        self.name = f"{CONTAINER_PREFIX}{os.getpid()}-{name}"
        self.id = buildah("from", "--pull=never", "--name", self.name, image).stdout.strip().splitlines()[-1]

    def run(self, *cmd, runs: Path | None = None, timeout=600) -> subprocess.CompletedProcess:
        mount = ["-v", f"{runs}:/runs"] if runs is not None else []
        return buildah("run", "--isolation", "chroot", "--network", "host", *mount, self.id, "--", *cmd,
                       timeout=timeout, check=False)

    def config(self) -> dict:
        return json.loads(buildah("inspect", "--type", "container", self.id).stdout)["OCIv1"]["config"]

    def remove(self) -> None:
        buildah("rm", self.id, check=False)
