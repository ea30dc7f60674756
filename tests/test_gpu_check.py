"""heddle.gpu_check (make gpu-check): the no-CUDA line, and every check's logic run on the CPU."""

import subprocess
import sys

import torch

from heddle import gpu_check


def test_without_cuda_one_line_and_exit_0(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("gpu-check: no CUDA device on this machine")


def test_every_check_passes_on_the_cpu():
    run = subprocess.run([sys.executable, "-m", "heddle.gpu_check", "--device", "cpu"], capture_output=True,
                         text=True, timeout=400, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    names = [name for name, _ in gpu_check.planned_checks(torch.device("cpu"))]
    assert names == ["kernels", "ulysses-sdpa-math", "checkpoint", "trainer-bf16"]
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert sorted(rows) == sorted(names) and all(" PASS " in row for row in rows.values())
    assert "bit for bit" in rows["kernels"] and "restore bit for bit (from memory)" in rows["checkpoint"]
    assert lines[-1].startswith("4 passed, 0 failed")


def test_failures_and_budget_are_rows(monkeypatch):
    def broken(device, quick):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "planned_checks", lambda device: [("a", broken), ("b", broken)])
    results = gpu_check.run_checks(torch.device("cpu"), quick=True)
    assert [(r.name, r.ok) for r in results] == [("a", False), ("b", False)]
    assert "RuntimeError: kernel exploded" in results[0].detail
    monkeypatch.setattr(gpu_check, "planned_checks", lambda device: [("a", lambda d, q: (True, "fine", {}))])
    spent = gpu_check.run_checks(torch.device("cpu"), quick=True, budget_s=-1)
    assert not spent[0].ok and "budget" in spent[0].detail
    table = gpu_check.format_table(results, "header")
    assert table.splitlines()[-1] == f"0 passed, 2 failed in {sum(r.seconds for r in results):.1f} s"
    assert gpu_check.ulysses_backends(torch.device("cpu")) == ["sdpa-math"]
