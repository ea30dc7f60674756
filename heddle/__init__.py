"""heddle: faster and safer large-model training on many devices."""

__version__ = "0.1.0"

from heddle.dist import init_distributed  # noqa: E402


def __getattr__(name):
    # The Trainer sits on top of every feature: import it only when asked for.
    if name in ("Trainer", "TrainerConfig"):
        from heddle import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'heddle' has no attribute {name!r}")


__all__ = ["init_distributed", "Trainer", "TrainerConfig", "__version__"]
