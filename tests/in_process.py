"""Federations whose sites are ClientApps in the test's own process: `fedlora simulate` with
its engine swapped (`engine_in_process`): the same settings, round loop (`Federation`), site
code (`make_client_app`), logs and results folder, without Ray or Flower's simulation engine.

For tests of what a run computes or records (every strategy x aggregation x rank rule, privacy
accounting, sweeps, trackers), where starting the engine for each case costs half a minute and
shows nothing the engine's own tests (`simulate` on real Ray workers, the CLI and deployment
processes) do not. `LocalGrid` also records the server's whole view of a round.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict

from fedlora.apps.client import make_client_app
from fedlora.privacy.site_policy import SitePolicy


class LocalGrid:
    """A Grid whose nodes are ClientApps in this process; `received` is the server's whole
    view: every reply's content, in arrival order. `background`: the sites train secure rounds
    in a thread, as a site daemon does (fedlora.apps.secure.BackgroundTraining)."""

    def __init__(self, cfg, sites: int, policy: SitePolicy | None = None, background=None) -> None:
        self.app = make_client_app(cfg, policy, background)
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": sites},
                state=RecordDict(),
                run_config={},
            )
            for i in range(sites)
        }
        self.replies: dict[str, Message] = {}
        self.received: list[RecordDict] = []
        self.ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, msgs: list[Message]) -> list[str]:
        out = []
        for msg in msgs:
            msg_id = f"m{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # what Flower does with a raising ClientApp
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            reply.metadata.__dict__["_reply_to_message_id"] = msg_id
            self.replies[msg_id] = reply
            out.append(msg_id)
        return out

    def pull_messages(self, ids: list[str]) -> list[Message]:
        replies = [self.replies.pop(i) for i in ids if i in self.replies]
        self.received += [r.content for r in replies if not r.has_error()]
        return replies


@contextmanager
def task_identity():
    """Flower stamps new messages with the current task's identity: give this process one."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_task_id", "_run_id", "_node_id")
    saved = {n: TaskIdentity.__dict__.get(n) for n in names}
    for name in names:
        setattr(TaskIdentity, name, 1)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def local_engine(cfg, runtime, reporter, state_dir: Path, switch=None):
    """`fedlora.simulate.run_engine` without Ray: the sites are ClientApps in this process."""
    from fedlora.apps.server import Federation
    from fedlora.interrupt import StopSwitch

    federation = Federation(cfg, runtime, reporter, state_dir, switch=switch or StopSwitch())
    with task_identity():
        federation.run(LocalGrid(cfg, cfg.federation.clients))
    return federation


@contextmanager
def engine_in_process():
    """`fedlora.simulate.simulate` (and so `sweep`) runs its federations in this process: the
    same settings, logs, results folder and summary; only the engine differs."""
    import fedlora.simulate

    saved = fedlora.simulate.run_engine
    fedlora.simulate.run_engine = local_engine
    try:
        yield
    finally:
        fedlora.simulate.run_engine = saved


def run_federation(cfg, log=lambda _msg: None, **options) -> Path:
    """`simulate(cfg, log, **options)` in this process; return its finished results folder."""
    from fedlora.simulate import simulate

    with engine_in_process():
        return simulate(cfg, log=log, **options)
