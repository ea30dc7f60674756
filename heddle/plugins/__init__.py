"""Trainer plugins: one module per TrainerConfig section (see base.py for the interface)."""

from heddle.plugins.base import TrainerPlugin

__all__ = ["TrainerPlugin"]
