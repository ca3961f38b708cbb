"""The inputs of a merge, opened together and checked against each other:
one naming scheme, layers paired by their place in the graph, the same
tensors, the same shapes, no input twice."""
from __future__ import annotations

import os
from pathlib import Path

from trainer.errors import UsageError

from trainer.files.naming import VariableLayout
from trainer.files.sources import H5Source, Source, open_source
from trainer.files.topology import Mismatch, key_renames, match, renames


class Inputs:
    """Opened sources plus what a merge needs to know about them together."""

    def __init__(self, paths: list[str]):
        _refuse_duplicates(paths)
        self.sources: list[Source] = []
        try:
            for p in paths:
                self.sources.append(open_source(p))
            self.reference = next((s for s in self.sources if s.config is not None), None)
            self.config = self.reference.config if self.reference is not None else None
            self._unify_names()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def family(self) -> str:
        return self.sources[0].family

    def _unify_names(self) -> None:
        for s in self.sources:
            if isinstance(s, H5Source) and s.needs_architecture:
                if self.config is None:
                    raise UsageError(f"{s.path}: a Keras weights file names its tensors by position only; "
                                     "give a .keras file or run directory of the same model alongside it")
                s.bind(self.config)
        self.renamed: dict[str, dict[str, str]] = {}
        self.mismatch: dict[str, str] = {}
        for s in self.sources:
            if s.config is not None and s.config is not self.config:
                self._pair_layers(s)
        self.layout = None
        families = {s.family for s in self.sources}
        if families == {"keras"}:
            return
        if self.config is None:
            raise UsageError(f"{self.sources[0].path}: no input records the model's architecture; "
                             "add a .keras file or run directory of the same model")
        self.layout = VariableLayout(self.config)
        self.config = self.layout.config  # the model is built anyway: write what Keras 3 writes
        for s in self.sources:
            if s.family == "keras":
                s.rename(self.layout.var_of, "variables")

    def _pair_layers(self, s: Source) -> None:
        """Re-key `s` with the reference's layer names, paired by place in the
        graph: Keras names unnamed layers by a per-session counter, so names
        alone pair the wrong layers or none. Where the graphs differ, names
        are all there is; check_tensors then reports the first difference."""
        try:
            mapping = match(self.config, s.config)
        except Mismatch as e:
            self.mismatch[s.path] = str(e)
            return
        changed = renames(mapping)
        if changed:
            s.rename(key_renames(s.keys(), mapping, s.family), s.family)
            # Reported: the layers whose tensors moved (not inputs, flatten, ...);
            # variable keys name a nested layer without its model.
            moved = {b: a for b, a in changed.items()
                     if any(k.startswith((a + "/", a.rsplit("/", 1)[-1] + "/")) for k in s.keys())}
            if moved:
                self.renamed[s.path] = moved

    def pairing_note(self) -> str | None:
        """One line on the inputs whose layers were paired by place, or None."""
        if not self.renamed:
            return None

        def pairs(changed):
            shown = [f"{b} -> {a}" for b, a in list(changed.items())[:4]]
            return ", ".join(shown) + (f", ... ({len(changed)} in all)" if len(changed) > 4 else "")

        return (f"layer names differ from {self.reference.path}'s; layers paired by their place in the graph: "
                + "; ".join(f"{path}: {pairs(c)}" for path, c in self.renamed.items()))

    def output_key(self, key: str) -> str:
        """The key's name in the Keras v3 scheme the output is written in."""
        return key if self.layout is None else self.layout.key_of.get(key, key)

    def check_tensors(self) -> list[str]:
        """The keys every input has, in the first input's order; a one-line
        error naming the file and the tensor for any difference."""
        first = self.sources[0]
        keys = first.keys()
        if not keys:
            raise UsageError(f"{first.path}: holds no model weights")
        for s in self.sources[1:]:
            reason = self.mismatch.get(s.path) or self.mismatch.get(first.path)
            same = "the inputs are not the same architecture" + (f" ({reason})" if reason else "")
            for kind, k, ours, theirs in tensor_differences(first, s):
                raise UsageError({
                    "missing": f"{s.path}: tensor {k} is missing (present in {first.path}); {same}",
                    "extra": f"{s.path}: tensor {k} is not in {first.path}; {same}",
                    "shape": f"{s.path}: tensor {k} has shape {theirs}, {first.path} has {ours}; {same}",
                    "dtype": f"{s.path}: tensor {k} is {theirs}, {first.path} has {ours}",
                }[kind])
        return keys


def tensor_differences(first: Source, other: Source):
    """(kind, key, first's, other's) for each way `other`'s tensors differ
    from `first`'s: "missing", "extra", then "shape" or "dtype". Both
    `check_tensors` (first one is an error) and `merge diff` (all) read it."""
    keys, theirs = first.keys(), set(other.keys())
    for k in keys:
        if k not in theirs:
            yield "missing", k, None, None
    ours = set(keys)
    for k in other.keys():
        if k not in ours:
            yield "extra", k, None, None
    for k in keys:
        if k in theirs:
            (sa, da), (sb, db) = first.info(k), other.info(k)
            if sa != sb:
                yield "shape", k, sa, sb
            elif da != db:
                yield "dtype", k, da, db


def _refuse_duplicates(paths: list[str]) -> None:
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if Path(p).exists():
            for q, other in seen.items():
                if other == real or (Path(q).exists() and os.path.samefile(q, p)):
                    raise UsageError(f"{p} is given twice (also as {q}); each input counts once")
        elif real in seen.values():
            raise UsageError(f"{p} is given twice; each input counts once")
        seen[p] = real
