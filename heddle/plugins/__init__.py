"""Trainer plugins: one module per TrainerConfig section (see base.py for the interface).

``SECTIONS`` is the registry: config section name -> plugin class, by explicit import (no lookup
by name at run time). Each plugin class exposes its section's dataclass as ``Plugin.Config``.
The order is fixed and is the order the Trainer runs the hooks: the checkpoint plugin comes last
so it sees every other plugin's state.
"""

from __future__ import annotations

from heddle.plugins.adaptive_sequence_parallel import Plugin as AdaptiveSequenceParallelPlugin
from heddle.plugins.base import TrainerPlugin
from heddle.plugins.checkpoint import Plugin as CheckpointPlugin
from heddle.plugins.compression import Plugin as CompressionPlugin
from heddle.plugins.moe import Plugin as MoEPlugin
from heddle.plugins.sequence_parallel import Plugin as SequenceParallelPlugin

SECTIONS: dict[str, type[TrainerPlugin]] = {
    "sequence_parallel": SequenceParallelPlugin,
    "adaptive_sequence_parallel": AdaptiveSequenceParallelPlugin,
    "moe": MoEPlugin,
    "compression": CompressionPlugin,
    "checkpoint": CheckpointPlugin,
}

__all__ = ["SECTIONS", "TrainerPlugin", "SequenceParallelPlugin", "AdaptiveSequenceParallelPlugin", "MoEPlugin",
           "CompressionPlugin", "CheckpointPlugin"]
