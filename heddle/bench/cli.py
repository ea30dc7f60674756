"""``heddle bench``: run a benchmark scenario, the quick set, or report on a results directory.

    heddle bench list                                  scenarios found in heddle/bench/scenarios/
    heddle bench collectives --nproc 2 --max-bytes 16M nccl-tests-style sweep, verified
    heddle bench training --nproc 2 --config '{"max_grad_norm": 1.0}' --config cfg.json
    heddle bench quick --nproc 2 --out heddle-results  every scenario at small sizes (make bench)
    heddle bench report heddle-results [--markdown docs/benchmarks.md]
    heddle bench NAME --help                           a scenario's own options

Multi-node: run the same command on every node with --nnodes, --node-rank, --master-addr
(torchrun's rendezvous), or start it under mpirun / srun / torchrun, which heddle detects.
"""

from __future__ import annotations

import json
import os
import sys


def _usage() -> str:
    from heddle.bench.registry import discover

    found, broken = discover()
    lines = [__doc__.strip(), "", "scenarios:"]
    for name, scenario in sorted(found.items()):
        lines.append(f"  {name:22s} {scenario.help}")
    for module, error in sorted(broken.items()):
        lines.append(f"  {module:22s} BROKEN: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and os.environ.get("HEDDLE_BENCH_ARGV"):  # a worker started by heddle.bench.runner
        argv = json.loads(os.environ["HEDDLE_BENCH_ARGV"])
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command = argv[0]
    if command == "list":
        print(_usage())
        return 0
    if command == "report":
        from heddle.bench.report import main as report_main

        return report_main(argv[1:])
    if command == "quick":
        from heddle.bench.quick import main as quick_main

        return quick_main(argv[1:])
    from heddle.bench import registry, runner

    try:
        scenario = registry.get(command)
    except ValueError as e:
        print(f"heddle bench: {e}", file=sys.stderr)
        return 2
    from heddle.launch.options import OneLineParser

    parser = OneLineParser(prog=f"heddle bench {scenario.name}", description=scenario.help)
    runner.add_common_options(parser)
    scenario.add_options(parser)
    options = parser.parse_args(argv[1:])
    try:  # in the launcher, before any worker starts: one line, not a traceback per rank
        runner.check_common_options(options)
        scenario.check_options(options)
    except (ValueError, TypeError) as e:
        print(f"heddle bench {scenario.name}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return runner.run(scenario, options, argv)


if __name__ == "__main__":
    sys.exit(main())
