"""Every ```python block in README.md and docs/*.md runs as written, each on its own, in a fresh
directory: at 1 process, or at N when its first line says ``# heddle run -n N <name>.py``.

A block opts out only with a visible first line ``# not run by the docs test: <why>`` (e.g. it
needs a GPU or a cluster); the reason must be given. A fragment with undefined names fails here:
make it complete instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
OPT_OUT = re.compile(r"^# not run by the docs test: (?P<why>\S.*)$")
PROCESSES = re.compile(r"^# heddle run -n (?P<n>\d+) \S+\.py")
TIMEOUT_S = 240
# pages whose snippets a dedicated test already runs (more strictly): not run twice
COVERED_ELSEWHERE = {"trainer.md": "tests/trainer/test_docs_snippet.py"}


def snippets(pages=PAGES):
    """(page, first line number, code) of every python block."""
    out = []
    for page in pages:
        text = page.read_text()
        for m in FENCE.finditer(text):
            indent = m.group("indent")
            code = "".join(line[len(indent):] if line.startswith(indent) else line
                           for line in m.group("code").splitlines(keepends=True))
            out.append((page, text[:m.start()].count("\n") + 1, code))
    return out


def run_snippet(code: str, workdir: Path, *, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    match = PROCESSES.match(first)
    nproc = int(match.group("n")) if match else 1
    script = workdir / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(script)]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


ALL = [s for s in snippets() if s[0].name not in COVERED_ELSEWHERE]


def test_pages_covered_elsewhere_have_their_test():
    for page, test in COVERED_ELSEWHERE.items():
        assert (ROOT / "docs" / page).exists() and (ROOT / test).exists(), (page, test)
        assert page in (ROOT / test).read_text()


def test_there_are_snippets_and_opt_outs_say_why():
    assert len(ALL) >= 8
    for page, line, code in snippets():
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        if first.startswith("# not run by the docs test"):
            assert OPT_OUT.match(first), f"{page.name}:{line}: an opt-out must say why: {first!r}"


def test_extractor_handles_indented_blocks_and_opt_outs(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n```python\nprint(1)\n```\n- item\n\n  ```python\n  x = 2\n  print(x)\n  ```\n"
                    "```bash\nls\n```\n")
    found = snippets([page])
    assert [(line, code) for _, line, code in found] == [(2, "print(1)\n"), (7, "x = 2\nprint(x)\n")]
    bad = tmp_path / "bad"
    bad.mkdir()
    run = run_snippet("print(undefined_name)\n", bad)
    assert run.returncode != 0 and "NameError" in run.stderr  # a fragment fails


@pytest.mark.parametrize("page,line,code", ALL, ids=[f"{p.name}:{line}" for p, line, _ in ALL])
def test_snippet_runs(page, line, code, tmp_path):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    why = OPT_OUT.match(first)
    if why:
        pytest.skip(f"{page.name}:{line} opts out: {why.group('why')}")
    run = run_snippet(code, tmp_path)
    assert run.returncode == 0, (f"{page.relative_to(ROOT)}:{line} failed (exit {run.returncode}):\n"
                                 f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
