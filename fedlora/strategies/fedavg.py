"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1): the global update is the data-size weighted mean delta."""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import (
    DELTA,
    SLOT_WEIGHT,
    WEIGHT,
    Arrays,
    LocalWork,
    Strategy,
    read_scalar,
    scalar,
    to_out,
    weighted_mean,
    with_prefix,
)
from fedlora.strategies.slots import slot_weighted_mean


def weighted_delta_terms(delta: Arrays, n_i: float) -> Arrays:
    """Client terms of Algorithm 1: ``n_i * delta_i`` and ``n_i`` (summed by the server)."""
    terms = with_prefix(DELTA, {k: n_i * np.asarray(v, dtype=np.float64) for k, v in delta.items()})
    terms[WEIGHT] = scalar(n_i)
    return terms


def fedavg_update(sum_weighted_delta: Arrays, sum_n: float) -> Arrays:
    """Algorithm 1, server: Delta = sum_i (n_i / n) delta_i with n = sum over participants."""
    return weighted_mean(sum_weighted_delta, sum_n)


def weighted_update(sum_weighted_delta: Arrays, sums: Arrays, partitioned: bool) -> Arrays:
    """The data-size weighted mean delta; rank-partitioned: per slot, over the sites holding it
    (sum n_i delta_i divided slot by slot by sum of the slot weights)."""
    if partitioned:
        return slot_weighted_mean(sum_weighted_delta, sums[SLOT_WEIGHT])
    return fedavg_update(sum_weighted_delta, read_scalar(sums, WEIGHT))


class FedAvg(Strategy):
    """Data-size weighted averaging of client deltas; no extra terms, no server state."""

    name = "fedavg"

    def client_contribution(
        self, delta: Arrays, work: LocalWork, broadcast: Arrays, client_state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """Send ``n_i * delta_i`` and ``n_i`` (rank-partitioned: also n_i per held slot);
        FedAvg keeps no client state."""
        n_i = float(work.num_examples)
        terms = weighted_delta_terms(self.own_slots(delta, work), n_i)
        return terms | self.slot_terms(work, **{SLOT_WEIGHT: n_i}), {}

    def aggregate(self, sums: Arrays, num_contributors: int) -> Arrays:
        """Delta = sum(n_i delta_i) / sum(n_i); rank-partitioned: per slot, over its holders."""
        parts = self._check_sums(sums, num_contributors, (WEIGHT,), slot_keys=(SLOT_WEIGHT,))
        return to_out(weighted_update(parts[DELTA], sums, self.slots is not None))
