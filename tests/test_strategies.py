"""Strategies checked against numbers worked out by hand from the papers' formulas.

Expected values are literals derived in the comments, never computed by the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedlora.strategies import (
    STRATEGIES,
    FedAvg,
    FedNova,
    FedProx,
    LocalWork,
    Scaffold,
    ServerOptimizer,
    Strategy,
    make_strategy,
    nova_a,
    sum_contributions,
)
from fedlora.strategies.base import Arrays


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def run_round(
    strategy: Strategy,
    deltas: list[Arrays],
    works: list[LocalWork],
    states: list[Arrays] | None = None,
) -> tuple[Arrays, list[Arrays], list[Arrays]]:
    """Both halves: each client's contribution, then the server sees only the sum."""
    states = states if states is not None else [{} for _ in deltas]
    bcast = strategy.broadcast()
    outs = [
        strategy.client_contribution(d, w, bcast, s)
        for d, w, s in zip(deltas, works, states, strict=True)
    ]
    contributions = [c for c, _ in outs]
    update = strategy.aggregate(sum_contributions(contributions), len(deltas))
    return update, contributions, [s for _, s in outs]


def assert_arrays(actual: Arrays, expected: dict[str, list[float]]) -> None:
    assert set(actual) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(actual[k], np.array(v), rtol=1e-6, atol=1e-7, err_msg=k)


# --- FedAvg ------------------------------------------------------------------------------------

# Three clients, n = (1, 2, 3), unequal steps (FedAvg must ignore them); sum n = 6.
FEDAVG_DELTAS = [
    {"lora_A": vec(1, 2, 3), "lora_B": vec(0, 1)},
    {"lora_A": vec(4, 0, -2), "lora_B": vec(2, 2)},
    {"lora_A": vec(1, 1, 1), "lora_B": vec(-1, 3)},
]
FEDAVG_WORK = [LocalWork(1, 2, 0.1), LocalWork(2, 7, 0.1), LocalWork(3, 1, 0.1)]
# sum n_i A_i = (1+8+3, 2+0+3, 3-4+3) = (12, 5, 2)   -> / 6 = (2, 5/6, 1/3)
# sum n_i B_i = (0+4-3, 1+4+9)     = (1, 14)         -> / 6 = (1/6, 7/3)
FEDAVG_EXPECTED = {"lora_A": [2.0, 5 / 6, 1 / 3], "lora_B": [1 / 6, 7 / 3]}


def test_fedavg_contribution_is_weighted_delta_and_weight() -> None:
    contribution, state = FedAvg(total_clients=3).client_contribution(
        FEDAVG_DELTAS[1], FEDAVG_WORK[1], {}, {}
    )
    # n_2 = 2: 2 * (4, 0, -2) = (8, 0, -4); 2 * (2, 2) = (4, 4)
    assert_arrays(
        contribution,
        {"delta/lora_A": [8, 0, -4], "delta/lora_B": [4, 4], "weight": [2]},
    )
    assert contribution["weight"].shape == (1,) and contribution["weight"].dtype == np.float64
    assert state == {}


def test_fedavg_pipeline_matches_hand_computed_weighted_mean() -> None:
    update, _, _ = run_round(FedAvg(total_clients=3), FEDAVG_DELTAS, FEDAVG_WORK)
    assert_arrays(update, FEDAVG_EXPECTED)
    assert all(v.dtype == np.float32 for v in update.values())


def test_fedavg_weights_only_participants() -> None:
    # Clients 1 and 3 of 10 take part: p = (1/4, 3/4), so lora_B = (0 - 3, 1 + 9) / 4.
    update, _, _ = run_round(
        FedAvg(total_clients=10),
        [FEDAVG_DELTAS[0], FEDAVG_DELTAS[2]],
        [FEDAVG_WORK[0], FEDAVG_WORK[2]],
    )
    # lora_A = (1 + 3, 2 + 3, 3 + 3) / 4 = (1, 1.25, 1.5)
    assert_arrays(update, {"lora_A": [1.0, 1.25, 1.5], "lora_B": [-0.75, 2.5]})


# --- FedProx -----------------------------------------------------------------------------------


def test_fedprox_training_terms_and_fedavg_aggregation() -> None:
    strategy = FedProx(total_clients=3, mu=0.01)
    terms = strategy.training_terms({}, {}, {"lora_A": vec(0, 0, 0)})
    assert terms.prox_mu == 0.01
    assert terms.grad_correction is None
    update, _, states = run_round(strategy, FEDAVG_DELTAS, FEDAVG_WORK)
    assert_arrays(update, FEDAVG_EXPECTED)
    assert states == [{}, {}, {}]


def test_fedavg_has_no_training_terms() -> None:
    terms = FedAvg(total_clients=1).training_terms({}, {}, {"w": vec(1)})
    assert terms.prox_mu == 0.0 and terms.grad_correction is None


def test_fedprox_validates_mu() -> None:
    with pytest.raises(ValueError, match="mu"):
        FedProx(total_clients=2, mu=-0.1)
    with pytest.warns(UserWarning, match="FedAvg"):
        FedProx(total_clients=2, mu=0.0)


# --- FedNova -----------------------------------------------------------------------------------


def test_fednova_unequal_steps_and_weights() -> None:
    # Client 1: n=1, tau=2, delta=(2, -4); client 2: n=3, tau=4, delta=(8, 4). Plain SGD: a_i=tau_i.
    deltas = [{"w": vec(2, -4)}, {"w": vec(8, 4)}]
    works = [LocalWork(1, 2, 0.1), LocalWork(3, 4, 0.05)]
    update, contributions, _ = run_round(FedNova(total_clients=2), deltas, works)
    # contributions: n_i delta_i / a_i = (1, -2) and (6, 3); n_i a_i = 2 and 12; n_i = 1 and 3
    assert_arrays(contributions[0], {"delta/w": [1, -2], "nova_a": [2], "weight": [1]})
    assert_arrays(contributions[1], {"delta/w": [6, 3], "nova_a": [12], "weight": [3]})
    # p = (1/4, 3/4); tau_eff = (1*2 + 3*4)/4 = 3.5
    # sum p_i delta_i / a_i = (1/4)(1, -2) + (3/4)(2, 1) = (1.75, 0.25)
    # Delta = 3.5 * (1.75, 0.25) = (6.125, 0.875)   [FedAvg would give (6.5, 2.0)]
    assert_arrays(update, {"w": [6.125, 0.875]})


def test_nova_a_closed_form_with_momentum() -> None:
    # tau=3, rho=0.5: (3 - 0.5 (1 - 0.125) / 0.5) / 0.5 = (3 - 0.875) / 0.5 = 4.25
    # (= per-gradient momentum weights (1 + .5 + .25) + (1 + .5) + 1)
    assert nova_a(3, 0.5) == pytest.approx(4.25)
    # tau=1, rho=0.5: (1 - 0.5 * 0.5 / 0.5) / 0.5 = 1
    assert nova_a(1, 0.5) == pytest.approx(1.0)
    assert nova_a(5) == 5.0


def test_nova_a_matches_simulated_momentum_sgd() -> None:
    # With a constant gradient g, tau heavy-ball steps move x by -eta * a * g.
    eta, g, rho, tau = 0.1, 2.0, 0.7, 6
    x, buf = 0.0, 0.0
    for _ in range(tau):
        buf = rho * buf + g
        x -= eta * buf
    assert nova_a(tau, rho) == pytest.approx(-x / (eta * g))


def test_fednova_pipeline_with_momentum() -> None:
    # Client 1: n=2, tau=3, rho=0.5 -> a=4.25, delta=(8.5, -4.25) -> delta/a = (2, -1)
    # Client 2: n=2, tau=1, rho=0.5 -> a=1,    delta=(1, 3)       -> delta/a = (1, 3)
    deltas = [{"w": vec(8.5, -4.25)}, {"w": vec(1, 3)}]
    works = [LocalWork(2, 3, 0.1, momentum=0.5), LocalWork(2, 1, 0.1, momentum=0.5)]
    update, contributions, _ = run_round(FedNova(total_clients=2), deltas, works)
    assert_arrays(contributions[0], {"delta/w": [4, -2], "nova_a": [8.5], "weight": [2]})
    # tau_eff = (2*4.25 + 2*1)/4 = 2.625; mean delta/a = (1.5, 1); Delta = (3.9375, 2.625)
    assert_arrays(update, {"w": [3.9375, 2.625]})


def test_fednova_with_equal_steps_equals_fedavg() -> None:
    rng = np.random.default_rng(0)
    deltas = [{"a": rng.normal(size=4).astype(np.float32)} for _ in range(3)]
    works = [LocalWork(n, 5, 0.1) for n in (1, 4, 7)]
    nova, _, _ = run_round(FedNova(total_clients=3), deltas, works)
    avg, _, _ = run_round(FedAvg(total_clients=3), deltas, works)
    np.testing.assert_allclose(nova["a"], avg["a"], rtol=1e-6)


def test_fednova_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        FedNova(total_clients=1).client_contribution({"w": vec(1)}, LocalWork(1, 0, 0.1), {}, {})


# --- SCAFFOLD ----------------------------------------------------------------------------------


def test_scaffold_two_rounds() -> None:
    strategy = Scaffold(total_clients=4)  # N = 4, only some clients take part each round
    params = {"w": vec(0, 0)}
    assert strategy.broadcast() == {}  # c is created lazily

    # Round 1, c = 0, c_i = 0: grad_correction = c - c_i = 0.
    terms = strategy.training_terms(strategy.broadcast(), {}, params)
    assert_arrays(terms.grad_correction or {}, {"w": [0, 0]})
    # Client 1: n=1, K=2, eta_l=0.5 (K eta_l = 1), delta=(-1, 2): c_1+ = -delta/1 = (1, -2)
    # Client 2: n=3, K=4, eta_l=0.5 (K eta_l = 2), delta=(2, 0):  c_2+ = -delta/2 = (-1, 0)
    update, contributions, states = run_round(
        strategy,
        [{"w": vec(-1, 2)}, {"w": vec(2, 0)}],
        [LocalWork(1, 2, 0.5), LocalWork(3, 4, 0.5)],
        [{}, {}],
    )
    assert_arrays(
        contributions[1], {"delta/w": [6, 0], "weight": [3], "dc/w": [-1, 0], "count": [1]}
    )
    assert_arrays(states[0], {"c_i/w": [1, -2]})
    assert_arrays(states[1], {"c_i/w": [-1, 0]})
    # Delta x = (1*(-1, 2) + 3*(2, 0)) / 4 = (1.25, 0.5)
    assert_arrays(update, {"w": [1.25, 0.5]})
    # c = 0 + (1/N) * ((1, -2) + (-1, 0)) = (0, -2)/4 = (0, -0.5)
    assert_arrays(strategy.broadcast(), {"c/w": [0, -0.5]})

    # Round 2: client 1 again (c_1 = (1, -2)) and client 3 (new, c_3 = 0).
    bcast = strategy.broadcast()
    t1 = strategy.training_terms(bcast, states[0], params)
    t3 = strategy.training_terms(bcast, {}, params)
    assert_arrays(t1.grad_correction or {}, {"w": [-1, 1.5]})  # (0,-0.5) - (1,-2)
    assert_arrays(t3.grad_correction or {}, {"w": [0, -0.5]})  # (0,-0.5) - 0
    # Client 1: n=1, K=1, eta_l=1, delta=(0.5, 0.5):
    #   c_1+ = (1,-2) - (0,-0.5) - (0.5,0.5) = (0.5, -2);  dc_1 = (-0.5, 0)
    # Client 3: n=2, K=2, eta_l=0.25 (K eta_l = 0.5), delta=(1, -1):
    #   c_3+ = 0 - (0,-0.5) - (2,-2) = (-2, 2.5);           dc_3 = (-2, 2.5)
    update, contributions, new_states = run_round(
        strategy,
        [{"w": vec(0.5, 0.5)}, {"w": vec(1, -1)}],
        [LocalWork(1, 1, 1.0), LocalWork(2, 2, 0.25)],
        [states[0], {}],
    )
    assert_arrays(new_states[0], {"c_i/w": [0.5, -2]})
    assert_arrays(new_states[1], {"c_i/w": [-2, 2.5]})
    assert_arrays(
        contributions[0], {"delta/w": [0.5, 0.5], "weight": [1], "dc/w": [-0.5, 0], "count": [1]}
    )
    # Delta x = (1*(0.5,0.5) + 2*(1,-1)) / 3 = (2.5, -1.5)/3 = (5/6, -0.5)
    assert_arrays(update, {"w": [5 / 6, -0.5]})
    # c = (0,-0.5) + (1/4)((-0.5,0) + (-2,2.5)) = (-0.625, 0.125)
    # (check: c = mean of all N c_i = ((0.5,-2) + (-1,0) + (-2,2.5) + 0)/4, as the paper keeps)
    assert_arrays(strategy.broadcast(), {"c/w": [-0.625, 0.125]})


def test_scaffold_equal_weights_is_papers_plain_mean() -> None:
    # With equal n_i the data-size weighted Delta x is the paper's 1/|S| sum: ((2,0)+(0,4))/2.
    update, _, _ = run_round(
        Scaffold(total_clients=2),
        [{"w": vec(2, 0)}, {"w": vec(0, 4)}],
        [LocalWork(5, 1, 0.1), LocalWork(5, 3, 0.1)],
    )
    assert_arrays(update, {"w": [1, 2]})


def test_scaffold_state_dict_round_trip() -> None:
    first = Scaffold(total_clients=4)
    assert first.state_dict() == {}
    sums = {"delta/w": vec(1, 1), "weight": vec(1), "dc/w": vec(4, -8), "count": vec(1)}
    first.aggregate(sums, 1)
    state = first.state_dict()
    assert_arrays(state, {"c/w": [1, -2]})  # (4, -8) / N
    second = Scaffold(total_clients=4)
    second.load_state_dict(state)
    assert_arrays(second.broadcast(), {"c/w": [1, -2]})
    first.aggregate(sums, 1)
    second.aggregate(sums, 1)
    assert_arrays(second.state_dict(), {"c/w": [2, -4]})
    np.testing.assert_array_equal(first.state_dict()["c/w"], second.state_dict()["c/w"])
    with pytest.raises(ValueError, match="unexpected"):
        second.load_state_dict({"m/w": vec(1, 1)})


def test_scaffold_rejects_mismatched_state_and_counts() -> None:
    strategy = Scaffold(total_clients=3)
    with pytest.raises(ValueError, match="missing"):
        strategy.client_contribution(
            {"w": vec(1, 1)}, LocalWork(1, 1, 0.1), {}, {"c_i/other": vec(0, 0)}
        )
    with pytest.raises(ValueError, match="shape"):
        strategy.training_terms({"c/w": vec(1, 2, 3)}, {}, {"w": vec(0, 0)})
    sums = {"delta/w": vec(1), "weight": vec(1), "dc/w": vec(1), "count": vec(2)}
    with pytest.raises(ValueError, match="count"):
        strategy.aggregate(sums, 1)
    with pytest.raises(ValueError, match="dc/"):
        strategy.aggregate({"delta/w": vec(1), "weight": vec(1), "count": vec(1)}, 1)


# --- stateless state dicts, factory --------------------------------------------------------------


@pytest.mark.parametrize("cls", [FedAvg, FedNova])
def test_stateless_state_dict(cls: type[Strategy]) -> None:
    strategy = cls(total_clients=2)
    assert strategy.state_dict() == {} and strategy.broadcast() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError, match="stateless"):
        strategy.load_state_dict({"c/w": vec(1)})


def test_make_strategy() -> None:
    assert STRATEGIES == ("fedavg", "fedprox", "scaffold", "fednova")
    kinds = {"fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold, "fednova": FedNova}
    for name in STRATEGIES:
        strategy = make_strategy(name, total_clients=3, mu=0.1 if name == "fedprox" else 0.0)
        assert type(strategy) is kinds[name] and strategy.name == name
    assert make_strategy("fedprox", total_clients=2, mu=0.5).mu == 0.5
    with pytest.raises(ValueError, match="fedavg, fedprox, scaffold, fednova"):
        make_strategy("fedsgd", total_clients=2)
    with pytest.warns(UserWarning, match="ignored"):
        make_strategy("fedavg", total_clients=2, mu=0.1)


# --- input validation --------------------------------------------------------------------------


def test_sum_contributions() -> None:
    total = sum_contributions(
        [{"a": vec(1, 2), "weight": vec(1)}, {"a": vec(3, 4), "weight": vec(2)}]
    )
    assert_arrays(total, {"a": [4, 6], "weight": [3]})
    assert total["a"].dtype == np.float64
    with pytest.raises(ValueError, match="missing"):
        sum_contributions([{"a": vec(1)}, {"b": vec(1)}])
    with pytest.raises(ValueError, match="shape"):
        sum_contributions([{"a": vec(1)}, {"a": vec(1, 2)}])
    with pytest.raises(ValueError, match="at least one"):
        sum_contributions([])


def test_aggregate_rejects_bad_sums() -> None:
    strategy = FedAvg(total_clients=2)
    good = {"delta/w": vec(1), "weight": vec(1)}
    with pytest.raises(ValueError, match="empty"):
        strategy.aggregate({}, 1)
    with pytest.raises(ValueError, match="num_contributors"):
        strategy.aggregate(good, 0)
    with pytest.raises(ValueError, match="exceeds"):
        strategy.aggregate(good, 3)
    with pytest.raises(ValueError, match="weight"):
        strategy.aggregate({"delta/w": vec(1)}, 1)
    with pytest.raises(ValueError, match="unexpected"):
        strategy.aggregate({**good, "nova_a": vec(1)}, 1)
    with pytest.raises(ValueError, match="> 0"):
        strategy.aggregate({"delta/w": vec(1), "weight": vec(0)}, 1)
    with pytest.raises(ValueError, match="delta"):
        strategy.client_contribution({}, LocalWork(1, 1, 0.1), {}, {})


def test_local_work_and_constructor_validation() -> None:
    with pytest.raises(ValueError, match="num_examples"):
        LocalWork(0, 1, 0.1)
    with pytest.raises(ValueError, match="lr"):
        LocalWork(1, 1, 0.0)
    with pytest.raises(ValueError, match="momentum"):
        LocalWork(1, 1, 0.1, momentum=1.0)
    with pytest.raises(ValueError, match="total_clients"):
        FedAvg(total_clients=0)


# --- server optimiser --------------------------------------------------------------------------


def test_server_optimizer_plain_is_x_plus_update() -> None:
    new = ServerOptimizer().step({"w": vec(1, 2)}, {"w": vec(0.5, -1)})
    assert_arrays(new, {"w": [1.5, 1]})
    assert new["w"].dtype == np.float32


def test_server_optimizer_momentum_two_steps_and_state() -> None:
    opt = ServerOptimizer(lr=2.0, momentum=0.5)
    # step 1: m = (1, -2); x = (1, 1) + 2 (1, -2) = (3, -3)
    x1 = opt.step({"w": vec(1, 1)}, {"w": vec(1, -2)})
    assert_arrays(x1, {"w": [3, -3]})
    state = opt.state_dict()
    assert_arrays(state, {"m/w": [1, -2]})
    # step 2: m = 0.5 (1, -2) + (2, 2) = (2.5, 1); x = (3, -3) + 2 (2.5, 1) = (8, -1)
    x2 = opt.step(x1, {"w": vec(2, 2)})
    assert_arrays(x2, {"w": [8, -1]})
    restored = ServerOptimizer(lr=2.0, momentum=0.5)
    restored.load_state_dict(state)
    assert_arrays(restored.step(x1, {"w": vec(2, 2)}), {"w": [8, -1]})


# Adaptive server optimisers (Reddi et al. 2021, Algorithm 2), lr 0.1, beta1 0.9, beta2 0.99,
# tau 0.05, from x = (1, 2) and m = v = 0.
# Round 1, Delta = (0.5, 1): m1 = 0.1 Delta = (0.05, 0.1), Delta^2 = (0.25, 1)
#   adam: v1 = 0.01 Delta^2 = (0.0025, 0.01); yogi: v1 = 0 - 0.01 Delta^2 sign(0 - Delta^2)
#   = (0.0025, 0.01); adagrad: v1 = Delta^2 = (0.25, 1).
#   x1 = x + 0.1 m1 / (sqrt(v1) + 0.05): adam/yogi (1 + 0.005/0.1, 2 + 0.01/0.15);
#   adagrad (1 + 0.005/0.55, 2 + 0.01/1.05).
# Round 2, Delta = (-1, 0.01): m2 = 0.9 m1 + 0.1 Delta = (-0.055, 0.091), Delta^2 = (1, 1e-4)
#   adam: v2 = 0.99 v1 + 0.01 Delta^2 = (0.012475, 0.009901)
#   yogi: v1 - Delta^2 = (-0.9975, 0.0099): signs (-1, +1), v2 = v1 -/+ 0.01 Delta^2
#   = (0.0125, 0.009999)
#   adagrad: v2 = v1 + Delta^2 = (1.25, 1.0001)
ADAPTIVE_X1 = {
    "adam": [1.05, 2 + 0.01 / 0.15],
    "yogi": [1.05, 2 + 0.01 / 0.15],
    "adagrad": [1 + 0.005 / 0.55, 2 + 0.01 / 1.05],
}
ADAPTIVE_V2 = {
    "adam": [0.012475, 0.009901],
    "yogi": [0.0125, 0.009999],
    "adagrad": [1.25, 1.0001],
}


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_adaptive_server_optimizer_two_steps_by_hand(kind: str) -> None:
    opt = ServerOptimizer(kind=kind, lr=0.1, beta1=0.9, beta2=0.99, tau=0.05)
    x1 = opt.step({"w": vec(1, 2)}, {"w": vec(0.5, 1)})
    assert_arrays(x1, {"w": ADAPTIVE_X1[kind]})
    x2 = opt.step(x1, {"w": vec(-1, 0.01)})
    v2 = ADAPTIVE_V2[kind]
    expected = [
        ADAPTIVE_X1[kind][i] + 0.1 * m / (v2[i] ** 0.5 + 0.05)
        for i, m in enumerate([-0.055, 0.091])
    ]
    assert_arrays(x2, {"w": expected})
    assert_arrays(opt.state_dict(), {"m/w": [-0.055, 0.091], "v/w": v2})


@pytest.mark.parametrize("kind", ["sgd", "adam", "yogi"])
def test_server_optimizer_state_survives_a_checkpoint(tmp_path, kind: str) -> None:
    """Two rounds, a save and a fresh optimiser from the file, a third round: the same as three
    uninterrupted rounds."""
    from fedlora import checkpoint

    settings = {"kind": kind, "lr": 0.1} | ({"momentum": 0.5} if kind == "sgd" else {})
    updates = [{"w": vec(0.5, 1)}, {"w": vec(-1, 0.01)}, {"w": vec(0.2, -0.3)}]
    straight, x = ServerOptimizer(**settings), {"w": vec(1, 2)}
    for u in updates:
        x = straight.step(x, u)
    first, y = ServerOptimizer(**settings), {"w": vec(1, 2)}
    for u in updates[:2]:
        y = first.step(y, u)
    ckpt = checkpoint.Checkpoint(2, {"global": y, "server_opt": first.state_dict()}, [], "f")
    checkpoint.save(tmp_path, ckpt)
    saved = checkpoint.load(tmp_path, "f")
    resumed = ServerOptimizer(**settings)
    resumed.load_state_dict(saved.arrays["server_opt"])
    assert set(saved.arrays["server_opt"]) == set(first.state_dict())
    np.testing.assert_array_equal(resumed.step(saved.arrays["global"], updates[2])["w"], x["w"])


def flower_replies(x: Arrays, deltas: list[Arrays], weights: list[int]) -> list:
    """What Flower's strategies aggregate: each site's new model x + Delta_i and its weight."""
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    replies = []
    for i, (delta, n) in enumerate(zip(deltas, weights, strict=True)):
        arrays = ArrayRecord({k: Array(np.asarray(x[k] + delta[k])) for k in x})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
        meta = Metadata(1, str(i), i + 1, 0, "m", "1", 0.0, 1e9, "train", 0, 0)
        replies.append(Message(content, metadata=meta))
    return replies


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_adaptive_server_optimizer_equals_flowers_fedopt(kind: str) -> None:
    """Flower's FedAdam / FedYogi / FedAdagrad on the same replies, three rounds. Flower's
    FedAdagrad fixes beta1 = 0; its FedAdam scales eta by sqrt(1 - beta2^(t+1)) /
    (1 - beta1^(t+1)) in round t, which we pass as that round's lr."""
    import flwr.serverapp.strategy as fl

    beta1 = 0.0 if kind == "adagrad" else 0.9
    hyper = {"eta": 0.1, "tau": 0.01} | ({} if kind == "adagrad" else {"beta_1": 0.9})
    hyper |= {} if kind == "adagrad" else {"beta_2": 0.99}
    flower = {"adam": fl.FedAdam, "yogi": fl.FedYogi, "adagrad": fl.FedAdagrad}[kind](**hyper)
    ours = ServerOptimizer(kind=kind, lr=0.1, beta1=beta1, beta2=0.99, tau=0.01)
    rng = np.random.default_rng(0)
    x_ours = x_flower = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": vec(0.5, -0.5)}
    weights = [1, 2, 3]
    for t in (1, 2, 3):
        deltas = [
            {k: rng.normal(scale=0.1, size=v.shape) for k, v in x_ours.items()} for _ in weights
        ]
        works = [LocalWork(n, 1, 0.1) for n in weights]
        update, _, _ = run_round(FedAvg(total_clients=3), deltas, works)
        if kind == "adam":
            ours.lr = 0.1 * np.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1))
        x_ours = ours.step(x_ours, update)
        flower.current_arrays = {k: v.copy() for k, v in x_flower.items()}
        new, _ = flower.aggregate_train(t, flower_replies(x_flower, deltas, weights))
        x_flower = {k: v.numpy() for k, v in new.items()}
        for k in x_ours:
            np.testing.assert_allclose(x_ours[k], x_flower[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert not np.allclose(x_ours["b"], [0.5, -0.5])  # the step moved the adapter


def test_server_optimizer_validation() -> None:
    with pytest.raises(ValueError, match="lr"):
        ServerOptimizer(lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer(momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer(momentum=-0.1)
    with pytest.raises(ValueError, match="missing"):
        ServerOptimizer().step({"w": vec(1)}, {"v": vec(1)})
    with pytest.raises(ValueError, match="unexpected"):
        ServerOptimizer().load_state_dict({"c/w": vec(1)})
    with pytest.raises(ValueError, match="beta1 instead"):
        ServerOptimizer(kind="adam", momentum=0.5)
    with pytest.raises(ValueError, match="one of"):
        ServerOptimizer(kind="rmsprop")
    with pytest.raises(ValueError, match="beta2"):
        ServerOptimizer(kind="yogi", beta2=1.0)
    with pytest.raises(ValueError, match="tau"):
        ServerOptimizer(kind="adagrad", tau=0.0)


def test_no_warnings_on_normal_use() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_strategy("fedprox", total_clients=2, mu=0.1)
        run_round(FedAvg(total_clients=3), FEDAVG_DELTAS, FEDAVG_WORK)


def test_scaffold_control_variate_with_momentum_divides_by_effective_steps():
    # tau = 3, rho = 0.5: a = (3 - 0.5 * (1 - 0.125) / 0.5) / 0.5 = 4.25 (FedNova's closed form).
    # c_i = 0, c = 0, delta = [-0.85], lr = 0.1: c_i+ = -(-0.85) / (4.25 * 0.1) = 2.0
    from fedlora.strategies.scaffold import updated_client_control

    out = updated_client_control(
        {"w": np.zeros(1)},
        {"w": np.zeros(1)},
        {"w": np.array([-0.85])},
        steps=3,
        lr=0.1,
        momentum=0.5,
    )
    np.testing.assert_allclose(out["w"], [2.0])
    # without momentum it is the paper's K: -(-0.85) / (3 * 0.1)
    out = updated_client_control(
        {"w": np.zeros(1)}, {"w": np.zeros(1)}, {"w": np.array([-0.85])}, steps=3, lr=0.1
    )
    np.testing.assert_allclose(out["w"], [0.85 / 0.3])
