"""A server that tells different sites different drop lists cannot read one site's update.

The attack (Bonawitz et al. 2017, why their active-server protocol has a consistency round):
five sites, threshold 3, every site listing the others in its [peers]. The server relays to
site 0 only the shares of sites 1 and 2, so site 0 masks its input with pairwise masks for those
two alone. At the unmasking it tells site 1 that site 2 dropped, site 2 that site 1 dropped, and
sites 3 and 4 that both did, while every one of them is told that site 0 survived: each site
reveals only one kind of share per peer, as the protocol asks, yet together they give the self
mask of site 0 and the mask keys of sites 1 and 2, and site 0's masked input is its update.
The check that stops it (a confirmed survivor set) is made by the other sites, so the same
attack works against a site with [peers] whose peers have none: such a site now takes part
only with peers that have a roster too. The sites here are the ClientApp a site daemon runs
(`daemons`); the server is fedlora's own message format, played by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from in_process import LocalGrid, task_identity
from test_peer_roster import (
    NAMES,
    daemons,
    listing_each_other,
    make_keys,
    roster,
    signer,
    spy_on_site_0,
)
from test_site_policy import global_adapter, next_content, round_content, run_secure

from fedlora.apps import records as R
from fedlora.apps.secure import (
    QUERY_SECAGG,
    TRAIN_SECAGG,
    NextRound,
    _keys_fields,
    _read_keys,
    _read_masked,
    _read_shares,
    _read_signature,
    _read_unmask,
    _share_fields,
    _signature_fields,
    _stage,
)
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy
from fedlora.secure.identity import survivors_statement
from fedlora.secure.secagg import (
    DEFAULT_VALUE_BOUND,
    combine_secret,
    decode_sum,
    mask,
    pairwise_mask,
    ring_add,
)

SITES, THRESHOLD = 5, 3
#: what the server tells each site but the target at the unmasking: the sites that dropped
TOLD_DROPPED = {1: [2], 2: [1], 3: [1, 2], 4: [1, 2]}


@pytest.fixture(autouse=True)
def _flower_task():
    with task_identity():
        yield


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"))


def ask(grid, site: int, content: RecordDict, message_type: str = QUERY_SECAGG) -> RecordDict:
    msg = Message(content, dst_node_id=100 + site, message_type=message_type)
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    assert not reply.has_error(), reply.error.reason
    return reply.content


def drop_list_attack(grid, cfg, confirm: bool) -> dict[str, np.ndarray] | dict[int, str]:
    """The server's attack on site 0 (module doc). `confirm`: it runs the confirm stage, asking
    each site to confirm the survivors it tells that site, and relays every confirmation it
    has of that set. Returns site 0's input as the server rebuilds it, or the sites' refusals
    (site -> reason) when it cannot."""
    round_, sites = 1, list(range(SITES))
    content = round_content(round_, global_adapter(cfg))
    fields = _keys_fields(THRESHOLD, DEFAULT_VALUE_BOUND, sites)
    content[R.SECAGG] = _stage("keys", round_, fields)
    public, signed, rostered = {}, {}, set()
    for s in sites:
        advertised = _read_keys(ask(grid, s, copy.deepcopy(content)))
        public[s], signed[s] = advertised.keys, advertised.signed
        rostered |= {s} if advertised.rostered else set()
    fields = _share_fields(public, signed, rostered)
    share = RecordDict({R.SECAGG: _stage("share", round_, fields)})
    sent, refused = {}, {}
    for s in sites:
        reply = ask(grid, s, copy.deepcopy(share))
        if R.REFUSAL in reply:
            refused[s] = str(reply[R.REFUSAL][R.REASON])
        else:
            sent[s] = _read_shares(reply)
    if refused:
        return refused

    inputs = {}
    for s in sites:  # site 0 hears from sites 1 and 2 only: its masks pair it with them alone
        senders = [1, 2] if s == 0 else [j for j in sites if j != s]
        fields = {R.PEERS: senders, R.CIPHERTEXTS: [sent[j][s] for j in senders]}
        reply = ask(grid, s, RecordDict({R.SECAGG: _stage("mask", round_, fields)}), TRAIN_SECAGG)
        inputs[s] = _read_masked(reply)

    told = {s: [j for j in sites if j not in dropped] for s, dropped in TOLD_DROPPED.items()}
    confirmations: dict[tuple[int, ...], dict] = {}
    if confirm:
        for s, survivors in told.items():
            fields = {R.SURVIVORS: survivors}
            fields |= _signature_fields(survivors, {j: inputs[j].signed for j in survivors})
            reply = ask(grid, s, RecordDict({R.SECAGG: _stage("confirm", round_, fields)}))
            if R.REFUSAL in reply:
                refused[s] = str(reply[R.REFUSAL][R.REASON])
            else:
                proof = _read_signature(reply[R.SECAGG])
                confirmations.setdefault(tuple(survivors), {})[s] = proof

    b_shares, s_shares = [], {1: [], 2: []}
    for s, dropped in TOLD_DROPPED.items():
        if s in refused:
            continue
        fields = {R.SURVIVORS: told[s], R.DROPPED: dropped}
        proofs = confirmations.get(tuple(told[s]), {})
        if proofs:  # the confirmations it has of that set
            fields |= {R.CONFIRMED: list(proofs)} | _signature_fields(list(proofs), proofs)
        else:  # the survivors' signed content digests, as in a round without a confirm stage
            fields |= _signature_fields(told[s], {j: inputs[j].signed for j in told[s]})
        reply = ask(grid, s, RecordDict({R.SECAGG: _stage("unmask", round_, fields)}))
        if R.REFUSAL in reply:
            refused[s] = str(reply[R.REFUSAL][R.REASON])
            continue
        b, gone = _read_unmask(reply)
        b_shares.append(b[0])
        for j in dropped:
            s_shares[j].append(gone[j])
    if refused:
        return refused

    layout, words = inputs[0].layout, inputs[0].masked.copy()
    ring_add(layout, words, mask(combine_secret(b_shares[:THRESHOLD]), words.size), True)
    for j in (1, 2):  # site 0 added +PRG(s_0j) for each j > 0 it heard from
        s_j = combine_secret(s_shares[j][:THRESHOLD])
        ring_add(layout, words, pairwise_mask(s_j, public[0][1], words.size), True)
    return layout.unpack(decode_sum(layout, words))


@pytest.mark.parametrize("confirm", [False, True], ids=["no-confirm-stage", "each-its-own"])
def test_sites_with_peers_never_unmask_one_site_by_different_drop_lists(
    tiny_cfg, tmp_path, keys, monkeypatch, confirm
):
    """On the code before (no confirm stage) the server rebuilt site 0's update exactly, every
    site listing the others in its [peers]. Now a site with [peers] reveals unmasking shares
    only for the survivor set it confirmed, and only when t sites confirmed that same set."""
    cfg = tiny_cfg(secure={"enabled": True}, federation={"clients": SITES})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys, SITES))
    own = spy_on_site_0(monkeypatch)
    result = drop_list_attack(grid, cfg, confirm)
    assert own, "site 0 did not mask its input"
    assert sorted(result) == sorted(TOLD_DROPPED), "the server rebuilt site 0's input"
    if confirm:  # sites 3 and 4 confirmed {0, 3, 4}: two of three; the others alone
        assert all("threshold is 3" in why for why in result.values()), result
    else:
        assert all("asked for no confirmation" in why for why in result.values()), result


class DropsAtMask(LocalGrid):
    """Site 4's masked input never arrives (its daemon fails while training, or the reply is
    lost): the others must reveal its mask key for the sum of the rest."""

    def push_messages(self, msgs: list[Message]) -> list[str]:
        ids = super().push_messages(msgs)
        for msg, msg_id in zip(msgs, ids, strict=True):
            if msg.metadata.dst_node_id == 104 and msg.metadata.message_type == TRAIN_SECAGG:
                self.replies[msg_id] = Message(Error(code=0, reason="lost"), reply_to=msg)
                self.replies[msg_id].metadata.__dict__["_reply_to_message_id"] = msg_id
        return ids


def test_an_honest_server_asks_for_a_confirmation_when_a_site_drops(tiny_cfg, tmp_path, keys):
    """Five daemons listing each other. Without a dropout a site reveals self-mask shares only,
    which unmask no part of a sum, so the rounds run without the confirm stage (the next one's
    session set up during this one); when site 4 drops after sharing its keys, the others
    confirm the four survivors before revealing its mask key, and the round sums the four."""
    cfg = tiny_cfg(secure={"enabled": True}, federation={"clients": SITES})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys, SITES))
    upcoming = NextRound(2, [*range(SITES)], THRESHOLD)
    first = run_secure(grid, cfg, 1, threshold=THRESHOLD, upcoming=upcoming)
    assert first.sites == [*range(SITES)] and not first.refused and not first.failures
    assert list(first.seconds) == ["keys", "share", "mask", "unmask"]
    assert first.prepared is not None and first.prepared.rostered == {*range(SITES)}
    second = run_secure(grid, cfg, 2, THRESHOLD, next_content(cfg, first), prepared=first.prepared)
    assert second.sites == [*range(SITES)]
    assert list(second.seconds) == ["mask", "unmask"]

    grid.__class__ = DropsAtMask
    third = run_secure(grid, cfg, 3, THRESHOLD, next_content(cfg, second))
    assert third.sites == [0, 1, 2, 3] and not third.refused, third.refused
    assert list(third.seconds) == ["keys", "share", "mask", "confirm", "unmask"]
    assert third.sums[R.STATS_ROWS][0] > 0


@pytest.mark.parametrize("confirm", [False, True], ids=["no-confirm-stage", "each-its-own"])
def test_a_site_with_peers_takes_part_only_with_peers_that_check(
    tiny_cfg, tmp_path, keys, monkeypatch, confirm
):
    """Site 0 lists the other four; they list no one, so they reveal their shares for whatever
    survivors the server names (and confirm whatever set it asks them to). On the code before,
    the attack rebuilt site 0's update exactly, its own roster notwithstanding. Each site now
    signs with its keys whether it has a roster, and a site with one takes part only when every
    peer does: site 0 refuses at the share stage, before anything it trained leaves."""
    cfg = tiny_cfg(secure={"enabled": True}, federation={"clients": SITES})
    policies = [listing_each_other(keys, SITES)[0]] + [SitePolicy()] * (SITES - 1)
    grid = daemons(cfg, tmp_path, keys, policies)
    own = spy_on_site_0(monkeypatch)
    result = drop_list_attack(grid, cfg, confirm)
    assert not own, "site 0 masked its input"
    assert list(result) == [0], result
    assert "site 1 ('st-marys') has no [peers] of its own" in result[0], result


def test_the_confirmations_a_site_with_peers_accepts(keys):
    """Before revealing a dropped site's mask key: its own confirmation and t - 1 more, each
    a different peer of its roster signing the same survivors for this session."""
    policy = listing_each_other(keys, SITES)[0]
    survivors, dropped = [0, 1, 2, 3], [4]

    def confirm(site: int, confirmed=survivors, session: int = 1):
        statement = survivors_statement("federation-1", session, site, NAMES[site], confirmed)
        return signer(keys, NAMES[site]).prove(statement)

    def check(proofs, confirmed=survivors, policy=policy):
        policy.check_confirmed("federation-1", 1, 0, THRESHOLD, confirmed, dropped, proofs)

    check({1: confirm(1), 2: confirm(2)})  # with its own: 3 of threshold 3
    policy.check_confirmed("federation-1", 1, 0, THRESHOLD, [], [], {})  # nobody dropped
    cases = [
        ({1: confirm(1)}, "2 sites confirmed the survivors, threshold is 3"),
        ({1: confirm(1), 2: confirm(2, [0, 1, 2])}, "for other survivors than this site's"),
        ({1: confirm(1), 2: confirm(2, session=2)}, "from another session"),
        ({1: confirm(1), 4: confirm(4)}, r"confirmations from sites \[4\], which are not"),
        ({1: confirm(1), 2: confirm(1)}, "two sites of the session sign as 'st-marys'"),
    ]
    for proofs, refusal in cases:
        with pytest.raises(PolicyRefused, match=refusal):
            check(proofs)
    with pytest.raises(PolicyRefused, match=r"names sites \[4\] that dropped but asked for no"):
        check({}, confirmed=[])
    SitePolicy().check_confirmed("federation-1", 1, 0, THRESHOLD, [], dropped, {})  # no roster
    assert roster(keys, NAMES[1:SITES]) == policy.peers


def test_a_site_and_a_server_of_other_protocols_say_so(tiny_cfg, tmp_path, keys):
    """The keys stage carries the secure-aggregation protocol's version both ways: a site
    asked by a server of another version (or of none: an older fedlora) says so instead of
    failing on a missing field or a signature that cannot match, and so does the server of a
    site's reply."""
    from fedlora.apps import secure

    cfg = tiny_cfg(secure={"enabled": True}, federation={"clients": SITES})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys, SITES))
    content = round_content(1, global_adapter(cfg))
    fields = _keys_fields(THRESHOLD, DEFAULT_VALUE_BOUND, list(range(SITES)))
    for sent in (secure.PROTOCOL - 1, None):
        request = copy.deepcopy(content)
        request[R.SECAGG] = _stage("keys", 1, fields)
        if sent is None:
            del request[R.SECAGG][R.PROTOCOL]
        else:
            request[R.SECAGG][R.PROTOCOL] = sent
        msg = Message(request, dst_node_id=100, message_type=QUERY_SECAGG)
        (reply,) = grid.pull_messages(grid.push_messages([msg]))
        assert reply.has_error() and "secure-aggregation protocol" in reply.error.reason
    request = copy.deepcopy(content)
    request[R.SECAGG] = _stage("keys", 1, fields)
    answer = ask(grid, 1, request)
    answer[R.SECAGG][R.PROTOCOL] = secure.PROTOCOL + 1
    with pytest.raises(ValueError, match="secure-aggregation protocol"):
        _read_keys(answer)
