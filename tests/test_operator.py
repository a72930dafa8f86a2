"""What an operator sees: the time left after each round, and every command's --help with its
defaults and an example."""

from __future__ import annotations

import pytest

from fedlora.cli import EXAMPLES, build_parser
from fedlora.report import time_left


def test_time_left_after_the_first_training_round():
    rows = [{"round": 0, "seconds": 50.0}]  # round 0 only evaluates: not a training round
    assert time_left(rows, 10) == ""
    rows += [{"round": 1, "seconds": 30.0}, {"round": 2, "seconds": 90.0}]
    assert time_left(rows, 10) == "0:08:00"  # 8 rounds left at 60 s
    assert time_left(rows, 2) == ""  # nothing left
    assert time_left([*rows, {"round": 3, "seconds": 60.0}], 123) == "2:00:00"


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_help_shows_defaults_and_an_example(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert f"example:\n  {EXAMPLES[command].splitlines()[0]}" in text


def test_help_shows_the_default_of_a_flag_with_one():
    parser = build_parser()
    certs = parser._subparsers._group_actions[0].choices["certs"]  # noqa: SLF001
    assert "(default: 825)" in " ".join(certs.format_help().split())


class _Grid:
    """Sites connect one per poll; site 1 ("st-marys") is the last to come."""

    def __init__(self) -> None:
        self.polls = 0
        self.pending: list[tuple[str, int]] = []  # (query id, site) not yet answered

    def get_node_ids(self):
        self.polls += 1
        return [100 + s for s in (0, 2, 1)[: self.polls]]

    def push_messages(self, messages):
        self.pending += [
            (f"q{msg.metadata.dst_node_id}", msg.metadata.dst_node_id - 100) for msg in messages
        ]
        return [mid for mid, _ in self.pending[-len(messages) :]]

    def pull_messages(self, message_ids):
        from flwr.app import MetricRecord, RecordDict

        from fedlora.apps import records as R

        replies = []
        for mid, site in [p for p in self.pending if p[0] in message_ids]:
            reply = type("Reply", (), {})()
            reply.has_error = lambda: False
            reply.content = RecordDict({R.SITE_METRICS: MetricRecord({R.SITE_ID: site})})
            reply.metadata = type("Meta", (), {"reply_to_message_id": mid})()
            replies.append(reply)
        self.pending = [p for p in self.pending if p[0] not in message_ids]
        return replies


def test_server_says_who_it_is_waiting_for(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.apps import discovery

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    monkeypatch.setattr(discovery.time, "sleep", lambda _: None)
    lines: list[str] = []
    names = ["city", "st-marys", "north"]
    nodes = discovery.discover_sites(_Grid(), 3, note=lines.append, names=names, every=0.0)
    assert nodes == {0: 100, 1: 101, 2: 102}
    assert "site city connected (1 of 3)" in lines
    assert "2 of 3 sites connected; waiting for st-marys" in lines
    assert lines[-1] == "site st-marys connected (3 of 3)"


def test_secure_aggregation_says_when_a_dropout_ends_the_federation():
    from fedlora.apps.collect import dropout_warning
    from fedlora.config import load_config

    def cfg(**federation):
        return load_config(None, [{"secure": {"enabled": True}, "federation": federation}])

    # 3 sites: the minimum cohort (3) needs every one of them
    assert "ends the federation" in dropout_warning(cfg(clients=3), 3)
    assert dropout_warning(cfg(clients=4), 4) == ""  # 3 of 4 suffice
    assert dropout_warning(load_config(None, [{"federation": {"clients": 2}}]), 2) == ""


def test_errors_relayed_to_the_server_name_the_site_and_no_local_path():
    from fedlora.deploy.executor import relayed_reason
    from fedlora.errors import FedloraError
    from fedlora.secure.secagg import SecAggError

    error = FedloraError("/srv/hospital/data/rows.jsonl, line 3: not UTF-8 text")
    assert relayed_reason(error, "st-marys") == "site st-marys: rows.jsonl, line 3: not UTF-8 text"
    protocol = SecAggError(r"no share of site 2 in C:\fl\state\session.json")
    reason = relayed_reason(protocol, "city")
    assert reason == "site city: SecAggError: no share of site 2 in session.json"


def test_of_another_librarys_error_the_server_learns_the_type_not_the_message():
    """A library's message may quote what it was working on: a row of the site's data, a value
    of its update. On the code before, the server read it whole."""
    from fedlora.deploy.executor import relayed_reason

    row = KeyError("Jane Doe, 1961-04-02, HIV positive")
    assert relayed_reason(row, "city") == "site city: KeyError (the message is in the site's log)"
    path = OSError(r"cannot open 'C:\fl\state\site-0.npz' or /var/lib/fl/state/")
    assert relayed_reason(path, "city") == "site city: OSError (the message is in the site's log)"


def test_simulate_help_shows_the_config_defaults_of_its_shortcuts():
    from fedlora.config import Config

    sim = build_parser()._subparsers._group_actions[0].choices["simulate"]  # noqa: SLF001
    text = " ".join(sim.format_help().split())
    assert f"(federation.clients) (default: {Config().federation.clients})" in text
    assert f"(default: {Config().strategy.name})" in text
