"""heddle.loggers: CSV / JSONL / TensorBoard metrics, one row per logged step."""

import csv
import json

import pytest

from heddle.loggers import COLUMNS, MetricsLogger, NullLogger, build_logger


def rows(step):
    return {"loss": 2.0 / step, "tokens_per_s": 1000.0 * step, "grad_norm": float("nan"),
            "bytes_sent": 4096.0, "checkpoint_stall_s": 0.01, "skipped_steps": 0.0, "lr": 3e-3}


def test_csv_and_jsonl_one_row_per_step(tmp_path):
    logger = build_logger(str(tmp_path / "run"), tensorboard=False)
    assert isinstance(logger, MetricsLogger)
    for step in (1, 2, 3):
        logger.log(step, rows(step))
    logger.close()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [*COLUMNS, "lr"]
    assert [int(r["step"]) for r in table] == [1, 2, 3]
    assert float(table[1]["loss"]) == 1.0 and table[0]["grad_norm"] == ""  # NaN: empty cell
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[2]["tokens_per_s"] == 3000.0 and lines[0]["grad_norm"] is None
    # a resumed run appends under the same header
    logger = build_logger(str(tmp_path / "run"), tensorboard=False)
    logger.log(4, {"loss": 0.5, "new_metric": 1.0})
    logger.close()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4] and table[3]["tokens_per_s"] == ""
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readlines()[-1])["new_metric"] == 1.0


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra; this checks the TB path")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = build_logger(str(tmp_path), tensorboard=True)
    for step in (1, 2):
        logger.log(step, rows(step))
    logger.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [e.value for e in acc.Scalars("loss")] == [2.0, 1.0]
    assert "grad_norm" not in acc.Tags()["scalars"]  # NaN is not plotted


def test_none_is_a_no_op(tmp_path):
    logger = build_logger(None)
    assert isinstance(logger, NullLogger)
    logger.log(1, {"loss": 1.0})
    logger.close()
    with pytest.raises(TypeError, match="log_dir=3"):
        build_logger(3)
