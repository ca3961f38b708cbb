"""The job's view of pruning and freezing: which mask sets exist, the hooks
they add to the loop, what goes into the checkpoint and the manifest.

With neither --prune nor --freeze every method here is a no-op, so the job
never branches on them.
"""
from __future__ import annotations

import numpy as np

from .errors import MaskMismatch


class Masking:
    def __init__(self, o, model, backend, total_steps: int, prune_cfg=None):
        self.o, self.model, self.backend = o, model, backend
        self.pruner = None
        self.freezer = None
        if o.freeze:
            from .pruning.freeze import Freezer
            self.freezer = Freezer(o.freeze, model, backend)
        if prune_cfg:
            from .pruning.pruner import Pruner
            # Frozen entries keep their values, so pruning must not pick them.
            protected = {k: mask == 0 for k, _, mask in self.freezer.chosen} if self.freezer else {}
            self.pruner = Pruner(model, prune_cfg, backend, total_steps, protected)
        self.sets = [x.maskset for x in (self.pruner, self.freezer) if x]
        self.checked_steps = 0

    @property
    def variables(self) -> list:
        return [v for s in self.sets for v in s.masks + s.values]

    def checkpoint_entries(self) -> dict:
        """Checkpoint sections {name: {weight key: variable}} (see checkpoint.state_checkpoint)."""
        out = {}
        for s in self.sets:
            out.update(s.checkpoint_entries())
        return out

    def start(self) -> None:
        if self.freezer:
            self.freezer.start()

    def hooks(self) -> dict:
        before = [self.pruner.before_step] if self.pruner else []
        after = [self._check] if self.pruner and self.o.verify_masks else []
        return {"grad_hooks": [s.grad_hook for s in self.sets], "after_update": [s.after_update for s in self.sets],
                "before_step": before, "after_step": after}

    def _check(self, step: int) -> None:
        # Summed over processes every step, so that all stop together: a rank
        # that raised alone would leave the others blocked in the next allreduce.
        table = self.backend.allreduce_sum(self.pruner.violations())
        self.checked_steps += 1
        if table.any():
            j = int(np.flatnonzero(table.any(axis=0))[0])
            name, noun = self.pruner.maskset.names[j], self.backend.replica_noun
            on = [int(r) for r in np.flatnonzero(table[:, j])]
            raise MaskMismatch(f"{int(table[:, j].sum())} pruned entries of {name} are nonzero after "
                               f"step {step} on {noun}{'s' if len(on) > 1 else ''} {', '.join(map(str, on))} "
                               "(--verify-masks); stopping the run")

    def finish(self, run_dir, reporter, sample=None) -> dict:
        """Manifest entries, and on the chief the sparsity table, PNG and exports."""
        if not self.sets:
            return {}
        out = {}
        if self.freezer:
            out["frozen"] = {"spec": self.freezer.spec, "checksums": self.freezer.maskset.verify()}
        if self.pruner:
            summary = self.pruner.summary()
            summary["final_checksums"] = self.pruner.maskset.verify()
            if self.o.verify_masks:
                # A violation stops the run (_check), so a finished run has none.
                total = self.backend.allreduce_sum(np.array([self.checked_steps], dtype=np.float64))
                summary["verified"] = {"violations": 0, "replica_steps_checked": int(total[0])}
            out["pruning"] = summary
            if run_dir:
                self._report(run_dir, reporter, summary, sample)
        return out

    def _report(self, run_dir, reporter, summary: dict, sample) -> None:
        from .pruning.export import export_savedmodel, save_sparse
        from .pruning.report import format_table, plot_sparsity, sparsity_rows
        masks = {k: m.numpy() for k, m in zip(self.pruner.maskset.names, self.pruner.maskset.masks)}
        rows = sparsity_rows(self.model, masks)
        reporter.line(format_table(rows))
        plot_sparsity(rows, run_dir.path / "sparsity.png")
        stats = save_sparse(self.model, run_dir.path / "model.sparse.npz")
        export_savedmodel(self.model, run_dir.path / "saved_model")
        summary["sparse_artifact"] = {"path": "model.sparse.npz", **stats}
        if self.pruner.cfg.structured:
            summary["sliced"] = self._slice(run_dir, sample)

    def _slice(self, run_dir, sample) -> dict:
        """The physically smaller model, checked against the masked one."""
        import tensorflow as tf
        from .checkpoint import export_keras
        from .pruning.structured import slice_checked
        small, diff = slice_checked(self.model, self.pruner.kept_units(), tf.constant(sample))
        export_keras(small, run_dir.path / "model.sliced.keras")
        return {"path": "model.sliced.keras", "params": [int(self.model.count_params()), int(small.count_params())],
                "max_abs_output_diff": diff}
