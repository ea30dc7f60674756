"""The shared start of every ``benchmarks/*.py`` script: options, threads, process group."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

import heddle


def script_setup(description: str | None, add_options: Sequence[Callable[[argparse.ArgumentParser], None]],
                 argv: list[str] | None = None, *, warmup: int | None = None, trials: int | None = None,
                 threads: bool = True) -> tuple[argparse.Namespace, int, int]:
    """Parse the common options (``--warmup``/``--trials`` when given defaults, ``--threads``,
    ``--markdown``) plus each ``add_options(parser)``; pin torch's thread count; start (or adopt)
    the process group. Returns ``(options, rank, world_size)``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup)
    if trials is not None:
        parser.add_argument("--trials", type=int, default=trials)
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    for add in add_options:
        add(parser)
    options = parser.parse_args(argv)
    if threads:
        torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    heddle.init_distributed()
    return options, dist.get_rank(), dist.get_world_size()
