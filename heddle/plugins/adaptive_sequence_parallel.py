"""Trainer section ``adaptive_sequence_parallel``: FlexSP-style mixed sequence-parallel groups,
planned per step in the background (:mod:`heddle.sequence.adaptive`).

    trainer = heddle.Trainer(model, opt, heddle.TrainerConfig(adaptive_sequence_parallel={"cost_model": "calibrate"}))
    asp = trainer.adaptive_sp
    asp.submit(lengths_of_step_0)
    for step in ...:
        plan = asp.next_plan()                  # collective: identical on every rank
        asp.submit(lengths_of_next_step)        # planned while this step trains
        asp.run(trainer, plan, documents)       # forward+backward of this rank's share
        trainer.step()

setup: builds the subgroup cache (collective, once), swaps the model's core attention for
Ulysses, loads / calibrates the cost model, starts the background planner, and turns the
Trainer builds no DDP (``replaces_ddp``: ranks run different numbers of micro-batches, which DDP
cannot follow; this plugin sums the gradients over all ranks itself in ``reduce_gradients``).
``run`` backpropagates each micro-batch and reports the step's loss sum and token count with
``trainer.record_micro_batch``, so the Trainer divides by the global token
count like every other section: the update is the gradient of the global token mean.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from heddle.plugins.base import TrainerPlugin


@dataclass
class Config:
    cost_model: str = "calibrate"          # "calibrate", a preset name, or a CostModel JSON path
    max_tokens_per_device: int | None = None  # activation tokens per device (default: memory)
    device_bytes: float | None = None      # memory per device for calibration (default: RAM / local ranks)
    time_limit: float = 0.5                # planner budget per step, seconds
    solver: str = "milp"                   # "milp" or "greedy"
    planner: str = "process"               # background planner: "process" or "thread"
    calibration_lengths: tuple = (64, 128, 256, 512)

    def __post_init__(self):
        if self.solver not in ("milp", "greedy"):
            raise ValueError(f"adaptive_sequence_parallel.solver={self.solver!r}; valid: 'milp', 'greedy'")
        if not self.time_limit > 0:
            raise ValueError(f"adaptive_sequence_parallel.time_limit={self.time_limit} must be positive")


class Plugin(TrainerPlugin):
    name = "adaptive_sequence_parallel"
    Config = Config
    replaces_ddp = True  # ranks run different numbers of micro-batches: gradients summed in reduce_gradients

    def setup(self, trainer) -> None:
        from heddle.sequence.adaptive import CostModel
        from heddle.sequence.adaptive.background import BackgroundPlanner
        from heddle.sequence.adaptive.cost_model import PRESETS
        from heddle.sequence.adaptive.executor import AdaptiveExecutor
        from heddle.sequence.adaptive.planner import allowed_degrees

        if trainer.config.grad_accum_steps != 1:
            raise ValueError(f"adaptive_sequence_parallel plans the micro-batches itself: use grad_accum_steps=1, "
                             f"got {trainer.config.grad_accum_steps}")
        self.executor = AdaptiveExecutor(trainer.module, group=trainer.group)
        cfg = self.config
        if cfg.cost_model == "calibrate":
            self.cost_model = CostModel.calibrate(trainer.module, self.executor.pool, lengths=cfg.calibration_lengths,
                                                  device_bytes=cfg.device_bytes)
        elif cfg.cost_model in PRESETS:
            self.cost_model = CostModel.preset(cfg.cost_model)
        elif os.path.exists(cfg.cost_model):
            self.cost_model = CostModel.load(cfg.cost_model)
        else:
            raise ValueError(f"adaptive_sequence_parallel.cost_model={cfg.cost_model!r}: use 'calibrate', a preset "
                             f"({sorted(PRESETS)}) or the path of a CostModel JSON file")
        # Ulysses needs a query head per rank: no group larger than the fewest heads of any layer
        heads = [m.n_heads for m in trainer.module.modules() if hasattr(m, "n_heads")]
        limit = min([trainer.world_size] + heads)
        degrees = [d for d in allowed_degrees(trainer.world_size, self.cost_model) if d <= limit]
        self.planner = BackgroundPlanner(trainer.world_size, self.cost_model, group=trainer.group,
                                         max_tokens_per_device=cfg.max_tokens_per_device, degrees=degrees,
                                         time_limit=cfg.time_limit, solver=cfg.solver, mode=cfg.planner)
        self.last: dict[str, float] = {}
        trainer.adaptive_sp = self

    def submit(self, lengths) -> None:
        self.planner.submit(lengths)

    def next_plan(self):
        start = time.perf_counter()
        plan = self.planner.result()
        self.last = {"plan_wait_s": time.perf_counter() - start, "predicted_s": plan.predicted_time,
                     "lanes": float(len(plan.lanes())), "solve_s": plan.solve_time}
        return plan

    def run(self, trainer, plan, documents) -> None:
        """This rank's share of ``plan`` (documents: 1-D token tensors of length+1)."""
        start = time.perf_counter()
        loss_sum, tokens = self.executor.run(plan, documents)
        self.last["compute_s"] = time.perf_counter() - start
        trainer.record_micro_batch(float(loss_sum), num_tokens=tokens)

    def reduce_gradients(self, trainer) -> bool:
        self.executor.reduce_gradients()
        return True

    def metrics(self, trainer) -> dict[str, float]:
        return {f"asp_{k}": v for k, v in self.last.items()}

    def close(self) -> None:
        self.planner.close()
