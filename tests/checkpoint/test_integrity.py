"""What restore reads cannot run code (JSON, no pickle), every checksum covers the bytes it names,
and an index that disagrees with its manifest or its path (relabelled step, swapped ranks) is refused."""

import json
import os
import pickle
import random
import shutil
import warnings
import zlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from heddle.checkpoint import Checkpointer, CheckpointFallbackWarning, CorruptCheckpoint
from heddle.checkpoint import codec
from heddle.checkpoint.state import fill, flatten
from heddle.checkpoint.storage import (MANIFEST, RankIndex, TensorEntry, _manifest_crc, encode_index, read_manifest,
                                       read_rank, rank_file, step_dir, write_manifest, write_rank_files)


def _save_steps(directory, steps, value_of=float):
    ck = Checkpointer(directory, levels=("disk",), keep=10)
    for s in steps:
        ck.save(s, {"t": torch.full((64,), value_of(s), dtype=torch.float64), "meta": {"step": s}})
        ck.wait()
    ck.close()


def _restore(directory, **kw):
    t, meta = torch.zeros(64, dtype=torch.float64), {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = Checkpointer(directory, levels=("disk",), **kw)
        try:
            step = ck.restore({"t": t, "meta": meta})
        finally:
            ck.close()
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointFallbackWarning)]
    return step, t, meta, msgs


def _rewrite_manifest(directory, step, edit):
    path = os.path.join(step_dir(directory, step), MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    manifest["crc"] = _manifest_crc(manifest)      # an attacker recomputes every CRC
    with open(path, "w") as f:
        json.dump(manifest, f)


def _flip(path, where):
    with open(path, "r+b") as f:
        f.seek(where)
        b = f.read(1)
        f.seek(where)
        f.write(bytes([b[0] ^ 0x04]))


def test_index_crc_in_the_manifest_covers_the_index_bytes(tmp_path):
    d = str(tmp_path / "orig")
    _save_steps(d, [1, 2])
    manifest = read_manifest(d, 2)
    with open(os.path.join(step_dir(d, 2), rank_file(0, "idx")), "rb") as f:
        raw = f.read()
    assert manifest["files"]["0"]["idx_crc"] == zlib.crc32(raw) != 0x2144DF1C   # not the CRC residue
    assert json.loads(raw)["step"] == 2                                       # the index is plain JSON
    for target, words in (("idx", "index file"), (MANIFEST, "manifest")):
        sub = tmp_path / target.replace(".", "_")
        shutil.copytree(d, sub, ignore=shutil.ignore_patterns(".heddle-lock"))
        path = os.path.join(step_dir(str(sub), 2), rank_file(0, "idx") if target == "idx" else MANIFEST)
        _flip(path, os.path.getsize(path) // 2)           # one flipped byte in the middle
        step, t, meta, msgs = _restore(str(sub))
        assert step == 1 and meta == {"step": 1} and bool((t == 1).all())
        assert len(msgs) == 1 and "step 2" in msgs[0] and words in msgs[0], (target, msgs)


def test_relabelled_step_does_not_load(tmp_path):
    d = str(tmp_path)
    _save_steps(d, [38, 39])
    os.rename(step_dir(d, 39), step_dir(d, 40))          # step 39 relabelled as 40, manifest rewritten to match
    _rewrite_manifest(d, 40, lambda m: m.update(step=40))
    step, t, meta, msgs = _restore(d)
    assert step == 38 and meta == {"step": 38}
    assert any("step 40" in m and "says step 39" in m for m in msgs), msgs


def _two_rank_step(d, step):
    """A step written at world size 2 through the storage API (what two ranks write)."""
    for rank in (0, 1):
        data = np.full(64, rank + 1, dtype=np.uint8)
        entry = TensorEntry("t", "uint8", (64,), 0, 64, crc=zlib.crc32(data))
        skeleton = {"t": {codec.TAG: "tensor", "i": 0}}
        write_rank_files(d, RankIndex(step, rank, 2, skeleton, [entry], [], 64, run_id="r"), data)
    write_manifest(d, step, 2)


def test_consistent_rank_swap_does_not_load(tmp_path):
    d = str(tmp_path)
    _two_rank_step(d, 5)
    sdir = step_dir(d, 5)
    assert read_rank(d, 5, 1, read_manifest(d, 5))[0].rank == 1
    for suffix in ("bin", "idx"):                         # swap the files ...
        a, b = os.path.join(sdir, rank_file(0, suffix)), os.path.join(sdir, rank_file(1, suffix))
        os.rename(a, a + ".x")
        os.rename(b, a)
        os.rename(a + ".x", b)
    _rewrite_manifest(d, 5, lambda m: m.update(files={"0": m["files"]["1"], "1": m["files"]["0"]}))   # ... and the manifest
    manifest = read_manifest(d, 5)                        # consistent: sizes and CRCs all match
    for rank in (0, 1):
        with pytest.raises(CorruptCheckpoint, match=f"says step 5 rank {1 - rank}"):
            read_rank(d, 5, rank, manifest)


def test_a_planted_pickle_index_never_runs(tmp_path):
    d = str(tmp_path / "ck")
    _save_steps(d, [1, 2])
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = os.path.join(step_dir(d, 2), rank_file(0, "idx"))
    payload = pickle.dumps(Exploit())
    with open(path, "wb") as f:
        f.write(payload + zlib.crc32(payload).to_bytes(4, "little"))   # the old format, CRC trailer and all
    with open(path, "rb") as f:
        raw = f.read()
    _rewrite_manifest(d, 2, lambda m: m["files"]["0"].update(idx_bytes=len(raw), idx_crc=zlib.crc32(raw)))
    step, _, meta, msgs = _restore(d)
    assert step == 1 and meta == {"step": 1} and not marker.exists()
    assert any("step 2" in m and "index" in m for m in msgs), msgs


def test_codec_round_trip_and_refusals():
    np_state = np.random.RandomState(3).get_state()
    tree = {"int_keys": {0: {"step": torch.tensor(3.0)}, 1: (1, 2.5, None)},
            "od": OrderedDict(a=torch.arange(3)), "rng": (np_state, random.Random(1).getstate()),
            "blob": b"\x00\xff", "dtype": torch.bfloat16, "nan": float("nan"), "size": torch.Size([2, 3]),
            "np": np.float32(1.5), "set": {1, 2}, "nested": [[{"x": "y"}]]}
    tree["od"]._metadata = OrderedDict({"": {"version": 1}})
    flat = flatten({"s": tree}, rank=0)
    back = fill(codec.loads(codec.dumps(flat.skeleton)), flat.tensors)["s"]
    assert torch.equal(back["int_keys"][0]["step"], torch.tensor(3.0)) and back["int_keys"][1] == (1, 2.5, None)
    assert list(back["od"]) == ["a"] and back["od"]._metadata == {"": {"version": 1}}
    assert back["rng"][0][0] == "MT19937" and np.array_equal(back["rng"][0][1], np_state[1])
    assert back["rng"][1] == random.Random(1).getstate()
    assert back["blob"] == b"\x00\xff" and back["dtype"] is torch.bfloat16 and np.isnan(back["nan"])
    assert back["size"] == torch.Size([2, 3]) and back["np"] == np.float32(1.5) and back["set"] == {1, 2}
    with pytest.raises(codec.CodecError, match="s/obj.*cannot be checkpointed"):
        flatten({"s": {"obj": object()}})
    for bad in ({codec.TAG: "pickle", "data": "x"}, {codec.TAG: "ndarray", "dtype": "O", "shape": [1], "b64": ""}):
        with pytest.raises(codec.CodecError):
            codec.decode(bad, lambda n, p: None)
    index = RankIndex(1, 0, 1, {"x": 1}, [TensorEntry("t", "load", (1,), 0, 8)], [], 8)
    with pytest.raises(CorruptCheckpoint, match="dtype"):       # dtype names are looked up in a fixed table
        from heddle.checkpoint.storage import decode_index
        decode_index(encode_index(index), "x")
