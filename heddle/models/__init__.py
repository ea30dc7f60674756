"""Reference models used by the examples, tests and benchmarks."""

from heddle.models.attention import local_attention
from heddle.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "local_attention"]
