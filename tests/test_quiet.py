"""Library chatter stays out of fedlora's console: one call at an entry point silences it."""

from __future__ import annotations

import subprocess
import sys

import pytest

LOAD = """
import sys
if sys.argv[1] == "quiet":
    from fedlora.quiet import quiet_libraries

    quiet_libraries()
from fedlora.config import load_config
from fedlora.runtime import build_runtime

build_runtime(load_config(None, [{"model": {"name": "tiny-random"}}]), log=lambda _: None)
"""


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_loading_a_base_says_nothing_after_quiet_libraries(mode):
    """Without it, loading a base prints transformers' progress bar and a deprecation notice
    (the control: so the quiet run's empty stderr means something)."""
    res = subprocess.run(
        [sys.executable, "-c", LOAD, mode], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    if mode == "loud":
        assert "Loading weights" in res.stderr or "Warning" in res.stderr
    else:
        assert res.stderr == ""
