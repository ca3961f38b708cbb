"""The values `launch slurm` writes into #SBATCH lines, checked as hostile
input before any script is rendered.

sbatch reads those lines itself, not the shell, with rules of its own
(src/sbatch/opt.c, _get_argument): whitespace ends the value, an unquoted `#`
makes the rest of the line a comment, quotes and backslashes group and
escape, and a newline starts a new line of the script. Quoting for that
parser would be a second shell dialect to get right; instead every value
takes a set of characters that mean the same to sbatch as to the user, and
anything else is refused with one line naming the flag."""
from __future__ import annotations

import re
import shlex
import string

from trainer.errors import UsageError

_WORD = string.ascii_letters + string.digits
NAME_CHARS = frozenset(_WORD + "._+=@:,-")
# Slurm account and QOS names are plain words (sacctmgr stores them lowercased).
_ACCOUNT_CHARS = frozenset(_WORD + "._-")
# Node features joined by Slurm's constraint operators: & and, | or,
# [a|b] all nodes alike, *N counts, ! not, () grouping.
_CONSTRAINT_CHARS = frozenset(_WORD + "._-&|[]*()!,:")
# --sbatch-arg values: names, paths, %-patterns, lists and TRES strings
# (--gres=gpu:a100:2, --export=ALL,FOO=1, --mail-user=a@b.org).
_ARG_VALUE_CHARS = NAME_CHARS | frozenset("/%&|[]*()!")

CHARSETS = {
    "--job-name": (NAME_CHARS, "letters, digits and . _ + = @ : , -"),
    "--partition": (NAME_CHARS, "letters, digits and . _ + = @ : , - (a name, or names separated by commas)"),
    "--log": (NAME_CHARS | {"/", "%"}, "letters, digits, / and . _ + = @ : , - % (a path without spaces; "
                                       "%j is the job id, %x the job name)"),
    "--account": (_ACCOUNT_CHARS, "letters, digits and . _ - (an account name)"),
    "--qos": (_ACCOUNT_CHARS, "letters, digits and . _ - (a QOS name)"),
    "--constraint": (_CONSTRAINT_CHARS, "letters, digits, . _ - , : and the operators & | [ ] * ( ) !"),
}
# Matched with fullmatch, ASCII: `\d` alone accepts any Unicode digit, which
# Slurm does not, and `$` also matches before a trailing newline.
TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", re.ASCII)
# sbatch --mem: a number and an optional unit (megabytes without one); 0 is
# Slurm's "all of each node's memory".
_MEM = re.compile(r"\d+[KMGT]?", re.ASCII)
_SIGNAL = re.compile(r"(?:(?:SIG)?(USR1|USR2)@)?(\d+)", re.ASCII)
# sbatch's --signal takes at most 0xffff seconds.
MAX_SIGNAL_SECONDS = 65535
# slurmctld checks time limits, and sends --signal, every 30 s
# (PERIODIC_TIMEOUT), so the signal comes up to that much early.
SIGNAL_SLACK = 30
_ARG = re.compile(r"--([a-z][a-z0-9-]*)(?:=(.+))?", re.ASCII | re.DOTALL)

# sbatch options --sbatch-arg may not pass, and why. sbatch reads every
# #SBATCH line with getopt_long, which takes any unambiguous abbreviation, so
# a prefix of one of these (--outp=) is refused as well.
_OWN = {name: f"launch slurm sets it: use its --{name}" for name in (
    "job-name", "nodes", "ntasks-per-node", "partition", "time", "gpus-per-node", "account", "qos", "mem",
    "cpus-per-task", "constraint", "exclusive", "requeue", "signal")}
RESERVED = {
    **_OWN,
    "output": "launch slurm sets it: use its --log",
    "ntasks": "the task count is --nodes x --tasks-per-node",
    "no-requeue": "use launch slurm's --requeue, or leave it out",
    "chdir": "the job runs in --workdir",
    "wrap": "the job's command goes after --",
    "array": "every task of an array would run the same command into the same --out",
    "parsable": "launch slurm reads sbatch's answer itself",
    "wait": "use launch slurm's --wait",
    "test-only": "it submits nothing; use --dry-run to see the script",
    "help": "it submits nothing",
    "usage": "it submits nothing",
    "version": "it submits nothing",
}
# Real sbatch options that happen to be prefixes of a reserved one: an exact
# name wins over abbreviations in getopt_long.
_EXACT = {"gpus"}


def show(value: str) -> str:
    """A value as one line of an error message (escapes spelled out)."""
    return shlex.quote(value) if value.isprintable() else repr(value)


def _what(c: str) -> str:
    if not c.isprintable():
        return f"a control character {c!r}"
    return "a space" if c.isspace() else repr(c)


def check_chars(flag: str, value: str | None) -> None:
    if value is None:
        return
    allowed, described = CHARSETS[flag]
    if not value:
        raise UsageError(f"{flag}: must not be empty")
    bad = next((c for c in value if c not in allowed), None)
    if bad is not None:
        raise UsageError(f"{flag} {show(value)}: contains {_what(bad)}, which an #SBATCH line cannot carry "
                         f"safely; use only {described}")


def check_mem(value: str | None) -> None:
    if value is not None and not _MEM.fullmatch(value):
        raise UsageError(f"--mem {show(value)}: expected a size per node like 4000M, 16G or 1T "
                         f"(megabytes without a unit; 0: all of each node's memory)")


def check_count(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: must be at least 1")


def time_seconds(value: str) -> int:
    """Seconds in one of Slurm's time forms (already matched by TIME):
    MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days, dash, rest = value.partition("-")
    if not dash:
        days, rest = "0", days
    parts = [int(p) for p in rest.split(":")]
    if dash:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_signal(value: str, time_limit: str | None) -> tuple[str, int]:
    """`[SIG@]SECONDS` -> (signal name, seconds before the time limit)."""
    m = _SIGNAL.fullmatch(value)
    if not m:
        raise UsageError(f"--signal {show(value)}: expected [USR1|USR2@]SECONDS, e.g. USR1@120: the signal the "
                         f"job script traps, sent that many seconds before the --time limit")
    name, seconds = m.group(1) or "USR1", int(m.group(2))
    if not 1 <= seconds <= MAX_SIGNAL_SECONDS:
        raise UsageError(f"--signal {value}: the seconds must be 1 to {MAX_SIGNAL_SECONDS}")
    if time_limit is not None:
        limit = time_seconds(time_limit)
        if seconds + SIGNAL_SLACK >= limit:
            raise UsageError(f"--signal {value}: Slurm sends it up to {SIGNAL_SLACK} s early, so with --time "
                             f"{time_limit} ({limit} s) the job would be stopped before it starts working; give at "
                             f"most {max(1, limit - SIGNAL_SLACK - 1)} s or a longer --time")
    return name, seconds


def check_sbatch_args(args: list[str], requeue: bool, mem: str | None) -> None:
    seen = set()
    for arg in args:
        m = _ARG.fullmatch(arg)
        if not m:
            raise UsageError(f"--sbatch-arg {show(arg)}: expected --name=value or --flag (sbatch's long "
                             f"form, e.g. --sbatch-arg=--mail-type=END)")
        name, value = m.group(1), m.group(2)
        own = RESERVED.get(name) or next((f"it abbreviates --{r}: {why}" for r, why in RESERVED.items()
                                          if r.startswith(name) and name not in _EXACT), None)
        if own is None and requeue and "open-mode".startswith(name):
            own = "--requeue appends each run to the log (--open-mode=append)"
        if own is None and mem is not None and name in ("mem-per-cpu", "mem-per-gpu"):
            own = "it contradicts --mem; give one of them"
        if own:
            raise UsageError(f"--sbatch-arg {show(arg)}: not allowed, {own}")
        if name in seen:
            raise UsageError(f"--sbatch-arg {show(arg)}: --{name} is given twice; give it once")
        seen.add(name)
        bad = next((c for c in value or "" if c not in _ARG_VALUE_CHARS), None)
        if bad is not None:
            raise UsageError(f"--sbatch-arg {show(arg)}: contains {_what(bad)}, which an #SBATCH line cannot "
                             f"carry safely; values take only letters, digits and . _ + = @ : , - / % & | [ ] * "
                             f"( ) !")
