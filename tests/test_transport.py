"""transport.dtype: the wire formats against torch's own conversions, weights kept exact, the
bytes halved, the round-trip error a site and the server report, and where it is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import transport
from fedlora.config import load_config
from fedlora.errors import FedloraError


def sample(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "delta/a": rng.normal(scale=1e-3, size=(8, 16)).astype(np.float64),
        "delta/b": rng.normal(scale=3.0, size=(5,)).astype(np.float32),
        "weight": np.array([37.0]),
    }


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_wire_values_equal_torchs_rounding_and_weights_stay_exact(dtype, torch_dtype):
    arrays = sample()
    wire = transport.encode(arrays, dtype)
    back = transport.decode(wire)
    for k in ("delta/a", "delta/b"):
        assert wire[k].itemsize == 2  # half float32's bytes
        expected = torch.from_numpy(arrays[k].astype(np.float32)).to(torch_dtype).float()
        np.testing.assert_array_equal(back[k], expected.numpy())  # same rounding, bit for bit
        assert back[k].dtype == np.float32
    assert wire["weight"].dtype == np.float64 and wire["weight"][0] == 37.0
    bound = 2.0**-8 if dtype == "bfloat16" else 2.0**-10  # unit roundoff (2^-9, 2^-11) x 2
    assert 0 < transport.round_trip_error(arrays, back) < bound


def test_bfloat16_ties_round_to_even():
    # 1 + 2^-8 lies half-way between bf16 neighbours 1 and 1 + 2^-7: even mantissa (1) wins;
    # 1 + 3 * 2^-8 lies half-way between 1 + 2^-7 and 1 + 2^-6: even mantissa (1 + 2^-6) wins
    x = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8)], dtype=np.float32)
    np.testing.assert_array_equal(
        transport.bf16_values(transport.bf16_bits(x)), [1.0, 1 + 2.0**-6, -1.0]
    )


def test_float32_travels_unchanged_and_float16_overflow_is_named():
    arrays = sample()
    same = transport.decode(transport.encode(arrays, "float32"))
    assert transport.round_trip_error(arrays, same) < 1e-7  # float64 -> float32 only
    with pytest.raises(FedloraError, match=r"delta/big.*bfloat16"):
        transport.encode({"delta/big": np.array([1.0, 7e4])}, "float16")


@pytest.mark.parametrize(
    ("section", "what"),
    [({"secure": {"enabled": True}}, "secure"), ({"privacy": {"level": "client"}}, "clip")],
)
def test_narrow_transport_is_refused_where_it_cannot_apply(section, what):
    with pytest.raises(FedloraError, match=what) as info:
        load_config(None, [{"transport": {"dtype": "bfloat16"}}, section])
    assert "transport.dtype" in str(info.value)


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def test_a_round_in_bfloat16_sends_half_the_bytes_and_reports_the_error(
    tmp_path, tiny_cfg, task_identity
):
    """The server's message and a site's reply, in process: the adapter and the update travel
    as bfloat16 bit patterns, and both round-trip errors are at bfloat16's scale."""
    from flwr.app import Context, RecordDict

    from fedlora.adapter import adapter_arrays
    from fedlora.apps import records as R
    from fedlora.apps.client import train_reply
    from fedlora.apps.collect import RoundInputs
    from fedlora.apps.server import Federation
    from fedlora.report import Reporter
    from fedlora.runtime import build_runtime

    cfg = tiny_cfg(transport={"dtype": "bfloat16"}, lora={"dropout": 0.0})
    rt = build_runtime(cfg, log=lambda _m: None)
    federation = Federation(cfg, rt, Reporter(tmp_path))
    n_lora = sum(v.size for v in adapter_arrays(rt.model).values())
    msgs, bytes_down = federation.train_messages(None, {0: 101}, [0], 1)
    assert bytes_down == 2 * n_lora
    down = R.from_record(msgs[0].content[R.GLOBAL_ADAPTER])
    assert all(v.dtype == np.uint16 for v in down.values())
    context = Context(
        run_id=1,
        node_id=101,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    reply = train_reply(cfg, msgs[0], context)
    up = R.from_record(reply.content[R.CONTRIBUTION])
    assert R.payload_bytes(up) == 2 * n_lora + 8  # the delta, and the float64 weight
    metrics = reply.content[R.SITE_METRICS]
    assert 0 < float(metrics[R.TRANSPORT_ERROR]) < 2.0**-8
    # peft starts B at 0 (exact in any format): the error down is A's
    inputs = RoundInputs(metrics=[metrics], transport_error_down=0.0)
    row = federation.transport_row(inputs)
    assert row["transport_error_up"] == float(metrics[R.TRANSPORT_ERROR])
    global_arrays = adapter_arrays(rt.model)
    sent = transport.decode(down)
    assert 0 < transport.round_trip_error(global_arrays, sent) < 2.0**-8


def test_a_record_travels_as_a_handful_of_objects_whatever_the_number_of_arrays():
    """Flower sends every Array of a record as objects of their own, each one request through
    the SuperLink: the default adapter's 120 tensors were 242 objects per message, and at 10
    site daemons on two cores plaintext rounds took 2x secure ones (whose masked input is
    one array). A record is one packed array; it comes back exactly, dtypes and shapes kept."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedlora.apps import records as R

    rng = np.random.default_rng(0)
    arrays = {
        f"layer{i}.{m}.lora_{ab}": rng.normal(size=(8, 12) if ab == "A" else (6, 8)).astype(
            np.float32
        )
        for i in range(30)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    arrays |= {"stats/rows": np.array([37.0]), "wire/bf16": np.arange(7, dtype=np.uint16)}
    record = R.to_record(arrays)
    assert len(get_all_nested_objects(RecordDict({"update": record}))) <= 4
    back = R.from_record(record)
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)
        assert back[key].flags.writeable
    assert R.from_record(R.to_record({})) == {}


def test_a_malformed_record_is_a_clear_error_not_a_decoding_crash():
    """A record that to_record did not write (a faulty or hostile site) must stop the server
    with what is wrong, not a JSON or buffer error; a negative shape must not read the rest of
    the buffer as one tensor (numpy's count=-1)."""
    import json

    from flwr.app import Array, ArrayRecord

    from fedlora.apps import records as R
    from fedlora.errors import FedloraError

    def packed(header: object, payload: bytes) -> ArrayRecord:
        head = json.dumps(header).encode()
        data = len(head).to_bytes(8, "little") + head + payload
        return ArrayRecord({R.PACKED: Array.from_numpy_ndarray(np.frombuffer(data, np.uint8))})

    good = R.to_record({"a/q_proj.lora_A": np.ones((2, 3), np.float32)})
    data = good[R.PACKED].numpy().tobytes()
    cases = {
        "truncated": ArrayRecord(
            {R.PACKED: Array.from_numpy_ndarray(np.frombuffer(data[:-4], np.uint8))}
        ),
        "trailing bytes": packed([["x", "<f4", [1]]], b"\0" * 8),
        "negative shape": packed([["x", "<f4", [-1]]], b"\0" * 8),
        "object dtype": packed([["x", "|O", [1]]], b"\0" * 8),
        "not json": ArrayRecord(
            {
                R.PACKED: Array.from_numpy_ndarray(
                    np.frombuffer(b"\x05" + b"\0" * 7 + b"{{{{{", np.uint8)
                )
            }
        ),
        "no packed array": ArrayRecord({"other": Array.from_numpy_ndarray(np.ones(2))}),
    }
    for what, record in cases.items():
        with pytest.raises(FedloraError, match="Malformed tensor record"):
            R.from_record(record)
            pytest.fail(what)


def test_the_audit_log_digests_the_tensors_a_site_sent_not_their_packing():
    """clients/README: the audit line's sha256 is over every tensor sent (name, dtype, shape,
    bytes), so that anyone holding the tensors gets the same digest; packing must not change
    it, nor the bytes."""
    from flwr.app import Message, Metadata, RecordDict

    from fedlora.apps import records as R
    from fedlora.apps.records import payload_digest
    from fedlora.deploy.apps import audit_entry

    arrays = sample()
    meta = Metadata(1, "m1", 2, 0, "", "1", 0.0, 1e9, "train", 0, 0)
    msg = Message(RecordDict(), metadata=meta)
    reply_meta = Metadata(1, "r1", 0, 2, "m1", "1", 0.0, 1e9, "train", 0, 0)
    reply = Message(RecordDict({R.CONTRIBUTION: R.to_record(arrays)}), metadata=reply_meta)
    entry = audit_entry(msg, reply, "federation")
    sent = {f"{R.CONTRIBUTION}/{k}": v for k, v in arrays.items()}
    assert entry["sha256"] == payload_digest(sent)
    assert entry["bytes"] == R.payload_bytes(arrays)
