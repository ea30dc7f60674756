"""Lazy asynchronous multi-level checkpointing (DataStates-LLM, REFT). See docs/checkpoint.md."""

from heddle.checkpoint.checkpointer import Checkpointer, SaveHandle
from heddle.checkpoint.keeper import shutdown_keeper
from heddle.checkpoint.restore import CheckpointFallbackWarning
from heddle.checkpoint.snapshot import TornSnapshot
from heddle.checkpoint.storage import CorruptCheckpoint

__all__ = ["Checkpointer", "SaveHandle", "CheckpointFallbackWarning", "CorruptCheckpoint", "TornSnapshot",
           "shutdown_keeper"]
