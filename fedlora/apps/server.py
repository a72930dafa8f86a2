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

from fedlora import checkpoint
from fedlora.aggregation import aggregate_sums, aggregate_svd, factor_error
from fedlora.apps import records as R
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.model import adapter_arrays, load_adapter_arrays, lora_arrays
from fedlora.privacy.client_level import add_gaussian, private_keys
from fedlora.privacy.policy import BudgetExhausted, client_mechanism
from fedlora.report import Reporter
from fedlora.runtime import Runtime
from fedlora.strategies import ServerOptimizer, strategy_for
from fedlora.strategies.base import Arrays, LocalWork, Strategy, sum_contributions
from fedlora.train import evaluate

#: the server state file that names the latest round begun (see Federation.mark_started)
STARTED_FILE = "round-started.txt"


def sample_sites(
    sites: list[int], fraction: float, minimum: int, rng: np.random.Generator
) -> list[int]:
    """max(minimum, ceil(fraction * n)) sites, without replacement, seeded."""
    k = min(len(sites), max(minimum, math.ceil(fraction * len(sites))))
    return sorted(int(s) for s in rng.choice(sorted(sites), size=k, replace=False))


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
    #: site id -> the name the server reports it by (deployment); "site <id>" otherwise
    site_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.noise_seed is None:
            self.noise_seed = self.cfg.run.seed
        self.strategy = strategy_for(self.cfg)
        self.server_opt = ServerOptimizer(
            lr=self.cfg.strategy.server_lr, momentum=self.cfg.strategy.server_momentum
        )
        #: the server step in product space, for lora.aggregation = "svd"
        self.product_opt = ServerOptimizer(
            lr=self.cfg.strategy.server_lr, momentum=self.cfg.strategy.server_momentum
        )
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
        return RecordDict(
            {
                R.GLOBAL_ADAPTER: R.to_record(self.global_arrays),
                R.BROADCAST: R.to_record(self.strategy.broadcast()),
                R.ROUND_CONFIG: ConfigRecord(config),
            }
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
        per_site = R.payload_bytes(self.global_arrays) + R.payload_bytes(self.strategy.broadcast())
        return msgs, per_site * len(sites)

    def available_sites(self) -> list[int]:
        return [s for s in sorted(self.nodes) if s not in self.exhausted]

    def threshold(self, sampled: int) -> int:
        """The fewest contributions a round may sum: secure.threshold, else the larger of
        federation.min_clients and two thirds of the sampled sites (SecAgg needs a majority)."""
        if self.cfg.secure.threshold:
            return min(self.cfg.secure.threshold, sampled)
        return min(sampled, max(self.cfg.federation.min_clients, math.ceil(2 * sampled / 3)))

    def collect_plain(self, grid: Grid, chosen: list[int], round_: int, progress) -> RoundInputs:
        msgs, bytes_down = self.train_messages(grid, self.nodes, chosen, round_)
        replies = exchange(grid, msgs, progress)
        inputs = RoundInputs(bytes_down=bytes_down)
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
            arrays = R.from_record(reply.content[R.CONTRIBUTION])
            check_contribution(arrays, self.global_arrays)
            inputs.contributions.append(arrays)
            inputs.metrics.append(metrics)
            inputs.bytes_up += R.payload_bytes(arrays)
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
        sums = self.add_central_noise(inputs.sums, round_)
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
            self.global_arrays = aggregate_sums(
                self.strategy, self.server_opt, self.global_arrays, sums, count
            )
        if inputs.stats:  # the sum of loss x rows over the sum of rows: the same weighted mean
            train_loss = float(inputs.stats[R.STATS_LOSS][0] / inputs.stats[R.STATS_ROWS][0])
        else:
            train_loss = float(
                np.average(
                    [float(m[R.TRAIN_LOSS]) for m in inputs.metrics],
                    weights=[w.num_examples for w in works],
                )
            )
        row: dict[str, object] = {
            "round": round_,
            "train_loss": train_loss,
            "clients": count,
            "sites": chosen,
            "agg_error_mean": error_mean,
            "agg_error_max": error_max,
        }
        if inputs.refused:
            row["refused"] = {str(s): why for s, why in sorted(inputs.refused.items())}
        if inputs.stats:
            row |= self.secure_privacy_row(inputs.metrics, inputs.stats)
        else:
            row |= self.privacy_row(inputs.metrics)
        self.reporter.progress(f"round {round_}/{fed.rounds}: evaluating the global adapter")
        row |= self.evaluate_global()
        row |= {
            "bytes_up": inputs.bytes_up,
            "bytes_down": inputs.bytes_down,
            "seconds": time.perf_counter() - started,
        }
        return row

    # --- refusals and the interrupted round ---------------------------------------------------
    def site_name(self, site: int) -> str:
        return self.site_names.get(site, f"site {site}")

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
        """Under secure aggregation the sites' epsilons arrive only as a sum. At client level
        every contributing site spends the same, so the mean is each one's epsilon; at sample
        level it depends on a site's rows, which stay at the site: only the mean is known."""
        if self.cfg.privacy.level == "none" or R.STATS_EPSILON not in stats:
            return {}
        mean = float(stats[R.STATS_EPSILON][0]) / len(metrics)
        if stats[R.STATS_UNBOUNDED][0] > 0:
            mean = float("inf")
        if self.cfg.privacy.level == "sample":
            return {"privacy": {}, "epsilon_mean": mean, "exhausted": sorted(self.exhausted)}
        mech = client_mechanism(self.cfg)  # the federation's own mechanism, the same at every site
        spend = {
            "epsilon": mean,
            "delta": mech.delta,
            "noise_multiplier": mech.noise_multiplier,
            "sample_rate": mech.sample_rate,
            "max_grad_norm": mech.max_grad_norm,
            "level": "client",
            "accountant": self.cfg.privacy.accountant,
        }
        per_site = {str(int(m[R.SITE_ID])): dict(spend) for m in metrics}
        self.epsilon_spent |= {s: mean for s in per_site}
        return {
            "privacy": per_site,
            "epsilon_max": max(self.epsilon_spent.values(), default=0.0),
            "exhausted": sorted(self.exhausted),
        }

    def privacy_row(self, metrics: list) -> dict[str, object]:
        """Per-site spend as reported (enough to recompute each epsilon) and the largest so far."""
        if self.cfg.privacy.level == "none":
            return {}
        per_site = {}
        for m in metrics:
            spend = {k[len(R.PRIVACY) :]: m[k] for k in m if k.startswith(R.PRIVACY)}
            spend |= {"level": self.cfg.privacy.level, "accountant": self.cfg.privacy.accountant}
            per_site[str(int(m[R.SITE_ID]))] = spend
            self.epsilon_spent[str(int(m[R.SITE_ID]))] = float(spend["epsilon"])
        return {
            "privacy": per_site,
            "epsilon_max": max(self.epsilon_spent.values(), default=0.0),
            "exhausted": sorted(self.exhausted),
        }

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
            ),
        )

    def restore_state(self) -> int:
        """Load the saved state if there is one; return the last finished round (-1: none)."""
        if self.state_dir is None:
            return -1
        saved = checkpoint.load(self.state_dir, checkpoint.config_fingerprint(self.cfg.to_dict()))
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

    def run(self, grid: Grid) -> Arrays:
        nodes = discover_sites(grid, self.cfg.federation.clients)
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
            self.reporter.round(
                row0 | {"bytes_up": 0, "bytes_down": 0, "seconds": time.perf_counter() - started}
            )
            self.save_state(0)
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
            self.reporter.round(row)
            self.save_state(round_)
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


def discover_sites(grid: Grid, expected: int, timeout: float = 600.0) -> dict[int, int]:
    """Map site id -> node id by asking every connected node which site it is."""
    deadline = time.monotonic() + timeout
    nodes: dict[int, int] = {}
    while len(nodes) < expected:
        new = [n for n in grid.get_node_ids() if n not in nodes.values()]
        if new:
            queries = [
                Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new
            ]
            for reply in grid.send_and_receive(queries, timeout=60):
                if not reply.has_error():
                    site = int(reply.content[R.SITE_METRICS][R.SITE_ID])
                    nodes[site] = reply.metadata.src_node_id
        if time.monotonic() > deadline:
            raise FedloraError(
                f"Only {len(nodes)} of {expected} sites connected within {timeout:.0f} s."
            )
        if len(nodes) < expected:
            time.sleep(0.5)
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
