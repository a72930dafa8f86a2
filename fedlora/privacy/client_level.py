"""Client-level DP: each site's update is clipped to norm C and the SUM of the updates carries
Gaussian noise N(0, (sigma C)^2) per coordinate (DP-FedAvg, McMahan et al. 2018, with uniform
weights: a site's data size would otherwise change the sensitivity).

Two places to add the noise, one guarantee: "central" adds it at the server after the sum;
"distributed" has each of the m >= t surviving sites add N(0, (sigma C)^2 / t), so the sum
carries at least (sigma C)^2 whatever the dropouts down to the threshold t: with secure
aggregation the server never sees an update with less noise than that.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Arrays = dict[str, np.ndarray]


def private_keys(contribution: Arrays, prefixes: Iterable[str]) -> list[str]:
    """The data-dependent vectors of a contribution (shape-(1,) scalars are public counts)."""
    prefixes = tuple(prefixes)
    return sorted(k for k in contribution if k.startswith(prefixes))


def clip_scale(contribution: Arrays, keys: Iterable[str], max_norm: float) -> float:
    """min(1, C / ||v||) for the concatenation v of the given vectors."""
    norm = float(
        np.sqrt(sum(float(np.sum(np.square(contribution[k], dtype=np.float64))) for k in keys))
    )
    return 1.0 if norm <= max_norm else max_norm / norm


def add_gaussian(
    arrays: Arrays, keys: Iterable[str], std: float, rng: np.random.Generator
) -> Arrays:
    """arrays with N(0, std^2) added to every coordinate of the given keys (float64)."""
    out = dict(arrays)
    for k in keys:
        value = np.asarray(arrays[k], dtype=np.float64)
        out[k] = value + rng.normal(0.0, std, size=value.shape)
    return out


def noise_shares(threshold: int) -> int:
    """Over how many sites a site splits its distributed noise: the fewest inputs of any sum
    the server can learn, which is the secure-aggregation threshold t of the site's own session
    (the server can unmask no sum of fewer, whatever it claims)."""
    return threshold


def site_noise_std(noise_multiplier: float, max_norm: float, shares: int) -> float:
    """Distributed noise per site: sigma C / sqrt(shares), so `shares` or more sites sum to
    >= (sigma C)^2 (`shares`: see noise_shares)."""
    return noise_multiplier * max_norm / np.sqrt(shares)
