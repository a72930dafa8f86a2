"""Secure aggregation over Flower's Message API: thin glue around fedlora.secure.secagg.

One session per round, four stages, each one message to every site still in it and one reply:

  keys    query.secagg  server -> site: the round's training content (global adapter, broadcast,
                        round config), threshold, value bound; site -> server: its public keys
  share   query.secagg  server -> site: everyone's public keys;  site -> server: encrypted shares
  mask    train.secagg  server -> site: the shares addressed to it; site -> server: its masked
                        contribution, layout, metrics
  unmask  query.secagg  server -> site: who survived, who dropped; site -> server: shares

The training content comes with the keys so that a site daemon can train while the keys and
shares are exchanged (`BackgroundTraining`, `site.train_during_key_exchange`): when training
outlasts those two stages, a secure round waits for one message stage more than a plaintext
one (the unmasking, which needs the sum and so cannot overlap) instead of three. A site
without it (a simulated one, whose stages may run in different worker processes) keeps the
content in ``context.state`` and trains at the mask stage. Either way the training's outcome,
a refusal or an error included, is the mask stage's reply.

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
is refused: one session per round), the cohort and threshold when it receives the keys, the
number of inputs in the sum before it reveals unmasking shares. Nothing the site trained leaves
it before the mask stage, so a session refused at the share stage has released nothing. A
refusal is a reply (site, round, reason), not an error. The site's new strategy state (SCAFFOLD's
c_i, the privacy ledger) is saved only once its input is in the sum (the unmasking stage names it
a survivor): a failed masking leaves it as it was, in step with the server's c.
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
    refusal_reply,
    site_id,
    site_state_dir,
    take_round,
    train_contribution,
)
from fedlora.apps.site_state import SiteStore
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.privacy.client_level import noise_shares, site_noise_std
from fedlora.privacy.policy import client_mechanism
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy
from fedlora.secure.secagg import (
    DEFAULT_VALUE_BOUND,
    Layout,
    SecAggClient,
    SecAggError,
    SecAggServer,
    check_threshold,
    clipped_range,
)
from fedlora.strategies import strategy_for
from fedlora.strategies.base import Arrays

KEYS, SHARE, MASK, UNMASK = "keys", "share", "mask", "unmask"
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
            self.failures.append(f"site {by_id[msg_id]}, {stage}: no reply in {self.timeout} s")
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


def _fields(stage: str, round_: int, **values: object) -> RecordDict:
    return RecordDict(
        {
            records.SECAGG: ConfigRecord(
                {records.SECAGG_STAGE: stage, records.ROUND: round_} | values
            )
        }
    )


def secure_sum(
    grid: Grid,
    site_nodes: dict[int, int],
    train_content: RecordDict,
    threshold: int,
    on_progress: Callable[[str], None],
    *,
    value_bound: float = DEFAULT_VALUE_BOUND,
    timeout: float | None = None,
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
    Raises FedloraError when fewer than t sites remain at any stage.
    """
    round_ = int(train_content[records.ROUND_CONFIG][records.ROUND])
    ask = _Exchange(grid, site_nodes, on_progress, timeout)
    server = SecAggServer(threshold, value_bound)
    stage = KEYS
    try:
        check_threshold(threshold, len(site_nodes))
        request = copy.deepcopy(train_content)
        request[records.SECAGG] = _fields(
            KEYS, round_, **{records.THRESHOLD: threshold, records.VALUE_BOUND: value_bound}
        )[records.SECAGG]
        replies = ask(KEYS, {s: copy.deepcopy(request) for s in sorted(site_nodes)})
        keys = {}
        for s, (claimed, pks) in ask.parse(KEYS, replies, _read_keys).items():
            if claimed == s:
                keys[s] = pks
            else:
                ask.failures.append(f"site {s}, {KEYS}: answered as site {claimed}")
        peers = server.receive_keys(keys)

        stage = SHARE
        request = _fields(
            SHARE,
            round_,
            **{
                records.SITES: list(peers),
                records.C_PKS: [c for c, _ in peers.values()],
                records.S_PKS: [s for _, s in peers.values()],
            },
        )
        replies = ask(SHARE, {s: copy.deepcopy(request) for s in peers})
        sent = ask.parse(
            SHARE,
            replies,
            lambda c: dict(
                zip(
                    c[records.SECAGG][records.PEERS],
                    c[records.SECAGG][records.CIPHERTEXTS],
                    strict=True,
                )
            ),
        )
        routed = server.route_shares(sent)

        stage = MASK
        contents = {
            s: _fields(
                MASK,
                round_,
                **{records.PEERS: list(incoming), records.CIPHERTEXTS: list(incoming.values())},
            )
            for s, incoming in routed.items()
        }
        replies = ask(MASK, contents, TRAIN_SECAGG)
        inputs = ask.parse(MASK, replies, _read_masked)
        layout = None  # a site whose keys, shapes or formats differ from the others' drops
        if inputs:
            layout = Counter(lay for _, lay, _ in inputs.values()).most_common(1)[0][0]
            for s in [s for s, (_, lay, _) in inputs.items() if lay != layout]:
                ask.failures.append(
                    f"site {s}, {MASK}: its contribution's keys, shapes or number formats differ"
                )
                del inputs[s]
        masked = {s: m for s, (m, _, _) in inputs.items()}
        survivors, dropped = server.receive_masked(masked, layout)

        stage = UNMASK
        request = _fields(
            UNMASK, round_, **{records.SURVIVORS: survivors, records.DROPPED: dropped}
        )
        replies = ask(UNMASK, {s: copy.deepcopy(request) for s in survivors})
        responses = ask.parse(UNMASK, replies, _read_unmask)
        total = server.unmask(responses)
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
        metrics={s: inputs[s][2] for s in survivors},
        failures=ask.failures,
        bytes_up=ask.bytes_up,
        bytes_down=ask.bytes_down,
        refused=ask.refused,
        seconds=ask.seconds,
    )


class SecureRoundFailed(FedloraError):
    """A secure round that could not complete; `refused` names the sites whose policy refused."""

    def __init__(self, message: str, refused: dict[int, str]) -> None:
        super().__init__(message)
        self.refused = dict(refused)


def _read_keys(content: RecordDict) -> tuple[int, tuple[bytes, bytes]]:
    f = content[records.SECAGG]
    (site,), (c_pk,), (s_pk,) = f[records.SITES], f[records.C_PKS], f[records.S_PKS]
    return int(site), (bytes(c_pk), bytes(s_pk))


def _read_masked(content: RecordDict) -> tuple[np.ndarray, Layout, MetricRecord]:
    masked = content[records.SECAGG_MASKED][records.SECAGG_MASKED].numpy()
    layout = Layout.from_config(content[records.SECAGG_LAYOUT])
    if masked.dtype != np.uint64 or masked.shape != (layout.words,):
        raise ValueError(f"masked input {masked.dtype} {masked.shape}, layout of {layout.words}")
    return masked, layout, content[records.SITE_METRICS]


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
    """Answer one stage of the round's secure-aggregation session (see the module doc); a
    stage the site's policy refuses ends its session and is answered with the reason.
    `background`: train from the keys stage on in a thread of this process (a site daemon),
    else at the mask stage."""
    fields = msg.content[records.SECAGG]
    stage, round_ = str(fields[records.SECAGG_STAGE]), int(fields[records.ROUND])
    site = site_id(context)
    try:
        return _stage_reply(cfg, msg, context, policy, background, stage, round_, site)
    except PolicyRefused as exc:
        for key in [records.SECAGG_STATE, records.PENDING_STATE, *_kept_content(context)]:
            if key in context.state:
                del context.state[key]
        if background is not None:
            background.discard(context.run_id, site)
        return refusal_reply(msg, site, round_, exc.reason)


def _stage_reply(
    cfg: Config,
    msg: Message,
    context: Context,
    policy: SitePolicy,
    background: BackgroundTraining | None,
    stage: str,
    round_: int,
    site: int,
) -> Message:
    fields = msg.content[records.SECAGG]
    if stage == KEYS:
        policy.check_request(cfg, secure=True)
        content = RecordDict({k: v for k, v in msg.content.items() if k != records.SECAGG})
        trains = int(content[records.ROUND_CONFIG][records.ROUND])
        if trains != round_:
            raise SecAggError(f"a session for round {round_} with training for round {trains}")
        take_round(cfg, context, round_)
        threshold = int(fields[records.THRESHOLD])
        client = SecAggClient.create(
            round_,
            site,
            threshold,
            float(fields[records.VALUE_BOUND]),
            key_bounds=key_bounds(cfg, threshold),
        )
        if background is None:
            for key in _kept_content(context):  # an abandoned session's
                del context.state[key]
            for name, record in content.items():
                context.state[records.ROUND_CONTENT + name] = record
        else:
            job = functools.partial(train_input, cfg, content, context, policy, threshold)
            background.start(context.run_id, site, round_, job)
        c_pk, s_pk = client.public_keys()
        reply = RecordDict(
            {
                records.SECAGG: ConfigRecord(
                    {records.SITES: [site], records.C_PKS: [c_pk], records.S_PKS: [s_pk]}
                )
            }
        )
    else:
        client = _load_session(context, round_)
        if stage == SHARE:
            peers = zip(
                fields[records.SITES], fields[records.C_PKS], fields[records.S_PKS], strict=True
            )
            received = {int(j): (bytes(c), bytes(s)) for j, c, s in peers}
            policy.check_session(cohort=len(received), threshold=client.threshold)
            out = client.share_keys(received)
            reply = RecordDict(
                {
                    records.SECAGG: ConfigRecord(
                        {records.PEERS: list(out), records.CIPHERTEXTS: list(out.values())}
                    )
                }
            )
        elif stage == MASK:
            if background is None:
                trained = train_input(
                    cfg, _take_content(context), context, policy, client.threshold
                )
            else:
                trained = background.result(context.run_id, site, round_)
            reply = _masked_reply(msg, context, client, trained)
        elif stage == UNMASK:
            policy.check_sum(len(fields[records.SURVIVORS]))
            b, s = client.unmask(fields[records.SURVIVORS], fields[records.DROPPED])
            _commit_state(cfg, context, round_, site)  # this site's input is in the sum
            fields_out = {records.SURVIVORS: list(b), records.B_SHARES: list(b.values())}
            fields_out |= {records.DROPPED: list(s), records.S_SHARES: list(s.values())}
            reply = RecordDict({records.SECAGG: ConfigRecord(fields_out)})
        else:
            raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
    if client.stage == "done":
        del context.state[records.SECAGG_STATE]  # the session's secrets go with it
    else:
        context.state[records.SECAGG_STATE] = ConfigRecord(client.to_state())
    return Message(reply, reply_to=msg)


def train_input(
    cfg: Config, content: RecordDict, context: Context, policy: SitePolicy, threshold: int
) -> Trained:
    """Train as in a plaintext round, for a session of threshold `threshold`; the new site
    state is kept for the unmasking stage, not saved."""
    pending: dict[str, Arrays] = {}
    contribution, metrics = train_contribution(
        cfg,
        content,
        context,
        policy,
        threshold=threshold,
        keep=lambda _r, state: pending.update(state),
    )
    return Trained(contribution, metrics, pending)


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


def _load_session(context: Context, round_: int) -> SecAggClient:
    if records.SECAGG_STATE not in context.state:
        raise SecAggError(f"no secure-aggregation session at this site for round {round_}")
    client = SecAggClient.from_state(context.state[records.SECAGG_STATE])
    if client.session != round_:
        raise SecAggError(
            f"this site's secure-aggregation session is for round {client.session}, "
            f"the message for round {round_}"
        )
    return client


def _masked_reply(
    msg: Message, context: Context, client: SecAggClient, trained: Trained
) -> RecordDict:
    """Mask the trained contribution. The new site state waits in ``context.state`` until the
    unmasking stage shows the input was summed."""
    fields = msg.content[records.SECAGG]
    layout, masked = client.mask_input(
        trained.contribution,
        dict(zip(fields[records.PEERS], fields[records.CIPHERTEXTS], strict=True)),
    )
    context.state[records.PENDING_STATE] = records.to_record(trained.state)
    if records.STATS_EPSILON in trained.contribution:  # for the site's own audit log, never sent
        epsilon = float(trained.contribution[records.STATS_EPSILON][0])
        context.state[records.LOCAL_SPEND] = MetricRecord({records.PRIVACY + "epsilon": epsilon})
    return RecordDict(
        {
            records.SECAGG_MASKED: ArrayRecord(
                {records.SECAGG_MASKED: Array.from_numpy_ndarray(masked)}
            ),
            records.SECAGG_LAYOUT: ConfigRecord(layout.to_config()),
            records.SITE_METRICS: trained.metrics,
        }
    )


def _commit_state(cfg: Config, context: Context, round_: int, site: int) -> None:
    """Save the state the site trained into once its masked input is in the sum."""
    if records.PENDING_STATE not in context.state:
        raise SecAggError(f"site {site}: no trained state waiting for round {round_}")
    state = records.from_record(context.state[records.PENDING_STATE])
    del context.state[records.PENDING_STATE]
    SiteStore(site_state_dir(cfg, context), site).save(round_, state)
