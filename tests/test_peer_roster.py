"""A server that invents sites cannot read one: a site with a roster of its peers (site.toml
[peers]) shares its secure-aggregation secrets only with keys those peers signed for the session.

The attack (`sybil_session`): the server runs a session of one real site and sites of its own,
whose secrets it holds. Their shares of the real site's self-mask and their pairwise keys
remove every mask, and the "sum" is the real site's update. The sites here are the ClientApp a
site daemon and a simulation run, in this process (`LocalGrid`); the server is fedlora's own
message format, played by hand.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from in_process import LocalGrid, task_identity
from test_site_policy import global_adapter, next_content, round_content, run_secure

from fedlora.apps import records as R
from fedlora.apps.contribution import AUTH_KEY, STATE_DIR
from fedlora.apps.secure import (
    QUERY_SECAGG,
    TRAIN_SECAGG,
    UNSIGNED,
    NextRound,
    SecureRoundFailed,
    _keys_fields,
    _read_keys,
    _read_masked,
    _read_shares,
    _share_fields,
    _stage,
    key_bounds,
)
from fedlora.deploy import runconfig
from fedlora.deploy.server import shared_config
from fedlora.deploy.settings import load_site
from fedlora.deploy.site import roster_line
from fedlora.errors import FedloraError
from fedlora.privacy.site_policy import SitePolicy
from fedlora.runtime import get_runtime
from fedlora.secure.certs import Layout, make_certs
from fedlora.secure.identity import Signer, fingerprint, keys_statement
from fedlora.secure.secagg import DEFAULT_VALUE_BOUND, SecAggClient, SecAggServer

FEDERATION = "federation-1"
NAMES = ["city", "st-marys", "university", "general", "county"]


@pytest.fixture(autouse=True)
def _flower_task():
    with task_identity():
        yield


def make_keys(folder: Path) -> Path:
    """Every site's node-authentication key (and one for a forger), made in `folder`."""
    make_certs(folder, server_names=[], server_ips=[], sites=[*NAMES, "forger"])
    return folder


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"))


def signer(keys: Path, name: str) -> Signer:
    return Signer.load(name, Layout(keys).site_key(name))


def roster(keys: Path, names) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted((n, fingerprint(Layout(keys).site_public_key(n).read_bytes())) for n in names)
    )


#: round 2 of the three sites, its session set up during round 1 (secure.pipeline)
NEXT = NextRound(2, [0, 1, 2], 2)


def listing_each_other(keys: Path, sites: int = 3) -> list[SitePolicy]:
    """The first `sites` sites' policies, each listing the others in its [peers]."""
    names = set(NAMES[:sites])
    return [SitePolicy(peers=roster(keys, names - {n})) for n in NAMES[:sites]]


def daemons(
    cfg, tmp_path: Path, keys: Path, policies: list[SitePolicy], configs: list | None = None
) -> LocalGrid:
    """Sites as site daemons run them (fedlora.deploy.apps.SiteApp): each its own name, state
    folder and key; `policies[i]` is site i's; `configs[i]` the federation's config as the
    server sent it to site i (default: `cfg` to all), in its run config too."""
    configs = configs or [cfg] * len(policies)
    grid = LocalGrid(cfg, len(policies))
    apps = [LocalGrid(c, 1, policy).app for c, policy in zip(configs, policies, strict=True)]
    for i, context in enumerate(list(grid.contexts.values())):
        grid.contexts[context.node_id] = Context(
            run_id=1,
            node_id=context.node_id,
            node_config={
                runconfig.SITE_NAME: NAMES[i],
                STATE_DIR: str(tmp_path / NAMES[i]),
                AUTH_KEY: str(Layout(keys).site_key(NAMES[i])),
            },
            state=RecordDict(),
            run_config={
                runconfig.CONFIG: shared_config(configs[i]),
                runconfig.FEDERATION: FEDERATION,
                runconfig.SITES: json.dumps(NAMES[: len(policies)]),
            },
        )

    def app(msg: Message, context: Context) -> Message:
        return apps[context.node_id - 100](msg, context)

    grid.app = app
    return grid


def ask(grid: LocalGrid, content: RecordDict, message_type: str) -> RecordDict:
    msg = Message(content, dst_node_id=100, message_type=message_type)
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    assert not reply.has_error(), reply.error.reason
    return reply.content


def sybil_session(grid: LocalGrid, cfg, fakes: int = 3, threshold: int = 3, sign=None):
    """The server's attack on the site at node 100 (site 0): a session of it and `fakes` sites
    the server makes, `sign(j, client)` giving what the server relays as fake j's signature.
    Returns the session's sum, which is site 0's contribution alone, or site 0's refusal."""
    round_, bounds = 1, key_bounds(cfg, threshold)
    content = round_content(round_, global_adapter(cfg))
    cohort = list(range(fakes + 1))
    content[R.SECAGG] = _stage("keys", round_, _keys_fields(threshold, DEFAULT_VALUE_BOUND, cohort))
    site, real_keys, real_signed, _ = _read_keys(ask(grid, content, QUERY_SECAGG))
    assert site == 0
    fake = {
        j: SecAggClient.create(round_, j, threshold, key_bounds=bounds, cohort=cohort)
        for j in range(1, fakes + 1)
    }
    server = SecAggServer(threshold)
    peers = server.receive_keys({0: real_keys} | {j: c.public_keys() for j, c in fake.items()})
    signed = {0: real_signed} | {j: sign(j, c) if sign else UNSIGNED for j, c in fake.items()}
    share = RecordDict({R.SECAGG: _stage("share", round_, _share_fields(peers, signed, set()))})
    reply = ask(grid, share, QUERY_SECAGG)
    if R.REFUSAL in reply:
        return str(reply[R.REFUSAL][R.REASON])
    sent = {0: _read_shares(reply)} | {j: c.share_keys(peers) for j, c in fake.items()}
    routed = server.route_shares(sent)
    fields = {R.PEERS: list(routed[0]), R.CIPHERTEXTS: list(routed[0].values())}
    masked, layout, *_ = _read_masked(
        ask(grid, RecordDict({R.SECAGG: _stage("mask", round_, fields)}), TRAIN_SECAGG)
    )
    zeros = {k: np.zeros(shape) for k, shape in zip(layout.keys, layout.shapes, strict=True)}
    inputs = {0: masked} | {j: c.mask_input(zeros, routed[j])[1] for j, c in fake.items()}
    survivors, _ = server.receive_masked(inputs, layout)
    return layout.unpack(server.unmask({j: c.unmask(survivors, []) for j, c in fake.items()}))


def test_without_peers_a_server_that_invents_sites_reads_one_sites_update(tiny_cfg):
    """The weakness, shown: the site counts a cohort of 4 (its policy's minimum is 3) and
    answers every stage; the server holds the update of that one site, its row count with it."""
    cfg = tiny_cfg(secure={"enabled": True})
    grid = LocalGrid(cfg, 1, SitePolicy(require_secure_aggregation=True))
    update = sybil_session(grid, cfg)
    assert not isinstance(update, str), update
    assert update[R.STATS_ROWS][0] == pytest.approx(len(get_runtime(cfg).train_parts[0]))
    deltas = [v for k, v in update.items() if not k.startswith(R.STATS)]
    assert any(np.abs(v).max() > 0 for v in deltas)


def test_a_site_with_peers_refuses_keys_its_peers_did_not_sign(tiny_cfg, tmp_path, keys):
    """The same server against a site whose [peers] lists three other sites: unsigned keys,
    keys signed by a key the roster does not hold under that name, keys a peer signed for
    another session: each refused at the share stage, before anything trained leaves."""
    cfg = tiny_cfg(secure={"enabled": True})
    policy = SitePolicy(require_secure_aggregation=True, peers=roster(keys, NAMES[1:]))

    def attack(sign) -> str:
        grid = daemons(cfg, tmp_path / str(next(attempt)), keys, [policy])
        reason = sybil_session(grid, cfg, sign=sign)
        assert isinstance(reason, str), "the server read the site's update"
        assert not any(R.SECAGG_MASKED in r for r in grid.received)
        return reason

    attempt = itertools.count()
    assert "site 1 sent its keys unsigned" in attack(None)

    forger = signer(keys, "forger")  # a key the server made, under a peer's name

    def forged(j: int, client: SecAggClient):
        c_pk, s_pk = client.public_keys()
        statement = keys_statement(FEDERATION, 1, j, NAMES[j], c_pk, s_pk)
        return Signer(NAMES[j], forger.key).prove(statement)

    assert "not that of the key [peers] lists for 'st-marys'" in attack(forged)

    def replayed(j: int, client: SecAggClient):  # the real peer's signature, another round's
        c_pk, s_pk = client.public_keys()
        statement = keys_statement(FEDERATION, 7, j, NAMES[j], c_pk, s_pk)
        return signer(keys, NAMES[j]).prove(statement)

    assert "(forged, from another session" in attack(replayed)

    def stranger(j: int, client: SecAggClient):
        c_pk, s_pk = client.public_keys()
        return forger.prove(keys_statement(FEDERATION, 1, j, "forger", c_pk, s_pk))

    assert "signs as 'forger', which this site's [peers] does not list" in attack(stranger)


def test_sites_that_list_each_other_run_signed_sessions(tiny_cfg, tmp_path, keys):
    """Three daemons, each with the other two in its [peers]: a round sets up its own session,
    and the next one's rides on it (secure.pipeline), signatures relayed in both; a fourth site
    no one lists makes the others refuse the session."""
    cfg = tiny_cfg(secure={"enabled": True})
    three = listing_each_other(keys)
    grid = daemons(cfg, tmp_path / "three", keys, three)
    first = run_secure(grid, cfg, 1, upcoming=NEXT)
    assert first.sites == [0, 1, 2] and not first.refused
    assert first.prepared is not None  # the next session passed every site's roster
    second = run_secure(grid, cfg, 2, content=next_content(cfg, first), prepared=first.prepared)
    assert second.sites == [0, 1, 2]

    four = [*three, SitePolicy()]
    with pytest.raises(SecureRoundFailed) as failed:
        run_secure(daemons(cfg, tmp_path / "four", keys, four), cfg, 1, threshold=3)
    assert sorted(failed.value.refused) == [0, 1, 2]
    assert all("'general', which this site's [peers]" in r for r in failed.value.refused.values())


def test_fingerprints_are_openssh_s(keys):
    public = Layout(keys).site_public_key("city")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    shown = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True)
    assert shown.stdout.split()[1] == fingerprint(public.read_bytes())


def write_site(folder: Path, keys: Path, peers: str, insecure: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    site = (
        "[site]\nname = 'city'\nserver = 'localhost:9092'\n"
        + (
            "insecure = true\n"
            if insecure
            else f"ca_cert = 'train.jsonl'\nauth_key = '{Layout(keys).site_key('city')}'\n"
        )
        + "[data]\npath = 'train.jsonl'\n"
        + peers
    )
    (folder / "site.toml").write_text(site)
    return folder / "site.toml"


def test_site_toml_peers(tmp_path, keys):
    """[peers] in site.toml: the roster the policy checks; this site's own line (one roster for
    the whole consortium) must match its key; a malformed fingerprint, a roster without a key to
    sign with, or a site with none are said plainly."""
    own, other = (fingerprint(Layout(keys).site_public_key(n).read_bytes()) for n in NAMES[:2])
    listed = f"[peers]\ncity = '{own}'\nst-marys = '{other}'\n"
    site = load_site(write_site(tmp_path / "a", keys, listed))
    assert site.policy.peers == (("st-marys", other),)
    assert "with the 1 sites of [peers] only (st-marys)" in roster_line(site)

    wrong = f"[peers]\ncity = '{other}'\n"
    with pytest.raises(FedloraError, match="its site.auth_key has"):
        load_site(write_site(tmp_path / "b", keys, wrong))
    with pytest.raises(FedloraError, match="peers.st-marys in .* must be a key fingerprint"):
        load_site(write_site(tmp_path / "c", keys, "[peers]\nst-marys = 'SHA256:...'\n"))
    with pytest.raises(FedloraError, match="insecure = true has none"):
        load_site(write_site(tmp_path / "d", keys, f"[peers]\nst-marys = '{other}'\n", True))
    bare = load_site(write_site(tmp_path / "e", keys, ""))
    assert bare.policy.peers == () and roster_line(bare).startswith("WARNING: no [peers]")
    first = "[policy]\ncheck_content_before_masking = true\n"
    with pytest.raises(FedloraError, match="check_content_before_masking .* there is no .peers"):
        load_site(write_site(tmp_path / "f", keys, first))
    assert load_site(write_site(tmp_path / "g", keys, first + listed)).policy.peers


class Inconsistent(LocalGrid):
    """A server that sends site 0 the round's adapter and every other site one whose B factors
    are zero and whose A factors are 1e-12 of the round's (Pasquini et al. 2022, "Eluding secure
    aggregation in federated learning via model inconsistency"): the others' gradients are about
    1e-12 of site 0's scale, and so are their updates under SGD: the sum is site 0's update.
    (All zeros would give exactly zero updates, which a site refuses to send: fedlora.train.)"""

    def push_messages(self, msgs: list[Message]) -> list[str]:
        for msg in msgs:
            if msg.metadata.dst_node_id != 100 and R.GLOBAL_ADAPTER in msg.content:
                arrays = R.from_record(msg.content[R.GLOBAL_ADAPTER])
                crafted = {k: v * (0.0 if "lora_B" in k else 1e-12) for k, v in arrays.items()}
                msg.content[R.GLOBAL_ADAPTER] = R.to_record(crafted)
        return super().push_messages(msgs)


def spy_on_site_0(monkeypatch) -> dict:
    """What site 0 masks (the test looks; the server never sees it)."""
    seen: dict = {}
    real_mask = SecAggClient.mask_input

    def mask_input(self, contribution, ciphertexts):
        if self.site == 0:
            seen.update(contribution)
        return real_mask(self, contribution, ciphertexts)

    monkeypatch.setattr(SecAggClient, "mask_input", mask_input)
    return seen


def test_without_peers_a_server_that_sends_different_adapters_reads_one_site(
    tiny_cfg, tmp_path, keys, monkeypatch
):
    """The weakness, shown with SGD, whose steps follow the gradients' scale (Adam's do not:
    against it the crafting takes more care, not less risk)."""
    cfg = tiny_cfg(secure={"enabled": True}, train={"optimizer": "sgd", "lr": 0.5})
    grid = daemons(cfg, tmp_path, keys, [SitePolicy()] * 3)
    grid.__class__ = Inconsistent
    own = spy_on_site_0(monkeypatch)
    result = run_secure(grid, cfg, 1)
    assert result.sites == [0, 1, 2]
    deltas = [k for k in own if k.startswith("delta/")]
    scale = max(float(np.abs(own[k]).max()) for k in deltas)
    assert scale > 0
    for k in deltas:  # the "sum" of the updates is site 0's, to 1e-3 of its largest value
        np.testing.assert_allclose(result.sums[k], own[k], rtol=0, atol=1e-3 * scale)


@pytest.mark.parametrize("pipeline", [False, True], ids=["own-session", "prepared"])
def test_sites_with_peers_refuse_to_unmask_sums_of_different_adapters(
    tiny_cfg, tmp_path, keys, monkeypatch, pipeline
):
    """Each site signs the digest of the training content it trained from; before it reveals
    unmasking shares (or confirms the survivors) it checks that every survivor trained from
    the same. A session of its own round has that check before anything is masked (its keys
    come with the content and are signed with its digest). In a session set up in the round
    before, whose keys cannot show the content, a site with [peers] refuses to train from an
    adapter that is not the aggregate of the round before (fedlora.apps.evidence): the sites
    sent the crafted one refuse before they train, and site 0's input is never unmasked."""
    cfg = tiny_cfg(secure={"enabled": True})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys))
    prepared, content = None, None
    if pipeline:  # round 1 honest, with round 2's session set up during it
        first = run_secure(grid, cfg, 1, upcoming=NEXT)
        prepared, content = first.prepared, next_content(cfg, first)
        assert prepared is not None
    grid.__class__ = Inconsistent
    round_ = 2 if pipeline else 1
    own = spy_on_site_0(monkeypatch)
    with pytest.raises(SecureRoundFailed) as failed:
        run_secure(grid, cfg, round_, content=content, prepared=prepared)
    assert ("'mask' stage" in str(failed.value)) == pipeline
    assert bool(own) == pipeline  # a session of its own round: refused before masking
    refused = failed.value.refused
    if pipeline:
        assert sorted(refused) == [1, 2], refused
        assert all("is not the secure sum of round 1" in why for why in refused.values())
    else:
        assert sorted(refused) == [0, 1, 2], refused
        assert all("training content" in why for why in refused.values())


def test_a_site_with_peers_checks_their_training_content_before_it_masks(
    tiny_cfg, tmp_path, keys, monkeypatch
):
    """Site 0 lists its peers; sites 1 and 2 list none, so they reveal their unmasking shares
    whatever the others trained from. In a session set up in its own round the training content
    comes with the keys, and each site signs its keys with the content's digest: site 0 refuses
    at the share stage, before anything it trained leaves, rather than depend on its peers'
    checks. (On the code before, site 0 masked its input, refused only at the unmasking, and
    sites 1 and 2 unmasked a "sum" that was site 0's update.)"""
    cfg = tiny_cfg(secure={"enabled": True}, train={"optimizer": "sgd", "lr": 0.5})
    lenient = SitePolicy(min_cohort=2)  # they unmask the sum of two
    grid = daemons(cfg, tmp_path, keys, [listing_each_other(keys)[0], lenient, lenient])
    grid.__class__ = Inconsistent
    own = spy_on_site_0(monkeypatch)
    result = run_secure(grid, cfg, 1)
    assert not own, "site 0 masked its input"
    assert result.sites == [1, 2]
    assert "or training content than this site" in result.refused[0], result.refused


def test_a_site_that_checks_content_before_masking_takes_no_prepared_session(
    tiny_cfg, tmp_path, keys
):
    """A session set up during the round before (secure.pipeline) exchanges its keys before its
    training content exists, so no key can show it. policy.check_content_before_masking makes a
    site refuse such sessions: every round then sets up a session of its own, all three sites
    train in each, and the server says once why it did not pipeline."""
    from fedlora.apps.server import Federation
    from fedlora.report import Reporter
    from fedlora.runtime import build_runtime

    cfg = tiny_cfg(secure={"enabled": True, "min_cohort": 3}, federation={"rounds": 3})
    assert cfg.secure.pipeline
    policies = listing_each_other(keys)
    policies[0] = dataclasses.replace(policies[0], check_content_before_masking=True)
    said = io.StringIO()
    runtime = build_runtime(cfg, log=lambda _: None)
    federation = Federation(cfg, runtime, Reporter(tmp_path, said), site_names=NAMES[:3])
    federation.run(daemons(cfg, tmp_path, keys, policies))
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for row in rounds[1:]:
        assert row["sites"] == [0, 1, 2]
        assert list(row["secagg_seconds"]) == ["keys", "share", "mask", "unmask"]
    notes = [line for line in said.getvalue().splitlines() if "next round's session" in line]
    # said once per site: city's reason, then the others' (too small a cohort without city)
    assert [n.split(":")[1].split()[0] for n in notes] == NAMES[:3], notes
    assert "check_content_before_masking" in notes[0]
    assert all("cohort of 2 sites" in n for n in notes[1:])


def test_sites_with_peers_refuse_a_session_whose_sites_were_sent_other_terms(
    tiny_cfg, tmp_path, keys, monkeypatch
):
    """The federation's config is the server's too, and a Flower server hands each site its run
    config: one whose learning rate is 1e-12 makes the other sites' updates about 1e-12 of site
    0's, and the "sum" is site 0's update, with the same adapter at every site (so the content
    check passes; a config with less noise would do the same to distributed client-level DP).
    On the code before, with every site listing its peers, the round ran with all three sites
    and its sum equalled site 0's update to 1e-3 of its scale. Every site now signs its keys
    with the digest of the run config it received (a session set up during the round before
    too; a run's config does not change between its rounds, and its first round sets up its
    own session), so the sites refuse at the share stage, before anything they trained leaves."""
    cfg = tiny_cfg(secure={"enabled": True}, train={"optimizer": "sgd", "lr": 0.5})
    slow = tiny_cfg(secure={"enabled": True}, train={"optimizer": "sgd", "lr": 1e-12})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys), [cfg, slow, slow])
    own = spy_on_site_0(monkeypatch)
    with pytest.raises(SecureRoundFailed) as failed:
        run_secure(grid, cfg, 1, upcoming=NEXT)
    assert "'keys' stage" in str(failed.value) and not own, "site 0 masked its input"
    assert sorted(failed.value.refused) == [0, 1, 2], failed.value.refused
    assert all("other federation terms" in why for why in failed.value.refused.values())


class OtherTerms(LocalGrid):
    """A server that tells site 0 the session's own threshold and cohort and the others other
    ones (`told`): a site splits its distributed client-level noise over its own t, so sites
    given a larger t would add less noise each than site 0 counts on; and a cohort decides how
    many sites could confirm a survivor set (fedlora.secure.secagg)."""

    told: dict = {}

    def push_messages(self, msgs: list[Message]) -> list[str]:
        for msg in msgs:
            stage = msg.content.get(R.SECAGG)
            if msg.metadata.dst_node_id != 100 and stage and stage[R.SECAGG_STAGE] == "keys":
                for key, value in self.told.items():
                    stage[key] = value
        return super().push_messages(msgs)


@pytest.mark.parametrize(
    ("threshold", "told"),
    [(2, {R.THRESHOLD: 3}), (3, {R.COHORT: [0, 1, 2, 3, 4]})],
    ids=["threshold", "cohort"],
)
def test_sites_with_peers_refuse_a_session_whose_sites_were_given_other_thresholds(
    tiny_cfg, tmp_path, keys, threshold, told
):
    """The keys are signed with the session's threshold, value bound and cohort too: a site
    with [peers] takes part only when every peer was given the same."""
    cfg = tiny_cfg(secure={"enabled": True})
    grid = daemons(cfg, tmp_path, keys, listing_each_other(keys))
    grid.__class__ = OtherTerms
    grid.told = told
    with pytest.raises(SecureRoundFailed) as failed:
        run_secure(grid, cfg, 1, threshold=threshold)
    assert "'keys' stage" in str(failed.value)
    assert sorted(failed.value.refused) == [0, 1, 2], failed.value.refused
    assert all("other federation terms" in why for why in failed.value.refused.values())
