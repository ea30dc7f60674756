"""Driver for test_configs.py: train examples/train_lm.py on each config file in turn inside one
launch (``torchrun --nproc-per-node 2 run_configs.py OUT CONFIG...``), so the test pays for one
process start instead of one per file. Each rank writes OUT/<name>.r<rank>.json with "ok" and
the losses, or "error" and the traceback; on an error the rank exits at once (the launcher then
stops the others) and the test starts a new launch for the files left."""

import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
TINY = ["--steps", "3", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--asp-tokens", "512", "--asp-max-len", "128", "--log-every", "1"]


def main() -> None:
    import train_lm

    out, configs = Path(sys.argv[1]), [Path(c) for c in sys.argv[2:]]
    rank = int(os.environ.get("RANK", "0"))
    for config in configs:
        work = out / config.stem
        work.mkdir(parents=True, exist_ok=True)
        os.chdir(work)  # relative checkpoint / log directories of the file land here
        result = out / f"{config.name}.r{rank}.json"
        try:
            losses = train_lm.main(["--config", str(config), *TINY, "--log-dir", str(work / "metrics")])
            result.write_text(json.dumps({"status": "ok", "losses": [float(x) for x in losses]}))
        except BaseException:  # noqa: BLE001 - reported to the test, then this launch ends
            result.write_text(json.dumps({"status": "error", "traceback": traceback.format_exc()}))
            sys.stdout.flush()
            os._exit(1)
        import torch.distributed as dist

        dist.barrier()


if __name__ == "__main__":
    main()
