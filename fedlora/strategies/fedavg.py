"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1): the global update is the data-size weighted mean delta."""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import (
    DELTA,
    WEIGHT,
    Arrays,
    LocalWork,
    Strategy,
    check_delta,
    read_scalar,
    scalar,
    to_out,
    weighted_mean,
    with_prefix,
)


def weighted_delta_terms(delta: Arrays, n_i: float) -> Arrays:
    """Client terms of Algorithm 1: ``n_i * delta_i`` and ``n_i`` (summed by the server)."""
    terms = with_prefix(DELTA, {k: n_i * np.asarray(v, dtype=np.float64) for k, v in delta.items()})
    terms[WEIGHT] = scalar(n_i)
    return terms


def fedavg_update(sum_weighted_delta: Arrays, sum_n: float) -> Arrays:
    """Algorithm 1, server: Delta = sum_i (n_i / n) delta_i with n = sum over participants."""
    return weighted_mean(sum_weighted_delta, sum_n)


class FedAvg(Strategy):
    """Data-size weighted averaging of client deltas; no extra terms, no server state."""

    name = "fedavg"

    def client_contribution(
        self, delta: Arrays, work: LocalWork, broadcast: Arrays, client_state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """Send ``n_i * delta_i`` and ``n_i``; FedAvg keeps no client state."""
        check_delta(delta)
        return weighted_delta_terms(delta, float(work.num_examples)), {}

    def aggregate(self, sums: Arrays, num_contributors: int) -> Arrays:
        """Delta = sum(n_i delta_i) / sum(n_i)."""
        parts = self._check_sums(sums, num_contributors, scalars=(WEIGHT,))
        return to_out(fedavg_update(parts[DELTA], read_scalar(sums, WEIGHT)))
