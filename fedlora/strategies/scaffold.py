"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1 with option II for the control-variate update).

Server control variate ``c``, client control variates ``c_i`` (all start at zero):
  line 10:  y_i <- y_i - eta_l (g_i(y_i) - c_i + c)          (local step, corrected gradient)
  line 12:  c_i+ <- c_i - c + (x - y_i) / (K eta_l)           (option II)
  line 13:  send (Delta y_i, Delta c_i) = (y_i - x, c_i+ - c_i)
  line 16:  (Delta x, Delta c) = 1/|S| sum_{i in S} (Delta y_i, Delta c_i)
  line 17:  x <- x + eta_g Delta x,   c <- c + |S|/N Delta c = c + (1/N) sum_{i in S} Delta c_i

Delta x here is data-size weighted, sum(n_i Delta y_i) / sum(n_i), which equals the paper's
1/|S| mean when all n_i are equal. The server learning rate eta_g lives in ServerOptimizer.
"""

from __future__ import annotations

import numpy as np

from fedlora.strategies.base import (
    C_I,
    COUNT,
    DC,
    DELTA,
    SLOT_WEIGHT,
    WEIGHT,
    Arrays,
    C,
    LocalWork,
    Strategy,
    TrainingTerms,
    check_same_shapes,
    read_scalar,
    scalar,
    strip_prefix,
    to_out,
    with_prefix,
)
from fedlora.strategies.fedavg import weighted_delta_terms, weighted_update
from fedlora.strategies.fednova import nova_a
from fedlora.strategies.slots import RankSlots, along_slots, restrict_to_rank


def updated_client_control(
    c_i: Arrays, c: Arrays, delta: Arrays, steps: int, lr: float, momentum: float = 0.0
) -> Arrays:
    """Algorithm 1 line 12 (option II): c_i+ = c_i - c + (x - y_i)/(K eta_l)
    = c_i - c - delta_i / (K eta_l), with K = tau_i the steps this client actually took.

    With local SGD momentum rho, K steps under a constant gradient move eta_l * a_i times it,
    where a_i is FedNova's effective step count (`nova_a`); dividing by a_i instead of K keeps
    c_i an estimate of the gradient. a_i = K when rho = 0: the paper's formula exactly."""
    scale = 1.0 / (nova_a(steps, momentum) * lr)
    return {k: c_i[k] - c[k] - scale * np.asarray(d, dtype=np.float64) for k, d in delta.items()}


def updated_server_control(c: Arrays, sum_dc: Arrays, total_clients: int) -> Arrays:
    """Algorithm 1 line 17: c <- c + |S|/N * (1/|S|) sum_{i in S} Delta c_i
    = c + (1/N) sum_{i in S} Delta c_i, with N all clients (not just participants)."""
    return {k: c[k] + sum_dc[k] / total_clients for k in sum_dc}


def updated_server_control_slots(c: Arrays, sum_dc: Arrays, holders: np.ndarray) -> Arrays:
    """Line 17 with rank-partitioned slots: slot j's c is the mean over the N_j sites of the
    federation that hold it, c_j <- c_j + (1/N_j) sum_{i in S} Delta c_ij (Delta c_ij = 0 for a
    site without slot j). With c_j diluted by 1/N instead, the holders' corrected steps would
    move slot j by only N_j/N of their gradient, undoing what partitioned averaging is for."""
    h = np.asarray(holders, dtype=np.float64)
    inverse = np.divide(1.0, h, out=np.zeros_like(h), where=h > 0)
    return {k: c[k] + sum_dc[k] * along_slots(k, inverse, sum_dc[k].shape) for k in sum_dc}


def _zeros_like(shapes: Arrays) -> Arrays:
    return {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in shapes.items()}


def _read_variate(prefix: str, what: str, arrays: Arrays, reference: Arrays) -> Arrays:
    """The control variate under ``prefix`` (zeros when absent: round one), shape-checked."""
    variate = strip_prefix(prefix, arrays)
    if not variate:
        return _zeros_like(reference)
    check_same_shapes(what, reference, variate)
    return variate


class Scaffold(Strategy):
    """Corrects client drift with control variates: clients follow g_i - c_i + c."""

    name = "scaffold"
    private_prefixes = (DELTA, DC)

    def __init__(self, *, total_clients: int, slots: RankSlots | None = None) -> None:
        super().__init__(total_clients=total_clients, slots=slots)
        self._c: Arrays | None = None  # server control variate, created lazily (shapes unknown)

    # client half ------------------------------------------------------------------------------
    def training_terms(
        self, broadcast: Arrays, client_state: Arrays, params: Arrays
    ) -> TrainingTerms:
        """grad += c - c_i (Algorithm 1 line 10); zeros before any variate exists."""
        if not params:
            raise ValueError("params are empty: SCAFFOLD needs the adapter tensor names/shapes")
        c = _read_variate(C, "broadcast c vs params", broadcast, params)
        c_i = _read_variate(C_I, "client_state c_i vs params", client_state, params)
        return TrainingTerms(grad_correction=to_out({k: c[k] - c_i[k] for k in params}))

    def client_contribution(
        self, delta: Arrays, work: LocalWork, broadcast: Arrays, client_state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """Send n_i delta_i, n_i, Delta c_i = c_i+ - c_i (unweighted) and a count of 1
        (rank-partitioned: also n_i per held slot).

        A site of rank r_i has gradient exactly 0 on the slots it lacks (they are not in its
        model), so its c_i+ is 0 there, not option II's c_i - c (which assumes the site took
        the corrected steps on them)."""
        delta = self.own_slots(delta, work)
        if work.steps < 1:
            raise ValueError(f"SCAFFOLD needs steps >= 1 to form c_i+, got {work.steps}")
        c = _read_variate(C, "broadcast c vs delta", broadcast, delta)
        c_i = _read_variate(C_I, "client_state c_i vs delta", client_state, delta)
        c_i_new = updated_client_control(c_i, c, delta, work.steps, work.lr, work.momentum)
        if work.rank is not None:
            c_i_new = restrict_to_rank(c_i_new, work.rank)
        n_i = float(work.num_examples)
        contribution = weighted_delta_terms(delta, n_i)
        contribution |= self.slot_terms(work, **{SLOT_WEIGHT: n_i})
        contribution.update(with_prefix(DC, {k: c_i_new[k] - c_i[k] for k in delta}))
        contribution[COUNT] = scalar(1.0)
        return contribution, with_prefix(C_I, c_i_new, dtype=np.float32)

    def scale_private(
        self, contribution: Arrays, new_state: Arrays, client_state: Arrays, scale: float
    ) -> tuple[Arrays, Arrays]:
        """Clipping scales Delta c_i too, so c_i+ = c_i + scale * Delta c_i: the site's variate
        stays the one the server's c accounts for."""
        scaled, _ = super().scale_private(contribution, new_state, client_state, scale)
        dc = strip_prefix(DC, scaled)
        c_i = _read_variate(C_I, "client_state c_i vs dc", client_state, dc)
        return scaled, with_prefix(C_I, {k: c_i[k] + dc[k] for k in dc}, dtype=np.float32)

    # server half ------------------------------------------------------------------------------
    def broadcast(self) -> Arrays:
        """{c/<name>: c}; empty before the first aggregation (clients then use zeros)."""
        return {} if self._c is None else with_prefix(C, self._c, dtype=np.float32)

    def aggregate(self, sums: Arrays, num_contributors: int) -> Arrays:
        """Delta x = sum(n_i delta_i)/sum(n_i); c <- c + sum(Delta c_i)/N (lines 16-17); with
        rank-partitioned slots both per slot, over the sites that hold it."""
        parts = self._check_sums(
            sums, num_contributors, (WEIGHT, COUNT), (DELTA, DC), slot_keys=(SLOT_WEIGHT,)
        )
        count = read_scalar(sums, COUNT)
        if count != num_contributors:
            raise ValueError(f"sums count {count:g} != num_contributors {num_contributors}")
        c = self._c if self._c is not None else _zeros_like(parts[DC])
        check_same_shapes("server c vs sums", c, parts[DC])
        update = weighted_update(parts[DELTA], sums, self.slots is not None)
        if self.slots is not None:
            self._c = updated_server_control_slots(c, parts[DC], np.array(self.slots.holders))
        else:
            self._c = updated_server_control(c, parts[DC], self.total_clients)
        return to_out(update)

    def state_dict(self) -> Arrays:
        """{c/<name>: c} in float64 so a checkpoint round-trips exactly; {} before round one."""
        return {} if self._c is None else with_prefix(C, self._c)

    def load_state_dict(self, state: Arrays) -> None:
        """Restore c; ``{}`` resets to the lazy zero state."""
        unexpected = sorted(k for k in state if not k.startswith(C))
        if unexpected:
            raise ValueError(f"scaffold state has unexpected keys {unexpected}; expected {C!r}*")
        self._c = strip_prefix(C, state) or None
