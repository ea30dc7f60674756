"""Data for the examples and tests: byte corpora every machine has, deterministic samplers."""

from heddle.data.text import ByteCorpus, WindowSampler, stdlib_source_bytes

__all__ = ["ByteCorpus", "WindowSampler", "stdlib_source_bytes"]
