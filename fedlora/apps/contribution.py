"""A site's part of one round, shared by plain and secure rounds.

Who the site is (its id, state folder, secret), whether it has taken the round already, and
the training that turns the global adapter into the strategy's contribution (the vectors the
server sums): `fedlora.apps.client` sends it in the clear, `fedlora.apps.secure` masks it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora import transport
from fedlora.adapter import (
    adapter_arrays,
    load_adapter_arrays,
    mask_slot_gradients,
    restore_lora,
    truncate_lora,
)
from fedlora.apps import records
from fedlora.apps.site_state import RoundsTaken, SiteStore
from fedlora.config import Config, TrainConfig
from fedlora.deploy import runconfig
from fedlora.errors import FedloraError
from fedlora.privacy import secrets
from fedlora.privacy.client_level import (
    add_gaussian,
    clip_scale,
    noise_shares,
    private_keys,
    site_noise_std,
)
from fedlora.privacy.dpsgd import DPSGD, count_units
from fedlora.privacy.ledger import PrivacyLedger, Release
from fedlora.privacy.policy import (
    Mechanism,
    check_budget,
    client_mechanism,
    describe_private_round,
    federation_budget,
    sample_mechanism,
    spend,
)
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy
from fedlora.results import run_state_dir
from fedlora.runtime import Runtime, get_runtime
from fedlora.strategies import strategy_for
from fedlora.strategies.base import LocalWork, scalar
from fedlora.train import for_round, local_train, make_optimizer


def site_local_steps(train: TrainConfig, site: int, n_sites: int) -> int:
    """Unequal local work: factors spread evenly over [1 - spread, 1 + spread] across sites."""
    if n_sites < 2 or not train.local_steps_spread:
        return train.local_steps
    factor = 1 - train.local_steps_spread + 2 * train.local_steps_spread * site / (n_sites - 1)
    return max(1, round(train.local_steps * factor))


def checked_steps(cfg: Config, policy: SitePolicy, site: int) -> int:
    """The local steps `site` runs in a round, once its policy has accepted them and the batch
    size (SitePolicy.check_work)."""
    steps = site_local_steps(cfg.train, site, cfg.federation.clients)
    policy.check_work(steps, cfg.train.batch_size)
    return steps


def seed_training(secret: secrets.SiteSecret, round_: int, site: int) -> np.random.Generator:
    """Seed one round's local training from the site's secret: torch's generator (LoRA
    dropout) now, and the returned stream (which rows make each batch). Seeds the server knows
    (run.seed, round, site) made a site train a round exactly alike in two federations, so a
    server that ran one with a site and one without read that site's update off the difference
    of the two sums. A site daemon draws a secret per federation; a simulated site's follows
    run.seed, so that a simulation repeats. (Dropout draws from torch, whose CPU generator keeps
    32 bits of a seed: enough to differ between federations, which is all it protects.)"""
    torch.manual_seed(int(secret.rng(secrets.LORA_DROPOUT, round_, site).integers(2**63)))
    return secret.rng(secrets.TRAINING_BATCHES, round_, site)


#: a site's own account of each private round, for its operator: a site daemon prints it
#: (fedlora.deploy.site), a simulation leaves it silent (its header says the same for all sites)
SITE_LOG = logging.getLogger("fedlora.site")
#: node_config key naming a site daemon's state folder (one per federation)
STATE_DIR = "state-dir"
#: node_config key naming a site daemon's privacy ledger (one for all its federations)
LEDGER_FILE = "privacy-ledger"
#: node_config key naming a site daemon's node-authentication private key, with which it signs
#: its secure-aggregation keys (fedlora.secure.identity)
AUTH_KEY = "auth-key"


def site_id(context: Context) -> int:
    """A simulated site is its partition id; a site daemon is the position of its name in the
    server's list of sites (fedlora.deploy.runconfig)."""
    if runconfig.is_site_daemon(context.node_config):
        return runconfig.site_index(context.node_config, context.run_config)
    return int(context.node_config["partition-id"])


def site_runtime(cfg: Config, context: Context) -> Runtime:
    """A site daemon's cfg names its own data file, all of whose rows are its own."""
    own = site_id(context) if runconfig.is_site_daemon(context.node_config) else None
    return get_runtime(cfg, own_site=own)


def site_state_dir(cfg: Config, context: Context) -> Path:
    """A site daemon names its state folder in its node config; simulated sites keep theirs in
    the server's state folder of the run (so `simulate --resume` finds them)."""
    if STATE_DIR in context.node_config:
        return Path(str(context.node_config[STATE_DIR]))
    if not cfg.run.out:
        raise FedloraError("run.out must be set before sites train (simulate resolves it).")
    return run_state_dir(Path(cfg.run.out)) / "sites"


def federation_name(context: Context) -> str:
    """The federation a site daemon's ledger and signatures name (a simulation's: "")."""
    return str(context.run_config.get(runconfig.FEDERATION, ""))


def site_ledger(cfg: Config, context: Context) -> PrivacyLedger:
    """A site daemon's ledger is named in its node config; a simulated site's lies beside its
    state (one federation)."""
    if LEDGER_FILE in context.node_config:
        return PrivacyLedger(Path(str(context.node_config[LEDGER_FILE])))
    return PrivacyLedger(site_state_dir(cfg, context) / f"site-{site_id(context)}.ledger.jsonl")


def take_round(cfg: Config, context: Context, round_: int) -> None:
    """Once per (federation, round): a second request for a round this site has already taken
    part in (a replay, or a new secure-aggregation session) is refused."""
    if not RoundsTaken(site_state_dir(cfg, context), site_id(context)).take(round_):
        raise PolicyRefused(
            f"round {round_} already taken: this site contributes to each round once"
        )


def train_contribution(
    cfg: Config,
    content: RecordDict,
    context: Context,
    policy: SitePolicy,
    *,
    threshold: int | None = None,
    keep: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> tuple[dict[str, np.ndarray], MetricRecord, Callable[[], None]]:
    """Train on this site's rows from the global adapter in a round's training `content`
    (global adapter, broadcast, round config); return the strategy's contribution (the vectors
    the server sums), the site's metrics, and `release`: call it just before the contribution
    leaves the site (it enters the round in the site's privacy ledger).

    `threshold`: the threshold t of the secure-aggregation session the contribution will be
    masked in (None: it travels in the clear). The distributed noise is then split over the
    session's own t (the fewest inputs the server can unmask, whatever it claims), and the
    site's statistics (loss, rows, epsilon) ride inside the contribution instead of in the
    clear metrics. `keep(round, state)` receives the site's new state instead of saving it
    (secure: saved once the input is accepted)."""
    site = site_id(context)
    steps = checked_steps(cfg, policy, site)  # before the model is even loaded
    runtime = site_runtime(cfg, context)
    round_ = int(content[records.ROUND_CONFIG][records.ROUND])
    global_arrays = transport.decode(records.from_record(content[records.GLOBAL_ADAPTER]))
    broadcast = transport.decode(records.from_record(content[records.BROADCAST]))
    folder = site_state_dir(cfg, context)
    store = SiteStore(folder, site)
    client_state = store.before(round_)
    ledger = site_ledger(cfg, context)
    federation = federation_name(context)
    strategy = strategy_for(cfg)
    load_adapter_arrays(runtime.model, global_arrays)
    terms = strategy.training_terms(broadcast, client_state, global_arrays)
    train = for_round(cfg.train, round_, cfg.federation.rounds)
    secret = site_secret(cfg, context, folder)
    batches = seed_training(secret, round_, site)
    rows = runtime.site_rows(site)
    level = cfg.privacy.level
    mechanism, dp_sgd = None, None
    # what delta protects one of: the site's rows or patients, or at client level the sites
    units = count_units(rows) if level == "sample" else cfg.federation.clients
    if level == "sample":
        # q and delta count units; the site's limits make it stricter, never refuse
        limits = {"max_delta": policy.max_delta, "min_noise": policy.min_noise_multiplier}
        mechanism = sample_mechanism(cfg, units, steps, **limits)
        dp_sgd = DPSGD.for_round(
            mechanism.noise_multiplier,
            mechanism.max_grad_norm,
            mechanism.sample_rate,
            secret=secret,
            round_=round_,
            site=site,
            physical_batch_size=cfg.privacy.physical_batch_size,
            max_rows_per_unit=cfg.privacy.max_rows_per_unit,
        )
    elif level == "client":  # one release of the sum per round the site is in
        mechanism = client_mechanism(cfg)
    spent = ledger.entries(federation)
    if mechanism is not None:  # before any training
        policy.check_mechanism(mechanism)
        note_stricter(cfg, policy, mechanism, units, round_)
        check_budgets(cfg, policy, mechanism, spent, ledger.entries(), site)
    if level == "client" and cfg.privacy.client_noise == "distributed" and threshold is None:
        raise PolicyRefused("distributed client-level noise needs secure aggregation")
    rank = cfg.lora.site_rank(site)
    truncated = rank < cfg.lora.r  # a lower-rank site trains the leading slice only
    optimizer, frozen = None, {}
    if truncated:
        frozen = truncate_lora(runtime.model, rank)
        optimizer = make_optimizer(runtime.model, train)
        mask_slot_gradients(optimizer, runtime.model, rank)
    try:
        result = local_train(
            runtime.model,
            rows,
            steps,
            train,
            terms,
            batches,
            runtime.pad_id,
            bf16=runtime.bf16,
            optimizer=optimizer,
            dp=dp_sgd,
        )
        local = adapter_arrays(runtime.model)
    finally:
        restore_lora(runtime.model, frozen)  # the worker's next site needs the shared A intact
    delta = {k: local[k] - global_arrays[k] for k in global_arrays}
    work = LocalWork(
        # client level: uniform weights, or a site's row count would change the sensitivity
        num_examples=1 if level == "client" else len(rows),
        steps=result.steps,
        lr=train.lr,
        momentum=train.momentum,
        rank=rank if truncated else None,
    )
    contribution, new_state = strategy.client_contribution(delta, work, broadcast, client_state)
    values: dict[str, float | int] = {
        records.SITE_ID: site,
        records.LOCAL_STEPS: result.steps,
        records.NUM_EXAMPLES: len(rows),
        records.RANK: rank,
    }
    if level == "none":  # under DP the loss is an unnoised statistic of the rows: it stays here
        values[records.TRAIN_LOSS] = result.mean_loss
    # (under secure aggregation, which poisson needs, nothing of `values` but the site id
    # travels in the clear: secure_stats puts the loss and rows inside the sum)
    if cfg.federation.participation == "poisson":
        contribution, new_state = self_selection(
            cfg, secret, round_, site, contribution, new_state, client_state
        )
    if mechanism is not None:
        if level == "client":
            keys = private_keys(contribution, strategy.private_prefixes)
            scale = clip_scale(contribution, keys, mechanism.max_grad_norm)
            contribution, new_state = strategy.scale_private(
                contribution, new_state, client_state, scale
            )
            values[records.CLIP_SCALE] = scale
            if cfg.privacy.client_noise == "distributed":
                assert threshold is not None  # refused above
                std = site_noise_std(
                    mechanism.noise_multiplier, mechanism.max_grad_norm, noise_shares(threshold)
                )
                rng = secret.rng(secrets.CLIENT_NOISE, round_, site)
                contribution = add_gaussian(contribution, keys, std, rng)
        release = Release(
            federation,
            round_,
            mechanism.noise_multiplier,
            mechanism.sample_rate,
            mechanism.steps_per_round,
            mechanism.delta,
            cfg.privacy.accountant,
        )
        spent = [*spent, release.entry]
        values |= {records.PRIVACY + k: v for k, v in spend_numbers(cfg, mechanism, spent).items()}
        if SITE_LOG.isEnabledFor(logging.INFO):
            every = [*ledger.entries(), release.entry]
            line = describe_private_round(cfg, mechanism, units, spent, every, policy.max_epsilon)
            SITE_LOG.info(f"round {round_} trained: {line}")
    if threshold is not None:  # nothing per site in the clear: the statistics go into the sum
        contribution = contribution | secure_stats(values)
        values = {records.SITE_ID: site}
    (keep or store.save)(round_, new_state)
    if mechanism is None:
        return contribution, MetricRecord(values), lambda: None
    return contribution, MetricRecord(values), lambda: ledger.record(release)


def check_budgets(
    cfg: Config,
    policy: SitePolicy,
    mechanism: Mechanism,
    federation_spent: list,
    site_spent: list,
    site: int,
) -> None:
    """The federation's budget over its own releases; the site's own (policy.max_epsilon) over
    every release of its rows, whatever the server calls the federation."""
    accountant = cfg.privacy.accountant
    check_budget(*federation_budget(cfg), mechanism, federation_spent, site, accountant)
    own = "policy.max_epsilon (this site's own, over all its federations)"
    check_budget(policy.max_epsilon, own, mechanism, site_spent, site, accountant)


def note_stricter(
    cfg: Config, policy: SitePolicy, mechanism: Mechanism, units: int, round_: int
) -> None:
    """Tell the site's operator where its own limits made it stricter than the federation."""
    if cfg.privacy.delta and mechanism.delta != cfg.privacy.delta:
        SITE_LOG.info(
            f"round {round_}: this site uses delta {mechanism.delta:.3g}, not the federation's "
            f"{cfg.privacy.delta:g} (1/n = 1/{units} and policy.max_delta bound it)"
        )
    if cfg.privacy.level == "sample" and mechanism.noise_multiplier == policy.min_noise_multiplier:
        SITE_LOG.info(
            f"round {round_}: this site applies its policy.min_noise_multiplier "
            f"{policy.min_noise_multiplier:g}, more noise than the federation asks"
        )


def self_selection(
    cfg: Config,
    secret: secrets.SiteSecret,
    round_: int,
    site: int,
    contribution: dict[str, np.ndarray],
    new_state: dict[str, np.ndarray],
    client_state: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """federation.participation = "poisson": the site takes part with probability
    federation.fraction by its own secret coin. It has trained either way (its reply time does
    not tell) and sends either way: when the coin says no, zeros in the layout of a real
    contribution (noise is added to them as to any), keeping its old state, so that inside the
    secure sum it changes nothing. records.PARTICIPANT (1 or 0) lets the server count the sites that
    took part from the sum alone."""
    takes_part = secrets.coin(secret, round_, site, cfg.federation.fraction)
    if not takes_part:
        contribution = {k: np.zeros_like(v) for k, v in contribution.items()}
        new_state = client_state
    return contribution | {records.PARTICIPANT: scalar(float(takes_part))}, new_state


def secure_stats(values: dict[str, float | int]) -> dict[str, np.ndarray]:
    """A site's statistics as shape-(1,) vectors of its contribution: under secure aggregation
    the server learns only their sums (the round's loss weighted by rows and the rows, when
    the site reports a loss at all; the epsilons), never one site's."""
    stats = {}
    if records.TRAIN_LOSS in values:
        rows = float(values[records.NUM_EXAMPLES])
        stats[records.STATS_LOSS] = np.array([float(values[records.TRAIN_LOSS]) * rows])
        stats[records.STATS_ROWS] = np.array([rows])
    if records.PRIVACY + "epsilon" in values:  # an infinite epsilon (no noise) is counted apart
        epsilon = float(values[records.PRIVACY + "epsilon"])
        finite = math.isfinite(epsilon)
        stats[records.STATS_EPSILON] = np.array([epsilon if finite else 0.0])
        stats[records.STATS_UNBOUNDED] = np.array([0.0 if finite else 1.0])
    return stats


def spend_numbers(cfg: Config, mech: Mechanism, ledger: list) -> dict[str, float | int]:
    """The numeric fields of this site's privacy spend (level and accountant are in the config)."""
    return {
        k: v
        for k, v in spend(cfg, mech, ledger).as_dict().items()
        if k not in ("level", "accountant")
    }


def site_secret(cfg: Config, context: Context, folder: Path) -> secrets.SiteSecret:
    """The secret behind every random value that protects this site (fedlora.privacy.secrets).
    A site daemon draws it from the OS CSPRNG once and keeps it in its state folder (noise the
    server could regenerate would protect nothing); a simulated site derives it from the run
    seed, so that simulations repeat."""
    if STATE_DIR not in context.node_config:
        return secrets.simulated_secret(cfg.run.seed, site_id(context))
    return secrets.site_secret(folder)


def refusal_reply(msg: Message, site: int, round_: int, reason: str) -> Message:
    """What a site answers a request its policy refuses: who, which round, why."""
    record = ConfigRecord({records.SITE_ID: site, records.ROUND: round_, records.REASON: reason})
    return Message(RecordDict({records.REFUSAL: record}), reply_to=msg)
