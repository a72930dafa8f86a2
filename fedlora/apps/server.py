"""The server half of a federation, as a Flower ServerApp (Message API).

The round loop: sample sites, send the global adapter and the strategy's broadcast state, SUM
the sites' contributions (the only thing the strategy's server half sees), apply the server
step, evaluate the global adapter on the held-out rows, and report the round.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora import checkpoint, transport
from fedlora.adapter import adapter_arrays, load_adapter_arrays, lora_arrays
from fedlora.aggregation import aggregate_sums, aggregate_svd, factor_error
from fedlora.apps import collect, records
from fedlora.apps.collect import RoundInputs
from fedlora.apps.discovery import StoppableGrid, discover_sites, exchange, no_reply
from fedlora.apps.evidence import Evidence, took_part
from fedlora.apps.secure import NextRound, PreparedSession, SecureRoundFailed
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.interrupt import StopSwitch
from fedlora.privacy.policy import amplification
from fedlora.privacy.server import central_noise, latest_epsilons, privacy_row
from fedlora.report import Reporter
from fedlora.runtime import Runtime
from fedlora.strategies import ServerOptimizer, strategy_for
from fedlora.strategies.base import Arrays, LocalWork, Strategy
from fedlora.strategies.server_opt import server_optimizer_for
from fedlora.train import evaluate, round_lr


def sample_sites(
    sites: list[int], fraction: float, minimum: int, rng: np.random.Generator
) -> list[int]:
    """max(minimum, ceil(fraction * n)) sites, without replacement, seeded."""
    k = min(len(sites), max(minimum, math.ceil(fraction * len(sites))))
    return sorted(int(s) for s in rng.choice(sorted(sites), size=k, replace=False))


@dataclass
class Federation:
    """The server's state between rounds, and the round loop around the pure strategy code."""

    cfg: Config
    runtime: Runtime
    reporter: Reporter
    strategy: Strategy = field(init=False)
    server_opt: ServerOptimizer = field(init=False)
    global_arrays: Arrays = field(init=False)
    #: where the server saves its state after every round (None: not saved); `run` resumes
    #: from it when it holds a checkpoint of the same configuration
    state_dir: Path | None = None
    personalization: list[dict[str, float]] = field(default_factory=list)
    nodes: dict[int, int] = field(default_factory=dict)  # site id -> Flower node id
    exhausted: set[int] = field(default_factory=set)  # sites whose privacy budget is spent
    epsilon_spent: dict[str, float] = field(default_factory=dict)  # site -> latest epsilon
    #: why the run ended before federation.rounds ("" = it did not)
    stopped: str = ""
    #: seed of the server's noise (client-level DP, central). A deployed server passes a
    #: secret one (it is saved with the state); a simulation uses run.seed, to be reproducible.
    noise_seed: int | None = None
    #: thrown by SIGINT/SIGTERM: the loop stops at its next exchange and saves nothing more
    switch: StopSwitch = field(default_factory=StopSwitch)
    #: the sites' names by site id, for what the operator reads (deployment); else the ids
    site_names: list[str] = field(default_factory=list)
    #: (round, the global adapter as the sites received it) of the last round run here: kept
    #: in the results folder so that `fedlora audit --site-update` replays that round exactly
    round_start: tuple[int, Arrays] | None = None
    #: secure aggregation: the next round's session, set up during the last round
    prepared: PreparedSession | None = None
    #: sites that refused a session set up during the round before (said once per site)
    not_pipelined: set[int] = field(default_factory=set)
    #: the last round's secure sum as sites with a roster recompute it, sent with the next
    #: round's content (fedlora.apps.evidence); None where no site signed its input
    evidence: Evidence | None = None

    def __post_init__(self) -> None:
        if self.noise_seed is None:
            self.noise_seed = self.cfg.run.seed
        self.strategy = strategy_for(self.cfg)
        self.server_opt = server_optimizer_for(self.cfg.strategy)
        #: the server step in product space, for lora.aggregation = "svd"
        self.product_opt = server_optimizer_for(self.cfg.strategy)
        self.global_arrays = adapter_arrays(self.runtime.model)
        self.eval_rows, self.eval_sites = self.runtime.eval_set()

    # --- evaluation of the global adapter -----------------------------------------------
    def evaluate_global(self) -> dict[str, object]:
        runtime = self.runtime
        load_adapter_arrays(runtime.model, self.global_arrays)
        result = evaluate(
            runtime.model, runtime.encoder, self.eval_rows, runtime.pad_id, bf16=runtime.bf16
        )
        row: dict[str, object] = {"eval_loss": result.loss}
        if result.accuracy is not None:
            row["eval_accuracy"] = result.accuracy
            row["eval_macro_f1"] = result.macro_f1
            per_site: dict[str, list[bool]] = defaultdict(list)
            for ok, site in zip(result.correct, self.eval_sites, strict=True):
                per_site[str(site)].append(ok)
            row["site_accuracy"] = {
                s: sum(v) / len(v) for s, v in sorted(per_site.items(), key=lambda kv: int(kv[0]))
            }
        else:
            row["eval_perplexity"] = result.perplexity
        return row

    # --- one round -----------------------------------------------------------------------
    def round_content(self, round_: int) -> RecordDict:
        """What every sampled site receives: the global adapter, the strategy's broadcast
        state and the round config."""
        config: dict[str, int] = {records.ROUND: round_}
        global_wire, broadcast_wire = self.wire_down()
        content = RecordDict(
            {
                records.GLOBAL_ADAPTER: records.to_record(global_wire),
                records.BROADCAST: records.to_record(broadcast_wire),
                records.ROUND_CONFIG: ConfigRecord(config),
            }
        )
        if self.evidence is not None and self.evidence.round_ < round_:
            self.evidence.attach(content)
            if state := self.server_opt.state_dict():  # the next adapter depends on it too
                content[records.SERVER_STATE] = records.to_record(state)
        return content

    def wire_down(self) -> tuple[Arrays, Arrays]:
        """The global adapter and the broadcast state as they travel (transport.dtype)."""
        dtype = self.cfg.transport.dtype
        return (
            transport.encode(self.global_arrays, dtype),
            transport.encode(self.strategy.broadcast(), dtype),
        )

    def train_messages(
        self, grid: Grid, nodes: dict[int, int], sites: list[int], round_: int
    ) -> tuple[list[Message], int]:
        """One TRAIN message per sampled site, and the bytes of tensor data they carry."""
        msgs = [
            Message(
                self.round_content(round_), dst_node_id=nodes[s], message_type=MessageType.TRAIN
            )
            for s in sites
        ]
        per_site = sum(records.payload_bytes(arrays) for arrays in self.wire_down())
        return msgs, per_site * len(sites)

    @property
    def reply_timeout(self) -> float | None:
        """How long to wait for a site's reply to one request (None: for every reply)."""
        return self.cfg.federation.reply_timeout or None

    def available_sites(self) -> list[int]:
        return [s for s in sorted(self.nodes) if s not in self.exhausted]

    def collect_plain(self, grid: Grid, chosen: list[int], round_: int, progress) -> RoundInputs:
        msgs, bytes_down = self.train_messages(grid, self.nodes, chosen, round_)
        global_wire = self.wire_down()[0]
        return collect.collect_plain(
            grid,
            msgs,
            bytes_down,
            self.global_arrays,
            global_wire,
            progress,
            self.reply_timeout,
            self.node_name,
        )

    def collect_secure(self, grid: Grid, chosen: list[int], round_: int, progress) -> RoundInputs:
        prepared, self.prepared = self.prepared, None
        if prepared is not None and (prepared.round_ != round_ or prepared.sites != chosen):
            prepared = None  # the sample changed (a spent budget, a resumed run): set up anew
        try:
            inputs = collect.collect_secure(
                grid,
                {s: self.nodes[s] for s in chosen},
                self.round_content(round_),
                collect.secure_threshold(self.cfg, len(chosen)),
                progress,
                prepared=prepared,
                upcoming=self.upcoming(round_),
                timeout=self.reply_timeout,
            )
        except SecureRoundFailed as err:
            self.note_refusals(round_, err.refused)
            raise
        self.prepared = inputs.prepared
        for site, why in sorted(inputs.next_refused.items()):
            if site not in self.not_pipelined:
                self.not_pipelined.add(site)
                self.reporter.note(
                    f"round {round_}: {self.site_name(site)} left the next round's session, "
                    f"set up during this one (secure.pipeline; the next round sets up its own): "
                    f"{why}"
                )
        return inputs

    def upcoming(self, round_: int) -> NextRound | None:
        """The round after `round_` as far as it is known now (secure.pipeline), for setting up
        its session during this one; None for the last round."""
        if not self.cfg.secure.pipeline or round_ >= self.cfg.federation.rounds:
            return None
        sites = self.sample(round_ + 1)
        return NextRound(round_ + 1, sites, collect.secure_threshold(self.cfg, len(sites)))

    def run_round(self, grid: Grid, nodes: dict[int, int], round_: int) -> dict[str, object] | None:
        """One round: sample, collect the sums, aggregate, evaluate; the round's row, or None
        when too few sites with privacy budget are left to hold it."""
        started = time.perf_counter()
        self.nodes = nodes
        chosen = self.sample(round_)
        self.round_start = (round_, transport.decode(self.wire_down()[0]))
        inputs = self.collect(grid, chosen, round_)
        if not self.enough_contributed(inputs, chosen, round_):
            return None  # budgets, not faults, ended the federation: `run` says so
        works = local_works(self.cfg, inputs, round_)
        participants, error_mean, error_max = self.aggregate(inputs, works, round_)
        self.evidence = inputs.evidence
        train_loss = round_train_loss(self.cfg, inputs, works)
        row: dict[str, object] = {
            "round": round_,
            **self.lr_row(round_),
            "train_loss": train_loss,
            "clients": participants,
            # the sites whose update is in this round's aggregate (a dropped site is not)
            "sites": sorted(int(m[records.SITE_ID]) for m in inputs.metrics),
            "agg_error_mean": error_mean,
            "agg_error_max": error_max,
        }
        if inputs.refused:
            row["refused"] = {str(s): why for s, why in sorted(inputs.refused.items())}
        row |= self.privacy_row(inputs.metrics, inputs.stats)
        row |= self.transport_row(inputs)
        self.reporter.progress(
            f"round {round_}/{self.cfg.federation.rounds}: evaluating the global adapter"
        )
        row |= self.evaluate_global()
        row |= {
            "bytes_up": inputs.bytes_up,
            "bytes_down": inputs.bytes_down,
            "seconds": time.perf_counter() - started,
        }
        if inputs.stage_seconds:  # where a secure round's time went
            row["secagg_seconds"] = {k: round(v, 3) for k, v in inputs.stage_seconds.items()}
        return row

    def lr_row(self, round_: int) -> dict[str, object]:
        """The round's learning rate where it changes from round to round (none in round 0)."""
        train = self.cfg.train
        if train.lr_schedule == "constant":
            return {}
        return {"lr": round_lr(train, round_, self.cfg.federation.rounds) if round_ else None}

    def sample(self, round_: int) -> list[int]:
        """The round's sites: a seeded sample of those with budget left, or (self-selection)
        every one of them, each deciding by its own coin."""
        federation = self.cfg.federation
        if federation.participation == "poisson":
            return self.available_sites()
        rng = np.random.default_rng([self.cfg.run.seed, round_])
        return sample_sites(
            self.available_sites(), federation.fraction, federation.min_clients, rng
        )

    def collect(self, grid: Grid, chosen: list[int], round_: int) -> RoundInputs:
        """The round's inputs from the `chosen` sites, in the clear or as a secure sum; says
        who failed, refused or ran out of budget."""

        def progress(done: object) -> None:
            what = done if isinstance(done, str) else f"{done}/{len(chosen)} sites done"
            self.reporter.progress(f"round {round_}/{self.cfg.federation.rounds}: {what}")

        collect_round = self.collect_secure if self.cfg.secure.enabled else self.collect_plain
        self.mark_started(round_)
        inputs = collect_round(grid, chosen, round_, progress)
        self.note_refusals(round_, inputs.refused)
        for reason in inputs.failures:
            self.reporter.note(f"round {round_}: a site failed: {reason.strip().splitlines()[-1]}")
        for site in inputs.exhausted:
            self.reporter.note(
                f"round {round_}: site {site} has spent its privacy budget and no longer trains."
            )
        self.exhausted.update(inputs.exhausted)
        return inputs

    def enough_contributed(self, inputs: RoundInputs, chosen: list[int], round_: int) -> bool:
        """At least federation.min_clients contributions; False when spent budgets leave too
        few sites to train, and a FedloraError naming the first failure when faults did."""
        count, minimum = len(inputs.metrics), self.cfg.federation.min_clients
        if count >= minimum:
            return True
        if len(self.available_sites()) < minimum:
            return False
        detail = f" First error: {inputs.failures[0].strip()}" if inputs.failures else ""
        if inputs.refused:
            detail += " " + "; ".join(self.refusal_lines(round_, inputs.refused)) + "."
        raise FedloraError(
            f"Round {round_}: only {count} of {len(chosen)} sites contributed, fewer than "
            f"federation.min_clients = {minimum}.{detail}"
        )

    def aggregate(
        self, inputs: RoundInputs, works: list[LocalWork], round_: int
    ) -> tuple[int, float | None, float | None]:
        """Apply the strategy's server half to the round's sums (central noise added first):
        the new global adapter. Returns how many sites took part and the factor error of
        aggregating A and B apart (mean, max; None where it cannot be measured)."""
        sums, participants = took_part(self.cfg, inputs.sums, inputs.metrics)
        sums = central_noise(
            self.cfg, sums, self.strategy.private_prefixes, seed=self.noise_seed, round_=round_
        )
        error_mean = error_max = None
        if self.cfg.lora.aggregation == "svd":  # plaintext only (refused at config load)
            self.global_arrays, error_mean, error_max = aggregate_svd(
                self.strategy,
                self.product_opt,
                self.global_arrays,
                inputs.contributions,
                works,
                self.cfg.lora.r,
            )
            return participants, error_mean, error_max
        if inputs.contributions:  # the diagnostic needs each site's factors: plaintext only
            frozen = lora_arrays(self.runtime.model)  # A under freeze-a: never changes
            error_mean, error_max = factor_error(
                self.strategy, self.global_arrays, frozen, inputs.contributions
            )
        if participants:  # no site took part: the adapter stays as it is
            self.global_arrays = aggregate_sums(
                self.strategy, self.server_opt, self.global_arrays, sums, participants
            )
        return participants, error_mean, error_max

    def transport_row(self, inputs: RoundInputs) -> dict[str, object]:
        """transport.dtype's round-trip error this round (relative L2): of the global adapter
        sent down (as sent at the start of the round), and the largest of the sites' updates."""
        if self.cfg.transport.dtype == "float32":
            return {}
        return {
            "transport_error_down": inputs.transport_error_down,
            "transport_error_up": max(
                (float(m.get(records.TRANSPORT_ERROR, 0.0)) for m in inputs.metrics), default=0.0
            ),
        }

    # --- refusals and the interrupted round ---------------------------------------------------
    def site_name(self, site: int) -> str:
        return self.site_names[site] if site < len(self.site_names) else f"site {site}"

    def node_name(self, node: int) -> str:
        """The name of the site connected as Flower node `node`."""
        return self.site_name({n: s for s, n in self.nodes.items()}[node])

    def refusal_lines(self, round_: int, refused: dict[int, str]) -> list[str]:
        return [
            f"{self.site_name(s)} refused round {round_}: {why}"
            for s, why in sorted(refused.items())
        ]

    def note_refusals(self, round_: int, refused: dict[int, str]) -> None:
        for line in self.refusal_lines(round_, refused):
            self.reporter.note(line)

    def mark_started(self, round_: int) -> None:
        """Persist "round r started" before its first message (`run` skips it on resume)."""
        if self.state_dir is not None:
            checkpoint.mark_started(self.state_dir, round_)

    def started_round(self) -> int:
        return -1 if self.state_dir is None else checkpoint.started_round(self.state_dir)

    # --- differential privacy ------------------------------------------------------------
    def privacy_row(self, metrics: list, stats: Arrays) -> dict[str, object]:
        """This round's privacy columns; remembers each site's latest epsilon."""
        row = privacy_row(
            self.cfg, metrics, stats, self.reporter.rows, self.epsilon_spent, self.exhausted
        )
        self.epsilon_spent |= latest_epsilons(row)
        return row

    # --- server state that survives a restart ----------------------------------------------
    def save_state(self, round_: int) -> None:
        if self.state_dir is None:
            return
        arrays = {
            "global": self.global_arrays,
            "strategy": self.strategy.state_dict(),
            "server_opt": self.server_opt.state_dict(),
            "product_opt": self.product_opt.state_dict(),
        }
        extra = {
            "exhausted": sorted(self.exhausted),
            "epsilon_spent": self.epsilon_spent,
            "noise_seed": self.noise_seed,
        }
        if self.round_start is not None:
            extra["round_start"] = self.round_start[0]
            arrays["round_start"] = self.round_start[1]
        if self.evidence is not None:
            extra["evidence"] = self.evidence.fields()
            arrays["evidence"] = self.evidence.arrays()
        checkpoint.save_federation(
            self.state_dir, self.cfg.to_dict(), round_, arrays, self.reporter.rows, extra
        )

    def restore_state(self) -> int:
        """Load the saved state if there is one; return the last finished round (-1: none)."""
        if self.state_dir is None:
            return -1
        saved = checkpoint.load_federation(self.state_dir, self.cfg.to_dict())
        if saved is None:
            return -1
        self.global_arrays = saved.arrays["global"]
        self.strategy.load_state_dict(saved.arrays["strategy"])
        self.server_opt.load_state_dict(saved.arrays["server_opt"])
        self.product_opt.load_state_dict(saved.arrays["product_opt"])
        self.exhausted = set(saved.extra.get("exhausted", []))
        self.epsilon_spent = dict(saved.extra.get("epsilon_spent", {}))
        self.noise_seed = saved.extra.get("noise_seed", self.noise_seed)
        if "round_start" in saved.extra:
            self.round_start = (int(saved.extra["round_start"]), saved.arrays["round_start"])
        if "evidence" in saved.extra:
            self.evidence = Evidence.parse(saved.extra["evidence"], saved.arrays["evidence"])
        self.reporter.restore(saved.rows)
        self.reporter.note(f"Resumed from the saved state after round {saved.round}.")
        return saved.round

    def keep_round(self, row: dict[str, object]) -> None:
        """Report and save a finished round, unless an interruption was announced: a round is
        saved wholly before the announcement or not at all (`StopSwitch.saving`)."""
        with self.switch.saving():
            self.reporter.round(row)
            self.save_state(int(row["round"]))  # type: ignore[call-overload]

    def run(self, grid: Grid) -> Arrays:
        grid = StoppableGrid(grid, self.switch)
        nodes = discover_sites(
            grid, self.cfg.federation.clients, note=self.reporter.note, names=self.site_names
        )
        if self.cfg.privacy.level == "client":
            self.reporter.note(
                f"Client-level DP, sampling amplification: {amplification(self.cfg)}"
            )
        if self.cfg.privacy.level != "none":
            self.reporter.note(
                "Train loss: not reported under differential privacy (a site's loss is an "
                "unnoised statistic of its rows, outside the accounting); eval loss is."
            )
        done = self.restore_state()
        if (begun := self.started_round()) > done:
            self.reporter.note(
                f"Round {begun} was interrupted and is not repeated (a site takes part in a "
                f"round once); the federation continues with round {begun + 1}."
            )
        if done < 0:
            started = time.perf_counter()
            self.reporter.progress("round 0: evaluating the initial adapter")
            row0 = {"round": 0, "train_loss": None, "clients": 0} | self.privacy_row([], {})
            row0 |= self.lr_row(0)
            row0 |= self.evaluate_global()
            self.keep_round(
                row0 | {"bytes_up": 0, "bytes_down": 0, "seconds": time.perf_counter() - started}
            )
            done = 0
        self.nodes = nodes
        for round_ in range(max(done, begun) + 1, self.cfg.federation.rounds + 1):
            row = None
            if len(self.available_sites()) >= self.cfg.federation.min_clients:
                row = self.run_round(grid, nodes, round_)
            if row is None:
                self.stopped = (
                    f"Stopped after round {round_ - 1} of {self.cfg.federation.rounds}: "
                    f"{len(self.exhausted)} of {len(nodes)} sites have spent their privacy "
                    "budget, fewer than federation.min_clients = "
                    f"{self.cfg.federation.min_clients} can still train."
                )
                self.reporter.note(self.stopped)
                break
            self.keep_round(row)
        if self.cfg.federation.personalize_steps:
            self.personalize(grid, nodes)
        return self.global_arrays

    def personalize(self, grid: Grid, nodes: dict[int, int]) -> None:
        steps = self.cfg.federation.personalize_steps
        content = {
            records.ROUND_CONFIG: ConfigRecord({records.PERSONALIZE_STEPS: steps}),
        }
        msgs = [
            Message(
                RecordDict(
                    content | {records.GLOBAL_ADAPTER: records.to_record(self.global_arrays)}
                ),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for _, node in sorted(nodes.items())
        ]
        replies, silent = exchange(
            grid,
            msgs,
            lambda done: self.reporter.progress(f"personalising: {done}/{len(msgs)} sites done"),
            self.reply_timeout,
        )
        for node in silent:
            late = no_reply(self.node_name(node), self.reply_timeout)
            self.reporter.note(f"personalisation: {late}")
        for reply in replies:
            if reply.has_error():
                self.reporter.note(f"personalisation failed at a site: {reply.error.reason}")
                continue
            if records.REFUSAL in reply.content:
                refusal = reply.content[records.REFUSAL]
                self.reporter.note(
                    f"{self.site_name(int(refusal[records.SITE_ID]))} refused personalisation: "
                    f"{refusal[records.REASON]}"
                )
                continue
            self.personalization.append(dict(reply.content[records.SITE_METRICS]))
        self.personalization.sort(key=lambda r: r[records.SITE_ID])
        self.reporter.note(personalization_table(self.personalization, steps))


def personalization_table(rows: list[dict[str, float]], steps: int) -> str:
    lines = [
        f"Personalisation: each site fine-tuned the global adapter for {steps} steps on its own "
        "rows; accuracy on its own held-out rows:",
        f"{'site':>4}  {'rows':>5}  {'global':>7}  {'personal':>8}  {'change':>7}",
    ]
    for site_row in rows:
        site = int(site_row[records.SITE_ID])
        if records.GLOBAL_ACCURACY not in site_row:
            lines.append(f"{site:>4}  {0:>5}  (no held-out rows)")
            continue
        held_out = int(site_row[records.HELD_OUT_ROWS])
        g, p = site_row[records.GLOBAL_ACCURACY], site_row[records.PERSONAL_ACCURACY]
        lines.append(f"{site:>4}  {held_out:>5}  {g:>7.3f}  {p:>8.3f}  {p - g:>+7.3f}")
    return "\n".join(lines)


def local_works(cfg: Config, inputs: RoundInputs, round_: int) -> list[LocalWork]:
    """Each contributing site's local work in round `round_` as it reported it: plaintext only
    (under secure aggregation no site reports its own numbers)."""
    if cfg.secure.enabled:
        return []
    return [
        LocalWork(
            num_examples=int(m[records.NUM_EXAMPLES]),
            steps=int(m[records.LOCAL_STEPS]),
            lr=round_lr(cfg.train, round_, cfg.federation.rounds),
            momentum=cfg.train.momentum,
            rank=site_rank(m, cfg.lora.r),
        )
        for m in inputs.metrics
    ]


def round_train_loss(cfg: Config, inputs: RoundInputs, works: list[LocalWork]) -> float | None:
    """The round's row-weighted mean train loss; None where no site sends one: under
    differential privacy (it would be an unnoised statistic of a site's rows, outside the
    accounting) and under self-selection in plaintext (it would tell who trained)."""
    if cfg.secure.enabled:  # the sum of loss x rows over the sum of rows: the same mean
        if records.STATS_LOSS not in inputs.stats:
            return None
        return float(inputs.stats[records.STATS_LOSS][0] / inputs.stats[records.STATS_ROWS][0])
    return mean_train_loss(inputs.metrics, works)


def mean_train_loss(metrics: list, works: list[LocalWork]) -> float | None:
    """The row-weighted mean of the sites' train losses; None when no site sends one (under
    self-selection a loss would tell who trained)."""
    pairs = [
        (float(m[records.TRAIN_LOSS]), w.num_examples)
        for m, w in zip(metrics, works, strict=True)
        if records.TRAIN_LOSS in m
    ]
    if not pairs:
        return None
    return float(np.average([v for v, _ in pairs], weights=[n for _, n in pairs]))


def site_rank(metrics, global_rank: int) -> int | None:
    """The rank a site reports it trained at; None when it is the global rank (all slots)."""
    rank = int(metrics.get(records.RANK, global_rank))
    if not 1 <= rank <= global_rank:
        raise FedloraError(f"A site reported rank {rank}, outside 1..{global_rank} (lora.r).")
    return None if rank == global_rank else rank


def make_server_app(federation: Federation, result: dict[str, Arrays]) -> ServerApp:
    """A ServerApp bound to a prepared Federation (simulation builds it in the driver)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result["adapter"] = federation.run(grid)

    return app
