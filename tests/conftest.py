"""Shared fixtures: a small, fast config on the tiny-random model (cached under the default
fedlora cache; it builds in about a second the first time)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Loopback-only Ray, no telemetry: set before Flower or Ray is imported anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

TINY_BASE: dict[str, dict[str, Any]] = {
    # fp32: the same numbers whatever the thread count (bf16 results depend on it)
    "model": {"name": "tiny-random", "precision": "fp32"},
    "federation": {"clients": 3, "rounds": 2},
    "train": {"local_steps": 2},
    "data": {"eval_rows": 60},
}


def tiny_overrides(out: Path, *overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The tiny base settings, the results folder, then the caller's overrides (in order)."""
    return [TINY_BASE, {"run": {"out": str(out)}}, *overrides]


def make_tiny_cfg(tmp_path: Path, *overrides: dict[str, Any], **sections: dict[str, Any]):
    """A Config on tiny-random: 3 sites, 2 rounds, 2 local steps, 60 eval rows, results in
    tmp_path/run. Overrides are `{section: {key: value}}` dicts, positional or by keyword
    (`train={"lr": 0.5}`), applied after the defaults above."""
    from fedlora.config import load_config

    extra = [*overrides, *({s: v} for s, v in sections.items())]
    return load_config(None, tiny_overrides(tmp_path / "run", *extra))


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: `tiny_cfg(train={"lr": 0.5})` or `tiny_cfg({"strategy": {"name": "fedprox"}})`."""

    def build(*overrides: dict[str, Any], **sections: dict[str, Any]):
        return make_tiny_cfg(tmp_path, *overrides, **sections)

    return build


@pytest.fixture(scope="session")
def tiny_cfg_at():
    """`tiny_cfg_at(folder, **sections)`: like `tiny_cfg`, for module-scoped fixtures."""
    return make_tiny_cfg


# --- the fast tier -------------------------------------------------------------------------------
#: what a test (or a fixture it uses) calls when it starts a Ray simulation or real processes
_ENGINE_CALLS = (
    "simulate(",
    "run_federation(",
    "run_simulation(",
    "run_sweep(",
    "subprocess",
    "Popen(",
    '"simulate"',
    '"sweep"',
)


def _starts_engines(func, fixturedefs, seen: set[str]) -> bool:
    import inspect

    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if any(call in source for call in _ENGINE_CALLS):
        return True
    for name in inspect.signature(func).parameters:
        if name in seen or name not in fixturedefs:
            continue
        seen.add(name)
        if any(_starts_engines(d.func, fixturedefs, seen) for d in fixturedefs[name]):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Mark `sim` every test that starts a Ray simulation or real processes, found from its own
    source and its fixtures' (one place, so a new test needs no decorator): the fast tier is
    `pytest -m "not slow and not deploy and not sim"`; `pytest -q` still runs everything."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        func = getattr(item, "function", None)
        if func is not None and _starts_engines(func, defs, set()):
            item.add_marker(pytest.mark.sim)
