"""docs/trainer.md's snippets run as written at 2 processes (each in its own namespace, in a
fresh working directory), and the first one feeds the two ranks different rows (dp_rank is set
without the SP section) and ends with the same loss on both."""

import os
import re

from tests.conftest import run_distributed

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "trainer.md")


def snippets() -> list[str]:
    with open(DOC) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def _run(rank, world, codes, cwd):
    import hashlib

    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    out = []
    for code in codes:
        ns = {"__name__": "__main__"}
        exec(compile(code, DOC, "exec"), ns)
        x = ns.get("x")
        out.append({"rows": hashlib.sha1(x.numpy().tobytes()).hexdigest() if x is not None else None,
                    "loss": ns["metrics"]["loss"] if "metrics" in ns else None})
    return out


def test_trainer_md_snippets_run_at_2_processes(tmp_path):
    codes = snippets()
    assert len(codes) >= 2
    ranks = run_distributed(_run, 2, codes, str(tmp_path), timeout=600)
    first = [r[0] for r in ranks]
    assert first[0]["rows"] != first[1]["rows"], "both ranks trained on the same rows"
    assert first[0]["loss"] == first[1]["loss"] and first[0]["loss"] < 5.0
