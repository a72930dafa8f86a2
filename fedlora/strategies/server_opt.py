"""Server optimiser applied to the aggregated update: FedAvgM (Hsu et al. 2019, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification", Section 3):

    m <- momentum * m + Delta,     x <- x + lr * m

With momentum 0 and lr 1 it is plain x + Delta, i.e. what every strategy prescribes; lr is the
paper-agnostic server learning rate (SCAFFOLD's eta_g).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlora.strategies.base import (
    MOMENTUM,
    Arrays,
    check_same_shapes,
    strip_prefix,
    to_out,
    with_prefix,
)


def momentum_step(
    params: Arrays, update: Arrays, buffer: Mapping[str, np.ndarray], lr: float, momentum: float
) -> tuple[Arrays, Arrays]:
    """One FedAvgM step in float64: returns (x + lr * m, m) with m = momentum * m + Delta."""
    new_buffer = {k: momentum * buffer[k] + np.asarray(update[k], dtype=np.float64) for k in update}
    new_params = {k: np.asarray(params[k], dtype=np.float64) + lr * new_buffer[k] for k in update}
    return new_params, new_buffer


class ServerOptimizer:
    """Applies the strategy's global update to the global adapter, optionally with momentum."""

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self._m: Arrays | None = None  # momentum buffer, created on the first step

    def step(self, global_params: Arrays, update: Arrays) -> Arrays:
        """Return new global params x + lr * m (float32); params and update must match."""
        if not update:
            raise ValueError("update is empty: expected one array per adapter tensor")
        check_same_shapes("update vs global_params", global_params, update)
        buffer = self._m
        if buffer is None:
            buffer = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in update.items()}
        else:
            check_same_shapes("update vs momentum buffer", buffer, update)
        new_params, self._m = momentum_step(global_params, update, buffer, self.lr, self.momentum)
        return to_out(new_params)

    def state_dict(self) -> Arrays:
        """{m/<name>: m} (float64); {} before the first step or when momentum is unused."""
        return {} if self._m is None else with_prefix(MOMENTUM, self._m)

    def load_state_dict(self, state: Arrays) -> None:
        """Restore the momentum buffer; ``{}`` clears it."""
        unexpected = sorted(k for k in state if not k.startswith(MOMENTUM))
        if unexpected:
            raise ValueError(f"server optimiser state has unexpected keys {unexpected}")
        self._m = strip_prefix(MOMENTUM, state) or None
