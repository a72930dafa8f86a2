"""Privacy accounting with opacus's accountants (RDP or PRV), from a ledger anyone can check.

A ledger is a list of entries (noise multiplier sigma, sampling rate q, steps): one entry per
round in which the mechanism ran. Replaying it through a fresh opacus accountant gives epsilon at
delta, so the numbers in metrics.jsonl and summary.json are enough to recompute every epsilon.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

Entry = tuple[float, float, int]
"""(noise_multiplier, sample_rate, steps)."""


def default_delta(n: int) -> float:
    """1 / (10 n): below 1/n, the usual requirement (n = records, or sites at client level)."""
    return 1.0 / (10 * max(1, n))


def unsafe_delta(delta: float, n: int) -> str | None:
    """Why `delta` protects none of n units, or None. (epsilon, delta)-DP with delta >= 1/n
    allows a mechanism that publishes one of the n outright (n = privacy units, or sites at
    client level)."""
    if delta < 1 / max(1, n):
        return None
    return (
        f"delta {delta:.3g} is not below 1/{n} (n = {n} privacy units): it would allow "
        "publishing one unit's records; set privacy.delta = 0 (1/(10 n))"
    )


def _accountant(name: str, ledger: Sequence[Entry]):
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = RDPAccountant() if name == "rdp" else PRVAccountant()
    # opacus merges consecutive identical (sigma, q) entries itself; keep the ledger as is
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in ledger if n > 0]
    return accountant


def epsilon(ledger: Sequence[Entry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` spent by the ledger: 0 for an empty one, inf without noise."""
    entries = [e for e in ledger if e[2] > 0]
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf
    with warnings.catch_warnings():  # "optimal order is the largest alpha": bound still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(_accountant(accountant, entries).get_epsilon(delta=delta))


def noise_for_epsilon(
    target: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier that keeps `steps` steps at rate `sample_rate` within
    (target, delta) (opacus's binary search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


@dataclass(frozen=True)
class Spend:
    """What a party reports after a round: enough to recompute its epsilon."""

    level: str  # "sample" or "client"
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int  # accounted steps so far (DP-SGD steps, or rounds at client level)
    max_grad_norm: float
    accountant: str

    def as_dict(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)
