"""run.trackers: a tiny-random federation's rounds read back from its TensorBoard event files
(and its MLflow run, where mlflow is installed) equal metrics.jsonl; a missing library is an
error at config load naming the extra."""

from __future__ import annotations

import importlib.util
import json

import pytest
from in_process import run_federation

from fedlora.config import load_config
from fedlora.errors import FedloraError
from fedlora.trackers import TENSORBOARD_DIR, scalars


def test_scalars_flatten_nested_numbers_and_drop_the_rest():
    row = {
        "round": 2,
        "eval_loss": 0.5,
        "site_accuracy": {"0": 1.0, "1": 0.25},
        "privacy": {"3": {"epsilon": 2.0, "level": "sample"}},
        "sites": [0, 1],
        "agg_error_mean": None,
        "note": "x",
    }
    assert scalars(row) == {
        "round": 2.0,
        "eval_loss": 0.5,
        "site_accuracy/0": 1.0,
        "site_accuracy/1": 0.25,
        "privacy/3/epsilon": 2.0,
    }


def test_unknown_or_missing_tracker_is_refused_at_config_load(monkeypatch):
    with pytest.raises(FedloraError, match=r"unknown tracker 'wandb'.*tensorboard"):
        load_config(None, [{"run": {"trackers": ["wandb"]}}])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(FedloraError, match=r"mlflow package is not installed.*fedlora\[mlflow\]"):
        load_config(None, [{"run": {"trackers": ["mlflow"]}}])
    # one name on the command line (--set run.trackers=tensorboard) is a list of one
    assert load_config(None, [{"run": {"trackers": "tensorboard"}}]).run.trackers == ["tensorboard"]


HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


def test_a_run_writes_readable_tensorboard_events(tmp_path, tiny_cfg, monkeypatch):
    """Also runs in bfloat16 transport, whose per-round error must reach the trackers too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = ["tensorboard", "mlflow"] if HAS_MLFLOW else ["tensorboard"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = tiny_cfg(run={"trackers": trackers}, transport={"dtype": "bfloat16"})
    out = run_federation(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    for key in ("eval_loss", "eval_accuracy", "site_accuracy/0", "transport_error_up"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["round"]: scalars(r)[key] for r in rows if key in scalars(r)}
        assert logged.keys() == expected.keys() and expected
        assert logged == pytest.approx(expected, rel=1e-6)
    assert 0 < rows[-1]["transport_error_down"] < 2.0**-8
    if HAS_MLFLOW:
        import mlflow

        client = mlflow.tracking.MlflowClient()
        (run,) = client.search_runs(
            [mlflow.get_experiment_by_name("fedlora").experiment_id],
            filter_string=f"tags.mlflow.runName = '{out.name}'",
        )
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        assert {m.step: m.value for m in history} == pytest.approx(
            {r["round"]: r["eval_loss"] for r in rows}, rel=1e-6
        )
        assert run.data.params["transport.dtype"] == "bfloat16"
