"""A server cannot make sites with [peers] train from an adapter of its own making.

The attack: secure aggregation hides one site's update, but the server also makes the adapter
every site trains from next. One it crafts instead of the aggregate (trap weights in the LoRA
factors, Fowl et al. 2023) turns the next round's updates, and so their sum, into a readout of
the sites' text. On the code before, three daemons listing each other trained round 2 from an
adapter the server had altered, every one of them. Now each checks the content it trains from
(fedlora.apps.evidence): round 1 against the adapter it builds from run.seed, every later round
against the round before's secure sum, recomputed from its signed inputs, and the server step
replayed. The sites are the ClientApp a site daemon runs (`daemons`), the server fedlora's own.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from in_process import task_identity
from test_drop_lists import SITES, THRESHOLD, DropsAtMask
from test_peer_roster import NAMES, daemons, listing_each_other, make_keys, roster, signer
from test_site_policy import next_content, run_secure

from fedlora.apps import records as R
from fedlora.apps.evidence import Evidence, check_training_content
from fedlora.apps.server import Federation
from fedlora.errors import FedloraError
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy
from fedlora.report import Reporter
from fedlora.runtime import build_runtime, get_runtime
from fedlora.secure.identity import fingerprint
from fedlora.secure.secagg import Revealed


@pytest.fixture(autouse=True)
def _flower_task():
    with task_identity():
        yield


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


class Crafting(Federation):
    """A server that sends, in round `crafted_round`, its honest adapter plus a trap of its
    own in every B factor (any change will do: the sites cannot tell a trap from noise)."""

    crafted_round = 2

    def round_content(self, round_: int):
        content = super().round_content(round_)
        if round_ == self.crafted_round:
            arrays = R.from_record(content[R.GLOBAL_ADAPTER])
            rng = np.random.default_rng(7)
            crafted = {
                k: v + (0.05 * rng.standard_normal(v.shape)).astype(v.dtype) if "lora_B" in k else v
                for k, v in arrays.items()
            }
            content[R.GLOBAL_ADAPTER] = R.to_record(crafted)
        return content


def federation_of(cls, cfg, tmp_path, keys, policies=None):
    said = io.StringIO()
    (tmp_path / "run").mkdir(exist_ok=True)
    runtime = build_runtime(cfg, log=lambda _: None)
    federation = cls(cfg, runtime, Reporter(tmp_path / "run", said), tmp_path / "state")
    federation.site_names = NAMES[:3]
    grid = daemons(cfg, tmp_path / "sites", keys, policies or listing_each_other(keys))
    return federation, grid, said


def rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]


@pytest.mark.parametrize("crafted_round", [1, 2])
def test_sites_with_peers_train_only_from_the_aggregate(tiny_cfg, tmp_path, keys, crafted_round):
    cfg = tiny_cfg(secure={"enabled": True, "min_cohort": 3}, federation={"rounds": 2})
    federation, grid, _ = federation_of(Crafting, cfg, tmp_path, keys)
    federation.crafted_round = crafted_round
    with pytest.raises(FedloraError) as failed:
        federation.run(grid)
    said = str(failed.value)
    assert f"Round {crafted_round}: secure aggregation failed" in said
    source = "from run.seed = 0" if crafted_round == 1 else "the secure sum of round 1"
    assert said.count(source) == 3, said  # every site refused, before training
    assert len(rows(tmp_path)) == crafted_round  # round 0, and round 1 when it was honest


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "scaffold"},
        {"name": "fedavg", "server_momentum": 0.9},
        {"name": "fedavg", "server_optimizer": "adam", "server_lr": 0.01},
        {"name": "fednova"},
        {"name": "fedavg", "participation": "poisson"},
    ],
    ids=["scaffold", "fedavgm", "fedadam", "fednova", "self-selected"],
)
def test_an_honest_federation_of_sites_with_peers_runs_and_resumes_its_checks(
    tiny_cfg, tmp_path, keys, strategy
):
    """Three rounds, the rounds' sessions set up in the round before, with the server state
    that the next adapter depends on besides the sum: SCAFFOLD's control variate (broadcast
    state), FedAvgM's momentum, FedAdam's moments (the server optimiser's state, sent with the
    content), each checked too; FedNova's normalised sums; self-selected sites, where the sum
    says how many took part. The evidence of the last round survives a restart: the resumed
    server's next content passes a site's check."""
    strategy = dict(strategy)
    federation = {"rounds": 3, "participation": strategy.pop("participation", "server")}
    secure = {"enabled": True, "min_cohort": 3}
    cfg = tiny_cfg(secure=secure, federation=federation, strategy=strategy)
    federation, grid, _ = federation_of(Federation, cfg, tmp_path, keys)
    federation.run(grid)
    assert [r["sites"] for r in rows(tmp_path)[1:]] == [[0, 1, 2]] * 3
    assert R.EVIDENCE_ARRAYS in federation.round_content(4)

    resumed, _, _ = federation_of(Federation, cfg, tmp_path, keys)
    assert resumed.restore_state() == 3
    assert resumed.evidence.fields() == federation.evidence.fields()
    content = resumed.round_content(4)
    if strategy["name"] == "scaffold" or len(strategy) > 1:  # SCAFFOLD's c, the server state
        assert R.from_record(content[R.BROADCAST]) or R.server_state(content)
    policy = listing_each_other(keys)[0]
    own = (NAMES[0], fingerprint(signer(keys, NAMES[0]).public_key()))
    check_training_content(cfg, content, {}, policy, "federation-1", own)


def test_a_site_recomputes_a_sum_with_a_dropped_site_and_checks_every_input(
    tiny_cfg, tmp_path, keys
):
    """Five daemons, site 4's masked input lost: the evidence carries the survivors' seeds and
    site 4's mask key, and a site recomputes exactly the server's sum. Then the server's
    possible lies, each refused: an input swapped for one that steers the sum (the adapter made
    to match), this site's own input altered, a seed of its choosing, a dropped site's mask key
    of its choosing (the sum it gives is pseudo-random: not the adapter sent), evidence without
    inputs (which would vouch for a content of its choosing), a later round's
    evidence or an earlier one's under its number, a malformed one, none at all."""
    cfg = tiny_cfg(secure={"enabled": True}, federation={"clients": SITES})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys, SITES))
    grid.__class__ = DropsAtMask
    result = run_secure(grid, cfg, 1, threshold=THRESHOLD)
    evidence = result.evidence
    assert evidence.survivors == [0, 1, 2, 3] and evidence.dropped == [4]
    assert list(evidence.revealed.mask_keys) == [4]
    total = evidence.total()
    for k, v in result.sums.items():
        np.testing.assert_array_equal(total[k], v)

    policy = SitePolicy(peers=roster(keys, set(NAMES[:SITES]) - {NAMES[1]}))
    own = (NAMES[1], fingerprint(signer(keys, NAMES[1]).public_key()))

    def check(evidence: Evidence) -> None:
        """The content a server sends with `evidence`: the adapter made to match it."""
        content = next_content(cfg, dataclasses.replace(result, evidence=evidence))
        check_training_content(cfg, content, {}, policy, "federation-1", own)

    check(evidence)  # the honest one passes

    def steered(site: int) -> Evidence:
        """Site `site`'s masked input moved in the first value of its first LoRA update: the
        sum, and the adapter made of it, move where the server likes."""
        layout = evidence.layout
        assert {width for width, _ in layout.formats} == {64}  # one word a value
        first = next(i for i, k in enumerate(layout.keys) if k.startswith("delta/"))
        masked = dict(evidence.masked)
        masked[site] = masked[site].copy()
        masked[site][sum(layout.sizes[:first])] += np.uint64(1 << 30)
        return dataclasses.replace(evidence, masked=masked)

    for site in (2, 1):  # another site's input, and this site's own
        with pytest.raises(PolicyRefused, match=f"signature on site {site}'s masked input") as no:
            check(steered(site))
        assert "forged, altered" in no.value.reason
    content = next_content(cfg, result)
    seeds = evidence.revealed.seeds | {3: bytes(32)}
    dataclasses.replace(evidence, revealed=Revealed(seeds, evidence.revealed.mask_keys)).attach(
        content
    )
    with pytest.raises(PolicyRefused, match="signature on site 3's masked input"):
        check_training_content(cfg, content, {}, policy, "federation-1", own)
    lie = Revealed(evidence.revealed.seeds, {4: bytes(range(32))})  # a mask key of its own
    dataclasses.replace(evidence, revealed=lie).attach(content)
    with pytest.raises(PolicyRefused, match="not the secure sum of round 1|gives no adapter"):
        check_training_content(cfg, content, {}, policy, "federation-1", own)
    # "round 1 summed no input and started from this": the adapter of the server's choosing
    crafted = {k: v + 1 for k, v in evidence.content.items() if k.startswith("global/")}
    vouched_by_none = dataclasses.replace(
        evidence, content=evidence.content | crafted, survivors=[], dropped=[]
    )
    unvouched = next_content(cfg, dataclasses.replace(result, evidence=vouched_by_none))
    with pytest.raises(PolicyRefused, match="holds no input, so no peer vouches"):
        check_training_content(cfg, unvouched, {}, policy, "federation-1", own)
    dataclasses.replace(evidence, round_=2).attach(content)
    with pytest.raises(PolicyRefused, match="round 2's adapter came with the evidence of round 2"):
        check_training_content(cfg, content, {}, policy, "federation-1", own)
    dataclasses.replace(evidence, round_=0).attach(content)  # the inputs were signed for 1
    with pytest.raises(PolicyRefused, match="signature on site 0's masked input"):
        check_training_content(cfg, content, {}, policy, "federation-1", own)
    content[R.EVIDENCE_ARRAYS] = R.to_record({"masked/0": np.zeros(3)})  # not what it says
    with pytest.raises(PolicyRefused, match="evidence of an earlier round's sum is malformed"):
        check_training_content(cfg, content, {}, policy, "federation-1", own)
    for key in (R.EVIDENCE, R.EVIDENCE_ARRAYS):
        del content[key]
    with pytest.raises(PolicyRefused, match="from run.seed = 0, and it came without the evid"):
        check_training_content(cfg, content, get_runtime(cfg).initial_adapter, policy, "f", own)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"privacy": {"level": "client", "client_noise": "central"}}, "client_noise"),
        ({"transport": {"dtype": "bfloat16"}}, "transport.dtype"),
    ],
)
def test_a_site_with_peers_refuses_a_server_step_it_cannot_replay(tiny_cfg, keys, setting, named):
    cfg = tiny_cfg(setting)
    with pytest.raises(PolicyRefused, match=named):
        listing_each_other(keys)[0].check_request(cfg, secure=True)
    SitePolicy().check_request(cfg, secure=True)  # without a roster there is nothing to check


def test_round_1_is_the_adapter_every_party_builds_from_the_seed(tiny_cfg):
    """What a site checks round 1 against is what a server sends: the same seed, the same
    factors, bit for bit, however many times a runtime is built."""
    cfg = tiny_cfg()
    server = build_runtime(cfg, log=lambda _: None)
    site = get_runtime(cfg)
    assert set(server.initial_adapter) == set(site.initial_adapter)
    for k, v in server.initial_adapter.items():
        np.testing.assert_array_equal(v, site.initial_adapter[k])


class KilledInRound2(Federation):
    """A server that dies once round 2 has begun (its sites never heard of it)."""

    def collect(self, grid, chosen, round_):
        if round_ == 2:
            self.mark_started(round_)
            raise RuntimeError("killed")
        return super().collect(grid, chosen, round_)


def test_after_a_round_that_is_not_repeated_the_sites_check_the_last_aggregate(
    tiny_cfg, tmp_path, keys
):
    """An interrupted round is not repeated (a site takes part in a round once): the resumed
    server sends round 3 the adapter of round 1's sum with round 1's evidence, and the sites
    with [peers] accept it."""
    cfg = tiny_cfg(secure={"enabled": True, "min_cohort": 3}, federation={"rounds": 3})
    federation, grid, _ = federation_of(KilledInRound2, cfg, tmp_path, keys)
    with pytest.raises(RuntimeError, match="killed"):
        federation.run(grid)
    resumed, _, said = federation_of(Federation, cfg, tmp_path, keys)
    resumed.run(grid)
    assert "Round 2 was interrupted and is not repeated" in said.getvalue()
    assert [r["round"] for r in resumed.reporter.rows] == [0, 1, 3]
    assert resumed.reporter.rows[-1]["sites"] == [0, 1, 2]
    assert resumed.evidence.round_ == 3


def test_the_server_optimisers_state_is_checked_like_the_adapter(tiny_cfg, tmp_path, keys):
    """FedAvgM: the next adapter depends on the momentum as much as on the sum, so a server
    that sends the right adapter with a momentum of its own making steers the one after. The
    momentum is in the content the sites sign and check."""
    cfg = tiny_cfg(secure={"enabled": True}, strategy={"server_momentum": 0.9})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys))
    result = run_secure(grid, cfg, 1)
    content = next_content(cfg, result)
    state = R.server_state(content)
    assert state  # the momentum after round 1
    policy = listing_each_other(keys)[0]
    own = (NAMES[0], fingerprint(signer(keys, NAMES[0]).public_key()))
    check_training_content(cfg, content, {}, policy, "federation-1", own)
    content[R.SERVER_STATE] = R.to_record({k: 2 * v for k, v in state.items()})
    with pytest.raises(PolicyRefused, match="round 2's server optimiser state is not the secure"):
        check_training_content(cfg, content, {}, policy, "federation-1", own)
