"""A quantised frozen base (QLoRA): the 8-bit success path through bitsandbytes' CPU backend,
the 4-bit refusal, the refusal without bitsandbytes, and the guard against training that
silently changes nothing."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from in_process import run_federation

from fedlora.adapter import adapter_arrays
from fedlora.config import load_config
from fedlora.errors import FedloraError
from fedlora.runtime import build_runtime
from fedlora.strategies import TrainingTerms
from fedlora.train import evaluate, local_train

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)


@needs_bnb
def test_an_8bit_base_trains_the_adapter_after_an_evaluation_pass(tiny_cfg):
    """The trigger of the 4-bit failure (an evaluation pass before training) must not stop
    8-bit training: the adapter moves and the training loss falls."""
    import bitsandbytes as bnb

    cfg = tiny_cfg(model={"quantization": "8bit"}, train={"lr": 0.05})
    rt = build_runtime(cfg, log=lambda _m: None)
    o_proj = rt.model.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj.base_layer, bnb.nn.Linear8bitLt)
    rows = rt.site_rows(0)
    before = adapter_arrays(rt.model)
    first = evaluate(rt.model, rt.encoder, rows[:16], rt.pad_id)
    local_train(rt.model, rows, 4, cfg.train, TrainingTerms(), np.random.default_rng(0), rt.pad_id)
    after = adapter_arrays(rt.model)
    assert max(float(np.abs(after[k] - before[k]).max()) for k in before) > 1e-3
    assert evaluate(rt.model, rt.encoder, rows[:16], rt.pad_id).loss < first.loss


@needs_bnb
def test_a_federation_on_an_8bit_base(tmp_path, tiny_cfg):
    out = run_federation(tiny_cfg(model={"quantization": "8bit"}, train={"lr": 0.05}))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_4bit_is_refused_when_the_config_is_loaded(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real("json"))
    with pytest.raises(FedloraError, match='"8bit"') as err:
        load_config(None, [{"model": {"quantization": "4bit"}}])
    assert "silently" in str(err.value)


def test_a_quantised_base_is_refused_without_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(FedloraError, match="bitsandbytes") as err:
        load_config(None, [{"model": {"quantization": "8bit"}}])
    assert 'model.quantization = "none"' in str(err.value)


def test_training_that_changes_nothing_is_an_error(tiny_cfg):
    """No gradient reaching the adapter (a backend that cannot train) must not pass silently."""
    cfg = tiny_cfg()
    cfg.train.lr = 0.0  # past validation on purpose: the optimiser then moves nothing
    rt = build_runtime(cfg, log=lambda _m: None)
    with pytest.raises(FedloraError, match="unchanged"):
        local_train(
            rt.model,
            rt.site_rows(0),
            2,
            cfg.train,
            TrainingTerms(),
            np.random.default_rng(0),
            rt.pad_id,
        )
