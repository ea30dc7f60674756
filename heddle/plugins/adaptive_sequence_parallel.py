"""Trainer section ``adaptive_sequence_parallel``: FlexSP-style mixed sequence-parallel groups,
planned per step in the background (:mod:`heddle.sequence.adaptive`).

    trainer = heddle.Trainer(model, opt, heddle.TrainerConfig(adaptive_sequence_parallel={"cost_model": "calibrate"}))
    for step in ...:
        step_batch = {"documents": docs, "next_lengths": lengths_of_the_next_step}   # same on every rank
        for batch in trainer.micro_batches(step_batch):   # this rank's share of the step's plan
            logits = trainer.model(batch["tokens"], position_ids=batch["position_ids"],
                                   cu_seqlens=batch["cu_seqlens"])
            trainer.backward(loss_sum(logits, batch["targets"]), num_tokens=(batch["targets"] != -100).sum())
        trainer.step()

setup: builds the subgroup cache (collective, once), swaps the model's core attention for
Ulysses, loads / calibrates the cost model and starts the background planner.
``split_batch`` takes the plan of the step's documents (submitted a step ahead through
``next_lengths``, else planned now), submits the next one so it is planned while this step
trains, and yields this rank's micro-batches, pointing the Ulysses modules at each one's cached
subgroup right before it is yielded. Ranks run different numbers of micro-batches, which DDP and
FSDP2 cannot follow (their collectives run per forward / backward), so the Trainer builds no
wrapper (``replaces_ddp``) and sums the gradients over all ranks once per step; it then divides by
the global token count like every other section: the update is the gradient of the global token
mean, whatever the plan.
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
    replaces_ddp = True  # ranks run different numbers of micro-batches: the Trainer sums once per step
    variable_micro_batches = True

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
            from heddle.progress import progress

            # tens of seconds on a CPU: say so on rank 0 instead of going quiet before step 1
            with progress(f"heddle: calibrating the adaptive-SP cost model on {trainer.world_size} rank(s), "
                          f"lengths {tuple(cfg.calibration_lengths)}", enabled=trainer.rank == 0):
                self.cost_model = CostModel.calibrate(trainer.module, self.executor.pool,
                                                      lengths=cfg.calibration_lengths, device_bytes=cfg.device_bytes)
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
        self.pending = False
        self.plan = None  # the plan of the step in progress (or the last one)

    def submit(self, lengths) -> None:
        self.planner.submit(lengths)
        self.pending = True

    def next_plan(self):
        start = time.perf_counter()
        plan = self.planner.result()
        self.pending = False
        self.plan = plan
        self.last = {"plan_wait_s": time.perf_counter() - start, "predicted_s": plan.predicted_time,
                     "lanes": float(len(plan.lanes())), "solve_s": plan.solve_time}
        return plan

    def split_batch(self, trainer, batch: dict):
        if "documents" not in batch:
            raise ValueError(f"adaptive_sequence_parallel: the step batch needs 'documents' (1-D token tensors of "
                             f"length + 1); got keys {sorted(batch)}")
        documents = list(batch["documents"])
        lengths = [len(d) - 1 for d in documents]
        if not self.pending:
            self.submit(lengths)
        plan = self.next_plan()
        if list(plan.lengths) != lengths:
            raise ValueError(f"the plan in flight is for lengths {list(plan.lengths)[:8]}..., but the step's documents "
                             f"have {lengths[:8]}...: pass next_lengths of the documents of the following step")
        if batch.get("next_lengths") is not None:
            self.submit(batch["next_lengths"])  # planned while this step trains
        return self._micro_batches(trainer, plan, documents)

    def _micro_batches(self, trainer, plan, documents):
        start = time.perf_counter()
        for x, y, pos, cu in self.executor.local_shards(plan, documents):
            yield {"tokens": x.to(trainer.device), "targets": y.to(trainer.device),
                   "position_ids": pos.to(trainer.device), "cu_seqlens": cu.to(trainer.device)}
        self.last["compute_s"] = time.perf_counter() - start

    def metrics(self, trainer) -> dict[str, float]:
        return {f"asp_{k}": v for k, v in self.last.items()}

    def close(self) -> None:
        self.planner.close()
