"""A server that tells different sites different drop lists cannot read one site's update.

The attack (Bonawitz et al. 2017, why their active-server protocol has a consistency round):
five sites, threshold 3, every site listing the others in its [peers]. The server relays to
site 0 only the shares of sites 1 and 2, so site 0 masks its input with pairwise masks for those
two alone. At the unmasking it tells site 1 that site 2 dropped, site 2 that site 1 dropped, and
sites 3 and 4 that both did, while every one of them is told that site 0 survived: each site
reveals only one kind of share per peer, as the protocol asks, yet together they give the self
mask of site 0 and the mask keys of sites 1 and 2, and site 0's masked input is its update.
The sites here are the ClientApp a site daemon runs (`daemons`); the server is fedlora's own
message format, played by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from in_process import task_identity
from test_peer_roster import daemons, listing_each_other, make_keys, spy_on_site_0
from test_site_policy import global_adapter, round_content, run_secure

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
    public, signed = {}, {}
    for s in sites:
        _, public[s], signed[s], asks = _read_keys(ask(grid, s, copy.deepcopy(content)))
        assert asks, "a site with [peers] asks for the confirm stage"
    share = RecordDict({R.SECAGG: _stage("share", round_, _share_fields(public, signed))})
    sent = {s: _read_shares(ask(grid, s, copy.deepcopy(share))) for s in sites}

    inputs = {}
    for s in sites:  # site 0 hears from sites 1 and 2 only: its masks pair it with them alone
        senders = [1, 2] if s == 0 else [j for j in sites if j != s]
        fields = {R.PEERS: senders, R.CIPHERTEXTS: [sent[j][s] for j in senders]}
        reply = ask(grid, s, RecordDict({R.SECAGG: _stage("mask", round_, fields)}), TRAIN_SECAGG)
        inputs[s] = _read_masked(reply)

    told = {s: [j for j in sites if j not in dropped] for s, dropped in TOLD_DROPPED.items()}
    confirmations: dict[tuple[int, ...], dict] = {}
    refused = {}
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
        if proofs:
            fields |= {R.CONFIRMED: list(proofs)} | _signature_fields(list(proofs), proofs)
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


def test_an_honest_server_runs_the_confirm_stage_sites_with_peers_ask_for(tiny_cfg, tmp_path, keys):
    """Five daemons listing each other: the round runs five stages and sums every input; the
    next round's session, set up during this one, asks for the stage too."""
    cfg = tiny_cfg(secure={"enabled": True}, federation={"clients": SITES})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys, SITES))
    first = run_secure(grid, cfg, 1, threshold=THRESHOLD, upcoming=NextRound(2, [*range(SITES)], 3))
    assert first.sites == [*range(SITES)] and not first.refused and not first.failures
    assert list(first.seconds) == ["keys", "share", "mask", "confirm", "unmask"]
    assert first.prepared is not None and first.prepared.confirming == {*range(SITES)}
    second = run_secure(grid, cfg, 2, threshold=THRESHOLD, prepared=first.prepared)
    assert second.sites == [*range(SITES)]
    assert list(second.seconds) == ["mask", "confirm", "unmask"]
