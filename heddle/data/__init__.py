"""Data for the examples and tests: byte corpora every machine has, deterministic samplers."""

from heddle.data.cache import cache_dir, cached_byte_dataset, cached_file, stdlib_documents
from heddle.data.lengths import DISTRIBUTIONS, sample_lengths
from heddle.data.text import ByteCorpus, WindowSampler, stdlib_source_bytes, stdlib_source_files
from heddle.data.token_files import TokenDataset, build_byte_dataset, write_token_file
from heddle.data.token_sampler import TokenBudgetSampler

__all__ = ["ByteCorpus", "WindowSampler", "stdlib_source_bytes", "stdlib_source_files", "stdlib_documents",
           "cache_dir", "cached_file", "cached_byte_dataset",
           "DISTRIBUTIONS", "sample_lengths", "TokenDataset", "build_byte_dataset", "write_token_file",
           "TokenBudgetSampler"]
