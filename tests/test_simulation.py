"""Integration: whole federations (tiny-random, 3 sites x 2 rounds) on Flower's simulation
engine, or in this process where the engine is not the subject (tests/in_process.py), the
results folder they leave, reproducibility, and what a site actually sends."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from in_process import run_federation
from peft import PeftModel
from safetensors.numpy import load_file

from fedlora.adapter import LORA_MARKERS, adapter_arrays, add_lora, lora_arrays
from fedlora.apps import records as R
from fedlora.apps.client import train_reply
from fedlora.apps.collect import check_contribution
from fedlora.apps.contribution import site_local_steps, site_state_dir
from fedlora.apps.server import Federation
from fedlora.apps.site_state import SiteStore
from fedlora.config import load_config
from fedlora.model import load_base
from fedlora.report import Reporter
from fedlora.runtime import build_runtime
from fedlora.simulate import simulate
from fedlora.train import evaluate

SGD = {"optimizer": "sgd", "lr": 0.5}
STRATEGY_OVERRIDES = {
    "fedavg": {},
    "fedprox": {},
    "scaffold": {"train": SGD},
    "fednova": {"train": SGD | {"local_steps_spread": 0.5, "momentum": 0.9}},
}
ROW_KEYS = {
    "round",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "bytes_up",
    "bytes_down",
    "seconds",
    "site_accuracy",
}
#: the run simulated twice for the reproducibility check (the one with the most moving parts)
REPEATED = "fednova"


def strategy_cfg(tiny_cfg_at, folder, name):
    return tiny_cfg_at(folder, {"strategy": {"name": name}}, **STRATEGY_OVERRIDES[name])


def quiet(_msg: str) -> None:
    pass


#: strategies whose runs go through Flower's simulation engine (Ray workers); the others run
#: in this process (what they compute is the subject, and the engine is the same code's)
ON_THE_ENGINE = {"fedavg", REPEATED}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cfg_at):
    """name -> (config, results folder): one run per strategy, REPEATED twice on the engine."""
    out = {}
    for name in [*STRATEGY_OVERRIDES, REPEATED]:
        key = name if name not in out else name + "-again"
        cfg = strategy_cfg(tiny_cfg_at, tmp_path_factory.mktemp(key), name)
        on_the_engine = name in ON_THE_ENGINE
        out[key] = (cfg, simulate(cfg, log=quiet) if on_the_engine else run_federation(cfg))
    return out


@pytest.fixture(scope="module")
def rt(tmp_path_factory, tiny_cfg_at):
    """A runtime with the same model, LoRA and data settings as every run (for encoding)."""
    return build_runtime(tiny_cfg_at(tmp_path_factory.mktemp("rt")), log=quiet)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(STRATEGY_OVERRIDES))
def test_results_folder(runs, rt, name):
    cfg, out = runs[name]
    assert out.is_dir() and out.name == "run"
    assert not out.with_name("run.partial").exists()
    assert load_config(out / "config.toml") == cfg
    assert (out / "metrics.png").stat().st_size > 0

    rows = metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    n_lora = sum(p.numel() for p in rt.model.parameters() if p.requires_grad)
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert 0 <= r["eval_accuracy"] <= 1 and math.isfinite(r["eval_loss"])
        assert r["seconds"] >= 0
        assert r["site_accuracy"] and set(r["site_accuracy"]) <= {"0", "1", "2"}
        assert all(0 <= v <= 1 for v in r["site_accuracy"].values())
    assert rows[0]["train_loss"] is None
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 0
    for r in rows[1:]:
        assert math.isfinite(r["train_loss"])
        assert r["clients"] == cfg.federation.clients
        # each site receives the float32 global adapter, plus SCAFFOLD's c once it exists
        per_site = 4 * n_lora * (2 if name == "scaffold" and r["round"] > 1 else 1)
        assert r["bytes_down"] == cfg.federation.clients * per_site
        assert r["bytes_up"] >= cfg.federation.clients * 4 * n_lora
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]  # the global adapter moved

    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == name
    assert summary["clients"] == cfg.federation.clients
    assert summary["rounds"] == cfg.federation.rounds
    assert summary["seed"] == cfg.run.seed
    assert summary["model"] == "tiny-random"
    for k in ("eval_loss", "eval_accuracy", "eval_macro_f1", "site_accuracy"):
        assert summary["final"][k] == rows[-1][k]
    for k in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
        assert summary["round0"][k] == rows[0][k]
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in rows)
    assert summary["wall_seconds"] > 0


@pytest.mark.parametrize("name", list(STRATEGY_OVERRIDES))
def test_saved_adapter_is_the_final_global_adapter(runs, rt, name):
    cfg, out = runs[name]
    base, _ = load_base("tiny-random", log=quiet)
    loaded = PeftModel.from_pretrained(base, str(out / "adapter"))
    trained = lora_arrays(loaded)  # loaded for inference: nothing trainable
    assert trained and all(any(m in k for m in LORA_MARKERS) for k in trained)
    assert loaded.peft_config["default"].r == cfg.lora.r
    assert set(loaded.peft_config["default"].target_modules) == set(cfg.lora.target_modules())

    fresh, _ = load_base("tiny-random", log=quiet)
    initial = adapter_arrays(add_lora(fresh, cfg.lora, cfg.run.seed))
    assert set(initial) == set(trained)
    assert any(not np.array_equal(initial[k], trained[k]) for k in initial)  # training happened

    # the adapter on disk scores the held-out rows exactly as the final round reported
    rows, _ = rt.eval_set()
    result = evaluate(loaded, rt.encoder, rows, rt.pad_id)
    final = metrics(out)[-1]
    assert result.loss == pytest.approx(final["eval_loss"], rel=1e-5)
    assert result.accuracy == pytest.approx(final["eval_accuracy"])


def test_same_config_same_numbers(runs):
    (cfg_a, out_a), (cfg_b, out_b) = runs[REPEATED], runs[REPEATED + "-again"]
    assert out_a != out_b and cfg_a.run.seed == cfg_b.run.seed
    rows_a, rows_b = metrics(out_a), metrics(out_b)
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b, strict=True):
        a.pop("seconds")
        b.pop("seconds")
        assert a == b
    tensors_a = load_file(str(out_a / "adapter" / "adapter_model.safetensors"))
    tensors_b = load_file(str(out_b / "adapter" / "adapter_model.safetensors"))
    assert tensors_a.keys() == tensors_b.keys() and tensors_a
    for k in tensors_a:
        assert np.array_equal(tensors_a[k], tensors_b[k]), k


# --- what a site sends ----------------------------------------------------------------------------

SCALARS = {"weight", "count", "nova_a"}
VECTOR_PREFIXES = {"fedavg": ["delta/"], "fedprox": ["delta/"], "fednova": ["delta/"]}
VECTOR_PREFIXES["scaffold"] = ["delta/", "dc/"]


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps new messages with the current task's identity; outside a running app
    there is none, so give the test one (restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.mark.parametrize("name", list(STRATEGY_OVERRIDES))
def test_site_sends_lora_tensors_only(name, rt, tmp_path, tiny_cfg_at, task_identity):
    from flwr.app import Context, RecordDict

    cfg = strategy_cfg(tiny_cfg_at, tmp_path, name)
    federation = Federation(cfg, rt, Reporter(tmp_path))
    nodes = {0: 101, 1: 102, 2: 103}
    msgs, bytes_down = federation.train_messages(None, nodes, [0], 1)
    assert len(msgs) == 1 and msgs[0].metadata.dst_node_id == nodes[0]

    lora_names = {n for n, p in rt.model.named_parameters() if p.requires_grad}
    n_lora = sum(p.numel() for p in rt.model.parameters() if p.requires_grad)
    n_base = sum(p.numel() for p in rt.model.parameters() if not p.requires_grad)
    assert lora_names and all(any(m in n for m in LORA_MARKERS) for n in lora_names)

    sent_down = R.from_record(msgs[0].content[R.GLOBAL_ADAPTER])
    assert set(sent_down) == lora_names
    assert sum(v.size for v in sent_down.values()) == n_lora
    assert bytes_down == 4 * n_lora  # float32, and no broadcast before the first aggregation

    context = Context(
        run_id=1,
        node_id=nodes[0],
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    reply = train_reply(cfg, msgs[0], context)
    sent = R.from_record(reply.content[R.CONTRIBUTION])
    check_contribution(sent, sent_down)

    scalars = {k for k in sent if k in SCALARS}
    vectors = {k: v for k, v in sent.items() if k not in SCALARS}
    for k in scalars:
        assert sent[k].shape == (1,)
    for key, value in vectors.items():
        prefix, _, tensor = key.partition("/")
        assert prefix + "/" in VECTOR_PREFIXES[name], key
        assert tensor in lora_names and ("lora_A" in tensor or "lora_B" in tensor), key
        assert value.shape == sent_down[tensor].shape
    for prefix in VECTOR_PREFIXES[name]:
        assert {k for k in vectors if k.startswith(prefix)} == {prefix + n for n in lora_names}

    n_values = sum(v.size for v in sent.values())
    n_delta = sum(v.size for k, v in vectors.items() if k.startswith("delta/"))
    assert n_delta == n_lora
    assert n_values == len(VECTOR_PREFIXES[name]) * n_lora + len(scalars)
    assert n_delta < 0.05 * n_base
    if name != "scaffold":
        assert n_values < 0.05 * n_base

    # the site trained: the LoRA B matrices (zero at the start) moved
    assert any(np.abs(v).max() > 0 for k, v in vectors.items() if "lora_B" in k)

    site_metrics = reply.content[R.SITE_METRICS]
    assert int(site_metrics[R.SITE_ID]) == 0
    assert int(site_metrics[R.NUM_EXAMPLES]) == len(rt.train_parts[0])
    expected_steps = site_local_steps(cfg.train, 0, cfg.federation.clients)
    assert int(site_metrics[R.LOCAL_STEPS]) == expected_steps
    if name == "scaffold":  # the client control variate stays at the site, LoRA-shaped
        store = SiteStore(site_state_dir(cfg, context), 0)
        state = store.before(2)
        assert {k.partition("/")[2] for k in state} == lora_names
        assert store.before(1) == {}  # round 1 started from no state


def test_plain_text_task_reports_perplexity(tmp_path, tiny_cfg):
    """The second task type: plain causal-LM text, evaluated by perplexity."""
    data = tmp_path / "notes.jsonl"
    lines = [f"Patient {i} reports mild symptoms after dose {i % 4}." for i in range(40)]
    data.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    cfg = tiny_cfg(data={"path": str(data), "task": "text", "eval_rows": 0}, train={"lr": 5e-3})
    out = run_federation(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r.get("eval_accuracy") is None
        assert math.isclose(r["eval_perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-6)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_client_sampling_fraction_and_minimum(tmp_path, tiny_cfg):
    """federation.fraction = 0.3 of 4 sites with min_clients = 2: two sites per round, seeded."""
    cfg = tiny_cfg(federation={"clients": 4, "fraction": 0.3, "min_clients": 2})
    out = run_federation(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(r["clients"] == 2 and len(r["sites"]) == 2 for r in rows)
    assert all(set(r["sites"]) <= {0, 1, 2, 3} for r in rows)


def test_personalisation_reports_global_and_personal_accuracy_per_site(tmp_path, tiny_cfg):
    cfg = tiny_cfg(federation={"personalize_steps": 3, "rounds": 1})
    out = run_federation(cfg)
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["personalization"]
    assert [int(r["site"]) for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["global_accuracy"] <= 1 and 0 <= r["personal_accuracy"] <= 1
        assert r["held_out_rows"] > 0
    # fine-tuning on the site's own rows changes the adapter: some loss must move
    assert any(r["personal_loss"] != r["global_loss"] for r in rows)


def test_freeze_a_sends_only_b_and_aggregates_exactly(tmp_path, tiny_cfg):
    """freeze-a: A never trains or travels; the factor-averaging error is 0 up to float error,
    while plain factor averaging on the same federation shows a non-zero error."""
    runs = {}
    for mode in ("factors", "freeze-a"):
        cfg = load_config(
            None,
            [
                {
                    "model": {"name": "tiny-random"},
                    "federation": {"clients": 3, "rounds": 2},
                    "train": {"local_steps": 3, "lr": 0.01},
                    "data": {"eval_rows": 30},
                },
                {"lora": {"aggregation": mode}, "run": {"out": str(tmp_path / mode)}},
            ],
        )
        out = run_federation(cfg)  # in this process: what the modes compute
        runs[mode] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        runs[mode + "-adapter"] = adapter
    factors, frozen = runs["factors"][1:], runs["freeze-a"][1:]
    assert all(r["agg_error_max"] > 1e-6 for r in factors)
    assert all(r["agg_error_max"] < 1e-9 for r in frozen)
    # only B travels: per site, B's share of the adapter's floats
    a_b = {k: v.size for k, v in runs["factors-adapter"].items()}
    b_share = sum(v for k, v in a_b.items() if "lora_B" in k) / sum(a_b.values())
    assert frozen[0]["bytes_down"] == round(b_share * factors[0]["bytes_down"])
    # A in the saved freeze-a adapter is still the seeded initialisation: equal to a fresh one
    fresh = build_runtime(
        load_config(None, [{"model": {"name": "tiny-random"}, "federation": {"clients": 3}}])
    )
    init = {k: v for k, v in adapter_arrays(fresh.model).items() if "lora_A" in k}
    saved = runs["freeze-a-adapter"]
    for name, value in init.items():
        key = name.replace("base_model.model.", "base_model.model.", 1).replace(".default", "")
        np.testing.assert_array_equal(saved[key], value)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fednova"])
def test_svd_aggregation_runs_and_reports_truncation_error(tmp_path, tiny_cfg, strategy):
    cfg = tiny_cfg(
        {"strategy": {"name": strategy}, "lora": {"aggregation": "svd"}},
        train={"optimizer": "sgd", "lr": 0.5, "local_steps_spread": 0.5},
        federation={"rounds": 1},
    )
    out = run_federation(cfg)  # in this process: what the mode computes
    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= row["agg_error_mean"] <= row["agg_error_max"] < 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def matrix_refusal(strategy: str, mode: str, rule: str) -> str | None:
    """The reason a cell of the README's matrix is refused at config load (None: it runs)."""
    if mode == "svd" and rule == "partitioned":
        return "no slots"
    if (strategy, mode) == ("scaffold", "svd"):
        return "control variates"
    return None


@pytest.mark.parametrize("rule", ["zero-pad", "partitioned"])
@pytest.mark.parametrize("mode", ["factors", "freeze-a", "svd"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "scaffold", "fednova"])
def test_compatibility_matrix_cell(tmp_path, strategy, mode, rule):
    """The README's strategy x aggregation x rank-rule matrix: each cell runs, or is refused
    with a reason. Every cell has mixed ranks (sites of rank 1 and 2, global rank 2), which
    exercises the equal-rank path too (the rank-2 site). The sites run in this process (the
    same round loop and site code; the engine itself is what the other tests here run)."""
    from in_process import run_federation

    from fedlora.errors import FedloraError

    train = {"local_steps": 1} | ({} if strategy in ("fedavg", "fedprox") else SGD)
    overrides = [
        {
            "model": {"name": "tiny-random"},
            "federation": {"clients": 2, "rounds": 1},
            "data": {"eval_rows": 10},
            "train": train,
        },
        {
            "strategy": {"name": strategy},
            "lora": {"aggregation": mode, "r": 2, "site_ranks": "1,2", "rank_rule": rule},
            "run": {"out": str(tmp_path / "run")},
        },
    ]
    reason = matrix_refusal(strategy, mode, rule)
    if reason:
        with pytest.raises(FedloraError, match=reason):
            load_config(None, overrides)
        return
    out = run_federation(load_config(None, overrides))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["agg_error_max"] is not None
    if mode == "freeze-a":  # exact per slot under either rule
        assert rows[-1]["agg_error_max"] < 1e-6
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(v.shape[0 if "lora_A" in k else 1] == 2 for k, v in adapter.items())  # global r


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_cfg, monkeypatch):
    """The server state (adapter, SCAFFOLD's c, server momentum, rows) is saved after every
    round: a run that dies in round 2 and is resumed ends exactly where an uninterrupted run
    ends, with no round lost or repeated."""
    sections = {
        "strategy": {"name": "scaffold", "server_momentum": 0.5},
        "train": SGD,
        "federation": {"rounds": 3},
    }
    whole = run_federation(tiny_cfg(sections, run={"out": str(tmp_path / "whole")}))

    cfg = tiny_cfg(sections, run={"out": str(tmp_path / "cut")})
    real_round = Federation.run_round

    def dies_in_round_2(self, grid, nodes, round_):
        if round_ == 2:
            raise RuntimeError("server killed")
        return real_round(self, grid, nodes, round_)

    monkeypatch.setattr(Federation, "run_round", dies_in_round_2)
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(cfg)
    partial = tmp_path / "cut.partial"
    assert [r["round"] for r in metrics(partial)] == [0, 1]
    monkeypatch.setattr(Federation, "run_round", real_round)
    resumed = run_federation(cfg, resume=True)

    assert not (resumed / "state").exists()
    assert [r["round"] for r in metrics(resumed)] == [0, 1, 2, 3]
    for a, b in zip(metrics(whole), metrics(resumed), strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
        assert (a["train_loss"] is None) == (b["train_loss"] is None)
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    left = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    right = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    for k in left:
        np.testing.assert_allclose(left[k], right[k], rtol=1e-5, atol=1e-7)


def test_resume_without_saved_state_is_refused(tmp_path, tiny_cfg):
    from fedlora.errors import FedloraError

    with pytest.raises(FedloraError, match="Nothing to resume"):
        simulate(tiny_cfg(), log=quiet, resume=True)


def test_metrics_list_only_the_sites_that_contributed(tmp_path, tiny_cfg, monkeypatch):
    """A site that fails in a round is not among that round's `sites` in metrics.jsonl."""
    from fedlora.apps.collect import RoundInputs
    from fedlora.strategies.base import sum_contributions

    real = Federation.collect_plain

    def site_1_fails_in_round_1(self, grid, chosen, round_, progress) -> RoundInputs:
        inputs = real(self, grid, chosen, round_, progress)
        if round_ == 1:
            keep = [i for i, m in enumerate(inputs.metrics) if int(m[R.SITE_ID]) != 1]
            inputs.metrics = [inputs.metrics[i] for i in keep]
            inputs.contributions = [inputs.contributions[i] for i in keep]
            inputs.sums = sum_contributions(inputs.contributions)
            inputs.failures.append("site 1: lost")
        return inputs

    monkeypatch.setattr(Federation, "collect_plain", site_1_fails_in_round_1)
    out = run_federation(tiny_cfg(federation={"min_clients": 2}))
    rows = metrics(out)
    assert rows[1]["sites"] == [0, 2] and rows[1]["clients"] == 2
    assert rows[2]["sites"] == [0, 1, 2]
