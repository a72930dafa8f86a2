"""The site's own state file: per round, so a repeated round starts from the same state."""

from __future__ import annotations

import numpy as np

from fedlora.apps.site_state import SiteStore


def test_state_is_read_from_the_latest_earlier_round(tmp_path):
    store = SiteStore(tmp_path, site=3)
    assert store.before(1) == {}
    store.save(1, {"c": np.array([1.0])})
    store.save(2, {"c": np.array([2.0])})
    assert store.before(2)["c"][0] == 1.0  # round 2 repeated: starts from round 1's state
    assert store.before(3)["c"][0] == 2.0
    assert SiteStore(tmp_path, site=3).before(9)["c"][0] == 2.0  # survives a restart
    assert SiteStore(tmp_path, site=4).before(9) == {}  # sites do not share state


def test_repeating_a_round_drops_the_abandoned_later_state(tmp_path):
    store = SiteStore(tmp_path, site=0)
    for r in (1, 2, 3):
        store.save(r, {"c": np.array([float(r)])})
    store.save(2, {"c": np.array([20.0])})  # the server resumed after round 1
    assert store.before(3)["c"][0] == 20.0
    assert store.before(4)["c"][0] == 20.0  # round 3 of the abandoned run is gone


def test_empty_state_and_bounded_history(tmp_path):
    store = SiteStore(tmp_path, site=0)
    store.save(1, {})
    assert store.before(2) == {}
    for r in range(2, 8):
        store.save(r, {"c": np.array([float(r)])})
    with np.load(store.path) as data:
        rounds = {k.split("/")[0] for k in data.files}
    assert rounds == {"r6", "r7"}
