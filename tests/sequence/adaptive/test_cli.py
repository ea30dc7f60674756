"""``heddle plan`` prints a plan for a length file, an Arrow token file and generated lengths."""

from heddle.data import write_token_file
from heddle.launch.cli import main as heddle_main


def test_plan_cli(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("1000\n250000, 4000 90000\n" + " ".join(["3000"] * 60))
    assert heddle_main(["plan", str(lengths), "--preset", "h100-80g-ib", "--devices", "32",
                        "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "plan for 64 sequences" in out and "predicted step time" in out and "best homogeneous plan" in out
    assert "HiGHS" not in out
    assert (tmp_path / "plan.json").read_text().startswith("{")
    tokens = write_token_file(str(tmp_path / "docs.arrow"), [[1] * n for n in (5, 9, 30)])
    assert heddle_main(["plan", tokens, "--devices", "2", "--max-tokens-per-device", "16"]) == 0
    assert "plan for 3 sequences (44 tokens) on 2 devices" in capsys.readouterr().out
    assert heddle_main(["plan", "--generate", "web", "--seqs", "64", "--solver", "greedy", "--rows", "2"]) == 0
    assert "lanes not shown" in capsys.readouterr().out
    lengths.write_text("10 ten")
    assert heddle_main(["plan", str(lengths)]) == 2
    assert "entry 1 is 'ten'" in capsys.readouterr().err
