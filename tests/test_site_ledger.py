"""A site's privacy budget holds against the server: every release is in the site's own ledger
before it leaves the site, whatever round numbers, federation names or stages the server sends;
and the site never uses a delta that would let a mechanism publish one of its units.

The rounds run in this process (`LocalGrid`: the sites' ClientApp, the code a site daemon and a
simulation run), with privacy.noise_multiplier = 1, where one round spends about 0.91 per site:
a budget of 0.95 holds exactly one round."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from in_process import LocalGrid, run_federation, task_identity
from test_site_policy import global_adapter, round_content, run_secure

from fedlora.apps import records as R
from fedlora.apps.contribution import LEDGER_FILE, STATE_DIR
from fedlora.apps.secure import SecureRoundFailed
from fedlora.deploy import runconfig
from fedlora.errors import FedloraError
from fedlora.privacy.ledger import PrivacyLedger, Release
from fedlora.privacy.policy import Mechanism, sample_mechanism
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy

ONE_ROUND = 0.95  # epsilon of one round at noise multiplier 1: about 0.91


@pytest.fixture(autouse=True)
def _flower_task():
    with task_identity():
        yield


def train(grid: LocalGrid, cfg, round_: int, node: int = 100) -> dict:
    """A plain TRAIN for `round_` to `node`; the site's metrics, or its refusal."""
    msg = Message(
        round_content(round_, global_adapter(cfg)), dst_node_id=node, message_type=MessageType.TRAIN
    )
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    if R.REFUSAL in reply.content:
        return dict(reply.content[R.REFUSAL])
    return dict(reply.content[R.SITE_METRICS])


def test_a_server_that_numbers_rounds_backwards_does_not_reset_the_budget(tiny_cfg):
    """Training in round r starts from the strategy state saved before r: a server that asked
    for round 5 and then round 3 found an empty ledger in round 3, and every site trained past
    its budget. The ledger is the list of releases, not a round's state."""
    cfg = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0, "max_epsilon": ONE_ROUND})
    grid = LocalGrid(cfg, 3)
    first = train(grid, cfg, 5)
    assert R.EXHAUSTED not in first and 0.8 < first[R.PRIVACY + "epsilon"] < ONE_ROUND
    assert train(grid, cfg, 3)[R.EXHAUSTED] == 1
    assert train(grid, cfg, 6)[R.EXHAUSTED] == 1


def test_a_server_that_runs_more_rounds_than_it_declared_gets_none(tiny_cfg):
    """privacy.target_epsilon calibrates the noise to spend exactly that over federation.rounds:
    a server that declares one round (less noise a round) and asks for a second is refused."""
    cfg = tiny_cfg(privacy={"level": "sample", "target_epsilon": 1.0}, federation={"rounds": 1})
    grid = LocalGrid(cfg, 3)
    assert 0.95 < train(grid, cfg, 1)[R.PRIVACY + "epsilon"] <= 1.0
    assert train(grid, cfg, 2)[R.EXHAUSTED] == 1


class WithholdsUnmask(LocalGrid):
    """A server that never asks site 0 to unmask (here: the request is lost on the way): the
    other sites' shares of site 0's self-mask are enough to sum its input, and site 0 is never
    told that it was."""

    def push_messages(self, msgs: list[Message]) -> list[str]:
        ids = []
        for msg in msgs:
            stage = msg.content[R.SECAGG].get(R.SECAGG_STAGE) if R.SECAGG in msg.content else None
            if msg.metadata.dst_node_id == 100 and stage == "unmask":
                msg_id = f"m{next(self.ids)}"
                lost = Message(Error(code=0, reason="not delivered"), reply_to=msg)
                lost.metadata.__dict__["_reply_to_message_id"] = msg_id
                self.replies[msg_id] = lost
                ids.append(msg_id)
            else:
                ids += super().push_messages([msg])
        return ids


def test_a_masked_input_is_accounted_when_it_leaves_not_when_the_server_says_it_was_summed(
    tiny_cfg,
):
    cfg = tiny_cfg(
        privacy={"level": "sample", "noise_multiplier": 1.0, "max_epsilon": ONE_ROUND},
        secure={"enabled": True},
    )
    grid = WithholdsUnmask(cfg, 3)
    result = run_secure(grid, cfg, 1)
    assert result.sites == [0, 1, 2]  # site 0's input is in the sum
    with pytest.raises(SecureRoundFailed) as failed:
        run_secure(grid, cfg, 2)
    failures = str(failed.value).split("Site failures: ")[1].split("; ")
    assert any(f.startswith("site 0, mask") and "budget exhausted" in f for f in failures), failures


def daemon_grid(cfg, tmp_path, federation: str, policy: SitePolicy) -> LocalGrid:
    """One site as a site daemon runs it (fedlora.deploy.apps.SiteApp): a state folder per
    federation, one ledger for the site."""
    grid = LocalGrid(cfg, 1, policy)
    grid.contexts[100] = Context(
        run_id=1,
        node_id=100,
        node_config={
            "partition-id": 0,
            "num-partitions": 1,
            STATE_DIR: str(tmp_path / "federations" / federation),
            LEDGER_FILE: str(tmp_path / "privacy-ledger.jsonl"),
        },
        state=RecordDict(),
        run_config={runconfig.FEDERATION: federation},
    )
    return grid


def test_a_sites_own_budget_counts_every_federation_a_server_names(tiny_cfg, tmp_path):
    """A site's own budget (site.toml policy.max_epsilon) covers its rows whatever the server
    calls the federation; the federation's budget (privacy.max_epsilon) covers that federation."""
    cfg = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0})
    own = SitePolicy(max_epsilon=ONE_ROUND)
    assert R.EXHAUSTED not in train(daemon_grid(cfg, tmp_path, "a", own), cfg, 1)
    assert train(daemon_grid(cfg, tmp_path, "b", own), cfg, 1)[R.EXHAUSTED] == 1

    shared = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0, "max_epsilon": 0.95})
    fresh = train(daemon_grid(shared, tmp_path, "c", SitePolicy()), shared, 1)
    assert R.EXHAUSTED not in fresh and fresh[R.PRIVACY + "epsilon"] < ONE_ROUND  # c's own spend
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.jsonl")
    assert [(r.federation, r.round) for r in ledger.releases()] == [("a", 1), ("c", 1)]


def test_a_site_daemon_prints_each_private_rounds_noise_and_spend(tiny_cfg, tmp_path):
    """Its operator sees the noise the site applied and what its rows have spent, in this
    federation and over its whole ledger, and why it stopped; a simulation (nothing forwarded)
    prints nothing."""
    from fedlora.deploy.site import forward_site_log

    cfg = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0})
    own = SitePolicy(max_epsilon=10.0)
    lines: list[str] = []
    stop_forwarding = forward_site_log(lines.append)
    try:
        first = train(daemon_grid(cfg, tmp_path, "a", own), cfg, 1)
        second = train(daemon_grid(cfg, tmp_path, "b", own), cfg, 1)
        spent = train(daemon_grid(cfg, tmp_path, "c", SitePolicy(max_epsilon=1.0)), cfg, 1)
    finally:
        stop_forwarding()
    train(daemon_grid(cfg, tmp_path, "d", own), cfg, 1)
    assert len(lines) == 3 and spent[R.EXHAUSTED] == 1, lines
    assert lines[2].startswith("round 1 not trained: epsilon spent ")
    assert "> policy.max_epsilon (this site's own, over all its federations) = 1" in lines[2]
    one = f"{first[R.PRIVACY + 'epsilon']:.3g}"
    assert second[R.PRIVACY + "epsilon"] == first[R.PRIVACY + "epsilon"]  # b's own: one round
    assert lines[0].startswith("round 1 trained: DP-SGD, noise multiplier 1 (lr x sigma x clip")
    assert f"epsilon {one} in this federation, {one} over this site's privacy ledger" in lines[0]
    assert "(policy.max_epsilon = 10)" in lines[0]
    both = float(re.search(r"federation, ([\d.]+) over", lines[1]).group(1))
    assert f"epsilon {one} in this federation" in lines[1] and both > float(one)


def test_the_ledger_is_append_only_json_lines_that_survive_a_restart(tmp_path):
    path = tmp_path / "ledger.jsonl"
    PrivacyLedger(path).record(Release("a", 2, 1.1, 0.02, 30))
    PrivacyLedger(path).record(Release("b", 1, 0.9, 0.05, 12))  # a new instance: a restart
    ledger = PrivacyLedger(path)
    assert ledger.entries() == [(1.1, 0.02, 30), (0.9, 0.05, 12)]
    assert ledger.entries("b") == [(0.9, 0.05, 12)]
    assert [json.loads(line)["federation"] for line in path.read_text().splitlines()] == ["a", "b"]
    ledger.forget_rounds_after(1)  # simulation resume: rounds after the last saved one
    assert ledger.entries() == [(0.9, 0.05, 12)]


def test_a_site_never_uses_a_delta_that_could_publish_a_unit(tiny_cfg):
    """(epsilon, delta)-DP with delta >= 1/n allows a mechanism that publishes one of n units
    outright. A site given such a delta uses 1/(10 n) instead, and never more than its policy's
    max_delta: stricter, not a refusal, which would tell a server probing with deltas its size."""
    cfg = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0, "delta": 0.5})
    assert sample_mechanism(cfg, 50, 3).delta == pytest.approx(1 / 500)
    assert sample_mechanism(cfg, 50, 3, max_delta=1e-6).delta == 1e-6
    below = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0, "delta": 0.0199})
    assert sample_mechanism(below, 50, 3).delta == 0.0199
    metrics = train(LocalGrid(cfg, 3, SitePolicy(max_delta=1e-6)), cfg, 1)
    assert R.REASON not in metrics and metrics[R.PRIVACY + "delta"] == 1e-6
    # client level: the sites share one delta (and their noise bounds), so max_delta refuses
    with pytest.raises(PolicyRefused, match="delta 1e-05 above this site's policy.max_delta"):
        SitePolicy(max_delta=1e-6).check_mechanism(Mechanism(1.0, 1.0, 1e-5, 1.0, 1))


def test_a_sites_minimum_noise_is_applied_not_refused(tiny_cfg):
    """Under a target epsilon the noise follows from the site's size, so refusing noise below
    policy.min_noise_multiplier would tell a server probing with epsilons that size: the site
    applies its minimum instead."""
    cfg = tiny_cfg(privacy={"level": "sample", "target_epsilon": 8.0})
    federations = sample_mechanism(cfg, 60, 3).noise_multiplier
    assert sample_mechanism(cfg, 60, 3, min_noise=federations + 1).noise_multiplier == (
        federations + 1
    )
    metrics = train(LocalGrid(cfg, 3, SitePolicy(min_noise_multiplier=5.0)), cfg, 1)
    assert R.REASON not in metrics and metrics[R.PRIVACY + "noise_multiplier"] == 5.0
    # client level: the sites share the noise, so a minimum above it is refused
    with pytest.raises(PolicyRefused, match="noise multiplier 0.5 below this site's minimum 1"):
        SitePolicy(min_noise_multiplier=1.0).check_mechanism(Mechanism(0.5, 1.0, 1e-5, 1.0, 1))


def test_a_delta_no_site_accepts_is_a_config_error_before_a_simulation_starts(tiny_cfg):
    """The operator of a simulation plays every site: one message before any work, not ten
    refusals after round 0."""
    sites = tiny_cfg().federation.clients
    with pytest.raises(FedloraError, match=f"protects each of the sites: delta 0.5 .* 1/{sites}"):
        tiny_cfg(privacy={"level": "client", "noise_multiplier": 1.0, "delta": 0.5})
    cfg = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0, "delta": 0.5})
    with pytest.raises(FedloraError, match="At the largest site, delta 0.5 is not below 1/"):
        run_federation(cfg)
    assert not Path(cfg.run.out).exists()


def test_a_sites_operator_reads_what_its_rows_have_spent(tiny_cfg, tmp_path, capsys):
    """`fedlora client --config site.toml --spent`: epsilon per federation at the delta and
    with the accountant its releases recorded, and over the whole ledger at the smallest delta,
    from the ledger alone."""
    import argparse

    from fedlora.deploy.cli import cmd_client
    from fedlora.privacy.accounting import epsilon

    state = tmp_path / "site" / "state"
    for federation, accountant in (("a", "rdp"), ("b", "prv")):
        privacy = {"level": "sample", "noise_multiplier": 1.0, "accountant": accountant}
        cfg = tiny_cfg(privacy=privacy)
        train(daemon_grid(cfg, state, federation, SitePolicy()), cfg, 1)
    ledger = PrivacyLedger(state / "privacy-ledger.jsonl")
    releases = ledger.releases()
    assert [(r.federation, r.accountant) for r in releases] == [("a", "rdp"), ("b", "prv")]
    assert all(r.delta > 0 for r in releases)
    ledger.record(Release("c", 1, 2.0, 0.5, 3))  # an older line: no delta recorded

    site = tmp_path / "site"
    (site / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    (site / "site.toml").write_text(
        "[site]\nname = 'alpha'\nserver = 'localhost:9092'\ninsecure = true\n"
        "state_dir = 'state'\n[data]\npath = 'train.jsonl'\n[policy]\nmax_epsilon = 10\n"
    )
    args = argparse.Namespace(config=str(site / "site.toml"), spent=True, delta=0.0)
    assert cmd_client(args) == 0
    out = capsys.readouterr().out
    delta = releases[0].delta
    for federation, accountant in (("a", "rdp"), ("b", "prv")):
        entries = [r.entry for r in releases if r.federation == federation]
        own = epsilon(entries, delta, accountant)
        row = rf"\n  {federation} +1-1 \(1\) +{own:.3g} +{delta:.3g} +{accountant}\n"
        assert re.search(row, out), out
    overall = epsilon([r.entry for r in ledger.releases()], delta)
    assert re.search(rf"all federations +\(3\) +{overall:.3g} +{delta:.3g} +rdp", out), out
    assert re.search(r"\n  c +1-1 \(1\) +- +- +rdp\n", out) and "policy.max_epsilon = 10" in out

    at = argparse.Namespace(config=str(site / "site.toml"), spent=True, delta=1e-6)
    assert cmd_client(at) == 0
    every = epsilon([r.entry for r in ledger.releases()], 1e-6)
    assert re.search(rf"all federations +\(3\) +{every:.3g} +1e-06", capsys.readouterr().out)
