"""A site with a roster trains only from a global adapter it can derive itself.

Secure aggregation keeps one site's update from the server, but the server also makes the
adapter every site trains from next. A server that sends a crafted one instead of the aggregate
(LoRA factors built so that the next round's updates carry the sites' text: malicious-model
attacks such as Fowl et al. 2023, "Decepticons", which survive the aggregation of many users)
reads from the sum what it hides. So a site with a roster of its peers (site.toml `[peers]`)
checks the training content of every round before it trains:

- before any round has made an aggregate (round 1, or rounds that were interrupted and are not
  repeated): the adapter must be the one made from `run.seed` (fedlora.adapter.add_lora: every
  party builds the same), which the site builds too, and the broadcast state empty;
- after that: the content comes with the evidence of the last round that made one (`Evidence`,
  the round before unless a round was interrupted): that round's training content, the
  survivors' masked inputs, and the self-mask seeds and mask keys the unmasking rebuilt. Each
  input is signed by its site with the content it trained from, a commitment to its seed and
  its mask key (fedlora.secure.identity.input_statement), so the site recomputes the sum
  exactly as the server did (fedlora.secure.secagg.unmasked_sum), replays the server step (the
  strategy's server half and the server optimiser: aggregate_sums) and refuses the round unless
  the adapter and broadcast state it was sent are what that gives.

Every survivor of that round signed that it has a roster, so it checked the content it trained
from the same way: by induction from round 1, every adapter a site with a roster trains
from is the aggregate of its peers' honest updates. A server that lies about a dropped site's
mask key gets a pseudo-random sum that it cannot steer to any adapter of its choosing.

What the evidence shows a site: the sum the server learnt, no more (a masked input stays masked
by its pairwise masks with the other survivors, whose keys the site does not hold). That sum
holds the statistics the sites put inside it (rows, and loss x rows where no DP hides it), so a
site learns their totals over the round's survivors, as the server does.

The server optimiser's state (FedAvgM's momentum, FedAdam's moments) travels with the content
of such a federation (records.SERVER_STATE), is in the digest its sites sign, and is checked the
same way. Only a server step that is a function of the sum and that state can be replayed; a
site with a roster refuses central noise and rounded adapters before it trains
(SitePolicy.check_replayable). Written here: Flower's SecAgg+ has
no such step, and research protocols that verify an aggregate (VerifyNet, VeriFL) do it with
homomorphic hashes no maintained library offers; replaying costs a site one masked input per
survivor instead.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedlora.aggregation import aggregate_sums
from fedlora.apps import records
from fedlora.config import Config
from fedlora.errors import FedloraError
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy
from fedlora.secure.identity import Proof, input_statement
from fedlora.secure.secagg import (
    Layout,
    Revealed,
    input_digest,
    ring_add,
    seed_commitment,
    unmasked_sum,
)
from fedlora.strategies import strategy_for
from fedlora.strategies.base import Arrays, read_scalar, strip_prefix
from fedlora.strategies.server_opt import server_optimizer_for

#: how close a received adapter must be to the replayed one: the replay runs the server's own
#: float64 code on the same sums and state, so only SCAFFOLD's control variate, which the server
#: keeps in float64 and sends in float32, differs at all (in its last bits)
RTOL = 1e-6

_CONTENT, _MASKED = "content/", "masked/"


@dataclass(frozen=True)
class Evidence:
    """One round's secure sum as a site recomputes it (module doc)."""

    round_: int
    content: Arrays  # the round's training content (records.content_arrays)
    survivors: list[int]
    dropped: list[int]
    mask_public_keys: dict[int, bytes]  # survivor -> its mask public key s_pk
    layout: Layout
    masked: dict[int, np.ndarray]  # survivor -> its masked input
    proofs: dict[int, Proof]  # survivor -> its signature on its input (input_statement)
    revealed: Revealed

    @property
    def signed(self) -> bool:
        return any(proof.name for proof in self.proofs.values())

    def fields(self) -> dict[str, object]:
        """Plain values (bytes as hex): a ConfigRecord's, and a checkpoint's JSON."""
        s = self.survivors
        return {
            records.ROUND: self.round_,
            records.SURVIVORS: s,
            records.DROPPED: self.dropped,
            records.S_PKS: [self.mask_public_keys[j].hex() for j in s],
            records.SIGNER_NAMES: [self.proofs[j].name for j in s],
            records.SIGNER_KEYS: [self.proofs[j].public_key.hex() for j in s],
            records.INPUT_SIGNATURES: [self.proofs[j].signature.hex() for j in s],
            records.SEEDS: [self.revealed.seeds[j].hex() for j in s],
            records.MASK_KEYS: [self.revealed.mask_keys[d].hex() for d in self.dropped],
        } | {f"layout.{k}": v for k, v in self.layout.to_config().items()}

    def arrays(self) -> Arrays:
        content = {_CONTENT + k: v for k, v in self.content.items()}
        return content | {f"{_MASKED}{j}": self.masked[j] for j in self.survivors}

    @classmethod
    def parse(cls, fields: dict, arrays: Arrays) -> Evidence:
        """From `fields()` and `arrays()`; KeyError, TypeError or ValueError when malformed."""
        survivors = [int(j) for j in fields[records.SURVIVORS]]
        dropped = [int(d) for d in fields[records.DROPPED]]

        def aligned(key: str, sites: list[int]) -> dict[int, bytes]:
            return dict(zip(sites, map(bytes.fromhex, fields[key]), strict=True))

        keys = aligned(records.SIGNER_KEYS, survivors)
        sigs = aligned(records.INPUT_SIGNATURES, survivors)
        names = dict(zip(survivors, fields[records.SIGNER_NAMES], strict=True))
        layout = {k[len("layout.") :]: v for k, v in fields.items() if k.startswith("layout.")}
        return cls(
            round_=int(fields[records.ROUND]),
            content=_exact(_CONTENT, arrays),
            survivors=survivors,
            dropped=dropped,
            mask_public_keys=aligned(records.S_PKS, survivors),
            layout=Layout.from_config(layout),
            masked={j: np.asarray(arrays[f"{_MASKED}{j}"], np.uint64) for j in survivors},
            proofs={j: Proof(str(names[j]), keys[j], sigs[j]) for j in survivors},
            revealed=Revealed(
                aligned(records.SEEDS, survivors), aligned(records.MASK_KEYS, dropped)
            ),
        )

    def attach(self, content: RecordDict) -> None:
        """Put the evidence into a round's training content (records.EVIDENCE*)."""
        content[records.EVIDENCE] = ConfigRecord(self.fields())
        content[records.EVIDENCE_ARRAYS] = records.to_record(self.arrays())

    @classmethod
    def of(cls, content: RecordDict) -> Evidence | None:
        """The evidence a round's training content carries (None: none); a malformed one is
        refused."""
        if records.EVIDENCE not in content:
            return None
        try:
            return cls.parse(
                dict(content[records.EVIDENCE]),
                records.from_record(content[records.EVIDENCE_ARRAYS]),
            )
        except (FedloraError, LookupError, TypeError, ValueError, ArithmeticError) as exc:
            raise PolicyRefused(
                f"the evidence of an earlier round's sum is malformed ({exc!r})"
            ) from None

    def total(self) -> Arrays:
        """The per-key sums of the survivors' inputs, recomputed from their masked inputs."""
        masked_sum = np.zeros(self.layout.words, dtype=np.uint64)
        for j in self.survivors:
            if self.masked[j].shape != (self.layout.words,):
                raise ValueError(f"site {j}'s masked input does not fit its layout")
            ring_add(self.layout, masked_sum, self.masked[j])
        keys = {j: self.mask_public_keys[j] for j in self.survivors}
        return self.layout.unpack(unmasked_sum(self.layout, masked_sum, keys, self.revealed))

    def statement(self, federation: str, site: int, name: str) -> bytes:
        """What survivor `site` signed, if this evidence is true."""
        return input_statement(
            federation,
            self.round_,
            site,
            name,
            records.arrays_digest(self.content),
            input_digest(self.layout, self.masked[site]),
            seed_commitment(self.revealed.seeds[site]),
            self.mask_public_keys[site],
            True,
        )


def _exact(prefix: str, arrays: Arrays) -> Arrays:
    """strip_prefix casts to float64; the content's digest needs the arrays as sent."""
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def took_part(cfg: Config, sums: Arrays, contributors: Sized) -> tuple[Arrays, int]:
    """How many sites took part in a round's sum, and the sums to aggregate: every contributor,
    or, where sites select themselves (federation.participation = "poisson"), the sum of the
    participant coordinate (the masked zeros of the others add 0), which is then left out. One
    decision for the server (Federation.aggregate) and a site replaying it."""
    if cfg.federation.participation != "poisson":
        return sums, len(contributors)
    rest = {k: v for k, v in sums.items() if k != records.PARTICIPANT}
    return rest, round(read_scalar(sums, records.PARTICIPANT))


def replay(cfg: Config, evidence: Evidence) -> tuple[Arrays, Arrays, Arrays]:
    """The server step on the recomputed sum: (global adapter, broadcast state, server
    optimiser state) of the next round, as the server makes them (fedlora.apps.server.
    Federation.aggregate, where central noise and the SVD mode, which cannot be replayed, are
    refused to a site with a roster)."""
    sums, participants = took_part(
        cfg, records.split_stats(evidence.total())[0], evidence.survivors
    )
    strategy = strategy_for(cfg)
    strategy.load_state_dict(strip_prefix("broadcast/", evidence.content))
    server_opt = server_optimizer_for(cfg.strategy)
    server_opt.load_state_dict(strip_prefix("server/", evidence.content))
    adapter = _exact("global/", evidence.content)
    if participants:
        adapter = aggregate_sums(strategy, server_opt, adapter, sums, participants)
    return adapter, strategy.broadcast(), server_opt.state_dict()


def check_training_content(
    cfg: Config,
    content: RecordDict,
    initial: Arrays,
    policy: SitePolicy,
    federation: str,
    own: tuple[str, str],
) -> None:
    """Refuse (PolicyRefused) a round whose adapter, broadcast state or server optimiser state
    is not what this site derives itself: the replay of the evidence of an earlier round it
    came with (the last one that made an aggregate: an interrupted round is not repeated),
    else `initial` (the adapter from run.seed), every input signed by a peer of the roster or
    `own` (this site's name and key fingerprint: its own input of that round is checked too)."""
    round_ = int(content[records.ROUND_CONFIG][records.ROUND])
    sent = (
        records.from_record(content[records.GLOBAL_ADAPTER]),
        records.from_record(content[records.BROADCAST]),
        records.server_state(content),
    )
    evidence = Evidence.of(content)
    if evidence is None:  # no round has made an aggregate yet (round 1, or all were interrupted)
        expected: tuple[Arrays, Arrays, Arrays] = (initial, {}, {})
        source = (
            f"the adapter every site builds from run.seed = {cfg.run.seed}, and it came "
            "without the evidence of a secure sum"
        )
    else:
        if evidence.round_ >= round_:
            raise PolicyRefused(
                f"round {round_}'s adapter came with the evidence of round {evidence.round_}"
            )
        if not evidence.survivors:  # nothing would vouch for that round's content
            raise PolicyRefused(
                f"the evidence of round {evidence.round_} holds no input, so no peer vouches "
                "for the content it starts from"
            )
        policy.check_inputs(
            federation, evidence.survivors, evidence.proofs, evidence.statement, own
        )
        try:
            expected = replay(cfg, evidence)
        except (LookupError, ValueError, ArithmeticError) as exc:  # a lie about a drop, say
            raise PolicyRefused(
                f"the evidence of round {evidence.round_} gives no adapter ({exc})"
            ) from None
        source = f"the secure sum of round {evidence.round_} that its sites signed"
    whats = ("adapter", "broadcast state", "server optimiser state")
    for what, got, want in zip(whats, sent, expected, strict=True):
        if not _same(got, want):
            raise PolicyRefused(
                f"round {round_}'s {what} is not {source}: the server sent one of its own "
                "making, and this site trains only from the federation's aggregate"
            )


def _same(got: Arrays, want: Arrays) -> bool:
    if set(got) != set(want):
        return False
    for k, w in want.items():
        g, w = np.asarray(got[k], np.float64), np.asarray(w, np.float64)
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        if g.shape != w.shape or not np.allclose(g, w, rtol=RTOL, atol=RTOL * scale):
            return False
    return True
