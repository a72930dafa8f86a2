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
from fedlora.privacy.accounting import Entry, epsilon


@dataclass(frozen=True)
class Release:
    federation: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float = 0.0  # the delta the site accounted this release at (0: an older ledger's)
    accountant: str = "rdp"  # the federation's privacy.accountant

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


def spent_report(ledger: PrivacyLedger, max_epsilon: float, delta: float = 0.0) -> str:
    """What a site's rows have spent, for the site's operator and data-protection officer:
    each federation at the delta and with the accountant its releases recorded, the whole
    ledger at the smallest delta with RDP (the releases of several federations compose in
    one accountant); `delta` overrides the deltas (needed for releases written before the
    ledger recorded one)."""
    accountant = "rdp"
    releases = ledger.releases()
    if not releases:
        return f"No private release in {ledger.path}: this site's rows have spent nothing."
    recorded = [r.delta for r in releases if r.delta > 0]
    overall = delta or (min(recorded) if recorded else 0.0)
    lines = [
        f"Privacy spent, from {ledger.path} ({len(releases)} releases):",
        f"  {'federation':<34}  {'rounds':>9}  {'epsilon':>8}  {'at delta':>9}  accountant",
    ]
    for name in dict.fromkeys(r.federation for r in releases):
        own = [r for r in releases if r.federation == name]
        at = delta or min((r.delta for r in own if r.delta > 0), default=0.0)
        rounds = f"{min(r.round for r in own)}-{max(r.round for r in own)} ({len(own)})"
        used = own[-1].accountant
        lines.append(f"  {name:<34}  {rounds:>9}  {_epsilon_at(own, at, used)}  {used}")
    total = _epsilon_at(releases, overall, accountant)
    lines.append(f"  {'all federations':<34}  {f'({len(releases)})':>9}  {total}  {accountant}")
    if max_epsilon:
        lines.append(f"policy.max_epsilon = {max_epsilon:g}, over all federations.")
    if not overall:
        lines.append(
            "These releases were written before the ledger recorded their delta: give one "
            "with --delta to see their epsilon."
        )
    return "\n".join(lines)


def _epsilon_at(releases: list[Release], delta: float, accountant: str) -> str:
    if not delta:
        return f"{'-':>8}  {'-':>9}"
    return f"{epsilon([r.entry for r in releases], delta, accountant):>8.3g}  {delta:>9.3g}"
