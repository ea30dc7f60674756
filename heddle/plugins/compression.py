"""Trainer section ``compression``: compressed gradient sync through heddle.compress.

    TrainerConfig(compression={"compressor": "topk:0.01", "feedback": "econtrol", "lgreco": True})

With DDP (world > 1) the plugin registers ``GradientCompression.hook`` with ``reduction="sum"``
(the Trainer's contract: gradients hold the sum over ranks; it divides by the global token count
afterwards). Under FSDP2 / HSDP it replaces every FSDP module's reduce-scatter
(``GradientCompression.attach_fsdp``): each rank keeps the error feedback of what it sends.
Without a wrapper (adaptive SP) it is the one owner of the gradient sum (``comp.all_reduce``).

Steps are staged by the compressor: ``commit_step`` after the optimizer step, ``discard_step``
when the Trainer skips the step on every rank (a non-finite value anywhere, ``local_nonfinite``
reports this rank's).
"""

from __future__ import annotations

from dataclasses import dataclass

from heddle.compress import (EF21, EControl, ErrorFeedback, GradientCompression, Identity, LGreCo,
                             PowerSGD, Quantize, RandomK, TopK)
from heddle.dist import is_sharded
from heddle.plugins.base import TrainerPlugin

FEEDBACKS = ("none", "ef", "ef21", "econtrol")


def parse_compressor(spec: str):
    """"topk:0.01" | "randomk:0.01" | "quantize:4" | "powersgd:4" | "identity" -> a Compressor."""
    name, _, arg = spec.partition(":")
    try:
        if name == "topk":
            return TopK(float(arg or 0.01))
        if name == "randomk":
            return RandomK(float(arg or 0.01))
        if name == "quantize":
            return Quantize(int(arg or 4))
        if name == "powersgd":
            return PowerSGD(int(arg or 4))
        if name == "identity" and not arg:
            return Identity()
    except ValueError as exc:
        raise ValueError(f"compressor={spec!r}: {exc}") from exc
    raise ValueError(f"compressor={spec!r}: valid are topk:<density>, randomk:<density>, "
                     "quantize:<bits>, powersgd:<rank>, identity")


def make_feedback(name: str, eta: float):
    if name not in FEEDBACKS:
        raise ValueError(f"feedback={name!r}: valid are {FEEDBACKS}")
    if name == "econtrol":
        return EControl(eta)
    return {"none": None, "ef": ErrorFeedback(), "ef21": EF21()}[name]


@dataclass
class Config:
    compressor: str = "topk:0.01"
    feedback: str = "ef"              # none | ef | ef21 | econtrol
    eta: float = 0.05                 # EControl
    lgreco: bool = False
    error_budget: float = 1.0
    retune_every: int = 1000
    sample_steps: int = 10
    start_iter: int = 10
    seed: int = 0

    def __post_init__(self):
        parse_compressor(self.compressor)
        make_feedback(self.feedback, self.eta)


class Plugin(TrainerPlugin):
    name = "compression"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        adaptive = (LGreCo(config.error_budget, retune_every=config.retune_every,
                           sample_steps=config.sample_steps) if config.lgreco else None)
        self.comp: GradientCompression | None = None
        self._args = dict(feedback=make_feedback(config.feedback, config.eta), adaptive=adaptive,
                          start_iter=config.start_iter, reduction="sum", seed=config.seed)

    def setup(self, trainer) -> None:
        self.comp = GradientCompression(parse_compressor(self.config.compressor), group=trainer.group,
                                        **self._args).bind(trainer.module)

    def configure_ddp(self, trainer, ddp) -> bool:
        ddp.register_comm_hook(self.comp, self.comp.hook)
        return True

    def configure_fsdp(self, trainer, fsdp_modules) -> bool:
        self.comp.attach_fsdp(fsdp_modules[-1])
        return True

    def reduce_gradients(self, trainer) -> bool:
        # called only when no DDP / FSDP wrapper syncs (the Trainer's manual sum, world > 1)
        named = [(n, p.grad) for n, p in trainer.module.named_parameters()
                 if p.grad is not None and not is_sharded(p)]
        self.comp.all_reduce([g for _, g in named], names=[n for n, _ in named])
        return True

    def local_nonfinite(self, trainer) -> bool:
        return self.comp.saw_nonfinite

    def on_skipped_step(self, trainer) -> None:
        self.comp.discard_step()

    def after_optimizer_step(self, trainer) -> None:
        self.comp.commit_step()

    def metrics(self, trainer) -> dict[str, float]:
        s = self.comp.stats
        if not s:
            return {}
        return {"compress_bits_per_element": s["bits_per_element"],
                "compress_error": s["compression_error"], "compress_bytes_sent": float(s["bytes_sent"])}

    def state_dict(self) -> dict:
        return self.comp.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.comp.load_state_dict(state)
