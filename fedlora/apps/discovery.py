"""Finding the sites and waiting for their replies, through Flower's Grid.

`discover_sites` maps each site id to the node it connected as (the server assigns work by
site, not by node id); `exchange` sends messages and polls for the replies with a live count;
`StoppableGrid` checks the stop switch at every call, so an interrupted server stops within one
poll interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.apps import records
from fedlora.errors import FedloraError
from fedlora.interrupt import StopSwitch


class DelegatingGrid(Grid):
    """A Grid that passes every call to the run's own Grid; a subclass overrides the calls it
    watches (Flower's Grid is abstract, so every method is spelled out once, here)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self.grid.send_and_receive(messages, timeout=timeout)


class StoppableGrid(DelegatingGrid):
    """The run's Grid, checking the stop switch before every call: every wait for the sites
    polls it, so an interrupted loop stops within a poll interval."""

    def __init__(self, grid: Grid, switch: StopSwitch) -> None:
        super().__init__(grid)
        self.switch = switch

    def get_node_ids(self):
        self.switch.check()
        return super().get_node_ids()

    def push_messages(self, messages):
        self.switch.check()
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        self.switch.check()
        return super().pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        self.switch.check()
        return super().send_and_receive(messages, timeout=timeout)


def waiting_line(connected: list[int], expected: int, names: list[str]) -> str:
    """'2 of 3 sites connected; waiting for st-marys' (names by site id, else the ids)."""
    have = set(connected)
    missing = [names[s] if s < len(names) else str(s) for s in range(expected) if s not in have]
    shown = ", ".join(missing[:10]) + (
        f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    )
    return f"{len(connected)} of {expected} sites connected; waiting for {shown}"


def discover_sites(
    grid: Grid,
    expected: int,
    timeout: float = 600.0,
    note: Callable[[str], None] | None = None,
    names: list[str] | None = None,
    every: float = 30.0,
    retry: float = 60.0,
) -> dict[int, int]:
    """Map site id -> node id by asking every connected node which site it is; `note` hears
    who is still missing (after 5 s, then every `every` s) and each site that connects.

    Every node is asked once, as soon as it is seen, and replies are collected as they arrive
    for as long as the deadline allows: a batch that waited for its slowest reply (and threw
    the late ones away, then asked everyone again) made no progress at all beyond a few
    thousand simulated sites on a small machine. A node is asked again when its reply was an
    error, or when none came within `retry` seconds (a query can be lost when a site daemon
    reconnects to a restarted server); an earlier query's late reply still counts.
    """
    deadline = time.monotonic() + timeout
    nodes: dict[int, int] = {}
    asked: dict[str, int] = {}  # pending query message id -> node id
    last_asked: dict[int, float] = {}  # node -> when it was last asked (pending or answered)
    next_note = time.monotonic() + min(5.0, every)
    while len(nodes) < expected:
        before = set(nodes)
        now, answered = time.monotonic(), set(nodes.values())
        for node in grid.get_node_ids():
            if node in answered or now - last_asked.get(node, -retry) < retry:
                continue
            query = Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for message_id in grid.push_messages([query]):  # none: not accepted, ask later
                asked[message_id] = node
                last_asked[node] = now
        for reply in grid.pull_messages(list(asked)) if asked else []:
            node = asked.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                last_asked.pop(node, None)  # ask it again
                continue
            nodes[int(reply.content[records.SITE_METRICS][records.SITE_ID])] = node
        if note is not None:
            # named sites (a deployment) are announced one by one; simulated ones only counted
            for k, site in enumerate(sorted(set(nodes) - before) if names else []):
                label = names[site] if site < len(names) else str(site)
                note(f"site {label} connected ({len(before) + k + 1} of {expected})")
            if len(nodes) < expected and time.monotonic() >= next_note:
                note(waiting_line(sorted(nodes), expected, names or []))
                next_note = time.monotonic() + every
        if time.monotonic() > deadline:
            raise FedloraError(
                f"Only {len(nodes)} of {expected} sites connected within {timeout:.0f} s: "
                f"{waiting_line(sorted(nodes), expected, names or [])}."
            )
        if len(nodes) < expected:
            time.sleep(0.2)
    return nodes


def no_reply(who: str, timeout: float | None) -> str:
    """A site that did not answer in time, as a round's failures say it."""
    return f"{who}: no reply within {timeout:g} s (federation.reply_timeout)"


def exchange(
    grid: Grid,
    msgs: list[Message],
    on_progress: Callable[[int], None],
    timeout: float | None = None,
) -> tuple[list[Message], list[int]]:
    """send_and_receive with a live count of sites that have replied: the replies, and the
    nodes that had not replied after `timeout` seconds (None: wait for every reply)."""
    ids = dict(zip(grid.push_messages(msgs), (m.metadata.dst_node_id for m in msgs), strict=True))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    on_progress(0)
    while ids and (deadline is None or time.monotonic() < deadline):
        for reply in grid.pull_messages(list(ids)):
            ids.pop(reply.metadata.reply_to_message_id, None)
            replies.append(reply)
            on_progress(len(replies))
        if ids:
            time.sleep(0.2)
    return replies, sorted(ids.values())
