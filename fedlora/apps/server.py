"""The server half of a federation, as a Flower ServerApp (Message API).

The round loop: sample sites, send the global adapter and the strategy's broadcast state, SUM
the sites' contributions (the only thing the strategy's server half sees), apply the server
step, evaluate the global adapter on the held-out rows, and report the round.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora import checkpoint, transport
from fedlora.adapter import adapter_arrays, load_adapter_arrays, lora_arrays
from fedlora.aggregation import aggregate_sums, aggregate_svd, factor_error
from fedlora.apps import records as R
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.interrupt import StopSwitch
from fedlora.privacy.client_level import add_gaussian, private_keys
from fedlora.privacy.policy import BudgetExhausted, amplification, client_mechanism, spend
from fedlora.report import Reporter
from fedlora.runtime import Runtime
from fedlora.strategies import ServerOptimizer, strategy_for
from fedlora.strategies.base import Arrays, LocalWork, Strategy, read_scalar, sum_contributions
from fedlora.strategies.server_opt import server_optimizer_for
from fedlora.train import evaluate

#: the server state file that names the latest round begun (see Federation.mark_started)
STARTED_FILE = "round-started.txt"


def sample_sites(
    sites: list[int], fraction: float, minimum: int, rng: np.random.Generator
) -> list[int]:
    """max(minimum, ceil(fraction * n)) sites, without replacement, seeded."""
    k = min(len(sites), max(minimum, math.ceil(fraction * len(sites))))
    return sorted(int(s) for s in rng.choice(sorted(sites), size=k, replace=False))


def secure_threshold(cfg: Config, sampled: int) -> int:
    if cfg.secure.threshold:
        return min(cfg.secure.threshold, sampled)
    return min(sampled, max(cfg.federation.min_clients, math.ceil(2 * sampled / 3)))


def dropout_warning(cfg: Config, sites: int) -> str:
    """What an operator must know up front: under secure aggregation a round that needs every
    sampled site ends the federation when one drops out ("" when a dropout is survivable)."""
    if not cfg.secure.enabled:
        return ""
    fed = cfg.federation
    sampled = min(sites, max(fed.min_clients, math.ceil(fed.fraction * sites)))
    # a round needs the threshold's inputs, and the sites unmask no sum of fewer than min_cohort
    if max(secure_threshold(cfg, sampled), cfg.secure.min_cohort) < sampled:
        return ""
    return (
        f"Note: secure aggregation with {sampled} sites per round needs all {sampled}: a site "
        "that drops out during a round ends the federation (it can be resumed with --resume). "
        "More sites, or a larger federation.fraction, leave room for a dropout."
    )


@dataclass
class RoundInputs:
    """What a round collected from the sites, however it was collected."""

    sums: Arrays = field(default_factory=dict)  # per-key sums of the contributions
    metrics: list = field(default_factory=list)  # MetricRecord of each contributing site
    contributions: list[Arrays] = field(default_factory=list)  # individual: plaintext only
    failures: list[str] = field(default_factory=list)
    exhausted: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # site -> why its policy refused
    #: secure aggregation: the summed statistics (records.STATS keys), no per-site metrics
    stats: Arrays = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    transport_error_down: float = 0.0  # relative L2 round-trip error of the adapter sent


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
        rt = self.runtime
        load_adapter_arrays(rt.model, self.global_arrays)
        result = evaluate(rt.model, rt.encoder, self.eval_rows, rt.pad_id, bf16=rt.bf16)
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
        config: dict[str, int] = {R.ROUND: round_}
        global_wire, broadcast_wire = self.wire_down()
        return RecordDict(
            {
                R.GLOBAL_ADAPTER: R.to_record(global_wire),
                R.BROADCAST: R.to_record(broadcast_wire),
                R.ROUND_CONFIG: ConfigRecord(config),
            }
        )

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
        per_site = sum(R.payload_bytes(arrays) for arrays in self.wire_down())
        return msgs, per_site * len(sites)

    def available_sites(self) -> list[int]:
        return [s for s in sorted(self.nodes) if s not in self.exhausted]

    def threshold(self, sampled: int) -> int:
        """The fewest contributions a round may sum: secure.threshold, else the larger of
        federation.min_clients and two thirds of the sampled sites (SecAgg needs a majority)."""
        return secure_threshold(self.cfg, sampled)

    def collect_plain(self, grid: Grid, chosen: list[int], round_: int, progress) -> RoundInputs:
        msgs, bytes_down = self.train_messages(grid, self.nodes, chosen, round_)
        replies = exchange(grid, msgs, progress)
        sent = self.wire_down()[0]
        inputs = RoundInputs(
            bytes_down=bytes_down,
            transport_error_down=transport.round_trip_error(
                self.global_arrays, transport.decode(sent)
            ),
        )
        # site order, not arrival order: float sums must not depend on which site finished first
        replies.sort(
            key=lambda m: (
                -1
                if m.has_error() or R.SITE_METRICS not in m.content
                else int(m.content[R.SITE_METRICS][R.SITE_ID])
            )
        )
        for reply in replies:
            if reply.has_error():
                inputs.failures.append(reply.error.reason)
                continue
            if R.REFUSAL in reply.content:
                refusal = reply.content[R.REFUSAL]
                inputs.refused[int(refusal[R.SITE_ID])] = str(refusal[R.REASON])
                continue
            metrics = reply.content[R.SITE_METRICS]
            if int(metrics.get(R.EXHAUSTED, 0)):
                inputs.exhausted.append(int(metrics[R.SITE_ID]))
                continue
            wire = R.from_record(reply.content[R.CONTRIBUTION])
            arrays = transport.decode(wire)
            check_contribution(arrays, self.global_arrays)
            inputs.contributions.append(arrays)
            inputs.metrics.append(metrics)
            inputs.bytes_up += R.payload_bytes(wire)
        if inputs.contributions:
            inputs.sums = sum_contributions(inputs.contributions)
        return inputs

    def collect_secure(self, grid: Grid, chosen: list[int], round_: int, progress) -> RoundInputs:
        from fedlora.apps.secure import SecureRoundFailed, secure_sum

        try:
            result = secure_sum(
                grid,
                {s: self.nodes[s] for s in chosen},
                self.round_content(round_),
                self.threshold(len(chosen)),
                progress,
            )
        except SecureRoundFailed as err:
            self.note_refusals(round_, err.refused)
            raise
        sums = {k: v for k, v in result.sums.items() if not k.startswith(R.STATS)}
        inputs = RoundInputs(
            sums=sums,
            metrics=[result.metrics[s] for s in sorted(result.sites)],
            refused=result.refused,
            stats={k: v for k, v in result.sums.items() if k.startswith(R.STATS)},
            bytes_up=sum(result.bytes_up.values()),
            bytes_down=sum(result.bytes_down.values()),
        )
        for failure in result.failures:
            found = re.search(r"site (\d+)", failure)
            if BudgetExhausted.MARK in failure and found:
                inputs.exhausted.append(int(found.group(1)))
            else:
                inputs.failures.append(failure)
        return inputs

    def run_round(self, grid: Grid, nodes: dict[int, int], round_: int) -> dict[str, object] | None:
        """One round; None when too few sites with privacy budget are left to hold it."""
        started = time.perf_counter()
        self.nodes = nodes
        rng = np.random.default_rng([self.cfg.run.seed, round_])
        fed = self.cfg.federation
        if fed.participation == "poisson":  # every site is asked; each decides by its own coin
            chosen = self.available_sites()
        else:
            chosen = sample_sites(self.available_sites(), fed.fraction, fed.min_clients, rng)

        def progress(done: object) -> None:
            what = done if isinstance(done, str) else f"{done}/{len(chosen)} sites done"
            self.reporter.progress(f"round {round_}/{fed.rounds}: {what}")

        collect = self.collect_secure if self.cfg.secure.enabled else self.collect_plain
        self.mark_started(round_)
        inputs = collect(grid, chosen, round_, progress)
        self.note_refusals(round_, inputs.refused)
        for reason in inputs.failures:
            self.reporter.note(f"round {round_}: a site failed: {reason.strip().splitlines()[-1]}")
        for site in inputs.exhausted:
            self.reporter.note(
                f"round {round_}: site {site} has spent its privacy budget "
                f"(privacy.max_epsilon = {self.cfg.privacy.max_epsilon:g}) and no longer trains."
            )
        self.exhausted.update(inputs.exhausted)
        count = len(inputs.metrics)
        if count < fed.min_clients and len(self.available_sites()) < fed.min_clients:
            return None  # budgets, not faults, ended the federation: `run` says so
        if count < fed.min_clients:
            detail = f" First error: {inputs.failures[0].strip()}" if inputs.failures else ""
            if inputs.refused:
                detail += " " + "; ".join(self.refusal_lines(round_, inputs.refused)) + "."
            raise FedloraError(
                f"Round {round_}: only {count} of {len(chosen)} sites contributed, fewer than "
                f"federation.min_clients = {fed.min_clients}.{detail}"
            )
        works = [  # plaintext only: under secure aggregation no site reports its own numbers
            LocalWork(
                num_examples=int(m[R.NUM_EXAMPLES]),
                steps=int(m[R.LOCAL_STEPS]),
                lr=self.cfg.train.lr,
                momentum=self.cfg.train.momentum,
                rank=site_rank(m, self.cfg.lora.r),
            )
            for m in inputs.metrics
            if not inputs.stats
        ]
        sums, participants = inputs.sums, count
        if fed.participation == "poisson":  # only the sum says how many took part, not who
            sums, participants = participant_count(inputs.sums)
        sums = self.add_central_noise(sums, round_)
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
        else:
            if inputs.contributions:  # the diagnostic needs each site's factors: plaintext only
                frozen = lora_arrays(self.runtime.model)  # A under freeze-a: never changes
                error_mean, error_max = factor_error(
                    self.strategy, self.global_arrays, frozen, inputs.contributions
                )
            if participants:  # no site took part: the adapter stays as it is
                self.global_arrays = aggregate_sums(
                    self.strategy, self.server_opt, self.global_arrays, sums, participants
                )
        if inputs.stats:  # the sum of loss x rows over the sum of rows: the same weighted mean
            train_loss = float(inputs.stats[R.STATS_LOSS][0] / inputs.stats[R.STATS_ROWS][0])
        else:
            train_loss = mean_train_loss(inputs.metrics, works)
        row: dict[str, object] = {
            "round": round_,
            "train_loss": train_loss,
            "clients": participants,
            # the sites whose update is in this round's aggregate (a dropped site is not)
            "sites": sorted(int(m[R.SITE_ID]) for m in inputs.metrics),
            "agg_error_mean": error_mean,
            "agg_error_max": error_max,
        }
        if inputs.refused:
            row["refused"] = {str(s): why for s, why in sorted(inputs.refused.items())}
        if inputs.stats:
            row |= self.secure_privacy_row(inputs.metrics, inputs.stats)
        else:
            row |= self.privacy_row(inputs.metrics)
        row |= self.transport_row(inputs)
        self.reporter.progress(f"round {round_}/{fed.rounds}: evaluating the global adapter")
        row |= self.evaluate_global()
        row |= {
            "bytes_up": inputs.bytes_up,
            "bytes_down": inputs.bytes_down,
            "seconds": time.perf_counter() - started,
        }
        return row

    def transport_row(self, inputs: RoundInputs) -> dict[str, object]:
        """transport.dtype's round-trip error this round (relative L2): of the global adapter
        sent down (as sent at the start of the round), and the largest of the sites' updates."""
        if self.cfg.transport.dtype == "float32":
            return {}
        return {
            "transport_error_down": inputs.transport_error_down,
            "transport_error_up": max(
                (float(m.get(R.TRANSPORT_ERROR, 0.0)) for m in inputs.metrics), default=0.0
            ),
        }

    # --- refusals and the interrupted round ---------------------------------------------------
    def site_name(self, site: int) -> str:
        return self.site_names[site] if site < len(self.site_names) else f"site {site}"

    def refusal_lines(self, round_: int, refused: dict[int, str]) -> list[str]:
        return [
            f"{self.site_name(s)} refused round {round_}: {why}"
            for s, why in sorted(refused.items())
        ]

    def note_refusals(self, round_: int, refused: dict[int, str]) -> None:
        for line in self.refusal_lines(round_, refused):
            self.reporter.note(line)

    def mark_started(self, round_: int) -> None:
        """Persist "round r started" before its first message: sites take part in a round once,
        so a resumed server does not repeat a round it may have started (`run` skips it)."""
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.state_dir / STARTED_FILE).write_text(str(round_))

    def started_round(self) -> int:
        path = None if self.state_dir is None else self.state_dir / STARTED_FILE
        return int(path.read_text()) if path is not None and path.exists() else -1

    # --- differential privacy ------------------------------------------------------------
    def add_central_noise(self, sums: Arrays, round_: int) -> Arrays:
        """Client level, central: N(0, (sigma C)^2) on every data-carrying sum."""
        pr = self.cfg.privacy
        if pr.level != "client" or pr.client_noise != "central":
            return sums
        mech = client_mechanism(self.cfg)
        keys = private_keys(sums, self.strategy.private_prefixes)
        rng = np.random.default_rng([self.noise_seed, round_])
        return add_gaussian(sums, keys, mech.noise_multiplier * mech.max_grad_norm, rng)

    def secure_privacy_row(self, metrics: list, stats: Arrays) -> dict[str, object]:
        """Under secure aggregation the sites' epsilons arrive only as a sum. At sample level a
        site's epsilon depends on its rows, which stay at the site: only the mean is known. At
        client level it follows from public facts, and each site's is recomputed here."""
        if self.cfg.privacy.level == "none" or R.STATS_EPSILON not in stats:
            return {}
        mean = float(stats[R.STATS_EPSILON][0]) / len(metrics)
        if stats[R.STATS_UNBOUNDED][0] > 0:
            mean = float("inf")
        if self.cfg.privacy.level == "sample":
            return {"privacy": {}, "epsilon_mean": mean, "exhausted": sorted(self.exhausted)}
        # Client level: a site's spend depends on public facts only (the federation's mechanism
        # and the rounds the site was in), so the server recomputes it exactly as the site does.
        mech = client_mechanism(self.cfg)
        per_site = {}
        for m in metrics:
            site = int(m[R.SITE_ID])
            rounds_in = 1 + sum(site in row.get("sites", []) for row in self.reporter.rows)
            ledger = [(mech.noise_multiplier, mech.sample_rate, 1)] * rounds_in
            per_site[str(site)] = spend(self.cfg, mech, ledger).as_dict()
            self.epsilon_spent[str(site)] = per_site[str(site)]["epsilon"]
        return {
            "privacy": per_site,
            "epsilon_max": max(self.epsilon_spent.values(), default=0.0),
            "exhausted": sorted(self.exhausted),
            "amplification": amplification(self.cfg),
        }

    def privacy_row(self, metrics: list) -> dict[str, object]:
        """Per-site spend as reported (enough to recompute each epsilon) and the largest so far."""
        if self.cfg.privacy.level == "none":
            return {}
        per_site = {}
        for m in metrics:
            spent = {k[len(R.PRIVACY) :]: m[k] for k in m if k.startswith(R.PRIVACY)}
            spent |= {"level": self.cfg.privacy.level, "accountant": self.cfg.privacy.accountant}
            per_site[str(int(m[R.SITE_ID]))] = spent
            self.epsilon_spent[str(int(m[R.SITE_ID]))] = float(spent["epsilon"])
        row: dict[str, object] = {
            "privacy": per_site,
            "epsilon_max": max(self.epsilon_spent.values(), default=0.0),
            "exhausted": sorted(self.exhausted),
        }
        if self.cfg.privacy.level == "client":
            row["amplification"] = amplification(self.cfg)
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
        fingerprint = checkpoint.config_fingerprint(self.cfg.to_dict())
        checkpoint.save(
            self.state_dir,
            checkpoint.Checkpoint(
                round_,
                arrays,
                self.reporter.rows,
                fingerprint,
                {
                    "exhausted": sorted(self.exhausted),
                    "epsilon_spent": self.epsilon_spent,
                    "noise_seed": self.noise_seed,
                },
                checkpoint.shaping_config(self.cfg.to_dict()),
            ),
        )

    def restore_state(self) -> int:
        """Load the saved state if there is one; return the last finished round (-1: none)."""
        if self.state_dir is None:
            return -1
        current = self.cfg.to_dict()
        saved = checkpoint.load(
            self.state_dir,
            checkpoint.config_fingerprint(current),
            checkpoint.shaping_config(current),
        )
        if saved is None:
            return -1
        self.global_arrays = saved.arrays["global"]
        self.strategy.load_state_dict(saved.arrays["strategy"])
        self.server_opt.load_state_dict(saved.arrays["server_opt"])
        self.product_opt.load_state_dict(saved.arrays["product_opt"])
        self.exhausted = set(saved.extra.get("exhausted", []))
        self.epsilon_spent = dict(saved.extra.get("epsilon_spent", {}))
        self.noise_seed = saved.extra.get("noise_seed", self.noise_seed)
        self.reporter.restore(saved.rows)
        self.reporter.note(f"Resumed from the saved state after round {saved.round}.")
        return saved.round

    def keep_round(self, row: dict[str, object]) -> None:
        """Report and save a finished round, unless an interruption was announced: under the
        switch's lock, so a round is saved wholly before the announcement or not at all."""
        with self.switch.lock:
            self.switch.check()
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
        done = self.restore_state()
        if (begun := self.started_round()) > done:
            self.reporter.note(
                f"Round {begun} was interrupted and is not repeated (a site takes part in a "
                f"round once); the federation continues with round {begun + 1}."
            )
        if done < 0:
            started = time.perf_counter()
            self.reporter.progress("round 0: evaluating the initial adapter")
            row0 = {"round": 0, "train_loss": None, "clients": 0} | self.privacy_row([])
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
                    "budget (privacy.max_epsilon), fewer than federation.min_clients = "
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
            R.ROUND_CONFIG: ConfigRecord({R.PERSONALIZE_STEPS: steps}),
        }
        msgs = [
            Message(
                RecordDict(content | {R.GLOBAL_ADAPTER: R.to_record(self.global_arrays)}),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for _, node in sorted(nodes.items())
        ]
        replies = exchange(
            grid,
            msgs,
            lambda done: self.reporter.progress(f"personalising: {done}/{len(msgs)} sites done"),
        )
        for reply in replies:
            if reply.has_error():
                self.reporter.note(f"personalisation failed at a site: {reply.error.reason}")
                continue
            self.personalization.append(dict(reply.content[R.SITE_METRICS]))
        self.personalization.sort(key=lambda r: r[R.SITE_ID])
        self.reporter.note(personalization_table(self.personalization, steps))


def personalization_table(rows: list[dict[str, float]], steps: int) -> str:
    lines = [
        f"Personalisation: each site fine-tuned the global adapter for {steps} steps on its own "
        "rows; accuracy on its own held-out rows:",
        f"{'site':>4}  {'rows':>5}  {'global':>7}  {'personal':>8}  {'change':>7}",
    ]
    for r in rows:
        if R.GLOBAL_ACCURACY not in r:
            lines.append(f"{int(r[R.SITE_ID]):>4}  {0:>5}  (no held-out rows)")
            continue
        g, p = r[R.GLOBAL_ACCURACY], r[R.PERSONAL_ACCURACY]
        lines.append(
            f"{int(r[R.SITE_ID]):>4}  {int(r[R.HELD_OUT_ROWS]):>5}  {g:>7.3f}  {p:>8.3f}  "
            f"{p - g:>+7.3f}"
        )
    return "\n".join(lines)


def participant_count(sums: Arrays) -> tuple[Arrays, int]:
    """Self-selected rounds: the sums without the participant coordinate, and how many sites
    took part (its sum; the masked zeros of the others add 0)."""
    rest = {k: v for k, v in sums.items() if k != R.PARTICIPANT}
    return rest, round(float(read_scalar(sums, R.PARTICIPANT)))


def mean_train_loss(metrics: list, works: list[LocalWork]) -> float | None:
    """The row-weighted mean of the sites' train losses; None when no site sends one (under
    self-selection a loss would tell who trained)."""
    pairs = [
        (float(m[R.TRAIN_LOSS]), w.num_examples)
        for m, w in zip(metrics, works, strict=True)
        if R.TRAIN_LOSS in m
    ]
    if not pairs:
        return None
    return float(np.average([v for v, _ in pairs], weights=[n for _, n in pairs]))


def site_rank(metrics, global_rank: int) -> int | None:
    """The rank a site reports it trained at; None when it is the global rank (all slots)."""
    rank = int(metrics.get(R.RANK, global_rank))
    if not 1 <= rank <= global_rank:
        raise FedloraError(f"A site reported rank {rank}, outside 1..{global_rank} (lora.r).")
    return None if rank == global_rank else rank


def check_contribution(arrays: Arrays, global_arrays: Arrays) -> None:
    """Replies are checked at the boundary: every tensor must be a LoRA tensor of this adapter
    (or a strategy scalar), so nothing else can travel unnoticed."""
    for key in arrays:
        name = key.split("/", 1)[1] if "/" in key else None
        if name is not None and name not in global_arrays:
            raise FedloraError(f"A site sent tensor {key!r}, which is not part of the adapter.")


class StoppableGrid(Grid):
    """The run's Grid, checking the stop switch before every call: every wait for the sites
    polls it, so an interrupted loop stops within a poll interval."""

    def __init__(self, grid: Grid, switch: StopSwitch) -> None:
        self.grid, self.switch = grid, switch

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        self.switch.check()
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        self.switch.check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        self.switch.check()
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        self.switch.check()
        return self.grid.send_and_receive(messages, timeout=timeout)


def waiting_line(connected: list[int], expected: int, names: list[str]) -> str:
    """'2 of 3 sites connected; waiting for st-marys' (names by site id, else the ids)."""
    have = set(connected)
    missing = [names[s] if s < len(names) else str(s) for s in range(expected) if s not in have]
    shown = ", ".join(missing[:10]) + (
        f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    )
    return f"{len(connected)} of {expected} sites connected; waiting for {shown}"


def discover_sites(
    grid: Grid,
    expected: int,
    timeout: float = 600.0,
    note: Callable[[str], None] | None = None,
    names: list[str] | None = None,
    every: float = 30.0,
    retry: float = 60.0,
) -> dict[int, int]:
    """Map site id -> node id by asking every connected node which site it is; `note` hears
    who is still missing (after 5 s, then every `every` s) and each site that connects.

    Every node is asked once, as soon as it is seen, and replies are collected as they arrive
    for as long as the deadline allows: a batch that waited for its slowest reply (and threw
    the late ones away, then asked everyone again) made no progress at all beyond a few
    thousand simulated sites on a small machine. A node is asked again when its reply was an
    error, or when none came within `retry` seconds (a query can be lost when a site daemon
    reconnects to a restarted server); an earlier query's late reply still counts.
    """
    deadline = time.monotonic() + timeout
    nodes: dict[int, int] = {}
    asked: dict[str, int] = {}  # pending query message id -> node id
    last_asked: dict[int, float] = {}  # node -> when it was last asked (pending or answered)
    next_note = time.monotonic() + min(5.0, every)
    while len(nodes) < expected:
        before = set(nodes)
        now, answered = time.monotonic(), set(nodes.values())
        for node in grid.get_node_ids():
            if node in answered or now - last_asked.get(node, -retry) < retry:
                continue
            query = Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for message_id in grid.push_messages([query]):  # none: not accepted, ask later
                asked[message_id] = node
                last_asked[node] = now
        for reply in grid.pull_messages(list(asked)) if asked else []:
            node = asked.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                last_asked.pop(node, None)  # ask it again
                continue
            nodes[int(reply.content[R.SITE_METRICS][R.SITE_ID])] = node
        if note is not None:
            # named sites (a deployment) are announced one by one; simulated ones only counted
            for k, site in enumerate(sorted(set(nodes) - before) if names else []):
                label = names[site] if site < len(names) else str(site)
                note(f"site {label} connected ({len(before) + k + 1} of {expected})")
            if len(nodes) < expected and time.monotonic() >= next_note:
                note(waiting_line(sorted(nodes), expected, names or []))
                next_note = time.monotonic() + every
        if time.monotonic() > deadline:
            raise FedloraError(
                f"Only {len(nodes)} of {expected} sites connected within {timeout:.0f} s: "
                f"{waiting_line(sorted(nodes), expected, names or [])}."
            )
        if len(nodes) < expected:
            time.sleep(0.2)
    return nodes


def exchange(grid: Grid, msgs: list[Message], on_progress: Callable[[int], None]) -> list[Message]:
    """send_and_receive with a live count of sites that have replied."""
    ids = set(grid.push_messages(msgs))
    replies: list[Message] = []
    on_progress(0)
    while ids:
        for reply in grid.pull_messages(list(ids)):
            ids.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            on_progress(len(replies))
        if ids:
            time.sleep(0.2)
    return replies


def make_server_app(federation: Federation, result: dict[str, Arrays]) -> ServerApp:
    """A ServerApp bound to a prepared Federation (simulation builds it in the driver)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result["adapter"] = federation.run(grid)

    return app
