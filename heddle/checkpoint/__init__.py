"""Lazy asynchronous multi-level checkpointing (DataStates-LLM, REFT). See docs/checkpoint.md."""

from heddle.checkpoint.checkpointer import Checkpointer, SaveHandle
from heddle.checkpoint.keeper import KeeperError, KeeperUnavailable, shutdown_keeper
from heddle.checkpoint.restore import CheckpointFallbackWarning
from heddle.checkpoint.snapshot import SharedMemoryFull, TornSnapshot
from heddle.checkpoint.storage import CorruptCheckpoint, DirectoryLocked, NoValidCheckpoint

__all__ = ["Checkpointer", "SaveHandle", "CheckpointFallbackWarning", "CorruptCheckpoint", "DirectoryLocked",
           "KeeperError", "KeeperUnavailable", "NoValidCheckpoint", "SharedMemoryFull", "TornSnapshot",
           "shutdown_keeper"]
