"""The interface a feature implements to plug into :class:`heddle.Trainer`.

A plugin lives in ``heddle/plugins/<section>.py`` and defines ``Config`` (a dataclass: the
TrainerConfig section) and ``Plugin(TrainerPlugin)``. The Trainer calls the hooks in this order:

    setup -> [DDP or FSDP2 is applied] -> configure_ddp / configure_fsdp -> [optimizer is built]
    per step: split_batch (a section that plans the micro-batches itself, else the Trainer slices)
    per micro-batch: prepare_batch, (the user's forward) auxiliary_loss, (trainer.backward)
    per step: reduce_gradients -> local_nonfinite -> (skipped on every rank: on_skipped_step)
              or (before_optimizer_step -> optimizer.step -> after_optimizer_step) -> metrics

Every hook has a do-nothing default, so a plugin overrides only what it needs. Plugins never
import each other and never set attributes on the Trainer; what they share goes through the
Trainer's declared fields (``trainer.module``, ``trainer.layout``, ``trainer.optimizer``,
``trainer.group``, ``trainer.stateful``). A caller reaches a plugin with ``trainer.plugin(name)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from heddle.trainer import Trainer


class TrainerPlugin:
    name = "plugin"
    # True: this plugin runs forward/backward itself and sums the gradients in reduce_gradients,
    # so the Trainer builds no DDP wrapper (DDP cannot follow ranks that run different numbers of
    # micro-batches).
    replaces_ddp = False
    # True: ranks run a different number of micro-batches per step (the plugin's split_batch)
    variable_micro_batches = False
    # the checkpoint section's Checkpointer; the Trainer exposes it as trainer.checkpointer
    checkpointer = None
    Config: type = object  # the section's dataclass (set by each plugin class)

    def __init__(self, config: Any):
        self.config = config

    def setup(self, trainer: "Trainer") -> None:
        """Before data parallelism: change the model in place, mark sharded parameters (the
        groups come from ``trainer.layout``)."""

    def configure_ddp(self, trainer: "Trainer", ddp) -> bool:
        """After DDP is built. Return True if this plugin registered DDP's comm hook."""
        return False

    def configure_fsdp(self, trainer: "Trainer", fsdp_modules: list) -> bool:
        """After FSDP2 is applied (blocks first, root last). Return True if this plugin registered
        a custom reduce-scatter."""
        return False

    def split_batch(self, trainer: "Trainer", batch: dict):
        """None, or an iterator of this rank's prepared micro-batches of the step's ``batch``."""
        return None

    def auxiliary_loss(self, trainer: "Trainer", num_tokens) -> "torch.Tensor | None":
        """A term the Trainer adds to the micro-batch's loss before backward (same units: a token
        sum when ``num_tokens`` is given, a mean otherwise)."""
        return None

    def prepare_batch(self, trainer: "Trainer", batch: dict) -> dict:
        """Turn the user's batch into what this rank feeds the model (e.g. its sequence shard)."""
        return batch

    def reduce_gradients(self, trainer: "Trainer") -> bool:
        """Only without a DDP / FSDP wrapper: return True if this plugin summed the replicated
        gradients across ``trainer.group`` itself; the Trainer then does not (one owner only)."""
        return False

    def local_nonfinite(self, trainer: "Trainer") -> bool:
        """True if this rank saw a non-finite value in its part of the step (e.g. a compressor's
        input). The Trainer ORs it over every rank with the loss and gradient checks; it rides the
        step's [loss, tokens] all-reduce."""
        return False

    def on_skipped_step(self, trainer: "Trainer") -> None:
        """The step was skipped on every rank (non-finite values): discard whatever this plugin
        staged during the step so that no state changes."""

    def before_optimizer_step(self, trainer: "Trainer") -> None:
        pass

    def after_optimizer_step(self, trainer: "Trainer") -> None:
        pass

    def metrics(self, trainer: "Trainer") -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass
