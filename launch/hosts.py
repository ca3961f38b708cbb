"""Host lists for horovodrun: `-H host1:4,host2:4` or a hostfile."""
from __future__ import annotations

import re
from pathlib import Path

from trainer.errors import UsageError

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """'a:4,b:2' -> [('a', 4), ('b', 2)]; a host without ':N' has one slot."""
    if not text or not text.strip():
        raise UsageError("-H is empty; expected host:slots[,host:slots...], e.g. -H node1:4,node2:4")
    out = []
    for item in text.split(","):
        name, sep, slots = item.strip().partition(":")
        if not _HOST.match(name) or (sep and not slots.isdigit()):
            raise UsageError(f"-H {text}: cannot parse {item!r}; expected host:slots, e.g. node1:4")
        n = int(slots) if sep else 1
        if n < 1:
            raise UsageError(f"-H {text}: {name} has {n} slots; each host needs at least 1")
        out.append((name, n))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UsageError(f"-H {text}: a host is listed twice; give each host once with its slot count")
    return out


def read_hostfile(path) -> list[tuple[str, int]]:
    """Lines of 'host slots=N' (OpenMPI and horovodrun) or 'host:N'; '#' comments."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"--hostfile {path}: cannot read it ({e.strerror})") from None
    items = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+?)(?::(\d+)|\s+slots\s*=\s*(\d+))?", line)
        if not m:
            raise UsageError(f"--hostfile {path}, line {number}: cannot parse {line!r}; expected 'host slots=N'")
        items.append(f"{m.group(1)}:{m.group(2) or m.group(3) or 1}")
    if not items:
        raise UsageError(f"--hostfile {path}: no hosts in it")
    return parse_hosts(",".join(items))


def format_hosts(hosts: list[tuple[str, int]]) -> str:
    return ",".join(f"{h}:{n}" for h, n in hosts)
