"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): normalise each client's update by its local work a_i, then scale by
the effective step count tau_eff, so clients taking more steps do not pull the objective.

Generalised update rule (Section 4) and FedNova (Section 5):
    x <- x - tau_eff * eta * sum_i p_i d_i,   d_i = (x - y_i) / (eta a_i),
    tau_eff = sum_i p_i a_i,                   p_i = n_i / sum_{j in S} n_j,
where a_i stands for the paper's ||a_i||_1. With delta_i = y_i - x the eta cancels:
    Delta = tau_eff * sum_i p_i delta_i / a_i.
a_i = tau_i for plain SGD; for SGD with momentum rho (Section 5, momentum SGD as local solver):
    a_i = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho).
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import (
    DELTA,
    NOVA_A,
    SLOT_NOVA_A,
    SLOT_WEIGHT,
    WEIGHT,
    Arrays,
    LocalWork,
    Strategy,
    read_scalar,
    scalar,
    strip_prefix,
    to_out,
    weighted_mean,
    with_prefix,
)
from fedlora.strategies.slots import along_slots, slot_weighted_mean


def nova_a(steps: int, momentum: float = 0.0) -> float:
    """a_i (the paper's ||a_i||_1): tau_i for SGD, the closed form above for momentum rho."""
    if steps < 1:
        raise ValueError(f"FedNova needs steps >= 1, got {steps}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    rho = float(momentum)
    if rho == 0.0:
        return float(steps)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def fednova_update(sum_normalised: Arrays, sum_n_a: float, sum_n: float) -> Arrays:
    """Delta = tau_eff * sum(n_i delta_i / a_i) / sum(n_i), tau_eff = sum(n_i a_i) / sum(n_i)."""
    tau_eff = sum_n_a / sum_n
    return {k: tau_eff * v for k, v in weighted_mean(sum_normalised, sum_n).items()}


def fednova_slot_update(sum_normalised: Arrays, slot_n_a: np.ndarray, slot_n: np.ndarray) -> Arrays:
    """Rank-partitioned FedNova: the formula above per slot j over the sites holding it,
    tau_eff_j = sum_h n_h a_h / sum_h n_h and Delta_j = tau_eff_j sum_h (n_h delta_hj / a_h) /
    sum_h n_h (a slot no site holds gets no update)."""
    slot_n = np.asarray(slot_n, dtype=np.float64)
    tau = np.divide(slot_n_a, slot_n, out=np.zeros_like(slot_n), where=slot_n > 0)
    mean = slot_weighted_mean(sum_normalised, slot_n)
    return {k: v * along_slots(k, tau, v.shape) for k, v in mean.items()}


class FedNova(Strategy):
    """Normalised averaging: removes the bias towards clients that take more local steps."""

    name = "fednova"

    def client_contribution(
        self, delta: Arrays, work: LocalWork, broadcast: Arrays, client_state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """Send n_i delta_i / a_i, n_i a_i and n_i (rank-partitioned: the last two also per held
        slot); FedNova keeps no client state."""
        delta = self.own_slots(delta, work)
        a_i = nova_a(work.steps, work.momentum)
        n_i = float(work.num_examples)
        contribution = with_prefix(
            DELTA, {k: n_i * np.asarray(v, dtype=np.float64) / a_i for k, v in delta.items()}
        )
        contribution[NOVA_A] = scalar(n_i * a_i)
        contribution[WEIGHT] = scalar(n_i)
        slots = self.slot_terms(work, **{SLOT_NOVA_A: n_i * a_i, SLOT_WEIGHT: n_i})
        return contribution | slots, {}

    def site_delta(self, contribution: Arrays) -> Arrays:
        """delta_i = (n_i delta_i / a_i) * a_i / n_i, with a_i = (n_i a_i) / n_i."""
        n_i = read_scalar(contribution, WEIGHT)
        a_i = read_scalar(contribution, NOVA_A) / n_i
        return {k: v * a_i / n_i for k, v in strip_prefix(DELTA, contribution).items()}

    def aggregate(self, sums: Arrays, num_contributors: int) -> Arrays:
        """Delta = tau_eff * sum(n_i delta_i / a_i) / sum(n_i) (Section 5, eta cancelled)."""
        parts = self._check_sums(
            sums, num_contributors, (NOVA_A, WEIGHT), slot_keys=(SLOT_NOVA_A, SLOT_WEIGHT)
        )
        if self.slots is not None:
            return to_out(fednova_slot_update(parts[DELTA], sums[SLOT_NOVA_A], sums[SLOT_WEIGHT]))
        sum_n = read_scalar(sums, WEIGHT)
        if not sum_n > 0:
            raise ValueError(f"total aggregation weight must be > 0, got {sum_n}")
        return to_out(fednova_update(parts[DELTA], read_scalar(sums, NOVA_A), sum_n))
