"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", eq. (2)):
FedAvg aggregation, but each client minimises h_k(w) = F_k(w) + mu/2 ||w - w^t||^2, so its
gradient gains mu * (w - w^t). The server half is exactly FedAvg's."""

from __future__ import annotations

import warnings

from fedlora.strategies.base import Arrays, TrainingTerms
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.slots import RankSlots


class FedProx(FedAvg):
    """FedAvg with a proximal term that keeps local models near the global one (eq. 2)."""

    name = "fedprox"

    def __init__(self, *, total_clients: int, mu: float, slots: RankSlots | None = None) -> None:
        super().__init__(total_clients=total_clients, slots=slots)
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        if mu == 0:
            warnings.warn(
                "FedProx with mu=0 has no proximal term and is identical to FedAvg",
                stacklevel=2,
            )
        self.mu = float(mu)

    def training_terms(
        self, broadcast: Arrays, client_state: Arrays, params: Arrays
    ) -> TrainingTerms:
        """The local loop adds mu * (w - w_global) to each gradient (gradient of eq. 2's term)."""
        return TrainingTerms(prox_mu=self.mu)
