"""Variable-length data: Arrow/Parquet token files (memory-mapped), byte dataset builder, length
generators, token-budget sampler with exact resume."""

import numpy as np
import pytest

from heddle.data import (DISTRIBUTIONS, TokenBudgetSampler, TokenDataset, build_byte_dataset, sample_lengths,
                         write_token_file)


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_token_file_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(-5, 2**31 - 1, size=int(n)) for n in rng.integers(0, 50, size=30)]
    path = write_token_file(str(tmp_path / f"t.{fmt}"), seqs)
    ds = TokenDataset(path)
    assert len(ds) == 30 and ds.lengths.tolist() == [len(s) for s in seqs]
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
    assert ds.tensor(3).dtype.is_floating_point is False and ds.tensor(3).tolist() == seqs[3].tolist()
    np.testing.assert_array_equal(ds[-1], seqs[-1])
    with pytest.raises(IndexError):
        ds[30]
    with pytest.raises(ValueError, match="column='ids' not in"):
        TokenDataset(path, column="ids")
    with pytest.raises(ValueError, match="outside int32"):
        write_token_file(str(tmp_path / "bad.arrow"), [[2**40]])


def test_byte_dataset_builder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"hello world, " * 10)  # 130 bytes
    (tmp_path / "src" / "b.md").write_bytes(b"x")                     # too short: no training pair
    (tmp_path / "src" / "c.bin").write_bytes(b"ignored suffix")
    path = build_byte_dataset(tmp_path / "src", str(tmp_path / "bytes.arrow"), max_len=50)
    ds = TokenDataset(path)
    assert ds.lengths.tolist() == [50, 50, 30]
    assert bytes(np.concatenate([ds[i] for i in range(3)]).astype(np.uint8)) == b"hello world, " * 10
    with pytest.raises(FileNotFoundError):
        build_byte_dataset(tmp_path / "nope", str(tmp_path / "x.arrow"))


def test_length_generators():
    for kind in DISTRIBUTIONS:
        a = sample_lengths(kind, 20000, max_len=65536, seed=3)
        assert a.min() >= 16 and a.max() <= 65536
        np.testing.assert_array_equal(a, sample_lengths(kind, 20000, max_len=65536, seed=3))
        assert np.mean(a) > 1.5 * np.median(a)  # long-tailed: the mean is pulled up by the tail
    code, web = sample_lengths("code", 20000, seed=1), sample_lengths("web", 20000, seed=1)
    assert np.percentile(code, 99) > 4 * np.percentile(web, 99)
    with pytest.raises(ValueError, match="kind='books'"):
        sample_lengths("books", 10)


def test_token_budget_sampler_resume():
    lengths = sample_lengths("code", 300, max_len=4096, seed=0)
    sampler = TokenBudgetSampler(lengths, 8192, max_sequences=16, seed=5)
    batches = [sampler.next() for _ in range(40)]  # spans several epochs
    for b in batches:
        assert 1 <= len(b) <= 16 and lengths[b].sum() <= 8192
    fresh = TokenBudgetSampler(lengths, 8192, max_sequences=16, seed=5)
    seen = []
    while fresh.state_dict()["epoch"] == 0:
        seen.extend(fresh.next())
        if fresh.offset == len(lengths):
            break
    assert sorted(seen) == list(range(300))  # one epoch = every document exactly once
    resumed = TokenBudgetSampler(lengths, 8192, max_sequences=16, seed=5)
    state = None
    replay = TokenBudgetSampler(lengths, 8192, max_sequences=16, seed=5)
    for i in range(40):
        if i == 17:
            state = replay.state_dict()
        replay.next()
    resumed.load_state_dict(state)
    assert resumed.peek() == batches[17] and resumed.next() == batches[17]
    assert [resumed.next() for _ in range(22)] == batches[18:]
    with pytest.raises(ValueError, match="token_budget=100 is smaller"):
        TokenBudgetSampler([50, 200], 100)
    with pytest.raises(ValueError, match="seed 5 in the checkpoint differs"):
        TokenBudgetSampler(lengths, 8192, seed=6).load_state_dict(state)
