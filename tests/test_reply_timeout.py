"""A site that never answers (a hung training, a machine stopped mid-round): with
federation.reply_timeout the server counts it as dropped for the round and goes on with the
others, in the clear, under secure aggregation and at personalisation; without it the server
waits for every reply, as Flower does."""

from __future__ import annotations

import json

import in_process
import pytest
from flwr.app import Message, MessageType

from fedlora.apps.secure import TRAIN_SECAGG
from fedlora.config import load_config
from fedlora.errors import FedloraError

SILENT_NODE = 102  # site 2 of LocalGrid's nodes 100, 101, ...


def silent_at(message_type: str) -> type[in_process.LocalGrid]:
    """A LocalGrid whose site 2 never answers messages of `message_type`."""

    class Silent(in_process.LocalGrid):
        def push_messages(self, msgs: list[Message]) -> list[str]:
            ids = super().push_messages(msgs)
            for msg, msg_id in zip(msgs, ids, strict=True):
                kind = msg.metadata.message_type
                if msg.metadata.dst_node_id == SILENT_NODE and kind == message_type:
                    del self.replies[msg_id]
            return ids

    return Silent


def rows_and_log(cfg, monkeypatch, capsys, message_type: str) -> tuple[list[dict], str]:
    """The federation's round rows (after round 0) and what its operator read."""
    monkeypatch.setattr(in_process, "LocalGrid", silent_at(message_type))
    out = in_process.run_federation(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("round")], capsys.readouterr().out


def test_a_site_that_never_answers_drops_out_of_each_round_in_the_clear(
    tiny_cfg, monkeypatch, capsys
):
    cfg = tiny_cfg(federation={"clients": 3, "rounds": 2, "reply_timeout": 1})
    rows, log = rows_and_log(cfg, monkeypatch, capsys, MessageType.TRAIN)
    assert [r["sites"] for r in rows] == [[0, 1], [0, 1]]
    assert "site 2: no reply within 1 s (federation.reply_timeout)" in log, log


def test_a_site_that_never_sends_its_masked_input_drops_out_of_the_secure_sum(
    tiny_cfg, monkeypatch, capsys
):
    """Silent at the mask stage, after sharing its keys: the others unmask the sum of three."""
    cfg = tiny_cfg(
        federation={"clients": 4, "rounds": 1, "reply_timeout": 1}, secure={"enabled": True}
    )
    rows, log = rows_and_log(cfg, monkeypatch, capsys, TRAIN_SECAGG)
    assert [r["sites"] for r in rows] == [[0, 1, 3]]
    assert "site 2, mask: no reply within 1 s (federation.reply_timeout)" in log, log


def test_a_site_that_never_answers_personalisation_is_named(tiny_cfg, monkeypatch, capsys):
    cfg = tiny_cfg(
        federation={"clients": 3, "rounds": 1, "reply_timeout": 1, "personalize_steps": 1}
    )
    _, log = rows_and_log(cfg, monkeypatch, capsys, MessageType.EVALUATE)
    assert "personalisation: site 2: no reply within 1 s" in log, log


def test_a_negative_reply_timeout_is_refused():
    with pytest.raises(FedloraError, match="federation.reply_timeout must be >= 0"):
        load_config(None, [{"federation": {"reply_timeout": -5}}])


def test_a_simulation_says_that_queued_sites_count_against_the_timeout():
    from fedlora.simulate import queueing_note

    def cfg(**federation):
        return load_config(None, [{"federation": {"clients": 10} | federation}])

    note = queueing_note(cfg(reply_timeout=60, workers=2))
    assert "10 sites queue for 2 workers" in note and "60 s" in note, note
    assert queueing_note(cfg(reply_timeout=60, workers=10)) == ""  # a worker for every site
    assert queueing_note(cfg(workers=2)) == ""  # no timeout: every reply is awaited
