"""Federated strategies as sums: a client half that emits weighted vectors and a server half
that turns their elementwise sums into the global update (so secure aggregation fits)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from fedlora.strategies.base import (
    Arrays,
    LocalWork,
    Strategy,
    TrainingTerms,
    sum_contributions,
)
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.fednova import FedNova, nova_a
from fedlora.strategies.fedprox import FedProx
from fedlora.strategies.scaffold import Scaffold
from fedlora.strategies.server_opt import ServerOptimizer
from fedlora.strategies.slots import RankSlots

if TYPE_CHECKING:
    from fedlora.config import Config

STRATEGIES = ("fedavg", "fedprox", "scaffold", "fednova")

__all__ = [
    "STRATEGIES",
    "Arrays",
    "FedAvg",
    "FedNova",
    "FedProx",
    "LocalWork",
    "RankSlots",
    "Scaffold",
    "ServerOptimizer",
    "Strategy",
    "TrainingTerms",
    "make_strategy",
    "strategy_for",
    "nova_a",
    "sum_contributions",
]


def make_strategy(
    name: str, *, total_clients: int, mu: float = 0.0, slots: RankSlots | None = None
) -> Strategy:
    """Build a strategy by its config name; ``mu`` is FedProx's proximal weight, ``slots``
    switches on rank-partitioned averaging."""
    if name == "fedprox":
        return FedProx(total_clients=total_clients, mu=mu, slots=slots)
    classes: dict[str, type[Strategy]] = {
        "fedavg": FedAvg,
        "scaffold": Scaffold,
        "fednova": FedNova,
    }
    if name not in classes:
        raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(STRATEGIES)}")
    if mu != 0:
        warnings.warn(
            f"mu={mu} is ignored by strategy {name!r} (only fedprox uses it)", stacklevel=2
        )
    return classes[name](total_clients=total_clients, slots=slots)


def strategy_for(cfg: Config) -> Strategy:
    """The strategy a run's config names (mu only where FedProx uses it; rank slots under
    `lora.rank_rule = "partitioned"` when the site ranks differ: with equal ranks both rules
    are the same, so the contribution stays one weight per site)."""
    mu = cfg.strategy.mu if cfg.strategy.name == "fedprox" else 0.0
    slots = None
    ranks = cfg.lora.all_site_ranks(cfg.federation.clients)
    if cfg.lora.rank_rule == "partitioned" and min(ranks) < cfg.lora.r:
        slots = RankSlots.of(ranks, cfg.lora.r)
    return make_strategy(
        cfg.strategy.name, total_clients=cfg.federation.clients, mu=mu, slots=slots
    )
