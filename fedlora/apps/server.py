"""The server half of a federation, as a Flower ServerApp (Message API).

The round loop: sample sites, send the global adapter and the strategy's broadcast state, SUM
the sites' contributions (the only thing the strategy's server half sees), apply the server
step, evaluate the global adapter on the held-out rows, and report the round.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora import checkpoint
from fedlora.aggregation import aggregate_factors, aggregate_svd, factor_error
from fedlora.apps import records as R
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.model import adapter_arrays, load_adapter_arrays, lora_arrays
from fedlora.report import Reporter
from fedlora.runtime import Runtime
from fedlora.strategies import ServerOptimizer, strategy_for
from fedlora.strategies.base import Arrays, LocalWork, Strategy
from fedlora.train import evaluate


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

    def __post_init__(self) -> None:
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
    def train_messages(
        self, grid: Grid, nodes: dict[int, int], sites: list[int], round_: int
    ) -> tuple[list[Message], int]:
        """One TRAIN message per sampled site (global adapter + broadcast state), and the bytes
        of tensor data they carry in total."""
        broadcast = self.strategy.broadcast()

        def content() -> RecordDict:
            return RecordDict(
                {
                    R.GLOBAL_ADAPTER: R.to_record(self.global_arrays),
                    R.BROADCAST: R.to_record(broadcast),
                    R.ROUND_CONFIG: ConfigRecord({R.ROUND: round_}),
                }
            )

        msgs = [
            Message(content(), dst_node_id=nodes[s], message_type=MessageType.TRAIN) for s in sites
        ]
        per_site = R.payload_bytes(self.global_arrays) + R.payload_bytes(broadcast)
        return msgs, per_site * len(sites)

    def run_round(self, grid: Grid, nodes: dict[int, int], round_: int) -> dict[str, object]:
        started = time.perf_counter()
        rng = np.random.default_rng([self.cfg.run.seed, round_])
        fed = self.cfg.federation
        chosen = sample_sites(sorted(nodes), fed.fraction, fed.min_clients, rng)
        msgs, bytes_down = self.train_messages(grid, nodes, chosen, round_)
        replies = exchange(
            grid,
            msgs,
            lambda done: self.reporter.progress(
                f"round {round_}/{fed.rounds}: {done}/{len(chosen)} sites done"
            ),
        )
        contributions, works, losses, weights, failures = [], [], [], [], []
        bytes_up = 0
        # site order, not arrival order: float sums must not depend on which site finished first
        replies.sort(
            key=lambda m: -1 if m.has_error() else int(m.content[R.SITE_METRICS][R.SITE_ID])
        )
        for reply in replies:
            if reply.has_error():
                failures.append(reply.error.reason)
                continue
            arrays = R.from_record(reply.content[R.CONTRIBUTION])
            check_contribution(arrays, self.global_arrays)
            metrics = reply.content[R.SITE_METRICS]
            contributions.append(arrays)
            works.append(
                LocalWork(
                    num_examples=int(metrics[R.NUM_EXAMPLES]),
                    steps=int(metrics[R.LOCAL_STEPS]),
                    lr=self.cfg.train.lr,
                    momentum=self.cfg.train.momentum,
                )
            )
            losses.append(float(metrics[R.TRAIN_LOSS]))
            weights.append(float(metrics[R.NUM_EXAMPLES]))
            bytes_up += R.payload_bytes(arrays)
        for reason in failures:
            self.reporter.note(f"round {round_}: a site failed: {reason.strip().splitlines()[-1]}")
        if len(contributions) < fed.min_clients:
            detail = f" First error: {failures[0].strip()}" if failures else ""
            raise FedloraError(
                f"Round {round_}: only {len(contributions)} of {len(chosen)} sites replied, "
                f"fewer than federation.min_clients = {fed.min_clients}.{detail}"
            )
        if self.cfg.lora.aggregation == "svd":
            self.global_arrays, error_mean, error_max = aggregate_svd(
                self.strategy,
                self.product_opt,
                self.global_arrays,
                contributions,
                works,
                self.cfg.lora.r,
            )
        else:
            frozen = lora_arrays(self.runtime.model)  # A under freeze-a: never changes
            error_mean, error_max = factor_error(
                self.strategy, self.global_arrays, frozen, contributions
            )
            self.global_arrays = aggregate_factors(
                self.strategy, self.server_opt, self.global_arrays, contributions
            )
        row: dict[str, object] = {
            "round": round_,
            "train_loss": float(np.average(losses, weights=weights)),
            "clients": len(contributions),
            "sites": chosen,
            "agg_error_mean": error_mean,
            "agg_error_max": error_max,
        }
        self.reporter.progress(f"round {round_}/{fed.rounds}: evaluating the global adapter")
        row |= self.evaluate_global()
        row |= {
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "seconds": time.perf_counter() - started,
        }
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
            self.state_dir, checkpoint.Checkpoint(round_, arrays, self.reporter.rows, fingerprint)
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
        self.reporter.restore(saved.rows)
        self.reporter.note(f"Resumed from the saved state after round {saved.round}.")
        return saved.round

    def run(self, grid: Grid) -> Arrays:
        nodes = discover_sites(grid, self.cfg.federation.clients)
        done = self.restore_state()
        if done < 0:
            started = time.perf_counter()
            self.reporter.progress("round 0: evaluating the initial adapter")
            row0 = {"round": 0, "train_loss": None, "clients": 0} | self.evaluate_global()
            self.reporter.round(
                row0 | {"bytes_up": 0, "bytes_down": 0, "seconds": time.perf_counter() - started}
            )
            self.save_state(0)
            done = 0
        for round_ in range(done + 1, self.cfg.federation.rounds + 1):
            row = self.run_round(grid, nodes, round_)
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
