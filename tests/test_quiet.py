"""Library chatter stays out of fedlora's console: one call at an entry point silences it."""

from __future__ import annotations

import os
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

#: what quiet_libraries and the simulation set in the environment: a test earlier in this
#: process may have set them, and the child would inherit them
QUIET_ENV = (
    "TRANSFORMERS_VERBOSITY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "TQDM_DISABLE",
    "PYTHONWARNINGS",
)


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_loading_a_base_says_nothing_after_quiet_libraries(mode):
    """Without it, loading a base prints transformers' progress bar and a deprecation notice
    (the control: so the quiet run's empty stderr means something)."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    res = subprocess.run(
        [sys.executable, "-c", LOAD, mode], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    if mode == "loud":
        assert "Loading weights" in res.stderr or "Warning" in res.stderr
    else:
        assert res.stderr == ""


NOISE = """
import sys
if sys.argv[1] == "quiet":
    from fedlora.quiet import quiet_libraries

    quiet_libraries()
from fedlora.config import load_config
from fedlora.privacy.policy import sample_mechanism

privacy = {"level": "sample", "target_epsilon": 8.0}
cfg = load_config(None, [{"privacy": privacy, "federation": {"rounds": 2}}])
print(sample_mechanism(cfg, 60, 6).noise_multiplier)
"""


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_the_noise_search_says_nothing_after_quiet_libraries(mode):
    """opacus's RDP search warns that a wider range of orders might give a tighter bound: the
    noise it returns is then larger than needed, the safe side, and no news for a user."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    res = subprocess.run(
        [sys.executable, "-c", NOISE, mode], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) > 0
    if mode == "loud":
        assert "Optimal order is the largest alpha" in res.stderr
    else:
        assert res.stderr == ""
