"""Heterogeneous ranks: per-slot aggregation computed by hand for three sites of ranks 1, 2
and 3, the factor-averaging error per slot, the svd path through stacked factors, config
validation, and what a lower-rank site actually sends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.aggregation import _svd_dense, _svd_stacked, aggregate_svd
from fedlora.lora_math import factor_averaging_error, products, refactorize, refactorize_stacked
from fedlora.strategies import LocalWork, RankSlots, ServerOptimizer, make_strategy
from fedlora.strategies.base import SLOT_WEIGHT, sum_contributions
from fedlora.strategies.slots import restrict_to_rank

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
RANKS, ROWS = (1, 2, 3), (2, 1, 1)  # site i has rank RANKS[i] and ROWS[i] rows


def site_delta(i: int) -> dict[str, np.ndarray]:
    """Site i (1-based) changes every entry by i; a site of rank r may only send slots < r."""
    return {A: np.full((3, 2), float(i)), B: np.full((2, 3), float(i))}


def works(steps=(1, 1, 1)) -> list[LocalWork]:
    return [
        LocalWork(num_examples=n, steps=s, lr=1.0, rank=r)
        for n, s, r in zip(ROWS, steps, RANKS, strict=True)
    ]


def run(name: str, partitioned: bool, steps=(1, 1, 1)):
    slots = RankSlots.of(list(RANKS), 3) if partitioned else None
    mu = 0.01 if name == "fedprox" else 0.0  # the proximal term acts in training, not here
    strategy = make_strategy(name, total_clients=3, mu=mu, slots=slots)
    sent = [
        strategy.client_contribution(site_delta(i + 1), w, {}, {})[0]
        for i, w in enumerate(works(steps))
    ]
    return strategy, sent, strategy.aggregate(sum_contributions(sent), 3)


def per_slot(update) -> tuple[list[float], list[float]]:
    """The value each slot moved by (every entry of a slot moves alike here)."""
    a, b = update[A], update[B]
    assert np.allclose(a, a[:, :1]) and np.allclose(b, b[:1, :])
    return a[:, 0].tolist(), b[0].tolist()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold"])
def test_weighted_mean_per_slot_by_hand(name):
    # sum n = 4. zero-pad: slot 0 (all) (2*1 + 1*2 + 1*3)/4 = 1.75, slot 1 (sites 2, 3)
    # (2 + 3)/4 = 1.25, slot 2 (site 3) 3/4 = 0.75. partitioned: the same sums over the
    # holders' rows: 7/4 = 1.75, 5/2 = 2.5, 3/1 = 3.
    _, sent, zero_pad = run(name, partitioned=False)
    assert per_slot(zero_pad) == (pytest.approx([1.75, 1.25, 0.75]),) * 2
    assert all(SLOT_WEIGHT not in c for c in sent)
    _, sent, partitioned = run(name, partitioned=True)
    assert per_slot(partitioned) == (pytest.approx([1.75, 2.5, 3.0]),) * 2
    assert [c[SLOT_WEIGHT].tolist() for c in sent] == [[2, 0, 0], [1, 1, 0], [1, 1, 1]]
    # a site sends nothing beyond its rank: site 1 (rank 1) only A[0], B[:, 0]
    assert np.count_nonzero(sent[0]["delta/" + A]) == 2
    assert np.count_nonzero(sent[0]["delta/" + B]) == 2


def test_fednova_per_slot_by_hand():
    # a_i = steps = 1, 2, 4; sent n_i delta_i / a_i = 2, 1, 0.75 and n_i a_i = 2, 2, 4.
    # zero-pad: tau_eff = 8/4 = 2; slots: 2 * (2+1+0.75)/4 = 1.875, 2 * 1.75/4 = 0.875,
    # 2 * 0.75/4 = 0.375. partitioned: slot 0 as zero-pad; slot 1 tau = 6/2 = 3, 3 * 1.75/2
    # = 2.625; slot 2 (site 3 alone) its own delta, 3.
    _, _, zero_pad = run("fednova", False, steps=(1, 2, 4))
    assert per_slot(zero_pad) == (pytest.approx([1.875, 0.875, 0.375]),) * 2
    _, _, partitioned = run("fednova", True, steps=(1, 2, 4))
    assert per_slot(partitioned) == (pytest.approx([1.875, 2.625, 3.0]),) * 2


def test_scaffold_control_variates_per_slot_by_hand():
    # lr 1, one step, c = c_i = 0: c_i+ = -delta_i on the slots a site holds, 0 elsewhere.
    # zero-pad: c <- sum dc / N (N = 3): slots -6/3, -5/3, -3/3. partitioned: per slot over
    # the federation's holders N_j = 3, 2, 1: -2, -2.5, -3.
    strategy, sent, _ = run("scaffold", partitioned=False)
    c = strategy.broadcast()
    assert c["c/" + A][:, 0] == pytest.approx([-2, -5 / 3, -1])
    strategy, _, _ = run("scaffold", partitioned=True)
    c = strategy.broadcast()
    assert c["c/" + A][:, 0] == pytest.approx([-2.0, -2.5, -3.0])
    # round 2 with c != 0: the rank-1 site's new c_i is 0 beyond slot 0 (its gradient there is
    # exactly 0), not option II's c_i - c
    _, state = strategy.client_contribution(site_delta(1), works()[0], c, {})
    assert np.all(state["c_i/" + A][1:] == 0) and np.all(state["c_i/" + B][:, 1:] == 0)
    assert np.all(state["c_i/" + A][0] != 0)


def test_slot_weights_with_equal_ranks_are_plain_fedavg():
    """partitioned with every site at the global rank is exactly the scalar-weight mean."""
    full = RankSlots.of([3, 3, 3], 3)
    strategy = make_strategy("fedavg", total_clients=3, slots=full)
    plain = make_strategy("fedavg", total_clients=3)
    work = [LocalWork(num_examples=n, steps=1, lr=1.0) for n in ROWS]
    deltas = [site_delta(i + 1) for i in range(3)]
    got = strategy.aggregate(
        sum_contributions(
            [
                strategy.client_contribution(d, w, {}, {})[0]
                for d, w in zip(deltas, work, strict=True)
            ]
        ),
        3,
    )
    want = plain.aggregate(
        sum_contributions(
            [plain.client_contribution(d, w, {}, {})[0] for d, w in zip(deltas, work, strict=True)]
        ),
        3,
    )
    for k in want:
        np.testing.assert_allclose(got[k], want[k])


def test_restrict_to_rank_keeps_the_leading_slice():
    arrays = {"delta/" + A: np.ones((3, 2)), "c_i/" + B: np.ones((2, 3)), "weight": np.ones(1)}
    out = restrict_to_rank(arrays, 2)
    assert out["delta/" + A].tolist() == [[1, 1], [1, 1], [0, 0]]
    assert out["c_i/" + B].tolist() == [[1, 1, 0], [1, 1, 0]]
    assert out["weight"].tolist() == [1]


# --- the factor-averaging error per slot ---------------------------------------------------------


def adapter(a, b):
    return {A: np.array(a, dtype=float), B: np.array(b, dtype=float)}


def test_partitioned_factor_error_by_hand():
    # rank 2, scalars per slot. Site 1 holds slot 0 (weights 1, 0): its slot 1 never counts.
    # Site 2 holds both (1, 1). p = [[.5, 0], [.5, 1]].
    # reference: slot 0 .5*1*1 + .5*3*3 = 5, slot 1 2*1 = 2 -> 7
    # produced: slot 0 (.5*1 + .5*3)(.5*1 + .5*3) = 4, slot 1 2*1 = 2 -> 6; error 1/7
    sites = [adapter([[1], [5]], [[1, 7]]), adapter([[3], [1]], [[3, 2]])]
    mean, worst = factor_averaging_error(sites, [np.array([1.0, 0.0]), np.array([1.0, 1.0])])
    assert math.isclose(mean, 1 / 7, rel_tol=1e-12) and math.isclose(worst, mean)
    # a shared A (freeze-a) is exact per slot too
    shared = [adapter([[1], [2]], [[1, 7]]), adapter([[1], [2]], [[3, 2]])]
    assert factor_averaging_error(shared, [np.array([1.0, 0.0]), np.ones(2)])[1] < 1e-15
    # equal per-slot weights are the scalar weights
    assert factor_averaging_error(sites, [np.ones(2), np.ones(2)]) == pytest.approx(
        factor_averaging_error(sites, [1.0, 1.0])
    )


# --- svd: stacked factors, mixed ranks -----------------------------------------------------------


@pytest.mark.parametrize("k", [4, 40])  # K = 12 stacked columns: the QR path, then the dense one
def test_refactorize_stacked_equals_the_dense_svd(k):
    rng = np.random.default_rng(1)
    left, right = rng.normal(size=(30, 12)), rng.normal(size=(12, k))
    a, b, err = refactorize_stacked(left, right, 3)
    a0, b0, err0 = refactorize(left @ right, 3)
    np.testing.assert_allclose(b @ a, b0 @ a0, atol=1e-10)
    assert err == pytest.approx(err0, rel=1e-10)


def random_adapter(rng, rank=3, d=6, k=5):
    return {A: rng.normal(size=(rank, k)), B: rng.normal(size=(d, rank))}


@pytest.mark.parametrize("name", ["fedavg", "fednova"])
def test_svd_with_mixed_ranks_is_the_truncated_mean_product(name):
    """Each site's update is the product of its leading slice minus that of the global
    slice; the stacked path equals the dense one and the truncated SVD of the hand formula."""
    rng = np.random.default_rng(2)
    strategy = make_strategy(name, total_clients=3)
    x = random_adapter(rng)
    ws = works(steps=(1, 2, 4))
    ys = [restrict_to_rank(random_adapter(rng), r) for r in RANKS]  # what each site ran
    deltas = [
        {k: restrict_to_rank({k: y[k] - x[k]}, r)[k] for k in x}
        for y, r in zip(ys, RANKS, strict=True)
    ]
    sent = [strategy.client_contribution(d, w, {}, {})[0] for d, w in zip(deltas, ws, strict=True)]
    new, err_mean, err_max = aggregate_svd(strategy, ServerOptimizer(lr=0.7), x, sent, ws, 3)
    locals_ = [{k: x[k] + d[k] for k in x} for d in deltas]
    dense, errors = _svd_dense(strategy, ServerOptimizer(lr=0.7), x, locals_, ws, 3)
    stacked, _ = _svd_stacked(strategy, 0.7, x, locals_, ws, 3)
    for got in (new, stacked):
        np.testing.assert_allclose(products(got)["m"], products(dense)["m"], atol=1e-5)
    assert err_max == pytest.approx(max(errors), rel=1e-4)
    # by hand: FedAvg weights p_i = n_i / 4; FedNova tau_eff / a_i * n_i / 4 (tau_eff = 2)
    p = np.array(ROWS) / 4 if name == "fedavg" else 2 * np.array(ROWS) / np.array([1, 2, 4]) / 4
    target = products(x)["m"] + 0.7 * sum(
        pi * (products(loc, r)["m"] - products(x, r)["m"])
        for pi, loc, r in zip(p, locals_, RANKS, strict=True)
    )
    a, b, _ = refactorize(target, 3)
    np.testing.assert_allclose(products(new)["m"], b @ a, atol=1e-5)
    assert 0 <= err_mean <= err_max


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"site_ranks": "4,8,16"}, "set lora.r = 16"),
        ({"site_ranks": "2,4", "r": 8}, "set lora.r = 4"),
        ({"site_ranks": "1,2,2,2", "r": 2}, "4 ranks for 3 sites"),
        ({"site_ranks": "0,2", "r": 2}, ">= 1"),
        ({"site_ranks": "two", "r": 2}, "not a list of ranks"),
        (
            {"site_ranks": "1,2", "r": 2, "aggregation": "svd", "rank_rule": "partitioned"},
            "no slots",
        ),
    ],
)
def test_rank_settings_refused_with_a_reason(lora, reason):
    from fedlora.config import load_config
    from fedlora.errors import FedloraError

    with pytest.raises(FedloraError, match=reason):
        load_config(None, [{"federation": {"clients": 3}, "lora": lora}])


def test_rank_settings_accepted_and_cycled():
    from fedlora.config import load_config, parse_override

    cfg = load_config(None, [parse_override("lora.site_ranks=4,8,16"), {"lora": {"r": 16}}])
    assert cfg.lora.all_site_ranks(5) == [4, 8, 16, 4, 8]
    assert load_config(None, [{"lora": {"site_ranks": [2, 4], "r": 4}}]).lora.site_ranks == "2,4"
    assert load_config(None, [parse_override("lora.site_ranks=8")]).lora.all_site_ranks(2) == [8, 8]
    # scaffold with either rule, svd with zero-padding, freeze-a: all meaningful, all accepted
    for extra in (
        {"lora": {"rank_rule": "partitioned"}, "strategy": {"name": "scaffold"}},
        {"lora": {"aggregation": "svd"}},
        {"lora": {"aggregation": "freeze-a", "rank_rule": "partitioned"}},
    ):
        load_config(
            None,
            [{"lora": {"site_ranks": "1,2", "r": 2}, "train": {"optimizer": "sgd"}}, extra],
        )


# --- what a lower-rank site sends ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["factors", "freeze-a"])
def test_a_lower_rank_site_trains_and_sends_its_leading_slice(
    mode, tmp_path, tiny_cfg, monkeypatch
):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.adapter import adapter_arrays, lora_arrays
    from fedlora.apps import records as R
    from fedlora.apps.client import train_reply
    from fedlora.runtime import get_runtime

    for field in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
    lora = {"r": 4, "site_ranks": "1,4", "rank_rule": "partitioned", "aggregation": mode}
    cfg = tiny_cfg(lora=lora)
    rt = get_runtime(cfg)
    before = lora_arrays(rt.model)
    global_arrays = {k: v + 0.01 for k, v in adapter_arrays(rt.model).items()}
    content = RecordDict(
        {
            R.GLOBAL_ADAPTER: R.to_record(global_arrays),
            R.BROADCAST: R.to_record({}),
            R.ROUND_CONFIG: ConfigRecord({R.ROUND: 1}),
        }
    )
    msg = Message(content, dst_node_id=101, message_type=MessageType.TRAIN)
    context = Context(
        run_id=1,
        node_id=101,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    reply = train_reply(cfg, msg, context)
    sent = R.from_record(reply.content[R.CONTRIBUTION])
    assert int(reply.content[R.SITE_METRICS][R.RANK]) == 1
    assert sent[SLOT_WEIGHT].tolist() == [sent["weight"][0], 0, 0, 0]
    moved = False
    for key, value in sent.items():
        if "lora_A" in key:
            assert not value[1:].any(), key
            moved |= bool(value[0].any())
        elif "lora_B" in key:
            assert not value[:, 1:].any(), key
            moved |= bool(value[:, 0].any())
    assert moved  # it trained its slice
    # the shared frozen A (freeze-a) is back as it was for the worker's next site
    after = lora_arrays(rt.model)
    for k, v in before.items():
        if k not in global_arrays:
            np.testing.assert_array_equal(after[k], v)


@pytest.mark.parametrize(("level", "rule"), [("sample", "zero-pad"), ("client", "partitioned")])
def test_mixed_ranks_under_differential_privacy(level, rule, tiny_cfg):
    """Sites of ranks 1 and 2 under DP-SGD (noise beyond a site's rank is dropped with the
    rest of those slots) and under client-level DP (the per-slot weights are public counts)."""
    import json

    from in_process import run_federation

    cfg = tiny_cfg(
        lora={"r": 2, "site_ranks": "1,2", "rank_rule": rule},
        privacy={"level": level},
        federation={"rounds": 1},
    )
    out = run_federation(cfg)  # in this process: what the combination computes
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["clients"] == 3 and 0 < last["epsilon_max"] < float("inf")
    assert last["agg_error_max"] is not None
