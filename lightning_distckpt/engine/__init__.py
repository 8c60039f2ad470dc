"""The engine: DCP storage writer and reader, host snapshots, balanced reads, and the collective save and load.

Builds on :mod:`~lightning_distckpt.catalog` (what exists), :mod:`~lightning_distckpt.storage` (bytes),
:mod:`~lightning_distckpt.transforms` (codecs) and :mod:`~lightning_distckpt.parallel` (planners).
Knows nothing of Lightning.
"""
