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
