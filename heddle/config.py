"""TrainerConfig files: TOML, YAML or JSON, every section, checked before any worker starts.

    from heddle.config import load_config, save_config
    cfg = load_config("run.toml", overrides={"grad_accum_steps": 2, "moe.num_experts": 4})
    save_config(cfg, "run.yaml")            # the format follows the suffix: .toml .yaml .yml .json

A file has the top-level fields of :class:`heddle.TrainerConfig` and one table per feature
section (``[moe]``, ``[compression]``, ...). A section that is present is switched on with its
fields (omitted fields keep their defaults); an absent section (or ``moe = false``) is off.
Everything is generic over the dataclass fields, so a new field needs no change here.

TOML has no null: a field whose value is None is left out (when its default is None) or written
as the string ``"none"`` (when its default is not None and it accepts None; e.g.
``reshard_every = "none"``). Callable fields (``sequence_parallel.attn_fn``) are written and read
as an import path ``"package.module:function"``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}
TOP = "trainer"  # the name error messages give the top level


# -- the schema: TrainerConfig and one Config dataclass per section ----------------------------
def section_configs() -> dict[str, type]:
    """Section name -> its Config dataclass, in the Trainer's fixed order."""
    import heddle.plugins as plugins

    registry = getattr(plugins, "SECTIONS", None)
    if isinstance(registry, dict):
        return {name: plugin.Config for name, plugin in registry.items()}
    from heddle.trainer import SECTIONS  # before the registry: a tuple of module names

    return {name: importlib.import_module(f"heddle.plugins.{name}").Config for name in SECTIONS}


def _trainer_config_cls() -> type:
    from heddle.trainer import TrainerConfig

    return TrainerConfig


def _plain_fields(cls) -> list[dataclasses.Field]:
    sections = section_configs()
    return [f for f in dataclasses.fields(cls) if f.name not in sections]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_names(f: dataclasses.Field) -> set[str]:
    """The names in a field's annotation, e.g. 'int | None' -> {'int', 'None'} (annotations are
    strings under ``from __future__ import annotations``)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for ch in "[],|":
        text = text.replace(ch, " ")
    names = {t.split(".")[-1] for t in text.split()}
    return {"None" if n in ("NoneType", "Optional") else n for n in names}


def _unknown(key: str, section: str, valid) -> ValueError:
    return ValueError(f"unknown key {key!r} in section {section!r}; valid keys: {', '.join(valid)}")


# -- values: file -> Python ------------------------------------------------------------------
def _import_path(text: str, where: str):
    module, sep, name = text.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{where}={text!r}: expected an import path 'package.module:function'")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _coerce(f: dataclasses.Field, value: Any, section: str) -> Any:
    """Check one value against its field's annotation; convert what a file format cannot spell
    (lists -> tuples, int -> float, "none" -> None, import paths -> callables)."""
    where = f"{section}.{f.name}"
    names = _type_names(f)
    if value is None or (isinstance(value, str) and value.lower() == "none" and "None" in names
                         and "str" not in names and "Any" not in names):
        if "None" in names or "Any" in names:
            return None
        raise ValueError(f"{where}=None: this key does not accept None (type {f.type})")
    if "Any" in names:
        return value
    if "Callable" in names:
        if callable(value):
            return value
        if isinstance(value, str):
            return _import_path(value, where)
    if isinstance(value, bool):
        if "bool" in names:
            return value
    elif isinstance(value, int) and "int" in names:
        return value
    elif isinstance(value, (int, float)) and "float" in names:
        return float(value)
    elif isinstance(value, str) and "str" in names:
        return value
    elif isinstance(value, (list, tuple)) and names & {"tuple", "list"}:
        return tuple(value) if "tuple" in names else list(value)
    elif isinstance(value, dict) and "dict" in names:
        return value
    raise ValueError(f"{where}={value!r} ({type(value).__name__}): expected {f.type}")


def _section_fields(cls, section: str, data: dict) -> dict:
    fields = {f.name: f for f in (_plain_fields(cls) if section == TOP else dataclasses.fields(cls))}
    out = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, section, fields)
        out[key] = _coerce(fields[key], value, section)
    return out


def _merge_overrides(data: dict, overrides: dict | None) -> dict:
    """Apply ``overrides`` ({"grad_accum_steps": 2, "moe.num_experts": 4, "moe": {...}}) on top."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in (overrides or {}).items():
        section, dot, name = str(key).partition(".")
        if dot:
            current = data.get(section)
            if not isinstance(current, dict):  # absent, True or False: switch it on with defaults
                current = {}
            current[name] = value
            data[section] = current
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def config_from_dict(data: dict, overrides: dict | None = None):
    """A TrainerConfig from nested plain data (the parsed file); unknown keys -> ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"a TrainerConfig file must hold a table/mapping at the top, got {type(data).__name__}")
    data = _merge_overrides(data, overrides)
    cls, sections = _trainer_config_cls(), section_configs()
    top = {k: v for k, v in data.items() if k not in sections}
    kwargs = _section_fields(cls, TOP, top) if top else {}
    unknown = [k for k in top if k not in kwargs]
    if unknown:  # pragma: no cover - _section_fields raised already
        raise _unknown(unknown[0], TOP, [f.name for f in dataclasses.fields(cls)])
    for name, config_cls in sections.items():
        if name not in data:
            continue
        value = data[name]
        if value is None or value is False:
            kwargs[name] = None
        elif value is True:
            kwargs[name] = config_cls()
        elif isinstance(value, dict):
            kwargs[name] = config_cls(**_section_fields(config_cls, name, value))
        elif isinstance(value, config_cls):
            kwargs[name] = value
        else:
            raise ValueError(f"section {name!r}={value!r}: expected a table of its keys, true or false")
    return cls(**kwargs)


# -- values: Python -> file ------------------------------------------------------------------
def _plain(f: dataclasses.Field, value: Any, section: str) -> Any:
    if callable(value) and not isinstance(value, type):
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
        if not module or "<" in qualname:
            raise ValueError(f"{section}.{f.name}={value!r}: only a module-level function can be "
                             f"saved (as 'package.module:function')")
        return f"{module}:{qualname}"
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{section}.{f.name}={value}: not a finite number; a config file cannot hold it")
    return value


def config_to_dict(cfg) -> dict:
    """Nested plain data (JSON types) of a TrainerConfig: top-level fields, then one dict per
    section that is on (a section that is off is None)."""
    sections = section_configs()
    out = {f.name: _plain(f, getattr(cfg, f.name), TOP) for f in _plain_fields(type(cfg))}
    for name, config_cls in sections.items():
        value = getattr(cfg, name, None)
        if value is None or value is False:
            out[name] = None
            continue
        if value is True:
            value = config_cls()
        elif isinstance(value, dict):
            value = config_cls(**_section_fields(config_cls, name, value))
        out[name] = {f.name: _plain(f, getattr(value, f.name), name) for f in dataclasses.fields(value)}
    return out


# -- formats ---------------------------------------------------------------------------------
def _format_of(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"path={str(path)!r}: unknown config format {suffix or '(no suffix)'!r}; "
                         f"valid suffixes: {', '.join(FORMATS)}")
    return FORMATS[suffix]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def _toml_lines(cls, section: str, values: dict) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    lines = []
    for key, value in values.items():
        if value is None:
            f = fields[key]
            if _default(f) is None:
                lines.append(f"# {key} =   (unset)")
                continue
            if "str" in _type_names(f):
                raise ValueError(f"{section}.{key}=None cannot be written to TOML (no null, and the "
                                 f"string 'none' would be a valid value): use YAML or JSON")
            value = "none"
        lines.append(f"{key} = {_toml_value(value)}")
    return lines


def to_toml(data: dict) -> str:
    """TOML text of ``config_to_dict`` output (a tiny writer: scalars, arrays, one table per section)."""
    cls, sections = _trainer_config_cls(), section_configs()
    lines = _toml_lines(cls, TOP, {k: v for k, v in data.items() if k not in sections})
    for name, config_cls in sections.items():
        if data.get(name) is not None:
            lines += ["", f"[{name}]", *_toml_lines(config_cls, name, data[name])]
    return "\n".join(lines) + "\n"


def _yaml(data: dict) -> str:
    """Block-style YAML with lists inline ([64, 128]), keys in field order."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def dumps(cfg, fmt: str) -> str:
    """A TrainerConfig as text in ``fmt`` ("toml", "yaml" or "json")."""
    data = config_to_dict(cfg)
    if fmt == "toml":
        return to_toml(data)
    if fmt == "yaml":
        return _yaml(data)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    raise ValueError(f"fmt={fmt!r}; valid: toml, yaml, json")


def loads(text: str, fmt: str) -> dict:
    """Parse config text into plain data (no checking; see :func:`config_from_dict`)."""
    if fmt == "toml":
        return tomllib.loads(text)
    if fmt == "yaml":
        import yaml

        data = yaml.safe_load(text)
        return {} if data is None else data
    if fmt == "json":
        return json.loads(text)
    raise ValueError(f"fmt={fmt!r}; valid: toml, yaml, json")


def load_config(path_or_dict, overrides: dict | None = None):
    """A :class:`heddle.TrainerConfig` from a .toml/.yaml/.yml/.json file or a dict, with
    ``overrides`` (flat ``"section.key"`` names or nested dicts) applied on top.

    Raises ValueError naming the key, the section and the valid keys for an unknown key, and the
    key, value and expected type for a value of the wrong type."""
    if isinstance(path_or_dict, dict):
        return config_from_dict(path_or_dict, overrides)
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise TypeError(f"load_config({path_or_dict!r}): expected a path or a dict")
    fmt = _format_of(path_or_dict)
    if not os.path.exists(path_or_dict):
        raise FileNotFoundError(f"config file {str(path_or_dict)!r} does not exist")
    text = Path(path_or_dict).read_text()
    try:
        data = loads(text, fmt)
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"{path_or_dict}: not valid {fmt.upper()}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"{path_or_dict}: not valid {fmt.upper()}: {' '.join(str(e).split())}") from None
    return config_from_dict(data, overrides)


def save_config(cfg, path) -> str:
    """Write ``cfg`` to ``path`` in the format its suffix names; returns the path."""
    text = dumps(cfg, _format_of(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return str(path)


def default_config_text(fmt: str = "toml", enabled=()) -> str:
    """The defaults as a file to start from: every top-level field, and every section with its
    defaults: commented out in TOML/YAML unless named in ``enabled`` (so the file as printed
    loads to ``TrainerConfig()``), null in JSON unless named in ``enabled``."""
    cls, sections = _trainer_config_cls(), section_configs()
    enabled = list(sections) if "all" in enabled else list(enabled)
    for name in enabled:
        if name not in sections:
            raise ValueError(f"enabled={name!r}: not a section; valid: all, {', '.join(sections)}")
    head = (f"heddle TrainerConfig defaults (heddle config --format {fmt}). A section that is present "
            f"switches its feature on;\nuncomment one (and its keys) to use it. Docs: docs/trainer.md")
    top = {f.name: _plain(f, _default(f), TOP) for f in _plain_fields(cls)}
    parts = {}
    for name, config_cls in sections.items():
        parts[name] = {}
        for f in dataclasses.fields(config_cls):
            value = _default(f)
            parts[name][f.name] = None if value is dataclasses.MISSING else _plain(f, value, name)
    if fmt == "json":
        return json.dumps({**top, **{n: parts[n] if n in enabled else None for n in sections}}, indent=2) + "\n"
    if fmt == "toml":
        lines = ["# " + line for line in head.splitlines()]
        lines += _toml_lines(cls, TOP, top)
        for name, config_cls in sections.items():
            body = _toml_lines(config_cls, name, parts[name])
            if name in enabled:
                lines += ["", f"[{name}]", *body]
            else:
                lines += ["", f"# [{name}]"] + ["# " + line.lstrip("# ") for line in body]
        return "\n".join(lines) + "\n"
    if fmt == "yaml":
        text = "\n".join("# " + line for line in head.splitlines()) + "\n" + _yaml(top)
        for name in sections:
            block = _yaml({name: parts[name]})
            on = name in enabled
            text += "\n" + "".join(("" if on else "# ") + line + "\n" for line in block.splitlines())
        return text
    raise ValueError(f"fmt={fmt!r}; valid: toml, yaml, json")


def main(argv: list[str] | None = None) -> int:
    """``heddle config``: print the defaults as a file to start from, or check a file."""
    import argparse

    p = argparse.ArgumentParser(prog="heddle config", description=main.__doc__)
    p.add_argument("--format", "-f", choices=("toml", "yaml", "json"), default="toml")
    p.add_argument("--check", metavar="FILE", default=None,
                   help="load FILE (unknown keys, wrong types) and print it back as resolved")
    p.add_argument("--with", dest="enabled", action="append", default=[], metavar="SECTION",
                   help="switch a section on in the printed file (repeatable; 'all' for every one)")
    args = p.parse_args(argv)
    if args.check:
        try:
            cfg = load_config(args.check)
        except (ValueError, TypeError, FileNotFoundError) as e:
            print(f"heddle config: {e}", file=__import__("sys").stderr)
            return 2
        print(dumps(cfg, args.format), end="")
        return 0
    try:
        print(default_config_text(args.format, enabled=args.enabled), end="")
    except ValueError as e:
        p.error(str(e))
    return 0
