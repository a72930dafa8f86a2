"""The server's privacy columns as pure functions (fedlora.privacy.server): what a round's row
says about each site's spend, in plaintext and under secure aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.apps import records
from fedlora.config import load_config
from fedlora.privacy.policy import NO_AMPLIFICATION, client_mechanism, spend
from fedlora.privacy.server import latest_epsilons, privacy_row


def config(level: str, **sections):
    return load_config(None, [{"privacy": {"level": level, "noise_multiplier": 1.0}}, sections])


def site_metrics(site: int, epsilon: float) -> dict:
    return {
        records.SITE_ID: site,
        records.PRIVACY + "epsilon": epsilon,
        records.PRIVACY + "steps": 3,
    }


def test_plaintext_row_names_each_reported_spend_and_the_largest_so_far():
    cfg = config("sample")
    row = privacy_row(cfg, [site_metrics(0, 0.5), site_metrics(2, 1.5)], {}, [], {"1": 4.0}, {1})
    assert row["privacy"] == {
        "0": {"epsilon": 0.5, "steps": 3, "level": "sample", "accountant": "rdp"},
        "2": {"epsilon": 1.5, "steps": 3, "level": "sample", "accountant": "rdp"},
    }
    assert row["epsilon_max"] == 4.0  # site 1 spent more in an earlier round
    assert row["exhausted"] == [1] and "amplification" not in row
    assert latest_epsilons(row) == {"0": 0.5, "2": 1.5}
    assert privacy_row(config("none"), [site_metrics(0, 0.5)], {}, [], {}, set()) == {}


def test_secure_sample_level_row_holds_only_the_mean():
    cfg = config("sample", secure={"enabled": True})
    stats = {records.STATS_EPSILON: np.array([3.0]), records.STATS_UNBOUNDED: np.array([0.0])}
    sites = [{records.SITE_ID: s} for s in range(3)]
    row = privacy_row(cfg, sites, stats, [], {}, set())
    assert row == {"privacy": {}, "epsilon_mean": 1.0, "exhausted": []}
    stats[records.STATS_UNBOUNDED] = np.array([1.0])  # one site added no noise
    assert math.isinf(privacy_row(cfg, sites, stats, [], {}, set())["epsilon_mean"])


def test_secure_client_level_spend_is_recomputed_from_the_rounds_each_site_was_in():
    cfg = config("client", secure={"enabled": True})
    stats = {records.STATS_EPSILON: np.array([9.0]), records.STATS_UNBOUNDED: np.array([0.0])}
    earlier = [{"round": 1, "sites": [0, 1]}, {"round": 2, "sites": [0]}]
    row = privacy_row(cfg, [{records.SITE_ID: 0}, {records.SITE_ID: 1}], stats, earlier, {}, set())
    mechanism = client_mechanism(cfg)
    for site, rounds_in in (("0", 3), ("1", 2)):
        ledger = [(mechanism.noise_multiplier, mechanism.sample_rate, 1)] * rounds_in
        assert row["privacy"][site] == spend(cfg, mechanism, ledger).as_dict()
    assert row["epsilon_max"] == pytest.approx(row["privacy"]["0"]["epsilon"])
    assert row["amplification"] == NO_AMPLIFICATION


def test_the_round_table_keeps_its_columns_when_only_the_mean_epsilon_is_known(tmp_path):
    """Under secure aggregation at sample level a round's row holds the mean epsilon only (the
    sites' sum is all the server sees): the table shows it in the epsilon column, in line with
    round 0's largest epsilon, not a row with a column missing."""
    import io

    from fedlora.report import Reporter

    stream = io.StringIO()
    reporter = Reporter(tmp_path, stream)
    common = {"eval_loss": 5.5, "eval_accuracy": 0.3, "eval_macro_f1": 0.15, "seconds": 1.0}
    reporter.round({"round": 0, **common, "epsilon_max": 0.0, "clients": 0, "bytes_up": 0})
    reporter.round({"round": 1, **common, "epsilon_mean": 7.99, "clients": 3, "bytes_up": 5})
    header, _, first, second = stream.getvalue().splitlines()
    end = header.index("epsilon") + len("epsilon")
    assert first[:end].endswith("0.00") and second[:end].endswith("7.99"), stream.getvalue()
    assert len({len(header), len(first), len(second)}) == 1, stream.getvalue()
