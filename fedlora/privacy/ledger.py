"""A site's privacy ledger: every release of an update computed from its rows, in the order made.

The ledger is a list of releases, not part of a round's state: a round's state is chosen by the
round number the server sends, and a server that asked for round 5 and then round 3 would find
the ledger of before round 3, empty. Each release is appended (and flushed to disk) just before
the update leaves the site, in the clear or masked: once a masked input is out, the server may
sum it from the other sites' shares without ever telling this site, so "summed" cannot be what
counts. A site daemon keeps one ledger for all its federations (its own budget covers its
rows whatever the server calls the federation); each release names its federation, whose own
budget and reported epsilon count only its releases.

Hand-written: a JSON line per release is all it needs, readable by anyone auditing the site.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlora.errors import FedloraError
from fedlora.privacy.accounting import Entry


@dataclass(frozen=True)
class Release:
    federation: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def entry(self) -> Entry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """Releases as JSON lines in `path`, appended and never rewritten, except by a simulation's
    resume (`forget_rounds_after`), where one machine plays every site and reruns a round
    exactly as it ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def releases(self) -> list[Release]:
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            return [Release(**json.loads(line)) for line in lines if line.strip()]
        except (OSError, ValueError, TypeError) as exc:
            raise FedloraError(
                f"Privacy ledger {self.path} is unreadable ({exc}); restore it from a backup. "
                "Without it this site cannot know what its rows have spent."
            ) from None

    def entries(self, federation: str | None = None) -> list[Entry]:
        """Every release's (noise multiplier, sample rate, steps), or one federation's."""
        return [
            r.entry for r in self.releases() if federation is None or r.federation == federation
        ]

    def record(self, release: Release) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(release)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def forget_rounds_after(self, round_: int) -> None:
        kept = [asdict(r) for r in self.releases() if r.round <= round_]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
