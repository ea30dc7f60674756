"""`heddle run`'s checks, in-process (no worker starts): every bad flag is one line naming the
flag, its value and what is valid; a --config file is validated; the one-node store listens on
127.0.0.1 only."""

import argparse
import json
import socket
import sys

import pytest

from heddle.launch import run as heddle_run
from heddle.launch.local import exit_code, loopback_store
from heddle.launch.options import check_launch_options, is_multi_node, parse_nnodes

BAD_FLAGS = [
    (["--nnodes", "0"], "--nnodes='0' is out of range; valid: N or MIN:MAX with 1 <= MIN <= MAX"),
    (["--nnodes", "abc"], "--nnodes='abc' is not an integer; valid: N or MIN:MAX"),
    (["--nnodes", "3:2"], "--nnodes='3:2' is out of range"),
    (["--max-restarts", "-1"], "--max-restarts='-1' is out of range; valid: an integer >= 0"),
    (["--max-restarts", "x"], "--max-restarts='x' is not an integer"),
    (["--master-port", "99999"], "--master-port='99999' is out of range; valid: 1-65535"),
    (["--master-port", "0"], "--master-port='0' is out of range; valid: 1-65535"),
    (["--node-rank", "5"], "--node-rank='5' is out of range; valid: 0 <= R < 1 (--nnodes=1)"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank='2' is out of range; valid: 0 <= R < 2"),
    (["--rdzv-backend", "bogus"], "--rdzv-backend='bogus' is unknown; valid: c10d, static, etcd, etcd-v2"),
    (["--rdzv-endpoint", "host:70000"], "--rdzv-endpoint port='70000' is out of range"),
    (["-n", "0"], "--nproc='0' must be a positive integer or one of gpu, cpu, auto"),
    (["--watchdog-timeout", "0"], "--watchdog-timeout='0' must be a number of seconds > 0"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flag_is_one_line_before_any_worker(flags, message, tmp_path, capsys):
    script = tmp_path / "never_runs.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert heddle_run.main([*flags, str(script)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("heddle run: ") and message in err, err
    assert not marker.exists()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        heddle_run.main(["--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("heddle run: "), err


def test_missing_script(capsys):
    assert heddle_run.main(["/nonexistent/train.py"]) == 2
    assert "script '/nonexistent/train.py' does not exist" in capsys.readouterr().err


def test_valid_flags_are_normalized():
    args = argparse.Namespace(nnodes="1:4", node_rank="3", master_addr=None, master_port="29500",
                              rdzv_backend="c10d", rdzv_endpoint="node0:29400", rdzv_id="job", max_restarts="2")
    check_launch_options(args)
    assert (args.node_rank, args.master_port, args.max_restarts) == (3, 29500, 2)
    assert parse_nnodes("2") == (2, 2) and parse_nnodes("1:4") == (1, 4)
    assert is_multi_node(args)
    one = argparse.Namespace(nnodes="1", master_addr=None, rdzv_endpoint=None)
    assert not is_multi_node(one)
    assert is_multi_node(argparse.Namespace(nnodes="1", master_addr="10.0.0.1", rdzv_endpoint=None))


def test_multi_node_goes_through_torchrun_and_heddle_worker(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    args = heddle_run.build_parser().parse_args(["--nnodes", "2", "--node-rank", "1", "--master-addr", "h0",
                                                  "--master-port", "29500", "-n", "4", str(script), "--lr", "1"])
    heddle_run.check_args(args)
    argv = heddle_run.torchrun_argv(args)
    assert argv[:3] == ["--nproc-per-node=4", "--nnodes=2", "--max-restarts=0"]
    assert "--node-rank=1" in argv and "--master-addr=h0" in argv and "--master-port=29500" in argv
    from heddle.launch.worker import WORKER_PATH

    assert argv[-6:] == ["--no-python", sys.executable, WORKER_PATH, str(script), "--lr", "1"]


def test_config_file_is_checked_before_workers(tmp_path, capsys):
    script = tmp_path / "train.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"compresion": {"density": 0.1}}))
    assert heddle_run.main([str(script), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'compresion'" in err and str(bad) in err, err
    typo = tmp_path / "moe.toml"
    typo.write_text("[moe]\nnum_expert = 4\n")
    assert heddle_run.main([str(script), f"--config={typo}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'num_expert' in section 'moe'" in err, err
    assert heddle_run.main([str(script), "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not marker.exists()
    # --no-config-check leaves the file to the script; other --config values are not ours
    assert heddle_run.config_paths(["--config", "x.toml", "--config", '{"a": 1}', "--config=y.yaml"]) == \
        ["x.toml", "y.yaml"]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                out.add(addr)
    return out


def test_one_node_store_listens_on_loopback_only():
    store, port = loopback_store()
    try:
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, and no 0.0.0.0 / :: socket
        store.set("k", "v")
        import torch.distributed as dist

        client = dist.TCPStore("127.0.0.1", port, None, False)
        assert client.get("k") == b"v"
    finally:
        del store
    with socket.socket() as s:  # nothing else was left listening
        s.bind(("127.0.0.1", 0))


def test_exit_codes():
    assert exit_code(3) == 3 and exit_code(0) == 0
    assert exit_code(-9) == 137 and exit_code(-15) == 143


def test_bench_checks_options_before_workers(tmp_path, capsys):
    from heddle.bench.cli import main as bench_main

    assert bench_main(["collectives", "--nproc", "2", "--ops", "all_reduc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ops='all_reduc': unknown ['all_reduc']" in err, err
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"moe": {"num_expert": 4}}))
    assert bench_main(["training", "--nproc", "2", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'num_expert' in section 'moe'" in err, err
    assert bench_main(["training", "--nproc", "2", "--config", '{"compresion": {}}']) == 2
    assert "'compresion'" in capsys.readouterr().err
