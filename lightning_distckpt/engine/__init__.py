"""The engine: DCP storage writer and reader, host snapshots, balanced reads, and the collective save and load.

Builds on `catalog` (what exists), `storage` (bytes),
`transforms` (codecs) and `parallel` (planners).
Knows nothing of Lightning.
"""
