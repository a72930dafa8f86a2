"""Secure aggregation over Flower's Message API: thin glue around fedlora.secure.secagg.

One session per round, four or five stages, each one message to every site still in it and one
reply:

  keys    query.secagg  server -> site: the round's training content (global adapter, broadcast,
                        round config), the protocol's version (PROTOCOL), threshold, value
                        bound, cohort; site -> server: its version, its public keys (a site
                        daemon signs them: fedlora.secure.identity), and whether it asks for
                        the confirm stage (a site with [peers] does)
  share   query.secagg  server -> site: everyone's public keys and signatures;
                        site -> server: encrypted shares
  mask    train.secagg  server -> site: the shares addressed to it; site -> server: its masked
                        contribution, layout, metrics (a site daemon signs the digest of the
                        training content it trained from, and its input with that digest, its
                        seed commitment and mask key: the next round's evidence)
  confirm query.secagg  only when a site dropped after the share stage and a survivor asked for
                        it: server -> site: who survived, who dropped, the survivors' signed
                        digests; site -> server: its signature on the survivors
  unmask  query.secagg  server -> site: who survived, who dropped, and the survivors' signed
                        digests or (after a confirm stage) who confirmed and their signatures;
                        site -> server: shares

The next round's session need not wait for its round (`secure.pipeline`, the server's choice):
its keys stage rides on this round's mask message and its share stage on the unmask message
(records.SECAGG_NEXT, both ways), so a round after the first has two message stages, mask and
unmask (three when it needs the confirm stage), and its training content comes with the mask
message. The sites check it as they would in a session of its own (the request, the cohort,
the content's round, one session per round), and a site that refuses or fails the next session
leaves only that one: the next round then sets up a session of its own, as does a round whose
sites differ from those the session was set up for (a sample that changed) and the first
round. The two sessions share messages, never secrets: each has its own keys, seeds and state
at the site (SECAGG_STATE, SECAGG_NEXT_STATE).

In a round that sets up its own session, the training content comes with the keys so that a
site daemon can train while the keys and shares are exchanged (`BackgroundTraining`,
`site.train_during_key_exchange`): when training outlasts those two stages, a secure round
waits for one message stage more than a plaintext one (the unmasking, which needs the sum and
so cannot overlap) instead of three. A site
without it (a simulated one, whose stages may run in different worker processes) keeps the
content in ``context.state`` and trains at the mask stage. Either way the training's outcome,
a refusal or an error included, is the mask stage's reply.

After the unmasking the server keeps the round's evidence (`SecureSum.evidence`, where the sites
signed their inputs) and sends it with the next round's training content: a site with a roster
recomputes the sum from it and trains only from the adapter that sum gives
(fedlora.apps.evidence).

A site keeps its session secrets in ``context.state`` between the stages and deletes them once it
has answered the unmasking. The server sees public keys, ciphertexts, masked vectors, the layout
(keys, shapes, number formats) and each site's id; of the contributions only their sum. A site's
training statistics (loss, rows, epsilon) are extra coordinates of its contribution, so the server
learns their sums only.

Each key travels in 32 or 64 bits, chosen from the cohort and the key's bound
(``FixedPoint.choose``): the session's value bound, or a tighter one the federation's config
guarantees (``key_bounds``: client-level DP clips the data-carrying vectors). The layout a site
sends names each key's format; a site whose layout differs from the others' counts as dropped.

The site's policy (fedlora.privacy.site_policy) is checked at every stage against what the site
sees itself: the request before it opens a session or trains (and a round it took part in before
is refused: one session per round), who signed the keys it receives (against its [peers]
roster; the keys are signed with the digest of the federation's run config, the session's
threshold, value bound and cohort and, in a session of its own round, the training content
they came with, so this also shows that every peer received the same terms and, there,
content), the cohort and threshold when it receives them, the number of inputs in the sum and
(with a roster) that they all came from the training content it trained from, before it
confirms the survivors or reveals unmasking shares, and (with a roster, when the server names
sites that dropped) that t sites confirmed the same survivors, before it reveals the dropped
sites' mask keys (fedlora.secure.secagg says why). Nothing the site trained leaves
it before the mask stage, so a session refused at the share stage has released nothing. A
refusal is a reply (site, round, reason), not an error. The site's new strategy state (SCAFFOLD's
c_i) is saved only once its input is in the sum (the unmasking stage names it a survivor): a
failed masking leaves it as it was, in step with the server's c. Its privacy ledger records the
round as the masked input leaves (fedlora.privacy.ledger): the server needs only the other
sites' shares to sum it, so this site may never hear that it was.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedlora.apps import records
from fedlora.apps.contribution import (
    AUTH_KEY,
    checked_steps,
    federation_name,
    refusal_reply,
    site_id,
    site_runtime,
    site_state_dir,
    take_round,
    train_contribution,
)
from fedlora.apps.discovery import no_reply
from fedlora.apps.evidence import Evidence, check_training_content
from fedlora.apps.site_state import SiteStore
from fedlora.config import Config
from fedlora.deploy import runconfig
from fedlora.errors import FedloraError, told_the_server
from fedlora.privacy.client_level import noise_shares, site_noise_std
from fedlora.privacy.policy import client_mechanism
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy
from fedlora.secure.identity import (
    Proof,
    Signer,
    content_statement,
    fingerprint,
    input_statement,
    keys_statement,
    survivors_statement,
)
from fedlora.secure.secagg import (
    DEFAULT_VALUE_BOUND,
    Layout,
    SecAggClient,
    SecAggError,
    SecAggServer,
    ValueOutOfRange,
    check_threshold,
    clipped_range,
    input_digest,
    seed_commitment,
)
from fedlora.strategies import strategy_for
from fedlora.strategies.base import Arrays

KEYS, SHARE, MASK, CONFIRM, UNMASK = "keys", "share", "mask", "confirm", "unmask"
#: the version of the messages and signed statements below; a server and its sites must agree
#: (1: before versions; 2: the cohort, the confirm stage and the roster flag; 3: the signed
#: input and the evidence of the round before, fedlora.apps.evidence)
PROTOCOL = 3
UNSIGNED = Proof("", b"", b"")  # a simulated site's (and an older daemon's) signature
QUERY_SECAGG = f"{MessageType.QUERY}.{records.SECAGG_ACTION}"
TRAIN_SECAGG = f"{MessageType.TRAIN}.{records.SECAGG_ACTION}"


@dataclass
class SecureSum:
    """What one secure round gives the server."""

    sums: Arrays  # float64 per-key sums of the contributions of `sites`
    sites: list[int]  # the sites whose contribution is in `sums`
    metrics: dict[int, MetricRecord]  # site -> the metrics it reported with its input
    failures: list[str] = field(default_factory=list)  # "site s, stage: reason", one per loss
    bytes_up: dict[str, int] = field(default_factory=dict)  # stage -> payload bytes, all sites
    bytes_down: dict[str, int] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # site -> why its policy refused
    #: stage -> seconds from sending its messages to the last reply (or the stage's timeout)
    seconds: dict[str, float] = field(default_factory=dict)
    #: the next round's session, set up during this one (None: the next round sets up its own)
    prepared: PreparedSession | None = None
    next_refused: dict[int, str] = field(default_factory=dict)  # site -> why it refused that
    #: what the next round's sites with a roster recompute the sum from (None: no site signed)
    evidence: Evidence | None = None


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: tensor data, key material, ciphertexts, config values (8 per
    number); Flower's framing is not counted, as in the plaintext rounds' byte counts."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(
                int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values()
            )
            continue
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, bytes | str) else 8
    return total


# --- server side -------------------------------------------------------------------------------


@dataclass
class _Exchange:
    """Sends one stage's messages and keeps the failures and byte counts of the whole session."""

    grid: Grid
    site_nodes: Mapping[int, int]
    on_progress: Callable[[str], None]
    timeout: float | None
    failures: list[str] = field(default_factory=list)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(
        self, stage: str, contents: Mapping[int, RecordDict], message_type: str = QUERY_SECAGG
    ) -> dict[int, RecordDict]:
        """site -> reply content, for the sites that answered without error."""
        started = time.perf_counter()
        by_id: dict[str, int] = {}
        msgs = []
        for site, content in contents.items():
            msgs.append(
                Message(content, dst_node_id=self.site_nodes[site], message_type=message_type)
            )
        for site, msg_id in zip(contents, self.grid.push_messages(msgs), strict=True):
            by_id[msg_id] = site
        self.bytes_down[stage] = sum(record_bytes(c) for c in contents.values())
        self.bytes_up[stage] = 0
        replies: dict[int, RecordDict] = {}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pending = set(by_id)
        self.on_progress(f"secure aggregation, {stage}: 0/{len(msgs)} sites")
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.grid.pull_messages(list(pending)):
                msg_id = reply.metadata.reply_to_message_id
                pending.discard(msg_id)
                site = by_id[msg_id]
                self.on_progress(
                    f"secure aggregation, {stage}: {len(msgs) - len(pending)}/{len(msgs)} sites"
                )
                if reply.has_error():
                    reason = reply.error.reason.strip().splitlines() or ["(no reason given)"]
                    self.failures.append(f"site {site}, {stage}: {reason[-1]}")
                    continue
                if records.REFUSAL in reply.content:
                    self.refused[site] = str(reply.content[records.REFUSAL][records.REASON])
                    continue
                replies[site] = reply.content
                self.bytes_up[stage] += record_bytes(reply.content)
            if pending:
                time.sleep(0.2)
        for msg_id in sorted(pending, key=by_id.get):
            self.failures.append(no_reply(f"site {by_id[msg_id]}, {stage}", self.timeout))
        self.seconds[stage] = time.perf_counter() - started
        return dict(sorted(replies.items()))

    def parse(self, stage: str, replies: Mapping[int, RecordDict], read: Callable) -> dict:
        """site -> read(reply); a malformed reply is that site's failure, not the round's."""
        out = {}
        for site, content in replies.items():
            try:
                out[site] = read(content)
            except (KeyError, TypeError, ValueError) as err:
                self.failures.append(f"site {site}, {stage}: malformed reply ({err!r})")
        return out


def _stage(stage: str, round_: int, values: Mapping[str, object]) -> ConfigRecord:
    """A stage's protocol fields, for records.SECAGG (or the next session's SECAGG_NEXT)."""
    return ConfigRecord({records.SECAGG_STAGE: stage, records.ROUND: round_} | dict(values))


@dataclass
class PreparedSession:
    """A next round's session whose keys and shares rode on this round's mask and unmask
    messages: its round starts at the mask stage, with the training content."""

    round_: int
    server: SecAggServer
    routed: dict[int, dict[int, bytes]]  # site -> the shares addressed to it
    rostered: set[int] = field(default_factory=set)  # the sites that ask for a confirm stage

    @property
    def sites(self) -> list[int]:
        return sorted(self.routed)


@dataclass(frozen=True)
class NextRound:
    """What the server knows of the next round while this one runs: its sites and threshold."""

    round_: int
    sites: list[int]
    threshold: int


def secure_sum(
    grid: Grid,
    site_nodes: dict[int, int],
    train_content: RecordDict,
    threshold: int,
    on_progress: Callable[[str], None],
    *,
    value_bound: float = DEFAULT_VALUE_BOUND,
    timeout: float | None = None,
    prepared: PreparedSession | None = None,
    upcoming: NextRound | None = None,
) -> SecureSum:
    """Run one round's training under secure aggregation with the sites `site_nodes` (site id ->
    node id) and return the per-key SUM of their contributions (each key summed in the width
    the sites' layout names).

    `train_content` is what a plaintext TRAIN message carries (global adapter, broadcast, round
    config with the round number); it goes to the sites with the keys stage. `threshold` t:
    the fewest sites that must survive every stage (2t > number of sites); `value_bound`: the
    largest |value| a contribution may hold (an input beyond it makes that site fail, naming the
    key). `timeout` (seconds per stage, None = wait for every reply): a site that does not
    answer in time counts as dropped.

    `prepared`: this round's session, set up during the round before (its sites must be
    `site_nodes`'): the round starts at the mask stage, which then carries the training content.
    `upcoming`: the next round, whose session is then set up in this round's mask and unmask
    messages for those of its sites that are in this round (`SecureSum.prepared`, None when it
    could not be: the next round then sets up a session of its own).
    Raises FedloraError when fewer than t sites remain at any stage.
    """
    round_ = int(train_content[records.ROUND_CONFIG][records.ROUND])
    ask = _Exchange(grid, site_nodes, on_progress, timeout)
    stage = KEYS
    try:
        if prepared is None:
            server, routed, rostered = _set_up(
                ask, train_content, round_, threshold, value_bound, site_nodes
            )
        else:
            if prepared.round_ != round_ or prepared.sites != sorted(site_nodes):
                raise SecAggError(f"the session prepared for round {prepared.round_} is not this")
            server, routed, rostered = prepared.server, prepared.routed, prepared.rostered
        nxt = _NextSession.start(upcoming, value_bound, routed)

        stage = MASK
        contents = {}
        for s, incoming in routed.items():
            contents[s] = copy.deepcopy(train_content) if prepared is not None else RecordDict()
            contents[s][records.SECAGG] = _stage(
                MASK,
                round_,
                {records.PEERS: list(incoming), records.CIPHERTEXTS: list(incoming.values())},
            )
            nxt.ask_keys(contents[s], s)
        replies = ask(MASK, contents, TRAIN_SECAGG)
        inputs = ask.parse(MASK, replies, _read_masked)
        layout = None  # a site whose keys, shapes or formats differ from the others' drops
        if inputs:
            layout = Counter(i.layout for i in inputs.values()).most_common(1)[0][0]
            for s in [s for s, i in inputs.items() if i.layout != layout]:
                ask.failures.append(
                    f"site {s}, {MASK}: its contribution's keys, shapes or number formats differ"
                )
                del inputs[s]
        masked = {s: i.masked for s, i in inputs.items()}
        survivors, dropped = server.receive_masked(masked, layout)
        nxt.receive_keys({s: replies[s] for s in survivors})

        stage = CONFIRM
        outcome = {records.SURVIVORS: survivors, records.DROPPED: dropped}
        signed = {s: inputs[s].signed for s in survivors}
        fields = outcome | _signature_fields(survivors, signed)
        responders = survivors
        if dropped and rostered & set(survivors):
            request = RecordDict({records.SECAGG: _stage(CONFIRM, round_, fields)})
            replies = ask(CONFIRM, {s: copy.deepcopy(request) for s in survivors})
            confirmed = ask.parse(CONFIRM, replies, lambda c: _read_signature(c[records.SECAGG]))
            responders = server.receive_confirmations(confirmed)
            fields = outcome | {records.CONFIRMED: responders}
            fields |= _signature_fields(responders, confirmed)

        stage = UNMASK
        contents = {}
        for s in responders:
            contents[s] = RecordDict({records.SECAGG: _stage(UNMASK, round_, fields)})
            nxt.ask_shares(contents[s], s)
        replies = ask(UNMASK, contents)
        responses = ask.parse(UNMASK, replies, _read_unmask)
        total = server.unmask(responses)
        nxt.receive_shares({s: replies[s] for s in responses})
        evidence = Evidence(
            round_,
            records.content_arrays(train_content),
            survivors,
            dropped,
            {j: server.peers[j][1] for j in survivors},
            layout,
            {j: inputs[j].masked for j in survivors},
            {j: inputs[j].input_signed for j in survivors},
            server.revealed,
        )
    except SecAggError as err:
        detail = "; ".join(ask.failures)
        refused = "; ".join(f"site {s} refused: {why}" for s, why in sorted(ask.refused.items()))
        raise SecureRoundFailed(
            f"Round {round_}: secure aggregation failed at the {stage!r} stage: {err}."
            + (f" Refusals: {refused}." if refused else "")
            + (f" Site failures: {detail}" if detail else ""),
            ask.refused,
        ) from None
    return SecureSum(
        sums=layout.unpack(total),
        sites=survivors,
        metrics={s: inputs[s].metrics for s in survivors},
        failures=ask.failures,
        bytes_up=ask.bytes_up,
        bytes_down=ask.bytes_down,
        refused=ask.refused,
        seconds=ask.seconds,
        prepared=nxt.prepared(),
        next_refused=nxt.refused,
        evidence=evidence if evidence.signed else None,
    )


def _set_up(
    ask: _Exchange,
    train_content: RecordDict,
    round_: int,
    threshold: int,
    value_bound: float,
    site_nodes: Mapping[int, int],
) -> tuple[SecAggServer, dict[int, dict[int, bytes]], set[int]]:
    """The keys and share stages of a session of its own; the keys carry the training content.
    The server, the shares addressed to each site that sent a complete set, and the sites with
    a roster (they ask for a confirm stage)."""
    server = SecAggServer(threshold, value_bound)
    check_threshold(threshold, len(site_nodes))
    cohort = sorted(site_nodes)
    request = copy.deepcopy(train_content)
    request[records.SECAGG] = _stage(KEYS, round_, _keys_fields(threshold, value_bound, cohort))
    replies = ask(KEYS, {s: copy.deepcopy(request) for s in cohort})
    keys, signed, rostered = {}, {}, set()
    for s, advertised in ask.parse(KEYS, replies, _read_keys).items():
        if advertised.site == s:
            keys[s], signed[s] = advertised.keys, advertised.signed
            rostered |= {s} if advertised.rostered else set()
        else:
            ask.failures.append(f"site {s}, {KEYS}: answered as site {advertised.site}")
    peers = server.receive_keys(keys)
    fields = _share_fields(peers, signed, rostered)
    request = RecordDict({records.SECAGG: _stage(SHARE, round_, fields)})
    replies = ask(SHARE, {s: copy.deepcopy(request) for s in peers})
    return server, server.route_shares(ask.parse(SHARE, replies, _read_shares)), rostered


def _keys_fields(threshold: int, value_bound: float, cohort: list[int]) -> dict[str, object]:
    return {
        records.PROTOCOL: PROTOCOL,
        records.THRESHOLD: threshold,
        records.VALUE_BOUND: value_bound,
        records.COHORT: list(cohort),
    }


def other_protocol(whose: str, theirs: int) -> str:
    return (
        f"{whose} secure-aggregation protocol is version {theirs}, this one's {PROTOCOL}: the "
        "server and every site must run fedlora releases of the same protocol"
    )


def _share_fields(
    peers: Mapping[int, tuple[bytes, bytes]], signed: Mapping[int, Proof], rostered: set[int]
) -> dict[str, object]:
    """Every site's public keys, whether it has a roster, and who signed them where any site
    did (relayed as sent: each site checks them against its own roster,
    fedlora.secure.identity)."""
    return {
        records.SITES: list(peers),
        records.C_PKS: [c for c, _ in peers.values()],
        records.S_PKS: [s for _, s in peers.values()],
        records.ROSTERED: [j in rostered for j in peers],
    } | _signature_fields(list(peers), signed)


def _signature_fields(sites: list[int], signed: Mapping[int, Proof]) -> dict[str, list]:
    """The signatures of `sites`, in their order, where any site signed (else none)."""
    rows = [signed.get(j, UNSIGNED) for j in sites]
    if not any(row.name for row in rows):
        return {}
    return {
        records.SIGNER_NAMES: [row.name for row in rows],
        records.SIGNER_KEYS: [row.public_key for row in rows],
        records.SIGNATURES: [row.signature for row in rows],
    }


@dataclass
class _NextSession:
    """The next round's session, set up on this round's mask and unmask messages (`upcoming`).
    It only ever comes to nothing: a site that drops, refuses or answers it wrongly leaves it,
    too few left end it, and the next round then runs a session of its own; this round's sum
    never depends on it."""

    upcoming: NextRound | None
    server: SecAggServer | None = None
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    signed: dict[int, Proof] = field(default_factory=dict)
    rostered: set[int] = field(default_factory=set)
    routed: dict[int, dict[int, bytes]] | None = None
    refused: dict[int, str] = field(default_factory=dict)  # site -> its reason

    @classmethod
    def start(
        cls, upcoming: NextRound | None, value_bound: float, routed: Mapping[int, object]
    ) -> _NextSession:
        if upcoming is None or not set(upcoming.sites) <= set(routed):
            return cls(None)  # a site of the next round would miss the keys: no pipelining
        try:
            check_threshold(upcoming.threshold, len(upcoming.sites))
        except SecAggError:
            return cls(None)
        return cls(upcoming, SecAggServer(upcoming.threshold, value_bound))

    def ask_keys(self, content: RecordDict, site: int) -> None:
        if self.server is not None and site in self.upcoming.sites:
            fields = _keys_fields(
                self.server.threshold, self.server.value_bound, self.upcoming.sites
            )
            content[records.SECAGG_NEXT] = _stage(KEYS, self.upcoming.round_, fields)

    def receive_keys(self, replies: Mapping[int, RecordDict]) -> None:
        if self.server is None:
            return
        read = self._read(replies, _read_keys)
        keys = {s: a.keys for s, a in read.items() if a.site == s and s in self.upcoming.sites}
        self.signed = {s: read[s].signed for s in keys}
        self.rostered = {s for s in keys if read[s].rostered}
        try:
            self.peers = self.server.receive_keys(keys)
        except SecAggError:
            self.server = None

    def ask_shares(self, content: RecordDict, site: int) -> None:
        if self.server is not None and site in self.peers:
            fields = _share_fields(self.peers, self.signed, self.rostered)
            content[records.SECAGG_NEXT] = _stage(SHARE, self.upcoming.round_, fields)

    def receive_shares(self, replies: Mapping[int, RecordDict]) -> None:
        if self.server is None:
            return
        try:
            self.routed = self.server.route_shares(self._read(replies, _read_shares))
        except SecAggError:
            self.server = None

    def _read(self, replies: Mapping[int, RecordDict], read: Callable) -> dict:
        """site -> read(its reply's next-session part), for the sites whose part reads: a
        refusal (kept in `refused`) or a malformed part only leaves that site out of the next
        session."""
        out = {}
        for site, content in replies.items():
            part = content.get(records.SECAGG_NEXT)
            if part is not None and records.REASON in part:
                self.refused[site] = str(part[records.REASON])
                continue
            try:
                out[site] = read(content, records.SECAGG_NEXT)
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def prepared(self) -> PreparedSession | None:
        """The session, if every site of the next round is still in it."""
        if self.server is None or self.routed is None:
            return None
        if sorted(self.routed) != sorted(self.upcoming.sites):
            return None
        return PreparedSession(self.upcoming.round_, self.server, self.routed, self.rostered)


class SecureRoundFailed(FedloraError):
    """A secure round that could not complete; `refused` names the sites whose policy refused."""

    def __init__(self, message: str, refused: dict[int, str]) -> None:
        super().__init__(message)
        self.refused = dict(refused)


class Advertised(NamedTuple):
    """A site's keys-stage reply, as the server reads it."""

    site: int  # the site it answers as
    keys: tuple[bytes, bytes]
    signed: Proof  # who signed the keys (with the session's terms)
    rostered: bool  # it has a roster, and asks for a confirm stage (records.ROSTERED)


def _read_keys(content: RecordDict, record: str = records.SECAGG) -> Advertised:
    f = content[record]
    if (theirs := int(f.get(records.PROTOCOL, 1))) != PROTOCOL:
        raise ValueError(other_protocol("the site's", theirs))
    (site,), (c_pk,), (s_pk,) = f[records.SITES], f[records.C_PKS], f[records.S_PKS]
    rostered = bool(f.get(records.ROSTERED, False))
    return Advertised(int(site), (bytes(c_pk), bytes(s_pk)), _read_signature(f), rostered)


def _read_signature(fields: Mapping) -> Proof:
    """A reply's one signature, as sent (the sites check them, not the server)."""
    if records.SIGNATURES not in fields:
        return UNSIGNED
    (name,), (key,), (sig,) = (
        fields[records.SIGNER_NAMES],
        fields[records.SIGNER_KEYS],
        fields[records.SIGNATURES],
    )
    return Proof(str(name), bytes(key), bytes(sig))


def _read_shares(content: RecordDict, record: str = records.SECAGG) -> dict[int, bytes]:
    f = content[record]
    return dict(zip(f[records.PEERS], f[records.CIPHERTEXTS], strict=True))


class MaskedInput(NamedTuple):
    """A site's mask-stage reply, as the server reads it."""

    masked: np.ndarray
    layout: Layout
    metrics: MetricRecord
    signed: Proof  # who signed the digest of the training content the site trained from
    input_signed: Proof  # the same signer, on the input (identity.input_statement)


def _read_masked(content: RecordDict) -> MaskedInput:
    masked = content[records.SECAGG_MASKED][records.SECAGG_MASKED].numpy()
    layout = Layout.from_config(content[records.SECAGG_LAYOUT])
    if masked.dtype != np.uint64 or masked.shape != (layout.words,):
        raise ValueError(f"masked input {masked.dtype} {masked.shape}, layout of {layout.words}")
    fields = content.get(records.SECAGG, {})
    signed = _read_signature(fields)
    input_signed = UNSIGNED
    if records.INPUT_SIGNATURES in fields:
        (signature,) = fields[records.INPUT_SIGNATURES]
        input_signed = Proof(signed.name, signed.public_key, bytes(signature))
    return MaskedInput(masked, layout, content[records.SITE_METRICS], signed, input_signed)


def _read_unmask(content: RecordDict) -> tuple[dict[int, bytes], dict[int, bytes]]:
    f = content[records.SECAGG]
    return (
        dict(zip(f[records.SURVIVORS], f[records.B_SHARES], strict=True)),
        dict(zip(f[records.DROPPED], f[records.S_SHARES], strict=True)),
    )


# --- site side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """A site's contribution to a secure round before masking."""

    contribution: Arrays
    metrics: MetricRecord
    state: Arrays  # the site's new state: saved once its input is in the sum
    release: Callable[[], None]  # enters the round in the privacy ledger: once it is masked
    digest: bytes  # of the training content it came from (records.content_digest)


class BackgroundTraining:
    """A long-lived site process's secure-round training, started at the keys stage in a
    background thread while the main thread answers the key and share stages; the mask stage
    takes its outcome (`result`). One training at a time: the process holds one model, so a
    training waits for the one before, and the site's other work on the model holds the same
    lock (`exclusive`).

    A thread and a Future by hand: concurrent.futures' executors join their threads when the
    interpreter exits, so a daemon told to stop would first finish a round that the server may
    have abandoned."""

    def __init__(self) -> None:
        self._model = threading.Lock()
        self._jobs: dict[tuple[int, int], tuple[int, Future[Trained]]] = {}

    def start(self, run: int, site: int, round_: int, job: Callable[[], Trained]) -> None:
        future: Future[Trained] = Future()

        def work() -> None:
            with self._model:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(job())
                except BaseException as exc:  # the mask stage's reply says what it was
                    future.set_exception(exc)

        self.discard(run, site)  # an abandoned session's
        self._jobs[(run, site)] = (round_, future)
        threading.Thread(target=work, name=f"secure-training-{round_}", daemon=True).start()

    def result(self, run: int, site: int, round_: int) -> Trained:
        """The training started for (run, site, round), once it is done."""
        started, future = self._jobs.get((run, site), (None, None))
        if future is None or started != round_:
            raise SecAggError(f"this site started no training for round {round_}")
        del self._jobs[(run, site)]
        return future.result()

    def run(self, run: int, site: int, round_: int, job: Callable[[], Trained]) -> Trained:
        """Train now, in a training thread like every other secure round of this process:
        measured (BENCHMARKS.md), a daemon's first training in its main thread took 3-5 s
        longer than the same training in the thread that had trained the round before."""
        self.start(run, site, round_, job)
        return self.result(run, site, round_)

    def discard(self, run: int, site: int) -> None:
        """Forget the site's training of a session that ended (not run if not yet started)."""
        _, future = self._jobs.pop((run, site), (None, None))
        if future is not None:
            future.cancel()

    def exclusive(self) -> AbstractContextManager:
        """Held while other work uses the model: no training runs meanwhile."""
        return self._model


#: the one a site daemon's ClientApps share (one process, one model)
BACKGROUND = BackgroundTraining()


def secure_stage_reply(
    cfg: Config,
    msg: Message,
    context: Context,
    policy: SitePolicy,
    background: BackgroundTraining | None = None,
) -> Message:
    """Answer one stage of the round's secure-aggregation session (see the module doc), and the
    next round's keys or share stage when the message carries it; a stage the site's policy
    refuses ends its session and is answered with the reason. `background`: train from the
    keys stage on in a thread of this process (a site daemon), else at the mask stage."""
    fields = msg.content[records.SECAGG]
    stage, round_ = str(fields[records.SECAGG_STAGE]), int(fields[records.ROUND])
    site = site_id(context)
    try:
        reply = _stage_reply(cfg, msg, context, policy, background, stage, round_, site)
    except PolicyRefused as exc:
        for key in [
            records.SECAGG_STATE,
            records.SECAGG_NEXT_STATE,
            records.PENDING_STATE,
            records.CONTENT_DIGEST,
            *_kept_content(context),
        ]:
            if key in context.state:
                del context.state[key]
        if background is not None:
            background.discard(context.run_id, site)
        return refusal_reply(msg, site, round_, exc.reason)
    if records.SECAGG_NEXT in msg.content:
        reply[records.SECAGG_NEXT] = _next_stage_reply(
            cfg, msg.content[records.SECAGG_NEXT], context, policy, site, round_
        )
    return Message(reply, reply_to=msg)


def _stage_reply(
    cfg: Config,
    msg: Message,
    context: Context,
    policy: SitePolicy,
    background: BackgroundTraining | None,
    stage: str,
    round_: int,
    site: int,
) -> RecordDict:
    fields = msg.content[records.SECAGG]
    if stage == KEYS:
        for key in [records.SECAGG_NEXT_STATE, *_kept_content(context)]:  # abandoned sessions'
            if key in context.state:
                del context.state[key]
        content = _training_content(msg, round_)
        client, reply_fields = _open_session(cfg, fields, policy, context, content)
        take_round(cfg, context, round_)
        if background is None:
            for name, record in content.items():
                context.state[records.ROUND_CONTENT + name] = record
        else:
            job = functools.partial(train_input, cfg, content, context, policy, client.threshold)
            background.start(context.run_id, site, round_, job)
        reply = RecordDict({records.SECAGG: ConfigRecord(reply_fields)})
    else:
        client = _load_session(context, round_)
        if stage == SHARE:
            reply_fields = _share_keys(client, fields, policy, context)
            reply = RecordDict({records.SECAGG: ConfigRecord(reply_fields)})
        elif stage == MASK:
            if records.ROUND_CONFIG in msg.content:  # a session prepared in the round before
                content = _training_content(msg, round_)
                policy.check_request(cfg, secure=True)
                take_round(cfg, context, round_)
                job = functools.partial(
                    train_input, cfg, content, context, policy, client.threshold
                )
                trained = (
                    job()
                    if background is None
                    else background.run(context.run_id, site, round_, job)
                )
            elif background is None:
                trained = train_input(
                    cfg, _take_content(context), context, policy, client.threshold
                )
            else:
                trained = background.result(context.run_id, site, round_)
            reply = _masked_reply(msg, context, client, trained, bool(policy.peers))
        elif stage == CONFIRM:
            reply = RecordDict(
                {records.SECAGG: ConfigRecord(_confirm(client, fields, policy, context))}
            )
        elif stage == UNMASK:
            survivors, dropped = fields[records.SURVIVORS], fields[records.DROPPED]
            policy.check_sum(len(survivors))
            if not client.confirmed:  # else checked when it confirmed them
                _check_content(client, survivors, _proofs(fields, survivors), policy, context)
            policy.check_confirmed(
                federation_name(context),
                round_,
                site,
                client.threshold,
                client.confirmed,
                dropped,
                _proofs(fields, fields[records.CONFIRMED]) if records.CONFIRMED in fields else {},
            )
            b, s = client.unmask(survivors, dropped)
            _commit_state(cfg, context, round_, site)  # this site's input is in the sum
            if records.CONTENT_DIGEST in context.state:
                del context.state[records.CONTENT_DIGEST]
            fields_out = {records.SURVIVORS: list(b), records.B_SHARES: list(b.values())}
            fields_out |= {records.DROPPED: list(s), records.S_SHARES: list(s.values())}
            reply = RecordDict({records.SECAGG: ConfigRecord(fields_out)})
        else:
            raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
    _keep_session(context, records.SECAGG_STATE, client)
    return reply


def _next_stage_reply(
    cfg: Config,
    fields: ConfigRecord,
    context: Context,
    policy: SitePolicy,
    site: int,
    current: int,
) -> ConfigRecord:
    """The next round's keys or share stage, carried by this round's (`current`) mask or unmask
    message. A refusal or a fault ends only that session (the reply says why, and the next
    round then sets up a session of its own); this round's stands."""
    try:
        stage, round_ = str(fields[records.SECAGG_STAGE]), int(fields[records.ROUND])
        if round_ <= current:
            raise SecAggError(f"a next session for round {round_} during round {current}")
        if stage == KEYS:
            client, reply_fields = _open_session(cfg, fields, policy, context)
        elif stage == SHARE:
            client = _load_session(context, round_, records.SECAGG_NEXT_STATE)
            reply_fields = _share_keys(client, fields, policy, context)
        else:
            raise SecAggError(f"stage {stage!r} cannot ride on another round's message")
    except (PolicyRefused, SecAggError, KeyError, TypeError, ValueError) as exc:
        if records.SECAGG_NEXT_STATE in context.state:
            del context.state[records.SECAGG_NEXT_STATE]
        return ConfigRecord({records.REASON: str(exc)})
    _keep_session(context, records.SECAGG_NEXT_STATE, client)
    return ConfigRecord(reply_fields)


def _open_session(
    cfg: Config,
    fields: ConfigRecord,
    policy: SitePolicy,
    context: Context,
    content: RecordDict | None = None,
) -> tuple[SecAggClient, dict[str, list]]:
    """A keys stage: the request checked, a new session, and the public keys to send, signed
    by a site daemon (fedlora.secure.identity) with the digest of what they came with: the
    federation's run config, the session's threshold and value bound, and the round's training
    `content` (None: a session set up in the round before its own)."""
    site = site_id(context)
    policy.check_request(cfg, secure=True)
    checked_steps(cfg, policy, site)
    if policy.check_content_before_masking and content is None:
        raise PolicyRefused(
            "this site takes part only in sessions whose keys come with the round's training "
            "content (policy.check_content_before_masking), so that it sees its peers train "
            "from the same before it masks; a session set up during the round before cannot"
        )
    if (theirs := int(fields.get(records.PROTOCOL, 1))) != PROTOCOL:
        raise SecAggError(other_protocol("the server's", theirs))
    threshold = int(fields[records.THRESHOLD])
    value_bound = float(fields[records.VALUE_BOUND])
    cohort = [int(j) for j in fields[records.COHORT]]
    if not value_bound >= DEFAULT_VALUE_BOUND:
        raise PolicyRefused(
            f"value bound {value_bound:g} is below the protocol's {DEFAULT_VALUE_BOUND:g}: "
            "masking would fail on this site's own values, and the failure would tell the "
            "server about them"
        )
    client = SecAggClient.create(
        int(fields[records.ROUND]),
        site,
        threshold,
        value_bound,
        key_bounds=key_bounds(cfg, threshold),
        terms=records.session_terms(
            runconfig.digest(context.run_config), threshold, value_bound, cohort, content
        ),
        cohort=cohort,
    )
    c_pk, s_pk = client.public_keys()
    reply = {records.SITES: [site], records.C_PKS: [c_pk], records.S_PKS: [s_pk]}
    reply[records.PROTOCOL] = PROTOCOL
    reply[records.ROSTERED] = rostered = bool(policy.peers)
    federation = federation_name(context)
    return client, reply | _signed(
        context,
        lambda name: keys_statement(
            federation, client.session, site, name, c_pk, s_pk, client.terms, rostered
        ),
    )


def _signer(context: Context) -> Signer | None:
    """A site daemon's signer (its node-authentication key); a simulated site has none."""
    if AUTH_KEY not in context.node_config:
        return None
    return Signer.load(
        str(context.node_config[runconfig.SITE_NAME]), Path(str(context.node_config[AUTH_KEY]))
    )


def _signed(context: Context, statement: Callable[[str], bytes]) -> dict[str, list]:
    """A site daemon's signature on `statement(its name)`, as reply fields; a simulated site
    signs nothing."""
    if (signer := _signer(context)) is None:
        return {}
    proof = signer.prove(statement(signer.name))
    return {
        records.SIGNER_NAMES: [proof.name],
        records.SIGNER_KEYS: [proof.public_key],
        records.SIGNATURES: [proof.signature],
    }


def _own_identity(context: Context) -> tuple[str, str]:
    """A site daemon's name and key fingerprint (a simulated site has neither)."""
    if (signer := _signer(context)) is None:
        return "", ""
    return signer.name, fingerprint(signer.public_key())


def _share_keys(
    client: SecAggClient, fields: ConfigRecord, policy: SitePolicy, context: Context
) -> dict:
    """A share stage: who is behind each key and the cohort checked, and one encrypted pair
    of shares per peer."""
    peers = zip(fields[records.SITES], fields[records.C_PKS], fields[records.S_PKS], strict=True)
    received = {int(j): (bytes(c), bytes(s)) for j, c, s in peers}
    rostered = fields.get(records.ROSTERED, [False] * len(received))
    policy.check_peers(
        federation_name(context),
        client.session,
        client.site,
        received,
        _proofs(fields, fields[records.SITES]),
        client.terms,
        {j for j, has in zip(received, rostered, strict=True) if has},
    )
    policy.check_session(cohort=len(received), threshold=client.threshold)
    out = client.share_keys(received)
    return {records.PEERS: list(out), records.CIPHERTEXTS: list(out.values())}


def _confirm(
    client: SecAggClient, fields: ConfigRecord, policy: SitePolicy, context: Context
) -> dict[str, list]:
    """A confirm stage: the survivors checked (how many, and with a roster that every input
    came from the content this site trained from), accepted once, and signed by a daemon."""
    survivors = [int(j) for j in fields[records.SURVIVORS]]
    policy.check_sum(len(survivors))
    _check_content(client, survivors, _proofs(fields, survivors), policy, context)
    client.confirm(survivors)
    federation = federation_name(context)
    return _signed(
        context,
        lambda name: survivors_statement(federation, client.session, client.site, name, survivors),
    )


def _check_content(
    client: SecAggClient,
    survivors: list[int],
    proofs: Mapping[int, Proof],
    policy: SitePolicy,
    context: Context,
) -> None:
    """With a roster: every survivor signed that it trained from the content this site did."""
    trained_from = context.state.get(records.CONTENT_DIGEST, {}).get("digest", b"")
    policy.check_same_content(
        federation_name(context),
        client.session,
        client.site,
        bytes(trained_from),
        survivors,
        proofs,
    )


def _proofs(fields: ConfigRecord, sites: list) -> dict[int, Proof]:
    """site -> its signature, from signature lists aligned with `sites` (the signed ones)."""
    if records.SIGNATURES not in fields:
        return {}
    signed = zip(
        sites,
        fields[records.SIGNER_NAMES],
        fields[records.SIGNER_KEYS],
        fields[records.SIGNATURES],
        strict=True,
    )
    return {int(j): Proof(str(n), bytes(k), bytes(sig)) for j, n, k, sig in signed if n}


def _training_content(msg: Message, round_: int) -> RecordDict:
    """The round's training content a keys (or prepared session's mask) message carries, which
    must be for the session's own round: else a server could replay an old adapter."""
    content = RecordDict(
        {k: v for k, v in msg.content.items() if k not in (records.SECAGG, records.SECAGG_NEXT)}
    )
    trains = int(content[records.ROUND_CONFIG][records.ROUND])
    if trains != round_:
        raise SecAggError(f"a session for round {round_} with training for round {trains}")
    return content


def _keep_session(context: Context, key: str, client: SecAggClient) -> None:
    if client.stage == "done":
        del context.state[key]  # the session's secrets go with it
    else:
        context.state[key] = ConfigRecord(client.to_state())


def train_input(
    cfg: Config, content: RecordDict, context: Context, policy: SitePolicy, threshold: int
) -> Trained:
    """Train as in a plaintext round, for a session of threshold `threshold`; the new site
    state is kept for the unmasking stage, not saved. A site with a roster first checks that
    the content's adapter is the federation's aggregate (fedlora.apps.evidence)."""
    if policy.peers:
        check_training_content(
            cfg,
            content,
            site_runtime(cfg, context).initial_adapter,
            policy,
            federation_name(context),
            _own_identity(context),
        )
    pending: dict[str, Arrays] = {}
    contribution, metrics, release = train_contribution(
        cfg,
        content,
        context,
        policy,
        threshold=threshold,
        keep=lambda _r, state: pending.update(state),
    )
    return Trained(contribution, metrics, pending, release, records.content_digest(content))


def _kept_content(context: Context) -> list[str]:
    return [key for key in context.state if key.startswith(records.ROUND_CONTENT)]


def _take_content(context: Context) -> RecordDict:
    """The training content the keys stage kept in ``context.state``, removed from it."""
    keys = _kept_content(context)
    if not keys:
        raise SecAggError("no training content kept at this site since the keys stage")
    content = RecordDict(
        {key.removeprefix(records.ROUND_CONTENT): context.state[key] for key in keys}
    )
    for key in keys:
        del context.state[key]
    return content


def key_bounds(cfg: Config, threshold: int) -> dict[str, float]:
    """Key prefix -> the largest |value| the federation's config guarantees for those keys,
    tighter than the session's value bound: under client-level DP a site clips its private
    vectors (the strategy's private prefixes) jointly to L2 norm C, so every coordinate is
    within C, and with distributed noise adds N(0, sigma_site^2) to each (``clipped_range``).
    Weights, counts and the statistics (rows, loss x rows, epsilon) have no such bound and keep
    the session's. Every site derives the same from the config and the session's threshold t
    (the noise is split over t, as in fedlora.apps.contribution)."""
    if cfg.privacy.level != "client":
        return {}
    mechanism = client_mechanism(cfg)
    std = 0.0
    if cfg.privacy.client_noise == "distributed":
        std = site_noise_std(
            mechanism.noise_multiplier, mechanism.max_grad_norm, noise_shares(threshold)
        )
    bound = clipped_range(mechanism.max_grad_norm, std)
    return dict.fromkeys(strategy_for(cfg).private_prefixes, bound)


def _load_session(context: Context, round_: int, key: str = records.SECAGG_STATE) -> SecAggClient:
    """The session for `round_`; the current one, or the next one prepared during the round
    before, which becomes current."""
    next_state = context.state.get(records.SECAGG_NEXT_STATE)
    if key == records.SECAGG_STATE and next_state is not None:
        if SecAggClient.from_state(next_state).session == round_:
            context.state[records.SECAGG_STATE] = next_state
            del context.state[records.SECAGG_NEXT_STATE]
    if key not in context.state:
        raise SecAggError(f"no secure-aggregation session at this site for round {round_}")
    client = SecAggClient.from_state(context.state[key])
    if client.session != round_:
        raise SecAggError(
            f"this site's secure-aggregation session is for round {client.session}, "
            f"the message for round {round_}"
        )
    return client


def _masked_reply(
    msg: Message, context: Context, client: SecAggClient, trained: Trained, rostered: bool
) -> RecordDict:
    """Mask the trained contribution. The new site state waits in ``context.state`` until the
    unmasking stage shows the input was summed."""
    fields = msg.content[records.SECAGG]
    try:
        layout, masked = client.mask_input(
            trained.contribution,
            dict(zip(fields[records.PEERS], fields[records.CIPHERTEXTS], strict=True)),
        )
    except ValueOutOfRange as exc:  # its text quotes the value: for this site's log only
        raise told_the_server(
            ValueOutOfRange(
                "a value of this site's contribution is outside the secure-aggregation range "
                f"[-{client.value_bound:g}, {client.value_bound:g}] (the site's log says which)"
            ),
            str(exc),
        ) from None
    context.state[records.PENDING_STATE] = records.to_record(trained.state)
    context.state[records.CONTENT_DIGEST] = ConfigRecord({"digest": trained.digest})
    trained.release()  # the masked input leaves now; the server may sum it without saying so
    if records.STATS_EPSILON in trained.contribution:  # for the site's own audit log, never sent
        epsilon = float(trained.contribution[records.STATS_EPSILON][0])
        context.state[records.LOCAL_SPEND] = MetricRecord({records.PRIVACY + "epsilon": epsilon})
    federation = federation_name(context)
    signed = _signed(
        context,
        lambda name: content_statement(
            federation, client.session, client.site, name, trained.digest
        ),
    )
    if signed:  # and the input, for the next round's sites to recompute the sum from
        on_input = _signed(
            context,
            lambda name: input_statement(
                federation,
                client.session,
                client.site,
                name,
                trained.digest,
                input_digest(layout, masked),
                seed_commitment(client.seed),
                client.public_keys()[1],
                rostered,
            ),
        )
        signed[records.INPUT_SIGNATURES] = on_input[records.SIGNATURES]
    return RecordDict(
        {
            records.SECAGG_MASKED: ArrayRecord(
                {records.SECAGG_MASKED: Array.from_numpy_ndarray(masked)}
            ),
            records.SECAGG_LAYOUT: ConfigRecord(layout.to_config()),
            records.SITE_METRICS: trained.metrics,
            records.SECAGG: ConfigRecord(signed),
        }
    )


def _commit_state(cfg: Config, context: Context, round_: int, site: int) -> None:
    """Save the state the site trained into once its masked input is in the sum."""
    if records.PENDING_STATE not in context.state:
        raise SecAggError(f"site {site}: no trained state waiting for round {round_}")
    state = records.from_record(context.state[records.PENDING_STATE])
    del context.state[records.PENDING_STATE]
    SiteStore(site_state_dir(cfg, context), site).save(round_, state)
