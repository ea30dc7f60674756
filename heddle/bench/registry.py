"""Scenario registry: every module in ``heddle/bench/scenarios/`` that defines ``SCENARIO``.

Keyed by ``SCENARIO.name`` (``adaptive_sp.py`` registers "adaptive-sp"). A module that fails to
import is not silently dropped: :func:`discover` returns its error, ``heddle bench list`` prints it
and asking for it by name raises with the import error.
"""

from __future__ import annotations

import importlib
import pkgutil

from heddle.bench.scenario import Scenario


def discover() -> tuple[dict[str, Scenario], dict[str, str]]:
    """({name: scenario}, {module: import error}) over heddle.bench.scenarios."""
    import heddle.bench.scenarios as package

    found: dict[str, Scenario] = {}
    broken: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module_name = f"{package.__name__}.{info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            broken[info.name] = f"{type(e).__name__}: {e}"
            continue
        scenario = getattr(module, "SCENARIO", None)
        if scenario is None:
            continue
        if not isinstance(scenario, Scenario):
            broken[info.name] = f"SCENARIO is a {type(scenario).__name__}, not a heddle.bench.scenario.Scenario"
            continue
        if scenario.name in found:
            broken[info.name] = f"duplicate scenario name {scenario.name!r}"
            continue
        found[scenario.name] = scenario
    return found, broken


def get(name: str) -> Scenario:
    found, broken = discover()
    if name in found:
        return found[name]
    module = name.replace("-", "_")
    by_module = {type(s).__module__.rsplit(".", 1)[-1]: s for s in found.values()}
    if module in by_module:  # the file name works too: adaptive_sp -> "adaptive-sp"
        return by_module[module]
    if module in broken:
        raise ValueError(f"scenario {name!r} failed to import: {broken[module]}")
    raise ValueError(f"unknown scenario {name!r}; valid: {', '.join(sorted(found)) or 'none'}")
