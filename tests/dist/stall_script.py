"""Launched by tests/dist/test_watchdog.py: every rank all-reduces in a loop; rank STALL_RANK
stops itself (SIGSTOP) after STALL_AFTER_S seconds of it (its heartbeat has reported collectives). The watchdog comes from
`heddle run --watchdog-timeout` through heddle.init_distributed."""

import os
import signal
import time

import torch
import torch.distributed as dist

import heddle
import heddle.dist as hd

heddle.init_distributed()
rank = dist.get_rank()
stall_rank, stall_after = int(os.environ["STALL_RANK"]), float(os.environ.get("STALL_AFTER_S", "1"))
t = torch.ones(8)
start = time.monotonic()
while True:
    if rank == stall_rank and time.monotonic() - start > stall_after:
        print(f"SIGSTOP {rank} {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    hd.all_reduce(t)
