"""Trainer section ``checkpoint``: lazy asynchronous checkpoints every N optimizer steps.

    config = heddle.TrainerConfig(checkpoint={"directory": "ckpts", "every": 1, "keep": 3})
    trainer = heddle.Trainer(model, optimizer, config=config)
    trainer.track("sampler", sampler)
    start = trainer.resume()                     # newest valid step or None; loads in place
    trainer.checkpointer                         # the Checkpointer (None without this section)

What is saved: ``trainer.module``, ``trainer.optimizer``, the Trainer itself (its step, loss
scale, LR scheduler and every other plugin's state, e.g. compression error buffers), everything
in ``trainer.stateful`` and the RNG states. Under FSDP2 the model and optimizer state are
DTensors: the Checkpointer saves each rank's shards and reshards on restore. A save starts in ``after_optimizer_step``; the lazy wait for the background copy
happens in ``before_optimizer_step`` (the next step is the first thing that changes the tensors).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from heddle.checkpoint import Checkpointer
from heddle.dist import is_sharded
from heddle.plugins.base import TrainerPlugin


def _ddp_rewrites_buffers(trainer) -> bool:
    """DDP with broadcast_buffers copies rank 0's buffers into every rank's (rank 0's too) before
    each forward; persistent buffers (MoE layouts, running stats) are checkpoint state."""
    if trainer.ddp is None or not trainer.ddp.broadcast_buffers:
        return False
    return any(b is not None and name not in m._non_persistent_buffers_set
               for m in trainer.module.modules() for name, b in m._buffers.items())


@dataclass
class Config:
    directory: str | None = None
    every: int = 1
    keep: int = 3
    levels: tuple = ("memory", "disk")
    redundancy: str | None = None
    flush: str = "every"
    num_slots: int = 2
    start_fresh_on_corrupt: bool = False   # resume when every checkpoint is corrupt: start over instead of raising

    def __post_init__(self):
        if not self.directory:
            raise ValueError(f"checkpoint.directory={self.directory!r}: a directory is required")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"checkpoint.every={self.every!r} must be an int >= 1")


class Plugin(TrainerPlugin):
    name = "checkpoint"
    Config = Config

    def setup(self, trainer) -> None:
        c = self.config
        self.checkpointer = Checkpointer(c.directory, group=trainer.group, keep=c.keep, levels=tuple(c.levels),
                                         redundancy=c.redundancy, flush=c.flush, num_slots=c.num_slots,
                                         start_fresh_on_corrupt=c.start_fresh_on_corrupt)
        self.saves = 0
        self.stall_s = 0.0   # this step's time blocked on checkpointing (lazy wait + save call)

    def state(self, trainer) -> dict:
        return {"model": trainer.module, "optimizer": trainer.optimizer, "trainer": trainer, **trainer.stateful}

    @staticmethod
    def replicated(trainer) -> tuple[str, ...]:
        """Keys identical on every rank, saved once: the model and optimizer under DDP without
        heddle-sharded parameters (every rank applies the same summed gradients). FSDP2 state is
        DTensor shards; per-rank plugin state (error feedback) lives in "trainer"."""
        if trainer.world_size == 1 or trainer.config.data_parallel != "ddp":
            return ()
        if any(is_sharded(p) for p in trainer.module.parameters()):
            return ()
        return ("model", "optimizer")

    def resume(self, trainer, *, step: int | None = None) -> int | None:
        """Load the newest valid checkpoint (collective); returns its step or None."""
        return self.checkpointer.restore(self.state(trainer), step=step)

    def before_optimizer_step(self, trainer) -> None:
        start = time.perf_counter()
        self.checkpointer.wait_for_snapshot()
        self.stall_s = time.perf_counter() - start

    def after_optimizer_step(self, trainer) -> None:
        if trainer.step_count % self.config.every == 0:
            start = time.perf_counter()
            self.checkpointer.save(trainer.step_count, self.state(trainer), replicated=self.replicated(trainer))
            if _ddp_rewrites_buffers(trainer):
                # DDP broadcasts the buffers into place at the next forward, which would tear the
                # lazy snapshot (TornSnapshot): copy them to host memory now; the disk write stays lazy
                self.checkpointer.wait_for_snapshot()
            self.stall_s += time.perf_counter() - start
            self.saves += 1

    def on_skipped_step(self, trainer) -> None:
        self.stall_s = 0.0

    def metrics(self, trainer) -> dict[str, float]:
        return {"checkpoints_saved": float(self.saves), "checkpoint_stall_s": self.stall_s}

    def close(self) -> None:
        # a clean finish stops the keeper (its memory snapshots are on disk too); a crashed
        # worker never gets here, so the keeper survives it for the restart
        self.checkpointer.close(shutdown_keeper_process=True)
