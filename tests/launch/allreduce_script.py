"""Launched by tests: bootstrap through heddle.init_distributed and write what each rank saw."""

import json
import sys

import torch
import torch.distributed as dist

import heddle
import heddle.dist as hd

heddle.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
hd.all_reduce(t)
with open(f"{sys.argv[1]}.{rank}", "w") as f:
    json.dump({"rank": rank, "world": world, "sum": float(t), "local_rank": hd.local_rank(),
               "backend": dist.get_backend()}, f)
dist.destroy_process_group()
