"""What a site keeps between rounds, on its own disk: the strategy's client state (SCAFFOLD's
c_i) and the rounds it has taken part in. (What its rows have spent is in its privacy ledger,
fedlora.privacy.ledger, which no round number can roll back.)

Flower's ``context.state`` lives as long as one run; a federation that is resumed after a server
restart is a new run, and a site daemon can restart too. So the state is a file per site, and it
is kept per round: training in round r starts from the state saved after the latest round before
r. A round that is repeated after a server restart therefore starts from exactly the same state
(and, with the same seeds, sends exactly the same update: nothing new is revealed).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from fedlora.errors import FedloraError
from fedlora.privacy.ledger import PrivacyLedger

Arrays = dict[str, np.ndarray]

#: rounds of history kept: the last finished round is enough to repeat one; one more is slack
KEEP_ROUNDS = 2
_MARK = "__round__"


class SiteStore:
    """Per-round site state in ``<folder>/site-<id>.npz`` (keys ``r<round>/<name>``)."""

    def __init__(self, folder: Path, site: int) -> None:
        self.path = folder / f"site-{site}.npz"

    def _read(self) -> dict[int, Arrays]:
        if not self.path.exists():
            return {}
        by_round: dict[int, Arrays] = {}
        try:
            with np.load(self.path) as data:
                for key in data.files:
                    tag, name = key.split("/", 1)
                    state = by_round.setdefault(int(tag[1:]), {})
                    if name != _MARK:
                        state[name] = data[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise FedloraError(
                f"Site state {self.path} is unreadable ({exc}); restore it from a backup, or "
                "remove it to start this site's state afresh."
            ) from None
        return by_round

    def before(self, round_: int) -> Arrays:
        """The state saved after the latest round before `round_` ({} at the start)."""
        by_round = self._read()
        earlier = [r for r in by_round if r < round_]
        return by_round[max(earlier)] if earlier else {}

    def save(self, round_: int, state: Arrays) -> None:
        """Record the state after `round_`; later rounds (from an abandoned run) are dropped."""
        by_round = {r: s for r, s in self._read().items() if r < round_}
        by_round[round_] = state
        kept = sorted(by_round)[-KEEP_ROUNDS:]
        flat = {f"r{r}/{k}": v for r in kept for k, v in by_round[r].items()}
        flat |= {f"r{r}/{_MARK}": np.array([r]) for r in kept}  # an empty state still counts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, self.path)


class RoundsTaken:
    """The rounds a site has taken part in, in ``<folder>/site-<id>.rounds.json``: a site
    contributes to a round at most once (one plain update or one secure-aggregation session),
    so a server cannot sum the same round twice over different sets of sites and subtract.
    Written to disk before the site answers, so a restart of the site does not forget it."""

    def __init__(self, folder: Path, site: int) -> None:
        self.path = folder / f"site-{site}.rounds.json"

    def taken(self) -> list[int]:
        return json.loads(self.path.read_text()) if self.path.exists() else []

    def take(self, round_: int) -> bool:
        """Record `round_`; False when it was taken before (the request must be refused)."""
        rounds = self.taken()
        if round_ in rounds:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(sorted([*rounds, round_])))
        os.replace(tmp, self.path)
        return True


def forget_unfinished_rounds(state_dir: Path, saved: int | None, started_file: str) -> None:
    """Simulation resume: the machine plays the server and every site, so a round interrupted
    after its first message is run again as it would have run (the result then equals an
    uninterrupted run). Forget that round in every simulated site's records (rounds taken,
    privacy ledger) and in the server's "round started" file; a site daemon never does (a
    deployed server continues with the next round instead)."""
    done = -1 if saved is None else saved
    (state_dir / started_file).unlink(missing_ok=True)
    for path in (state_dir / "sites").glob("site-*.rounds.json"):
        kept = [r for r in json.loads(path.read_text()) if r <= done]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, path)
    for path in (state_dir / "sites").glob("site-*.ledger.jsonl"):
        PrivacyLedger(path).forget_rounds_after(done)
