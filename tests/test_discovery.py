"""Site discovery against a grid whose replies come back late: every node is asked once and a
late reply still counts (a batch that waited a fixed time threw late replies away and asked
everyone again, which stopped making progress with thousands of simulated sites)."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import pytest

from fedlora.apps import records as R
from fedlora.apps.discovery import discover_sites


class LateGrid:
    """Node n answers a query only after it has been pulled `delays[n]` times."""

    def __init__(self, delays: dict[int, int]) -> None:
        self.delays = delays
        self.asked: Counter[int] = Counter()
        self.pending: dict[str, list[int]] = {}
        self.ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.delays)

    def push_messages(self, messages) -> list[str]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked[node] += 1
            message_id = f"m{next(self.ids)}"
            self.pending[message_id] = [node, self.delays[node]]
            out.append(message_id)
        return out

    def pull_messages(self, message_ids) -> list[SimpleNamespace]:
        replies = []
        for message_id in message_ids:
            entry = self.pending.get(message_id)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                del self.pending[message_id]
                replies.append(self.reply(message_id, entry[0]))
        return replies

    def send_and_receive(self, messages, timeout=None) -> list[SimpleNamespace]:
        """What is back after one wait; the rest is lost (Flower's behaviour at its timeout)."""
        return self.pull_messages(self.push_messages(messages))

    @staticmethod
    def reply(message_id: str, node: int) -> SimpleNamespace:
        return SimpleNamespace(
            metadata=SimpleNamespace(reply_to_message_id=message_id, src_node_id=node),
            content={R.SITE_METRICS: {R.SITE_ID: node - 100}},
            has_error=lambda: False,
        )


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def test_late_replies_count_and_every_node_is_asked_once(task_identity):
    grid = LateGrid({100: 1, 101: 1, 102: 4, 103: 2})
    nodes = discover_sites(grid, 4, timeout=5.0)
    assert nodes == {0: 100, 1: 101, 2: 102, 3: 103}
    assert grid.asked == {100: 1, 101: 1, 102: 1, 103: 1}
