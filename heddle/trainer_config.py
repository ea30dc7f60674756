"""TrainerConfig: the Trainer's options and its feature sections (one per plugin in
:data:`heddle.plugins.SECTIONS`), read from / written to files by :mod:`heddle.config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heddle.dist.mesh import DATA_PARALLEL
from heddle.plugins import SECTIONS, TrainerPlugin

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainerConfig:
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    data_parallel: str = "ddp"        # "ddp" | "fsdp" | "hsdp" | "none" (see heddle.dist.mesh)
    dp_shard: int | None = None       # hsdp: ranks sharding one replica (x sp); None: from dp_replicate / node
    dp_replicate: int | None = None   # hsdp: replicas
    precision: str = "fp32"           # "fp32" | "bf16" | "fp16"
    reshard_after_forward: bool = True  # FSDP2: free gathered block parameters after forward
    on_nonfinite: str = "skip"        # "skip" | "raise"
    loss_scale: float = 2.0 ** 16     # fp16: initial loss scale
    loss_scale_growth_interval: int = 2000  # fp16: double the scale after this many good steps
    collective_timeout_s: float | None = None  # end the process when a collective blocks this long
    place_model: bool = True          # move the model to heddle.dist.device() (and batches in prepare_batch)
    log_dir: str | None = None        # rank 0 writes metrics there (heddle.loggers.build_logger)
    bucket_cap_mb: float = 25.0
    find_unused_parameters: bool = False
    total_steps: int | None = None    # for the progress bar
    progress: bool = True             # rich progress bar on rank 0 (a log line when not a TTY)
    log_every: int = 10
    # Feature sections: a section's Config, a dict of its fields, True for its defaults, or None.
    sequence_parallel: Any = None
    adaptive_sequence_parallel: Any = None
    moe: Any = None
    compression: Any = None
    checkpoint: Any = None

    def __post_init__(self):
        if self.data_parallel is True or self.data_parallel is False:  # the old bool spelling
            self.data_parallel = "ddp" if self.data_parallel else "none"
        if self.data_parallel not in DATA_PARALLEL:
            raise ValueError(f"data_parallel={self.data_parallel!r}; valid: {', '.join(map(repr, DATA_PARALLEL))}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; valid: {', '.join(map(repr, PRECISIONS))}")
        if self.on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r}; valid: 'skip', 'raise'")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive or None")
        if self.bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb={self.bucket_cap_mb} must be positive")
        if not self.loss_scale > 0 or self.loss_scale_growth_interval < 1:
            raise ValueError(f"loss_scale={self.loss_scale} must be > 0 and loss_scale_growth_interval="
                             f"{self.loss_scale_growth_interval} >= 1")
        if self.collective_timeout_s is not None and not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s={self.collective_timeout_s} must be positive or None")

    @classmethod
    def from_file(cls, path: str, overrides: dict | None = None) -> "TrainerConfig":
        """Read a .toml / .yaml / .json file (heddle.config.load_config)."""
        from heddle.config import load_config

        return load_config(path, overrides)

    def to_file(self, path: str) -> None:
        from heddle.config import save_config

        save_config(self, path)


def _build_plugin(section: str, value: Any, plugin_cls: type[TrainerPlugin] | None = None) -> TrainerPlugin:
    plugin_cls = plugin_cls or SECTIONS[section]
    config_cls = plugin_cls.Config
    if value is True:
        value = config_cls()
    elif isinstance(value, dict):
        valid = {f for f in config_cls.__dataclass_fields__}
        unknown = sorted(set(value) - valid)
        if unknown:
            raise ValueError(f"TrainerConfig.{section}: unknown option(s) {unknown}; valid: {sorted(valid)}")
        value = config_cls(**value)
    elif not isinstance(value, config_cls):
        raise TypeError(f"TrainerConfig.{section}={value!r}: expected {config_cls.__module__}.Config, "
                        f"a dict of its fields, True or None")
    return plugin_cls(value)
