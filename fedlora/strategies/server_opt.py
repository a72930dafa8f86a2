"""Server optimiser applied to the aggregated update Delta (the strategy's global update, after
the sum: so it composes with every strategy, secure aggregation and client-level DP, whose
noise is already in Delta).

"sgd" is FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", Section 3):

    m <- momentum * m + Delta,     x <- x + lr * m

With momentum 0 and lr 1 it is plain x + Delta, i.e. what every strategy prescribes; lr is the
paper-agnostic server learning rate (SCAFFOLD's eta_g).

"adagrad", "yogi", "adam" are FedAdagrad, FedYogi and FedAdam (Reddi et al. 2021, "Adaptive
Federated Optimization", Algorithm 2), per coordinate:

    m <- beta1 * m + (1 - beta1) * Delta
    v <- v + Delta^2                                        (adagrad)
    v <- v - (1 - beta2) * Delta^2 * sign(v - Delta^2)      (yogi)
    v <- beta2 * v + (1 - beta2) * Delta^2                  (adam)
    x <- x + lr * m / (sqrt(v) + tau)

m and v start at 0 (as in Flower's FedOpt strategies; tau keeps the first step finite) and
there is no bias correction, as in the paper. Flower's FedAdam multiplies lr by
sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) in round t, and its FedAdagrad fixes beta1 = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedlora.strategies.base import (
    MOMENTUM,
    Arrays,
    check_same_shapes,
    strip_prefix,
    to_out,
    with_prefix,
)

if TYPE_CHECKING:
    from fedlora.config import StrategyConfig

SECOND_MOMENT = "v/"  # server optimiser state: adaptive second-moment estimate
ADAPTIVE = ("adagrad", "yogi", "adam")
OPTIMIZERS = ("sgd", *ADAPTIVE)


def momentum_step(
    params: Arrays, update: Arrays, buffer: Mapping[str, np.ndarray], lr: float, momentum: float
) -> tuple[Arrays, Arrays]:
    """One FedAvgM step in float64: returns (x + lr * m, m) with m = momentum * m + Delta."""
    new_buffer = {k: momentum * buffer[k] + np.asarray(update[k], dtype=np.float64) for k in update}
    new_params = {k: np.asarray(params[k], dtype=np.float64) + lr * new_buffer[k] for k in update}
    return new_params, new_buffer


def second_moment(kind: str, v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """The paper's v_t from v_{t-1} and Delta_t for one optimiser."""
    sq = delta * delta
    if kind == "adagrad":
        return v + sq
    if kind == "yogi":
        return v - (1.0 - beta2) * sq * np.sign(v - sq)
    if kind == "adam":
        return beta2 * v + (1.0 - beta2) * sq
    raise ValueError(f"unknown adaptive server optimiser {kind!r}; expected one of {ADAPTIVE}")


def adaptive_step(
    kind: str,
    params: Arrays,
    update: Arrays,
    m: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Arrays, Arrays, Arrays]:
    """One FedAdagrad / FedYogi / FedAdam step in float64: returns (x_{t+1}, m_t, v_t)."""
    new_m, new_v, new_x = {}, {}, {}
    for k in update:
        delta = np.asarray(update[k], dtype=np.float64)
        new_m[k] = beta1 * m[k] + (1.0 - beta1) * delta
        new_v[k] = second_moment(kind, v[k], delta, beta2)
        step = lr * new_m[k] / (np.sqrt(new_v[k]) + tau)
        new_x[k] = np.asarray(params[k], dtype=np.float64) + step
    return new_x, new_m, new_v


class ServerOptimizer:
    """Applies the strategy's global update to the global adapter: plain, with momentum, or
    with one of the adaptive optimisers of Reddi et al."""

    def __init__(
        self,
        *,
        lr: float = 1.0,
        momentum: float = 0.0,
        kind: str = "sgd",
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"server optimiser must be one of {OPTIMIZERS}, got {kind!r}")
        if not lr > 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        if kind != "sgd" and momentum:
            raise ValueError(f"server momentum is for 'sgd'; {kind!r} uses beta1 instead")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"server {name} must be in [0, 1), got {beta}")
        if not tau > 0:
            raise ValueError(f"server tau must be > 0, got {tau}")
        self.kind = kind
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self._m: Arrays | None = None  # momentum / first moment, created on the first step
        self._v: Arrays | None = None  # second moment (adaptive optimisers only)

    @property
    def is_plain(self) -> bool:
        """x + lr * Delta, no state: the new adapter is linear in this round's update alone."""
        return self.kind == "sgd" and self.momentum == 0

    def step(self, global_params: Arrays, update: Arrays) -> Arrays:
        """Return the new global params (float32); params and update must match."""
        if not update:
            raise ValueError("update is empty: expected one array per adapter tensor")
        check_same_shapes("update vs global_params", global_params, update)
        m = self._state_or_zeros(self._m, update, "momentum buffer")
        if self.kind == "sgd":
            new_params, self._m = momentum_step(global_params, update, m, self.lr, self.momentum)
            return to_out(new_params)
        v = self._state_or_zeros(self._v, update, "second moment")
        new_params, self._m, self._v = adaptive_step(
            self.kind,
            global_params,
            update,
            m,
            v,
            lr=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        return to_out(new_params)

    @staticmethod
    def _state_or_zeros(state: Arrays | None, update: Arrays, what: str) -> Arrays:
        if state is None:
            return {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in update.items()}
        check_same_shapes(f"update vs {what}", state, update)
        return state

    def state_dict(self) -> Arrays:
        """{m/<name>: m, v/<name>: v} (float64); {} before the first step."""
        state = {} if self._m is None else with_prefix(MOMENTUM, self._m)
        return state | ({} if self._v is None else with_prefix(SECOND_MOMENT, self._v))

    def load_state_dict(self, state: Arrays) -> None:
        """Restore the buffers; ``{}`` clears them."""
        unexpected = sorted(
            k for k in state if not k.startswith(MOMENTUM) and not k.startswith(SECOND_MOMENT)
        )
        if unexpected:
            raise ValueError(f"server optimiser state has unexpected keys {unexpected}")
        self._m = strip_prefix(MOMENTUM, state) or None
        self._v = strip_prefix(SECOND_MOMENT, state) or None


def server_optimizer_for(st: StrategyConfig) -> ServerOptimizer:
    """The server optimiser a run's `[strategy]` section asks for."""
    return ServerOptimizer(
        lr=st.server_lr,
        momentum=st.server_momentum,
        kind=st.server_optimizer,
        beta1=st.server_beta1,
        beta2=st.server_beta2,
        tau=st.server_tau,
    )
