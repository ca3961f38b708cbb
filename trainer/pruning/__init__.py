"""Pruning and freezing: masks beside their weights, applied inside the step.

Modules: config (what and when), schedule (TFMOT's schedules), masks (the
mask mechanism), pruner (magnitude updates), freeze (--freeze), structured
(unit removal and slicing), export (sparse artifact, SavedModel), report
(sparsity table and PNG). Import the one you need; this package imports
nothing so that its light parts load without TensorFlow.
"""
