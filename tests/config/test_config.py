"""heddle.config: TrainerConfig files in TOML, YAML and JSON."""

import dataclasses
import json
import pytest

import heddle
from heddle.config import (config_to_dict, default_config_text, dumps, load_config, loads, save_config,
                           section_configs)


def full_config():
    """Every section on, with values that differ from the defaults and need conversion (tuples,
    None where the default is not None, a float written as an int, a callable)."""
    return heddle.TrainerConfig(
        grad_accum_steps=2, max_grad_norm=1.0, total_steps=7, log_every=3,
        sequence_parallel={"sp_size": 2, "attn_fn": "torch.nn.functional:scaled_dot_product_attention"},
        adaptive_sequence_parallel={"cost_model": "a100-80g-ib", "calibration_lengths": [32, 64], "time_limit": 1},
        moe={"num_experts": 4, "reshard_every": None, "capacity_factor": 1.25},
        compression={"compressor": "quantize:4", "feedback": "econtrol", "start_iter": 0},
        checkpoint={"directory": "ckpts", "every": 5, "levels": ["memory", "disk"]},
    )


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".yml", ".json"])
def test_round_trip_every_section(tmp_path, suffix):
    cfg = load_config(config_to_dict(full_config()))
    path = save_config(cfg, tmp_path / f"run{suffix}")
    back = load_config(path)
    assert back == cfg  # dataclass equality: every field of every section
    assert isinstance(back.adaptive_sequence_parallel.calibration_lengths, tuple)
    assert back.moe.reshard_every is None and back.adaptive_sequence_parallel.time_limit == 1.0
    import torch.nn.functional as F

    assert back.sequence_parallel.attn_fn is F.scaled_dot_product_attention
    # file -> config -> file is stable text
    assert open(save_config(back, tmp_path / f"again{suffix}")).read() == open(path).read()


def test_sections_off_and_defaults(tmp_path):
    cfg = load_config(save_config(heddle.TrainerConfig(), tmp_path / "d.toml"))
    assert cfg == heddle.TrainerConfig()
    assert load_config({"moe": True}).moe == section_configs()["moe"]()
    assert load_config({"moe": False}).moe is None
    assert load_config({}) == heddle.TrainerConfig()


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_printed_defaults_load_to_the_defaults(fmt):
    assert load_config(loads(default_config_text(fmt), fmt)) == heddle.TrainerConfig()
    on = load_config(loads(default_config_text(fmt, enabled=["moe", "compression"]), fmt))
    assert on.moe == section_configs()["moe"]() and on.compression == section_configs()["compression"]()
    assert on.sequence_parallel is None


def test_every_field_of_every_section_is_in_the_printed_file():
    text = default_config_text("toml")
    for name, cls in section_configs().items():
        assert f"# [{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"# {f.name} =" in text, (name, f.name)
    for f in dataclasses.fields(heddle.TrainerConfig):
        if f.name not in section_configs():
            assert f"{f.name} =" in text


def test_unknown_keys_one_line():
    with pytest.raises(ValueError) as e:
        load_config({"moe": {"num_expert": 4}})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("unknown key 'num_expert' in section 'moe'; valid keys: num_experts, top_k,")
    with pytest.raises(ValueError, match=r"^unknown key 'grad_acum' in section 'trainer'; valid keys: grad_accum_steps, "):
        load_config({"grad_acum": 2})
    with pytest.raises(ValueError, match=r"unknown key 'x' in section 'compression'"):
        load_config({}, overrides={"compression.x": 1})


def test_wrong_types_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.grad_accum_steps='2' \(str\): expected int"):
        load_config({"grad_accum_steps": "2"})
    with pytest.raises(ValueError, match=r"moe.num_experts=True"):
        load_config({"moe": {"num_experts": True}})
    with pytest.raises(ValueError, match=r"section 'moe'=3"):
        load_config({"moe": 3})
    with pytest.raises(ValueError, match="valid suffixes: .toml, .yaml, .yml, .json"):
        load_config(tmp_path / "run.ini")
    (tmp_path / "bad.toml").write_text("grad_accum_steps = = 2\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="not a finite number"):
        dumps(heddle.TrainerConfig(max_grad_norm=float("inf")), "json")


def test_overrides_flat_and_nested(tmp_path):
    path = save_config(load_config({"moe": {"num_experts": 4}}), tmp_path / "r.json")
    cfg = load_config(path, overrides={"grad_accum_steps": 3, "moe.top_k": 1, "compression.start_iter": 0})
    assert cfg.grad_accum_steps == 3 and cfg.moe.num_experts == 4 and cfg.moe.top_k == 1
    assert cfg.compression.start_iter == 0  # a dotted override switches its section on
    assert load_config(path, overrides={"moe": None}).moe is None


def test_heddle_config_command(tmp_path, capsys):
    from heddle.launch.cli import main as heddle_main

    assert heddle_main(["config", "--format", "json"]) == 0  # registered in the heddle command
    assert load_config(json.loads(capsys.readouterr().out)) == heddle.TrainerConfig()
    path = tmp_path / "bad.yaml"
    path.write_text("moe:\n  num_expert: 4\n")
    assert heddle_main(["config", "--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "heddle config: unknown key 'num_expert' in section 'moe'; valid keys: "
        + ", ".join(f.name for f in dataclasses.fields(section_configs()["moe"]))]
