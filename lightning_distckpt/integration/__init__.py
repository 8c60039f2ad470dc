"""Everything that knows Lightning: the plugin (`DistCheckpointIO`), how strategies are routed through
it, the state-dict adapters, the `DistCheckpoint` callback and `KnowledgeDistillation`.

Importing this package changes nothing in Lightning: routing is installed when a ``DistCheckpointIO`` is
constructed (and applied when it is given to a Trainer or when ``DistCheckpoint`` sets up).
"""
