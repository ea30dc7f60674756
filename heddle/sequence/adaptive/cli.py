"""``heddle plan``: print the adaptive sequence-parallel plan for one global batch.

    heddle plan lengths.txt --preset a100-80g-ib --devices 64      # one length per line (or spaces)
    heddle plan docs.arrow --cost-model calibrated.json --devices 4 # a list<int32> token file
    heddle plan --generate code --seqs 512 --preset h100-80g-ib     # generated long-tailed lengths
"""

from __future__ import annotations

import argparse
import sys

from heddle.sequence.adaptive.cost_model import PRESETS, CostModel
from heddle.sequence.adaptive.planner import plan_batch


def read_lengths(path: str) -> list[int]:
    """Lengths from a text file (integers separated by whitespace or commas) or, for .arrow /
    .parquet, the sequence lengths of a token file."""
    if path.endswith((".arrow", ".parquet", ".feather")):
        from heddle.data import TokenDataset

        return TokenDataset(path).lengths.tolist()
    with open(path) as f:
        text = f.read().replace(",", " ")
    out = []
    for i, word in enumerate(text.split()):
        try:
            out.append(int(word))
        except ValueError:
            raise ValueError(f"{path}: entry {i} is {word!r}, not an integer length") from None
    return out


def _micro(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor an integer") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heddle plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lengths", nargs="?", help="text file of lengths, or an .arrow/.parquet token file")
    p.add_argument("--generate", choices=("code", "web", "encyclopedia"), help="generated lengths instead of a file")
    p.add_argument("--seqs", type=int, default=512, help="sequences to generate")
    p.add_argument("--max-len", type=int, default=192 * 1024, help="context length for generated lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="a100-80g-ib", help=f"cost model preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--cost-model", help="a cost model JSON (CostModel.save / calibrate); overrides --preset")
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--max-tokens-per-device", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=0.5)
    p.add_argument("--micro-batches", type=_micro, default="auto", help="'auto' or the most micro-batches a lane may run")
    p.add_argument("--solver", choices=("milp", "greedy"), default="milp")
    p.add_argument("--rows", type=int, default=40, help="lanes shown in the table")
    p.add_argument("--json", help="also write the plan as JSON to this path")
    args = p.parse_args(argv)
    try:
        if args.generate:
            from heddle.data import sample_lengths

            lengths = sample_lengths(args.generate, args.seqs, max_len=args.max_len, seed=args.seed).tolist()
        elif args.lengths:
            lengths = read_lengths(args.lengths)
        else:
            p.error("give a lengths file or --generate KIND")
        cm = CostModel.load(args.cost_model) if args.cost_model else CostModel.preset(args.preset)
        plan = plan_batch(lengths, args.devices, cm, max_tokens_per_device=args.max_tokens_per_device,
                          time_limit=args.time_limit, solver=args.solver,
                          micro_batches=args.micro_batches)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"heddle plan: {e}", file=sys.stderr)
        return 2
    print(plan.table(max_rows=args.rows))
    if args.json:
        with open(args.json, "w") as f:
            f.write(plan.to_json())
    return 0
