"""The server's side of differential privacy: central noise on the round's sums, the privacy
columns of each round's row, and the privacy block of summary.json.

What the server reports is what anyone can recompute: in plaintext rounds each site's spend
as it reported it; under secure aggregation only sums arrive, so at sample level only the mean
epsilon is known (a site's epsilon depends on its rows, which stay at the site), and at client
level each site's spend follows from public facts and is recomputed here exactly as the site
computes it.
"""

from __future__ import annotations

import numpy as np

from fedlora.apps import records
from fedlora.config import Config
from fedlora.privacy.client_level import add_gaussian, private_keys
from fedlora.privacy.policy import amplification, client_mechanism, spend
from fedlora.strategies.base import Arrays


def central_noise(
    cfg: Config, sums: Arrays, private_prefixes: tuple[str, ...], *, seed: int, round_: int
) -> Arrays:
    """Client level, central: N(0, (sigma C)^2) on every data-carrying sum (the strategy's
    `private_prefixes`), drawn from the server's noise seed and the round; else `sums`."""
    privacy = cfg.privacy
    if privacy.level != "client" or privacy.client_noise != "central":
        return sums
    mechanism = client_mechanism(cfg)
    keys = private_keys(sums, private_prefixes)
    rng = np.random.default_rng([seed, round_])
    return add_gaussian(sums, keys, mechanism.noise_multiplier * mechanism.max_grad_norm, rng)


def reported_spends(cfg: Config, metrics: list) -> dict[str, dict]:
    """Plaintext rounds: each site's spend as it reported it (enough to recompute its epsilon)."""
    per_site = {}
    for site_metrics in metrics:
        spent = {
            k[len(records.PRIVACY) :]: site_metrics[k]
            for k in site_metrics
            if k.startswith(records.PRIVACY)
        }
        spent |= {"level": cfg.privacy.level, "accountant": cfg.privacy.accountant}
        per_site[str(int(site_metrics[records.SITE_ID]))] = spent
    return per_site


def recomputed_spends(cfg: Config, sites: list[int], rows: list[dict]) -> dict[str, dict]:
    """Client level under secure aggregation: a site's spend depends on public facts only (the
    federation's mechanism and the rounds the site was in: those of `rows`, and this one)."""
    mechanism = client_mechanism(cfg)
    per_site = {}
    for site in sites:
        rounds_in = 1 + sum(site in row.get("sites", []) for row in rows)
        ledger = [(mechanism.noise_multiplier, mechanism.sample_rate, 1)] * rounds_in
        per_site[str(site)] = spend(cfg, mechanism, ledger).as_dict()
    return per_site


def privacy_row(
    cfg: Config,
    metrics: list,
    stats: Arrays,
    rows: list[dict],
    epsilon_spent: dict[str, float],
    exhausted: set[int],
) -> dict[str, object]:
    """The privacy columns of a round's row: per-site spend and the largest epsilon so far
    (`epsilon_spent`: site -> latest epsilon before this round), or under secure aggregation at
    sample level the mean. `stats`: the summed statistics of a secure round ({} in plaintext);
    `rows`: the rows reported before this one."""
    if cfg.privacy.level == "none":
        return {}
    if stats:
        if records.STATS_EPSILON not in stats:
            return {}
        if cfg.privacy.level == "sample":
            mean = float(stats[records.STATS_EPSILON][0]) / len(metrics)
            if stats[records.STATS_UNBOUNDED][0] > 0:
                mean = float("inf")
            return {"privacy": {}, "epsilon_mean": mean, "exhausted": sorted(exhausted)}
        per_site = recomputed_spends(cfg, [int(m[records.SITE_ID]) for m in metrics], rows)
    else:
        per_site = reported_spends(cfg, metrics)
    latest = epsilon_spent | latest_epsilons({"privacy": per_site})
    row: dict[str, object] = {
        "privacy": per_site,
        "epsilon_max": max(latest.values(), default=0.0),
        "exhausted": sorted(exhausted),
    }
    if cfg.privacy.level == "client":
        row["amplification"] = amplification(cfg)
    return row


def latest_epsilons(row: dict) -> dict[str, float]:
    """site -> epsilon, for the sites whose spend a round's row names."""
    return {site: float(spent["epsilon"]) for site, spent in row.get("privacy", {}).items()}


def privacy_summary(cfg: Config, rows: list[dict], exhausted: set[int]) -> dict:
    """Each site's latest spend (enough to recompute its epsilon) and the largest epsilon. A
    site spends only in the rounds it is in (or, self-selecting, asked), and reports its whole
    spend each time, so its latest report is current; a site that was in no round spent 0."""
    if cfg.privacy.level == "none":
        return {"level": "none", "max_epsilon": None}
    sites: dict[str, dict] = {
        str(s): {"epsilon": 0.0, "steps": 0} for s in range(cfg.federation.clients)
    }
    for row in rows:
        sites.update(row.get("privacy", {}))
    if cfg.secure.enabled and cfg.privacy.level == "sample":  # epsilons depend on a site's rows
        means = [row["epsilon_mean"] for row in rows if "epsilon_mean" in row]
        return {
            "level": "sample",
            "accountant": cfg.privacy.accountant,
            "max_epsilon": None,  # kept at each site (its audit log): only their sum is sent
            "epsilon_mean": means[-1] if means else None,
            "budget": cfg.privacy.max_epsilon or None,
            "exhausted": sorted(exhausted),
        }
    return {
        "level": cfg.privacy.level,
        "client_noise": cfg.privacy.client_noise if cfg.privacy.level == "client" else None,
        "amplification": amplification(cfg) if cfg.privacy.level == "client" else None,
        "accountant": cfg.privacy.accountant,
        "max_epsilon": max((s["epsilon"] for s in sites.values()), default=0.0),
        "budget": cfg.privacy.max_epsilon or None,
        "exhausted": sorted(exhausted),
        "sites": dict(sorted(sites.items(), key=lambda kv: int(kv[0]))),
    }
