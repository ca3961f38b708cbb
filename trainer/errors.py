"""The one exception type that means "the user can fix this"."""
import argparse


class UsageError(Exception):
    """Bad input: the CLI prints this as one line and exits with code 2.

    The message names the problem and what to do about it; no traceback.
    """


class MaskMismatch(RuntimeError):
    """Pruning or freezing masks differ across replicas: the run stops, exit 1,
    naming the weight, before the replicas drift apart."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag like any other bad input: one line, exit 2."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")
