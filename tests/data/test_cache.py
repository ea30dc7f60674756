"""heddle.data.cache: content-addressed dataset cache, built once across concurrent processes."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from heddle.data import ByteCorpus, cached_file, stdlib_documents, stdlib_source_bytes
from heddle.data.text import stdlib_source_chunks


def _build_concurrently(directory, marker, barrier):
    def build(tmp):
        with open(marker, "a") as f:  # counts how many processes ran the build
            f.write(f"{os.getpid()}\n")
        with open(tmp, "w") as f:
            f.write("built")

    barrier.wait()
    path = cached_file("thing.txt", build, directory=directory)
    with open(path) as f:
        return f.read()


def _worker(directory, marker, barrier, results):
    results.put(_build_concurrently(directory, marker, barrier))


def test_built_once_across_processes(tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    marker = tmp_path / "builds"
    procs = [ctx.Process(target=_worker, args=(tmp_path / "cache", marker, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in procs) == ["built"] * 3
    assert len(marker.read_text().split()) == 1
    assert sorted(os.listdir(tmp_path / "cache")) == ["thing.txt", "thing.txt.lock"]  # no temp files left


def test_failed_build_leaves_nothing(tmp_path):
    def build(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cached_file("x.arrow", build, directory=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["x.arrow.lock"]
    with pytest.raises(ValueError, match="plain file name"):
        cached_file("a/b", build, directory=tmp_path)


def test_stdlib_documents_are_the_byte_corpus(tmp_path, capsys):
    max_bytes = 300_000
    whole = stdlib_documents(None, max_bytes=max_bytes, directory=tmp_path, show_progress=True)
    joined = np.concatenate([whole[i] for i in range(len(whole))]).astype(np.uint8).tobytes()
    # the bytes of ByteCorpus.stdlib, minus files of 0-1 bytes (they hold no training pair)
    corpus = bytes(ByteCorpus.stdlib(max_bytes, val_fraction=0.0).train.numpy())
    assert corpus == stdlib_source_bytes(max_bytes)
    assert joined == b"".join(c for c in stdlib_source_chunks(max_bytes) if len(c) >= 2)
    assert len(corpus) - len(joined) < 64
    assert "building" in capsys.readouterr().err
    cut = stdlib_documents(100, max_bytes=max_bytes, directory=tmp_path, show_progress=False)
    assert cut.lengths.max() == 100 and cut.path != whole.path  # different content, different name
    again = stdlib_documents(100, max_bytes=max_bytes, directory=tmp_path, show_progress=True)
    assert again.path == cut.path and "building" not in capsys.readouterr().err
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".arrow")]) == 2


def test_cache_dir_env(tmp_path, monkeypatch):
    from heddle.data import cache_dir

    monkeypatch.setenv("HEDDLE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("HEDDLE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "heddle"


def test_cached_byte_dataset_follows_content(tmp_path):
    from heddle.data import cached_byte_dataset

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_bytes(b"x" * 30)
    (src / "b.txt").write_bytes(b"hello world")
    cache = tmp_path / "cache"
    first = cached_byte_dataset(src, max_len=8, directory=cache)
    assert sorted(first.lengths.tolist()) == [3, 6, 8, 8, 8, 8]  # 30 = 8+8+8+6, 11 = 8+3
    assert cached_byte_dataset(src, max_len=8, directory=cache).path == first.path
    (src / "b.txt").write_bytes(b"hello there")  # same size, new bytes: a new name
    assert cached_byte_dataset(src, max_len=8, directory=cache).path != first.path
