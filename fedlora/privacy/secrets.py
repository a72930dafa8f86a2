"""A site's secret: the one source of every random value that protects the site.

DP-SGD's noise and Poisson batches, the client-level noise a site adds before secure
aggregation and its participation coin are only private if the server cannot regenerate them;
and the batches and dropout of plain local training must differ between two federations, or a
server that runs the same round in two, with a site and without, subtracts the sums.
So each comes from a per-use stream keyed by a secret of at least 128 bits that the site drew
from the operating system's CSPRNG (`os.urandom`) and keeps in its state folder; nothing the
server holds (run seed, round, site id, config) says anything about it. A simulation plays every
site on one machine and derives the secrets from `run.seed` so that a run repeats; it says so
(`SIMULATED`), a site daemon never does.

Why the streams are sound:
- One key per use: HMAC-SHA256(secret, [purpose, round, site]) is a pseudo-random function of
  the secret, so the keys of different uses (DP-SGD noise vs batches, round 3 vs round 4) are
  independent to anyone without the secret, and learning one use's key reveals no other.
- No small seed anywhere: the 256-bit key is the entropy of a numpy SeedSequence with a 256-bit
  pool, which fills PCG64's 128-bit state and 128-bit increment. torch generators are not used
  for these values: torch.Generator takes a 64-bit seed and its CPU generator keeps only the
  low 32 bits of it (`manual_seed(s)` and `manual_seed(s + 2**32)` give the same numbers), which
  a server can search in minutes.
- PCG64 is not a cryptographic generator, but recovering its state needs hundreds of its exact
  outputs; the server only ever sees these values added to data it does not know (noise on a
  gradient or an update, inside a secure sum) and each stream is used for one round, so it never
  holds the outputs such an attack needs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedlora.errors import FedloraError

if TYPE_CHECKING:
    import torch

#: bytes of a secret a site draws (256 bits); a secret must have at least MIN_BYTES
SECRET_BYTES = 32
MIN_BYTES = 16
#: the file in a site's state folder that holds its secret
FILE = "site.secret"
#: where the secrets came from, as a run's summary and a site's audit log say it
SIMULATED = "derived from run.seed (simulation)"
SITE_CSPRNG = "site CSPRNG"

# what a stream is for (the domain-separation label of its key)
DPSGD_NOISE = "dpsgd-noise"
DPSGD_BATCHES = "dpsgd-batches"
CLIENT_NOISE = "client-noise"
PARTICIPATION = "participation"
TRAINING_BATCHES = "training-batches"  # which rows make each batch of plain local training
LORA_DROPOUT = "lora-dropout"


@dataclass(frozen=True)
class SiteSecret:
    """A site's secret key and where it came from (`SITE_CSPRNG` or `SIMULATED`)."""

    key: bytes = field(repr=False)
    source: str

    def __post_init__(self) -> None:
        if len(self.key) < MIN_BYTES:
            raise ValueError(f"a site secret needs at least {MIN_BYTES} bytes, got {len(self.key)}")

    def use_key(self, purpose: str, round_: int, site: int) -> bytes:
        """The 256-bit key of one use: HMAC-SHA256 of (purpose, round, site) under the secret."""
        label = json.dumps(["fedlora", purpose, int(round_), int(site)]).encode()
        return hmac.new(self.key, label, hashlib.sha256).digest()

    def rng(self, purpose: str, round_: int, site: int) -> np.random.Generator:
        """The stream of one use: PCG64 seeded with the whole 256-bit use key."""
        entropy = int.from_bytes(self.use_key(purpose, round_, site), "little")
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, pool_size=8)))


def coin(secret: SiteSecret, round_: int, site: int, rate: float) -> bool:
    """A site's participation coin for a round: True with probability `rate`."""
    return bool(secret.rng(PARTICIPATION, round_, site).random() < rate)


def simulated_secret(run_seed: int, site: int) -> SiteSecret:
    """A simulated site's secret, derived from the run seed so that the run repeats (the server
    of a simulation knows it: simulation protects nothing against its own server)."""
    key = hashlib.sha256(json.dumps(["fedlora simulated site", run_seed, site]).encode()).digest()
    return SiteSecret(key, SIMULATED)


def site_secret(folder: Path) -> SiteSecret:
    """A site daemon's secret: drawn once from the OS CSPRNG into `folder`/site.secret (owner
    read/write only) and read from there afterwards, so a re-run round repeats its noise."""
    path = folder / FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker of the site drew it first
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(SECRET_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
    key = path.read_bytes()
    if len(key) < MIN_BYTES:
        raise FedloraError(
            f"The site secret {path} holds {len(key)} bytes, fewer than {MIN_BYTES}: the file is "
            "damaged. Remove it and the site draws a new secret (its noise then changes)."
        )
    return SiteSecret(key, SITE_CSPRNG)


def gaussian_like(reference: torch.Tensor, std: float, rng: np.random.Generator) -> torch.Tensor:
    """N(0, std^2) noise shaped like `reference`, on its device and in its dtype, drawn from a
    secret stream (not from a torch generator, see the module doc)."""
    import torch

    draw = rng.standard_normal(reference.numel(), dtype=np.float32)
    noise = torch.from_numpy(draw).view(reference.shape)
    return noise.to(device=reference.device, dtype=reference.dtype) * std
