"""From the config to the mechanism a party runs: noise multiplier, sampling rate, delta, and
the budget check. One place, used by the sites and the server alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.config import Config
from fedlora.privacy.accounting import (
    Entry,
    Spend,
    default_delta,
    epsilon,
    noise_for_epsilon,
    unsafe_delta,
)


class BudgetExhausted(Exception):
    """A site refuses a round that would take it past privacy.max_epsilon.

    Its text, which travels to the server, carries no number: under secure aggregation a
    site's epsilon would tell the server its size (sample level) or how often it took part
    (Poisson participation). The numbers stay in `local_detail`, for the site's own log."""

    MARK = "[privacy budget exhausted]"

    def __init__(
        self, site: int, spent: float, next_epsilon: float, budget: float, name: str
    ) -> None:
        self.site = site
        self.local_detail = (
            f"epsilon spent {spent:.3g}; the next round would reach {next_epsilon:.3g} > "
            f"{name} = {budget:g}"
        )
        super().__init__(f"{self.MARK} site {site}")


@dataclass(frozen=True)
class Mechanism:
    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    steps_per_round: int  # DP-SGD steps (sample level) or 1 (client level: one release a round)


def sample_mechanism(
    cfg: Config,
    n_units: int,
    steps_per_round: int,
    max_delta: float = 0.0,
    min_noise: float = 0.0,
) -> Mechanism:
    """DP-SGD at one site: Poisson rate batch_size / n, delta from n; n counts the site's
    privacy units (its rows under privacy.unit = "row", else e.g. its patients).

    The site's own limits make it stricter, never refuse: a delta of 1/n or more protects none
    of the n, so it uses 1/(10 n) instead, and at most its policy's `max_delta`; its noise
    multiplier is at least the policy's `min_noise`. Under a target epsilon both depend on n,
    so a refusal would tell a server probing with deltas or epsilons how many units the site
    holds. (A simulation refuses a delta of 1/n or more before it starts: fedlora.simulate.)"""
    privacy = cfg.privacy
    q = min(1.0, cfg.train.batch_size / n_units)
    delta = privacy.delta or default_delta(n_units)
    if unsafe_delta(delta, n_units):
        delta = default_delta(n_units)
    if max_delta:
        delta = min(delta, max_delta)
    sigma = privacy.noise_multiplier
    if privacy.target_epsilon:
        total = steps_per_round * cfg.federation.rounds
        sigma = noise_for_epsilon(privacy.target_epsilon, delta, q, total, privacy.accountant)
    return Mechanism(max(sigma, min_noise), q, delta, privacy.max_grad_norm, steps_per_round)


#: lr x sigma x C / B past which DP-SGD collapsed in the WordNet study (it learned at 0.058 and
#: under, and fell to 0.335 accuracy at 0.102): simulations/README.md
STEP_NOISE_SEEN_TO_COLLAPSE = 0.1


def step_noise(cfg: Config, mech: Mechanism, n_units: int) -> float:
    """The noise one DP-SGD step adds to each trained coordinate, lr x sigma x C / B, at the
    first round's rate (LoRA+'s B rate where larger) and B the expected batch (every unit where
    a site has fewer than train.batch_size). Under SGD it bounds how large a step may be."""
    lr = cfg.train.lr * max(1.0, cfg.train.loraplus_ratio)
    return lr * mech.noise_multiplier * mech.max_grad_norm / (mech.sample_rate * n_units)


def describe_site_noise(cfg: Config, sites: Sequence[tuple[int, int]]) -> str:
    """One header line on DP-SGD's noise over sites given as (privacy units, steps a round), so
    a user can check the step-size rule before training rather than after. Each distinct site
    costs one noise search (about half a second)."""
    mechs = [(sample_mechanism(cfg, n, steps), n) for n, steps in sorted(set(sites))]
    sigmas = [m.noise_multiplier for m, _ in mechs]
    noises = [step_noise(cfg, m, n) for m, n in mechs]
    budget = (
        f"for epsilon {cfg.privacy.target_epsilon:g} per site"
        if cfg.privacy.target_epsilon
        else "(privacy.noise_multiplier)"
    )
    text = (
        f"DP-SGD: noise multiplier {_span(sigmas)} {budget}; a step adds lr x sigma x clip / "
        f"batch = {_span(noises)} of noise to each trained coordinate"
    )
    if cfg.train.optimizer != "sgd":
        return text + " (AdamW learns little under DP-SGD noise: use SGD, see the README)."
    if max(noises) >= STEP_NOISE_SEEN_TO_COLLAPSE:
        return text + (
            ", where DP-SGD collapsed in the WordNet study (it learned at 0.06 and under): "
            "lower train.lr or raise train.batch_size."
        )
    return text + " (the WordNet study learned at 0.06 and under)."


def describe_private_round(
    cfg: Config,
    mech: Mechanism,
    n_units: int,
    federation_ledger: list[Entry],
    site_ledger: list[Entry],
    own_budget: float,
) -> str:
    """A site operator's line on one private round: the noise the site applied and what its
    rows have spent once the round is out, in this federation and over its whole ledger."""
    accountant = cfg.privacy.accountant
    if cfg.privacy.level == "sample":
        noise = (
            f"DP-SGD, noise multiplier {mech.noise_multiplier:.3g} (lr x sigma x clip / batch "
            f"= {step_noise(cfg, mech, n_units):.3g} per step)"
        )
    else:
        noise = f"client-level DP, noise multiplier {mech.noise_multiplier:.3g}"
    budget = f" (policy.max_epsilon = {own_budget:g})" if own_budget else ""
    return (
        f"{noise}; epsilon {epsilon(federation_ledger, mech.delta, accountant):.3g} in this "
        f"federation, {epsilon(site_ledger, mech.delta, accountant):.3g} over this site's "
        f"privacy ledger{budget}, at delta {mech.delta:.3g}"
    )


def _span(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3g}" if f"{low:.3g}" == f"{high:.3g}" else f"{low:.3g} to {high:.3g}"


#: what client-level accounting assumes about who took part in a round
NO_AMPLIFICATION = "none (server-chosen sample)"
POISSON_AMPLIFICATION = "poisson self-selection"


def amplification(cfg: Config) -> str:
    """Sampling amplifies client-level DP only if the server cannot tell who took part: the
    sites choose themselves by secret coins (federation.participation = "poisson", which needs
    secure aggregation). A sample the server draws from run.seed and writes to metrics.jsonl
    amplifies nothing against the server."""
    return POISSON_AMPLIFICATION if cfg.federation.participation == "poisson" else NO_AMPLIFICATION


def client_mechanism(cfg: Config) -> Mechanism:
    """Client level: one Gaussian release of the clipped sum per round. Accounted at sampling
    rate `federation.fraction` when sites self-select by secret coins; else at rate 1 for every
    round a site takes part in (see `amplification`)."""
    privacy = cfg.privacy
    q = cfg.federation.fraction if amplification(cfg) == POISSON_AMPLIFICATION else 1.0
    delta = privacy.delta or default_delta(cfg.federation.clients)
    sigma = privacy.noise_multiplier
    if privacy.target_epsilon:
        sigma = noise_for_epsilon(
            privacy.target_epsilon, delta, q, cfg.federation.rounds, privacy.accountant
        )
    return Mechanism(sigma, q, delta, privacy.max_grad_norm, 1)


def spend(cfg: Config, mech: Mechanism, ledger: list[Entry]) -> Spend:
    return Spend(
        level=cfg.privacy.level,
        epsilon=epsilon(ledger, mech.delta, cfg.privacy.accountant),
        delta=mech.delta,
        noise_multiplier=mech.noise_multiplier,
        sample_rate=mech.sample_rate,
        steps=sum(n for _, _, n in ledger),
        max_grad_norm=mech.max_grad_norm,
        accountant=cfg.privacy.accountant,
    )


def federation_budget(cfg: Config) -> tuple[float, str]:
    """A federation's budget per site and its name (0 = none): privacy.max_epsilon, and
    privacy.target_epsilon, whose noise spends exactly that over federation.rounds, so that a
    server asking for more rounds than it declared gets none; the smaller where both are set."""
    named = [
        (cfg.privacy.max_epsilon, "privacy.max_epsilon"),
        (cfg.privacy.target_epsilon, "privacy.target_epsilon"),
    ]
    return min(((b, n) for b, n in named if b), default=(0.0, ""))


def check_budget(
    budget: float, name: str, mech: Mechanism, ledger: list[Entry], site: int, accountant: str
) -> None:
    """Raise BudgetExhausted if one more round of `mech` would take the releases in `ledger`
    past `budget` (0 = none): the federation's over its releases, or a site's own
    (policy.max_epsilon) over every release of its rows."""
    if not budget:
        return
    entry = (mech.noise_multiplier, mech.sample_rate, mech.steps_per_round)
    following = epsilon([*ledger, entry], mech.delta, accountant)
    if following > budget:
        spent = epsilon(ledger, mech.delta, accountant)
        raise BudgetExhausted(site, spent, following, budget, name)
