"""A federation whose sites are ClientApps in the test's own process: the same round loop
(`Federation`), the same site code (`make_client_app`) and the same results folder as
`fedlora simulate`, without Ray or Flower's simulation engine.

For tests of what a combination of settings computes (every strategy x aggregation x rank
rule, say), where starting the engine for each case costs half a minute and shows nothing the
engine's own tests (`simulate`, on real Ray workers) do not. `LocalGrid` also records the
server's whole view of a round.
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
    view: every reply's content, in arrival order."""

    def __init__(self, cfg, sites: int, policy: SitePolicy | None = None) -> None:
        self.app = make_client_app(cfg, policy)
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


def run_federation(cfg) -> Path:
    """Run `cfg`'s federation in this process; return its finished results folder."""
    from fedlora.apps.server import Federation
    from fedlora.privacy.secrets import SIMULATED
    from fedlora.report import Reporter
    from fedlora.results import (
        check_out,
        close_results,
        finish,
        open_results,
        results_dir,
        run_state_dir,
    )
    from fedlora.runtime import build_runtime

    out = results_dir(cfg)
    check_out(out)
    cfg.run.out = str(out)
    runtime = build_runtime(cfg, log=lambda _msg: None)
    work = open_results(cfg, out, resume=False)
    reporter = Reporter(work, total_rounds=cfg.federation.rounds)
    federation = Federation(cfg, runtime, reporter, run_state_dir(out))
    with task_identity():
        federation.run(LocalGrid(cfg, cfg.federation.clients, SitePolicy.mirroring(cfg)))
    finish(cfg, runtime, federation, work, 0.0, SIMULATED)
    reporter.close()
    return close_results(out, work)
