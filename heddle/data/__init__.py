"""Data for the examples and tests: byte corpora every machine has, deterministic samplers."""

from heddle.data.lengths import DISTRIBUTIONS, sample_lengths
from heddle.data.text import ByteCorpus, WindowSampler, stdlib_source_bytes
from heddle.data.token_files import TokenDataset, build_byte_dataset, write_token_file
from heddle.data.token_sampler import TokenBudgetSampler

__all__ = ["ByteCorpus", "WindowSampler", "stdlib_source_bytes",
           "DISTRIBUTIONS", "sample_lengths", "TokenDataset", "build_byte_dataset", "write_token_file",
           "TokenBudgetSampler"]
