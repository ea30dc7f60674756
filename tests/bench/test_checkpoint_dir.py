"""benchmarks/checkpoint.py --dir X (heddle bench checkpoint --dir X) works when X does not exist."""

import os

from heddle.bench.scenarios.checkpoint import shared_tempdir


def test_dir_is_created(tmp_path):
    parent = tmp_path / "not" / "there"
    path = shared_tempdir(str(parent), "case-", None)
    assert os.path.isdir(path) and os.path.dirname(path) == str(parent)
