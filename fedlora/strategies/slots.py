"""Heterogeneous LoRA ranks: pure arithmetic on rank slots.

The global adapter has rank R. A site of rank r_i trains only the leading slice of it: rows
A[:r_i, :] and columns B[:, :r_i]. Slot j of a module is the pair (B[:, j], A[j, :]); since
B·A = sum_j B[:, j] A[j, :], slots add up independently, which is what lets each slice be
averaged on its own and still as a SUM (so secure aggregation composes):

  zero-pad      every site counts in every slot: a site sends its delta zero-padded to rank R
                and its weight n_i, as with equal ranks. Slot j moves by
                sum_{i: r_i > j} n_i delta_ij / sum_i n_i: the exact mean of the sites' updates,
                where a site that lacks slot j contributes no change to it.
  partitioned   slot j is averaged only over the sites that hold it: a site also sends a
                per-slot weight vector w_i (length R, w_ij = n_i if j < r_i else 0) and slot j
                moves by sum_i n_i delta_ij / sum_i w_ij, so the high-rank slices are not
                diluted by sites that never trained them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]

RANK_RULES = ("zero-pad", "partitioned")


def rank_axis(name: str) -> int | None:
    """The axis of a LoRA tensor that indexes rank slots: rows of A, columns of B; None for a
    tensor that is not a LoRA factor (a scalar, a product)."""
    if "lora_A" in name:
        return 0
    if "lora_B" in name:
        return 1
    return None


def slot_mask(rank: int, global_rank: int) -> np.ndarray:
    """1.0 for the slots a rank-`rank` site holds (the leading ones), 0.0 for the others."""
    if not 1 <= rank <= global_rank:
        raise ValueError(f"a site rank must be in [1, {global_rank}], got {rank}")
    return (np.arange(global_rank) < rank).astype(np.float64)


def along_slots(name: str, vector: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`vector` (one value per slot) shaped to broadcast against the tensor `name` of `shape`."""
    axis = rank_axis(name)
    if axis is None or len(shape) != 2 or shape[axis] != len(vector):
        raise ValueError(f"{name!r} of shape {shape} has no rank axis of length {len(vector)}")
    return vector.reshape((-1, 1) if axis == 0 else (1, -1))


def restrict_to_rank(arrays: Mapping[str, np.ndarray], rank: int) -> Arrays:
    """Zero every LoRA tensor (under any key prefix) outside its leading `rank` slots; other
    arrays pass through. What a site of that rank may send or keep: it trained nothing else."""
    out: Arrays = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        axis = rank_axis(key)
        if axis is None or value.ndim != 2:
            out[key] = value
            continue
        keep = slot_mask(rank, value.shape[axis])
        out[key] = (value * along_slots(key, keep, value.shape)).astype(value.dtype)
    return out


def slot_weighted_mean(weighted_sum: Mapping[str, np.ndarray], slot_weights: np.ndarray) -> Arrays:
    """Partitioned mean: each slot of every tensor divided by that slot's summed weight
    sum_i w_ij. A slot no contributing site holds (weight 0) gets no update (its sum is 0)."""
    w = np.asarray(slot_weights, dtype=np.float64)
    if np.any(w < 0):
        raise ValueError(f"slot weights must be >= 0, got {w}")
    if not np.any(w > 0):
        raise ValueError("every slot weight is 0: no contributing site holds any slot")
    inverse = np.divide(1.0, w, out=np.zeros_like(w), where=w > 0)
    return {
        k: np.asarray(v, dtype=np.float64) * along_slots(k, inverse, np.shape(v))
        for k, v in weighted_sum.items()
    }


@dataclass(frozen=True)
class RankSlots:
    """A federation whose sites train rank slices and whose slices are averaged per slot
    (`partitioned`). `holders[j]`: how many sites of the whole federation hold slot j, the
    denominator SCAFFOLD's server control variate needs per slot."""

    global_rank: int
    holders: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.holders) != self.global_rank or min(self.holders, default=0) < 0:
            raise ValueError(f"holders must be {self.global_rank} counts >= 0: {self.holders}")

    @classmethod
    def of(cls, site_ranks: list[int], global_rank: int) -> RankSlots:
        """From every site's rank (one entry per site of the federation)."""
        counts = sum((slot_mask(r, global_rank) for r in site_ranks), np.zeros(global_rank))
        return cls(global_rank, tuple(int(c) for c in counts))

    def weights(self, n_i: float, rank: int | None) -> np.ndarray:
        """A site's per-slot weight vector: n_i on the slots it holds, 0 elsewhere."""
        return n_i * slot_mask(self.global_rank if rank is None else rank, self.global_rank)
