"""Strategy interface: every federated strategy is a client half plus a server half over SUMS.

Secure aggregation reveals only the elementwise sum of what the clients send. So each strategy
splits into a *client half* that emits already-weighted vectors (e.g. ``n_i * delta_i`` and
``n_i``) and a *server half* that turns the per-key sums into the global update. Plain and
secure aggregation then run exactly the same strategy code.

Notation follows the papers: ``x`` global adapter, ``y_i`` client i's local result,
``delta_i = y_i - x``, ``n_i`` its training rows, ``tau_i`` its local steps, ``eta_l`` the local
learning rate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedlora.strategies.slots import RankSlots, restrict_to_rank

Arrays = dict[str, np.ndarray]
"""Adapter tensor name -> array."""

# --- every key prefix of contributions, broadcasts and state lives here -----------------------
DELTA = "delta/"  # contribution: weighted model delta per adapter tensor
WEIGHT = "weight"  # contribution: n_i, shape (1,)
DC = "dc/"  # contribution (SCAFFOLD): c_i+ - c_i per adapter tensor
COUNT = "count"  # contribution (SCAFFOLD): 1 per client, shape (1,)
NOVA_A = "nova_a"  # contribution (FedNova): n_i * a_i, shape (1,)
C = "c/"  # broadcast and server state (SCAFFOLD): server control variate c
C_I = "c_i/"  # client state (SCAFFOLD): client control variate c_i
MOMENTUM = "m/"  # server optimiser state: momentum buffer
SLOT_WEIGHT = "slot_weight"  # contribution (rank-partitioned): n_i on the slots site i holds
SLOT_NOVA_A = "slot_nova_a"  # contribution (rank-partitioned FedNova): n_i * a_i per held slot

OUT_DTYPE = np.float32
"""dtype of updates, broadcasts and client state (what adapters use); sums stay float64."""


@dataclass(frozen=True)
class LocalWork:
    """What a client's local training actually did; the strategies need it to weight the delta."""

    num_examples: int  # n_i: training rows at the site (the aggregation weight)
    steps: int  # tau_i: local optimiser steps actually taken
    lr: float  # local learning rate eta_l
    momentum: float = 0.0  # local SGD momentum rho
    #: the leading rank slots the site trained (heterogeneous ranks); None = all of them
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.num_examples < 1:
            raise ValueError(f"LocalWork.num_examples must be >= 1, got {self.num_examples}")
        if self.steps < 0:
            raise ValueError(f"LocalWork.steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"LocalWork.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"LocalWork.momentum must be in [0, 1), got {self.momentum}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"LocalWork.rank must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class TrainingTerms:
    """What the local training loop adds to each gradient."""

    prox_mu: float = 0.0  # FedProx: grad += mu * (w - w_global)
    grad_correction: Arrays | None = None  # SCAFFOLD: grad += (c - c_i)


# --- small pure helpers ------------------------------------------------------------------------


def scalar(value: float) -> np.ndarray:
    """A scalar contribution: shape-(1,) float64, so it can be summed like any other vector."""
    return np.array([value], dtype=np.float64)


def read_scalar(sums: Mapping[str, np.ndarray], key: str) -> float:
    """Read a shape-(1,) scalar from the sums, with a clear error if it is missing or malformed."""
    if key not in sums:
        raise ValueError(f"sums lack the scalar {key!r}; got keys {sorted(sums)}")
    value = np.asarray(sums[key], dtype=np.float64)
    if value.shape != (1,):
        raise ValueError(f"sums[{key!r}] must have shape (1,), got {value.shape}")
    return float(value[0])


def with_prefix(prefix: str, arrays: Mapping[str, np.ndarray], dtype: type = np.float64) -> Arrays:
    """Prefix every key (e.g. ``delta/``) and cast, keeping the caller's key order."""
    return {prefix + k: np.asarray(v, dtype=dtype) for k, v in arrays.items()}


def strip_prefix(prefix: str, arrays: Mapping[str, np.ndarray]) -> Arrays:
    """The sub-dict of keys starting with ``prefix``, prefix removed, as float64."""
    return {
        k[len(prefix) :]: np.asarray(v, dtype=np.float64)
        for k, v in arrays.items()
        if k.startswith(prefix)
    }


def check_same_keys(what: str, expected: Iterable[str], got: Iterable[str]) -> None:
    """Raise ValueError naming the missing and unexpected keys when two key sets differ."""
    exp, act = set(expected), set(got)
    if exp != act:
        raise ValueError(
            f"{what}: key mismatch; missing {sorted(exp - act)}, unexpected {sorted(act - exp)}"
        )


def check_same_shapes(what: str, reference: Mapping[str, np.ndarray], other: Arrays) -> None:
    """Keys must match and every array must have the reference's shape."""
    check_same_keys(what, reference, other)
    for k, ref in reference.items():
        if np.shape(other[k]) != np.shape(ref):
            raise ValueError(f"{what}: {k!r} has shape {np.shape(other[k])}, expected {ref.shape}")


def sum_contributions(contributions: list[Arrays]) -> Arrays:
    """Elementwise float64 sum over clients: what (secure) aggregation gives the server half."""
    if not contributions:
        raise ValueError("sum_contributions needs at least one contribution")
    first = contributions[0]
    total: Arrays = {k: np.array(v, dtype=np.float64) for k, v in first.items()}
    for i, contrib in enumerate(contributions[1:], start=1):
        check_same_keys(f"contribution {i} vs contribution 0", first, contrib)
        for k, v in contrib.items():
            if np.shape(v) != total[k].shape:
                raise ValueError(
                    f"contribution {i}: {k!r} has shape {np.shape(v)}, expected {total[k].shape}"
                )
            total[k] += np.asarray(v, dtype=np.float64)
    return total


def weighted_mean(weighted_sum: Arrays, total_weight: float) -> Arrays:
    """sum_i n_i v_i / sum_i n_i, i.e. sum_i p_i v_i with p_i = n_i / sum_j n_j (participants)."""
    if not total_weight > 0:
        raise ValueError(f"total aggregation weight must be > 0, got {total_weight}")
    return {k: v / total_weight for k, v in weighted_sum.items()}


def to_out(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """Cast to the adapters' dtype at the boundary (math above stays float64)."""
    return {k: np.asarray(v, dtype=OUT_DTYPE) for k, v in arrays.items()}


def check_delta(delta: Mapping[str, np.ndarray]) -> None:
    """A client delta must name at least one adapter tensor."""
    if not delta:
        raise ValueError("delta is empty: expected one array per adapter tensor")


# --- the interface -----------------------------------------------------------------------------


class Strategy(ABC):
    """A federated strategy split into a pure client half and a server half over sums."""

    name: ClassVar[str]
    #: the contribution vectors that carry data: clipped (jointly) and noised under client-level
    #: differential privacy; everything else is a public count or step number
    private_prefixes: ClassVar[tuple[str, ...]] = (DELTA,)

    def __init__(self, *, total_clients: int, slots: RankSlots | None = None) -> None:
        if total_clients < 1:
            raise ValueError(f"total_clients must be >= 1, got {total_clients}")
        self.total_clients = total_clients
        #: rank-partitioned averaging (fedlora.strategies.slots); None: one weight per site
        self.slots = slots

    def own_slots(self, delta: Arrays, work: LocalWork) -> Arrays:
        """A site of rank r_i changes only its leading r_i slots: anything else is zeroed
        (zero-padded to the global rank)."""
        check_delta(delta)
        return delta if work.rank is None else restrict_to_rank(delta, work.rank)

    def slot_terms(self, work: LocalWork, **per_site: float) -> Arrays:
        """Rank-partitioned: each scalar `name=value` also as a per-slot vector, value on the
        slots the site holds and 0 elsewhere (empty without `slots`)."""
        if self.slots is None:
            return {}
        return {k: self.slots.weights(v, work.rank) for k, v in per_site.items()}

    # client half ------------------------------------------------------------------------------
    def training_terms(
        self, broadcast: Arrays, client_state: Arrays, params: Arrays
    ) -> TrainingTerms:
        """Extra gradient terms for local training; plain SGD by default."""
        return TrainingTerms()

    @abstractmethod
    def client_contribution(
        self, delta: Arrays, work: LocalWork, broadcast: Arrays, client_state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """delta = y_i - x (local result minus global), keyed by adapter tensor name.

        Returns (contribution, new_client_state). contribution maps keys to arrays that the
        server will SUM elementwise over clients; scalars are shape-(1,) float64 arrays.
        """

    def scale_private(
        self, contribution: Arrays, new_state: Arrays, client_state: Arrays, scale: float
    ) -> tuple[Arrays, Arrays]:
        """Multiply the data-carrying vectors by `scale` (client-level clipping); a strategy
        whose client state follows from what it sent keeps the two consistent."""
        scaled = {
            k: v * scale if k.startswith(self.private_prefixes) else v
            for k, v in contribution.items()
        }
        return scaled, new_state

    # server half ------------------------------------------------------------------------------
    def site_delta(self, contribution: Arrays) -> Arrays:
        """Undo the weighting of ONE site's contribution: its delta_i. Only possible where the
        server sees individual contributions (plaintext aggregation); used for diagnostics such
        as the LoRA factor-averaging error, never for the update itself."""
        n_i = read_scalar(contribution, WEIGHT)
        return {k: v / n_i for k, v in strip_prefix(DELTA, contribution).items()}

    def broadcast(self) -> Arrays:
        """Server state sent along with the global adapter; none by default."""
        return {}

    @abstractmethod
    def aggregate(self, sums: Arrays, num_contributors: int) -> Arrays:
        """From the summed contributions return the global update Delta (same keys/shapes as
        delta), and update internal server state."""

    def state_dict(self) -> Arrays:
        """Server state for checkpointing; stateless strategies have none."""
        return {}

    def load_state_dict(self, state: Arrays) -> None:
        """Restore :meth:`state_dict`; a stateless strategy accepts only ``{}``."""
        if state:
            raise ValueError(f"{self.name} is stateless; got state keys {sorted(state)}")

    # shared validation -------------------------------------------------------------------------
    def _check_sums(
        self,
        sums: Arrays,
        num_contributors: int,
        scalars: tuple[str, ...],
        vectors: tuple[str, ...] = (DELTA,),
        slot_keys: tuple[str, ...] = (),
    ) -> dict[str, Arrays]:
        """Validate the sums; return ``{prefix: arrays}`` for each vector prefix, prefix stripped.

        Every vector prefix must cover the same adapter tensors with the same shapes as
        ``delta/``, and no other keys may be present (a typo would silently drop a term).
        With rank slots, `slot_keys` must be present as vectors of one value per slot.
        """
        if num_contributors < 1:
            raise ValueError(f"num_contributors must be >= 1, got {num_contributors}")
        if num_contributors > self.total_clients:
            raise ValueError(
                f"num_contributors={num_contributors} exceeds total_clients={self.total_clients}"
            )
        if not sums:
            raise ValueError("sums are empty: no client contributed")
        parts = {prefix: strip_prefix(prefix, sums) for prefix in vectors}
        deltas = parts[vectors[0]]
        if not deltas:
            raise ValueError(f"sums hold no {vectors[0]!r} keys; got keys {sorted(sums)}")
        for prefix in vectors[1:]:
            check_same_shapes(f"sums {prefix!r} vs {vectors[0]!r}", deltas, parts[prefix])
        slot_keys = slot_keys if self.slots is not None else ()
        known = set(scalars) | set(slot_keys) | {p + k for p in vectors for k in deltas}
        unexpected = sorted(set(sums) - known)
        if unexpected:
            raise ValueError(f"{self.name}: unexpected keys in sums: {unexpected}")
        for key in scalars:
            read_scalar(sums, key)
        for key in slot_keys:
            shape = np.shape(sums[key]) if key in sums else None
            if shape != (self.slots.global_rank,):  # type: ignore[union-attr]
                raise ValueError(
                    f"{self.name}: rank-partitioned sums need {key!r} with one value per slot "
                    f"({self.slots.global_rank}), got {shape}"  # type: ignore[union-attr]
                )
        return parts
