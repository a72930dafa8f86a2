"""A site's own policy: what it demands of any request before it trains or shares a key.

The server's run config says what the federation wants; the policy says what this site accepts.
Every check looks at something the site sees or does itself: the run config it will train with
(strategy, privacy level, the noise and clip it will apply), whether the request is a plain
TRAIN or a secure-aggregation session, and in a session who signed the keys it received (its
[peers] roster), the cohort and threshold it derives from them, and who confirmed the survivor
set it is asked to unmask. Never a number the server only asserts. A request that breaks the
policy raises `PolicyRefused` before any training; the site answers with the reason (see
fedlora.apps.contribution.refusal_reply) and writes it to its audit log.

A site daemon reads its policy from site.toml `[policy]`; a simulation has no site.toml and
plays every site with `SitePolicy.mirroring(cfg)`: the run config's own choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, get_args

from fedlora.config import AggregationMode, Config, PrivacyLevel
from fedlora.errors import FedloraError
from fedlora.privacy.policy import Mechanism
from fedlora.secure.identity import (
    Proof,
    content_statement,
    keys_statement,
    survivors_statement,
)
from fedlora.strategies import STRATEGIES

LEVELS: tuple[str, ...] = get_args(PrivacyLevel)
AGGREGATIONS: tuple[str, ...] = get_args(AggregationMode)
DEFAULT_MIN_COHORT = 3
OTHER_CONTENT = (
    "it trained from other training content than this site: a server that sends sites "
    "different adapters can read one site's update from the sum"
)
OTHER_TERMS = (
    "sent with other federation terms (config, threshold, cohort) or training content than this "
    "site's keys: a server that sends sites different configs or adapters can read one site's "
    "update from the sum"
)

UNCONFIRMED = (
    "this site reveals the mask keys of sites that dropped only for a survivor set that t sites "
    "of the session confirmed: a server that tells sites different drop lists can unmask one site"
)


class PolicyRefused(Exception):
    """A request this site's policy does not accept; `reason` is said back to the server."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class SitePolicy:
    #: refuse plain TRAIN requests: the server may only ever see this site's update in a sum
    require_secure_aggregation: bool = False
    #: fewest sites a secure-aggregation session may hold (counted from the keys received) and
    #: the fewest inputs this site helps unmask
    min_cohort: int = DEFAULT_MIN_COHORT
    #: smallest threshold t accepted (0: any majority, 2t > cohort, which the protocol demands)
    min_threshold: int = 0
    #: privacy levels this site trains under
    privacy_levels: tuple[str, ...] = LEVELS
    #: smallest noise multiplier: DP-SGD applies at least this (fedlora.privacy.policy.
    #: sample_mechanism); client-level DP, whose noise all sites share, is refused below it,
    #: and so is noise only the server would add (central client-level noise)
    min_noise_multiplier: float = 0.0
    #: largest clipping norm accepted (0 = any)
    max_clip: float = 0.0
    #: largest epsilon this site spends, over every federation and round it takes part in
    #: (its privacy ledger: fedlora.privacy.ledger; 0 = only the federation's budget)
    max_epsilon: float = 0.0
    #: largest delta: DP-SGD uses at most this (fedlora.privacy.policy.sample_mechanism, which
    #: never uses 1/n or more); client-level DP, whose delta all sites share, is refused above
    #: it (0 = any)
    max_delta: float = 0.0
    #: strategies and lora.aggregation modes this site trains for
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    aggregations: tuple[str, ...] = AGGREGATIONS
    #: the most local steps a round (or a personalisation) may ask of this site, and the most
    #: rows in one of its batches (0 = any): the server's settings decide how long and how
    #: much memory this site's machine gives a round
    max_local_steps: int = 0
    max_batch_size: int = 0
    #: the base models (model.name) this site loads, () = any: the name is the server's, and
    #: it may be a hub id to download or a folder on this site's machine
    models: tuple[str, ...] = ()
    #: the sites this site shares its secrets with, as (name, fingerprint of the site's
    #: node-authentication key), from site.toml [peers]; when given, every other key of a
    #: secure-aggregation session must be signed by one of them (check_peers)
    peers: tuple[tuple[str, str], ...] = ()
    #: refuse sessions set up during the round before (the server's secure.pipeline): their
    #: keys exist before the round's training content, so only the unmasking stage can show
    #: that every peer trained from the same content, after this site's input has left; in a
    #: session of its own round the keys stage shows it (needs [peers])
    check_content_before_masking: bool = False

    @classmethod
    def mirroring(cls, cfg: Config) -> SitePolicy:
        """A simulated site's policy: whatever the run config chose (so simulations run as
        configured), with the run's own minimum cohort."""
        return cls(require_secure_aggregation=cfg.secure.enabled, min_cohort=cfg.secure.min_cohort)

    def check_request(self, cfg: Config, *, secure: bool) -> None:
        """Before anything else: the kind of request and the settings the site would train with."""
        if self.require_secure_aggregation and not secure:
            raise PolicyRefused("secure aggregation required")
        self.check_model(cfg)
        level = cfg.privacy.level
        if level not in self.privacy_levels:
            raise PolicyRefused(
                f"privacy level {level!r} not accepted (policy: {', '.join(self.privacy_levels)})"
            )
        if self.max_epsilon and level == "none":
            raise PolicyRefused(
                f"differential privacy required (max_epsilon = {self.max_epsilon:g})"
            )
        if cfg.strategy.name not in self.strategies:
            raise PolicyRefused(
                f"strategy {cfg.strategy.name!r} not accepted (policy: "
                f"{', '.join(self.strategies)})"
            )
        if cfg.lora.aggregation not in self.aggregations:
            raise PolicyRefused(
                f"lora.aggregation {cfg.lora.aggregation!r} not accepted (policy: "
                f"{', '.join(self.aggregations)})"
            )
        if secure:
            self.check_replayable(cfg)
        if (
            self.min_noise_multiplier
            and level == "client"
            and cfg.privacy.client_noise != "distributed"
        ):
            raise PolicyRefused(
                "central client-level noise is added by the server, which this site cannot "
                f"check (min_noise_multiplier = {self.min_noise_multiplier:g} needs "
                'client_noise = "distributed")'
            )

    def check_replayable(self, cfg: Config) -> None:
        """With a roster: the server step must be one this site can replay from the secure sum
        (fedlora.apps.evidence), so that it trains only from the federation's aggregate."""
        if not self.peers:
            return
        why = "this site ([peers]) checks every adapter it trains from against the secure sum"
        if cfg.privacy.level == "client" and cfg.privacy.client_noise == "central":
            raise PolicyRefused(
                f"central client-level noise is the server's own draw, and {why}: ask for "
                'privacy.client_noise = "distributed"'
            )
        if cfg.transport.dtype != "float32":
            raise PolicyRefused(
                f"an adapter sent in {cfg.transport.dtype} is a rounding of the one the server "
                f'keeps, and {why}: ask for transport.dtype = "float32"'
            )

    def check_model(self, cfg: Config) -> None:
        """Before the base model is loaded."""
        if self.models and cfg.model.name not in self.models:
            raise PolicyRefused(
                f"model.name {cfg.model.name!r} not accepted (policy: {', '.join(self.models)})"
            )

    def check_work(self, steps: int, batch_size: int) -> None:
        """Before training: the steps this site would run and the rows in each batch."""
        if self.max_local_steps and steps > self.max_local_steps:
            raise PolicyRefused(
                f"{steps} local steps, this site's policy.max_local_steps is {self.max_local_steps}"
            )
        if self.max_batch_size and batch_size > self.max_batch_size:
            raise PolicyRefused(
                f"batches of {batch_size} rows, this site's policy.max_batch_size is "
                f"{self.max_batch_size}"
            )

    def check_personalisation(self, cfg: Config) -> None:
        """Personalisation trains without privacy and reports scores of the site's held-out
        rows in the clear, outside any accounting: a server may ask for it whatever its config
        says, so the site decides."""
        self.check_model(cfg)
        if self.require_secure_aggregation:
            raise PolicyRefused(
                "personalisation reports this site's scores in the clear; secure aggregation "
                "required"
            )
        if cfg.privacy.level != "none" or self.max_epsilon:
            raise PolicyRefused(
                "personalisation reports scores of this site's rows outside differential "
                "privacy, which the federation or this site's policy requires"
            )

    def check_mechanism(self, mech: Mechanism) -> None:
        """The noise, clip and delta this site is about to apply. Under DP-SGD the noise and
        delta already meet the policy (sample_mechanism applies it); at client level they come
        from the federation's config alone, so refusing tells the server nothing of the site."""
        if self.max_delta and mech.delta > self.max_delta:
            raise PolicyRefused(
                f"delta {mech.delta:.3g} above this site's policy.max_delta = {self.max_delta:g}"
            )
        if mech.noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefused(
                f"noise multiplier {mech.noise_multiplier:.3g} below this site's minimum "
                f"{self.min_noise_multiplier:g}"
            )
        if self.max_clip and mech.max_grad_norm > self.max_clip:
            raise PolicyRefused(
                f"clipping norm {mech.max_grad_norm:g} above this site's maximum {self.max_clip:g}"
            )

    def check_session(self, cohort: int, threshold: int) -> None:
        """A secure-aggregation session, as the site sees it: `cohort` = sites whose keys it
        received (itself included), `threshold` = the t its own secrets are shared with."""
        if cohort < self.min_cohort:
            raise PolicyRefused(
                f"secure-aggregation cohort of {cohort} sites, this site's minimum is "
                f"{self.min_cohort}"
            )
        if threshold < self.min_threshold:
            raise PolicyRefused(
                f"secure-aggregation threshold {threshold}, this site's minimum is "
                f"{self.min_threshold}"
            )

    def check_peers(
        self,
        federation: str,
        session: int,
        own: int,
        received: Mapping[int, tuple[bytes, bytes]],
        proofs: Mapping[int, Proof],
        terms: bytes = b"",
        rostered: Iterable[int] = (),
    ) -> None:
        """With a roster: every key of the session but this site's (`own`) is signed, for this
        federation and session, by a different peer of the roster (fedlora.secure.identity),
        so the cohort this site counts is sites, not keys the server made, and each of them
        has a roster too (`rostered`, signed with its keys). Without one, any key counts (the
        server's word on who is behind it). `terms`: the digest of what this site's keys came
        with (the federation's run config, the session's threshold, value bound and cohort, and
        the round's training content in a session of its own round: fedlora.apps.records.
        session_terms), which every peer's keys must have come with too: checked before
        anything this site trained leaves.

        Why every peer needs a roster: a peer without one reveals its unmasking shares whatever
        the others trained from and whatever survivors the server names, and its shares of
        this site's secrets are what unmasks this site's input alone."""
        rostered = set(rostered)

        def statement(site: int, name: str) -> bytes:
            keys = received[site]
            return keys_statement(federation, session, site, name, *keys, terms, site in rostered)

        mismatch = f"forged, from another session, or {OTHER_TERMS}"
        others = set(received) - {own}
        self._check_signed(others, proofs, statement, "keys", mismatch)
        if self.peers and others - rostered:
            site = min(others - rostered)
            raise PolicyRefused(
                f"site {site} ({proofs[site].name!r}) has no [peers] of its own, so it would help "
                "unmask whatever sum the server names: this site takes part only with peers "
                "that check what they unmask"
            )

    def check_same_content(
        self,
        federation: str,
        session: int,
        own: int,
        digest: bytes,
        survivors: Iterable[int],
        proofs: Mapping[int, Proof],
    ) -> None:
        """With a roster, before revealing unmasking shares: every other input in the sum was
        trained, by a peer of the roster, from the training content this site trained from
        (`digest`; fedlora.secure.identity.content_statement)."""

        def statement(site: int, name: str) -> bytes:
            return content_statement(federation, session, site, name, digest)

        self._check_signed(
            set(survivors) - {own},
            proofs,
            statement,
            "training content",
            OTHER_CONTENT,
        )

    def check_inputs(
        self,
        federation: str,
        survivors: Iterable[int],
        proofs: Mapping[int, Proof],
        statement: Callable[[str, int, str], bytes],
        own: tuple[str, str],
    ) -> None:
        """With a roster, before training from an adapter made of a secure sum: every input in
        that sum was signed, as `statement(federation, site, name)` says it should be (its
        content, masked input, seed commitment, mask key, and that it has a roster), by a
        different peer of the roster or by this site itself (`own`: its name and fingerprint,
        for its own input of that round; fedlora.apps.evidence)."""

        def signed(site: int, name: str) -> bytes:
            return statement(federation, site, name)

        mismatch = "forged, altered, or from a site without [peers], which checks nothing"
        self._check_signed(survivors, proofs, signed, "masked input", mismatch, dict([own]))

    def _check_signed(
        self,
        sites: Iterable[int],
        proofs: Mapping[int, Proof],
        statement: Callable[[int, str], bytes],
        what: str,
        mismatch: str,
        also: Mapping[str, str] | None = None,
    ) -> None:
        """Each site's `what` signed, by a different peer of the roster (or of `also`: name ->
        fingerprint), as `statement(site, the peer's name)`; `mismatch` says what a signature
        that does not hold means."""
        if not self.peers:
            return
        roster, seen = dict(self.peers) | dict(also or {}), set()
        for site in sorted(sites):
            proof = proofs.get(site)
            if proof is None:
                raise PolicyRefused(
                    f"site {site} sent its {what} unsigned; this site shares secrets only with "
                    "the peers its [peers] lists"
                )
            if proof.name not in roster:
                raise PolicyRefused(
                    f"site {site} signs as {proof.name!r}, which this site's [peers] does not list"
                )
            if proof.name in seen:
                raise PolicyRefused(f"two sites of the session sign as {proof.name!r}")
            if not proof.holds(roster[proof.name], statement(site, proof.name)):
                raise PolicyRefused(
                    f"the signature on site {site}'s {what} is not that of the key [peers] lists "
                    f"for {proof.name!r} in this session ({mismatch})"
                )
            seen.add(proof.name)

    def check_confirmed(
        self,
        federation: str,
        session: int,
        own: int,
        threshold: int,
        confirmed: list[int],
        dropped: list[int],
        proofs: Mapping[int, Proof],
    ) -> None:
        """With a roster, before revealing unmasking shares: when the server names sites that
        dropped (whose mask keys this site would reveal) or this site confirmed survivors, it
        confirmed that set (`confirmed`, the confirm stage) and t sites of the session did in
        all, each other one a different peer of the roster signing that same set
        (fedlora.secure.secagg: each site confirms one set, 2t exceeds the session's sites, so
        no other set can be confirmed, and self-mask shares alone unmask no part of a sum)."""
        if not self.peers or not (confirmed or dropped):
            return
        if not confirmed:
            raise PolicyRefused(
                f"the server names sites {sorted(dropped)} that dropped but asked for no "
                f"confirmation of the survivors; {UNCONFIRMED}"
            )
        signers = set(proofs) - {own}
        if not signers <= set(confirmed):
            raise PolicyRefused(
                f"confirmations from sites {sorted(signers - set(confirmed))}, which are not "
                f"among the survivors {confirmed}"
            )
        if len(signers) + 1 < threshold:
            raise PolicyRefused(
                f"{len(signers) + 1} sites confirmed the survivors, threshold is {threshold}; "
                + UNCONFIRMED
            )

        def statement(site: int, name: str) -> bytes:
            return survivors_statement(federation, session, site, name, confirmed)

        mismatch = "forged, from another session, or for other survivors than this site's"
        self._check_signed(signers, proofs, statement, "confirmation of the survivors", mismatch)

    def check_sum(self, survivors: int) -> None:
        """Before revealing unmasking shares: the sum must hold at least min_cohort inputs."""
        if survivors < self.min_cohort:
            raise PolicyRefused(
                f"only {survivors} inputs in the secure sum, this site's minimum cohort is "
                f"{self.min_cohort}"
            )


POLICY_KEYS = {f.name for f in fields(SitePolicy)} - {"peers"}  # [peers] is its own table


def load_policy(table: dict[str, Any], where: str) -> SitePolicy:
    """`[policy]` of a site.toml; every error names the key and what is accepted."""
    unknown = set(table) - POLICY_KEYS
    if unknown:
        raise FedloraError(
            f"Unknown key policy.{sorted(unknown)[0]} in {where}; known: "
            f"{', '.join(sorted(POLICY_KEYS))}."
        )
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(SitePolicy, key)
        name = f"policy.{key} in {where}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise FedloraError(f"{name} must be true or false (got {value!r}).")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FedloraError(f"{name} must be a whole number >= 0 (got {value!r}).")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise FedloraError(f"{name} must be a number >= 0 (got {value!r}).")
            value = float(value)
        elif key == "models":
            if not isinstance(value, list) or not value:
                raise FedloraError(f"{name} must be a non-empty list of model names.")
            if any(not isinstance(v, str) or not v.strip() for v in value):
                raise FedloraError(f"{name} must hold model names (got {value!r}).")
            value = tuple(value)
        else:
            choices = {"privacy_levels": LEVELS, "strategies": tuple(STRATEGIES)}.get(
                key, AGGREGATIONS
            )
            if not isinstance(value, list) or not value or any(v not in choices for v in value):
                raise FedloraError(
                    f"{name} must be a non-empty list of: {', '.join(choices)} (got {value!r})."
                )
            value = tuple(value)
        values[key] = value
    if values.get("min_cohort", DEFAULT_MIN_COHORT) < 2:
        raise FedloraError(
            f"policy.min_cohort in {where} must be at least 2: a secure sum of one site is that "
            "site's update."
        )
    return SitePolicy(**values)
