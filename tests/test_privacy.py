"""Differential privacy: accounting against opacus and published values, DP-SGD against plain
training, the noise really there at the stated scale, client-level clipping and noise, budgets,
and what a private run reports."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from in_process import run_federation

from fedlora.adapter import adapter_arrays, adapter_parameters, load_adapter_arrays
from fedlora.config import DataConfig, TrainConfig, load_config
from fedlora.data import load_dataset
from fedlora.errors import FedloraError
from fedlora.privacy import dpsgd
from fedlora.privacy.accounting import default_delta, epsilon, noise_for_epsilon
from fedlora.privacy.client_level import add_gaussian, clip_scale, private_keys, site_noise_std
from fedlora.privacy.dpsgd import DPSGD, cap_units, count_units, privacy_units
from fedlora.privacy.policy import (
    Mechanism,
    client_mechanism,
    describe_site_noise,
    sample_mechanism,
    step_noise,
)
from fedlora.privacy.secrets import simulated_secret
from fedlora.runtime import build_runtime
from fedlora.strategies import make_strategy
from fedlora.strategies.base import C_I, DC, DELTA, LocalWork, TrainingTerms
from fedlora.train import Encoded, local_train


def quiet(*_args, **_kwargs) -> None:
    pass


# --- accounting ---------------------------------------------------------------------------------


def test_epsilon_matches_opacus_accountant_stepped_one_step_at_a_time():
    from opacus.accountants import PRVAccountant, RDPAccountant

    ledger = [(1.1, 0.02, 30), (1.1, 0.02, 30), (0.9, 0.05, 12)]
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        reference = cls()
        for sigma, q, steps in ledger:
            for _ in range(steps):
                reference.step(noise_multiplier=sigma, sample_rate=q)
        assert epsilon(ledger, 1e-5, name) == pytest.approx(
            reference.get_epsilon(delta=1e-5), rel=1e-6 if name == "rdp" else 2e-2
        )


def test_epsilon_against_published_values():
    # opacus's own published accountant test: sigma 1.5, q 0.04, 90 epochs, delta 1e-5
    assert epsilon([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.32911117143, rel=1e-9)
    # Abadi et al. 2016, Sec. 3.1: sigma 4, q 0.01, T 10000, delta 1e-5 -> (1.26, 1e-5) with the
    # moments accountant; RDP is the same analysis with all orders, so at most that (and not far)
    value = epsilon([(4.0, 0.01, 10_000)], 1e-5)
    assert 0.9 < value <= 1.26


def test_edge_cases_and_noise_for_a_target():
    assert epsilon([], 1e-5) == 0.0
    assert math.isinf(epsilon([(0.0, 0.1, 5)], 1e-5))
    sigma = noise_for_epsilon(8.0, 1e-5, 0.04, 2250)
    assert epsilon([(sigma, 0.04, 2250)], 1e-5) == pytest.approx(8.0, abs=0.05)
    assert default_delta(500) == pytest.approx(1 / 5000) and default_delta(500) < 1 / 500


def test_one_round_without_amplification_costs_2_55_at_noise_1_and_delta_1_60():
    """Client level with a server-chosen sample: no sampling amplification (rate 1). One
    Gaussian release at sigma 1: RDP eps(alpha) = alpha / (2 sigma^2), converted at delta as
    opacus does, minimised over opacus's orders, is 2.55 (the rate-0.5 figure is 1.71)."""
    from opacus.accountants import RDPAccountant

    alphas = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    delta = 1 / 60
    by_hand = np.min(
        alphas / 2 - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    )
    reference = RDPAccountant()
    reference.step(noise_multiplier=1.0, sample_rate=1.0)
    assert by_hand == pytest.approx(2.55, abs=0.005)
    assert epsilon([(1.0, 1.0, 1)], delta) == pytest.approx(by_hand, rel=1e-9)
    assert reference.get_epsilon(delta=delta) == pytest.approx(by_hand, rel=1e-9)

    def mechanism(participation: str) -> Mechanism:
        return client_mechanism(
            load_config(
                None,
                [
                    {
                        "federation": {
                            "clients": 10,
                            "fraction": 0.5,
                            "participation": participation,
                        },
                        "privacy": {"level": "client", "noise_multiplier": 1.0, "delta": delta},
                        "secure": {"enabled": True},
                    }
                ],
            )
        )

    server, poisson = mechanism("server"), mechanism("poisson")
    assert server.sample_rate == 1.0 and poisson.sample_rate == 0.5
    assert epsilon([(server.noise_multiplier, server.sample_rate, 1)], delta) == pytest.approx(
        by_hand
    )
    assert epsilon([(poisson.noise_multiplier, poisson.sample_rate, 1)], delta) < 2.0


# --- DP-SGD at a site ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_cfg_at):
    # q/v: enough coordinates for the noise statistics below
    cfg = tiny_cfg_at(tmp_path_factory.mktemp("dp"), lora={"dropout": 0.0, "targets": "qv"})
    rt = build_runtime(cfg, log=quiet)
    return rt, rt.site_rows(0)[:12], adapter_arrays(rt.model)


def train_once(site, steps, cfg, dp, seed=0):
    rt, rows, start = site
    load_adapter_arrays(rt.model, start)
    local_train(
        rt.model, rows, steps, cfg, TrainingTerms(), np.random.default_rng(seed), rt.pad_id, dp=dp
    )
    after = adapter_arrays(rt.model)
    return {k: after[k] - start[k] for k in start}


SGD = TrainConfig(optimizer="sgd", lr=0.5, batch_size=12, max_grad_norm=0.0)


def make_dp(sigma: float, clip: float, q: float, secret_seed: int = 1, **sizes: int) -> DPSGD:
    """DP-SGD for round 1 of site 0, keyed by a simulated secret (`sizes`: physical_batch_size,
    max_rows_per_unit)."""
    secret = simulated_secret(secret_seed, 0)
    return DPSGD.for_round(sigma, clip, q, secret=secret, round_=1, site=0, **sizes)


def test_dpsgd_without_noise_or_clipping_equals_plain_training(site):
    """Guards against silently corrupted LoRA updates under DP (a known opacus+peft failure):
    sigma 0, no effective clipping, every row in every batch (q = 1) must be plain SGD."""
    plain = train_once(site, 3, SGD, None)
    private = train_once(site, 3, SGD, make_dp(0.0, 1e9, 1.0))
    assert any(np.abs(v).max() > 1e-4 for v in plain.values())
    for k in plain:
        np.testing.assert_allclose(private[k], plain[k], rtol=1e-4, atol=1e-7)


def test_dpsgd_noise_is_there_at_the_stated_scale(site):
    """One step, q = 1, clip C: the noisy update minus the noiseless one is
    -lr * N(0, (sigma C)^2) / B per coordinate."""
    sigma, clip, batch = 2.0, 0.05, 12
    quiet_step = train_once(site, 1, SGD, make_dp(0.0, clip, 1.0))
    noisy_step = train_once(site, 1, SGD, make_dp(sigma, clip, 1.0))
    diff = np.concatenate([(noisy_step[k] - quiet_step[k]).ravel() for k in quiet_step])
    expected = SGD.lr * sigma * clip / batch
    assert diff.size > 3000
    assert diff.std() == pytest.approx(expected, rel=0.05)
    assert abs(diff.mean()) < 4 * expected / math.sqrt(diff.size)
    # and clipping really bounds the data term: every example's gradient norm is at most C
    data_norm = math.sqrt(sum(float((v**2).sum()) for v in quiet_step.values()))
    assert data_norm <= SGD.lr * clip * (1 + 1e-5)


def test_dpsgd_under_freeze_a_noises_all_of_b_and_leaves_a(tmp_path, tiny_cfg_at):
    """The WordNet recipe trains B alone (`lora.aggregation = "freeze-a"`): every B coordinate
    gets the stated noise -lr * N(0, (sigma C)^2) / B, and A, frozen, is exactly its start."""
    lora = {"dropout": 0.0, "targets": "qv", "aggregation": "freeze-a"}
    rt = build_runtime(tiny_cfg_at(tmp_path, lora=lora), log=quiet)
    frozen = {n: p.detach().clone() for n, p in rt.model.named_parameters() if "lora_A" in n}
    one_site = (rt, rt.site_rows(0)[:12], adapter_arrays(rt.model))
    sigma, clip, batch = 2.0, 0.05, 12
    quiet_step = train_once(one_site, 1, SGD, make_dp(0.0, clip, 1.0))
    noisy_step = train_once(one_site, 1, SGD, make_dp(sigma, clip, 1.0))
    assert frozen and quiet_step and all("lora_B" in k for k in quiet_step)
    diff = np.concatenate([(noisy_step[k] - quiet_step[k]).ravel() for k in quiet_step])
    assert diff.size > 1500
    assert diff.std() == pytest.approx(SGD.lr * sigma * clip / batch, rel=0.05)
    for name, param in rt.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name])


def test_loraplus_ratio_scales_b_alone_through_dpsgd(site):
    """train.loraplus_ratio (LoRA+ through peft's parameter groups) holds under opacus. Without
    noise (from a non-zero B, so that A has a gradient) a ratio-4 step is the ratio-1 step with
    B's part times 4 and A's unchanged; with noise, A's step carries lr * N(0, (sigma C)^2) / B
    and B's 4 times that."""
    from dataclasses import replace

    rt, rows, start = site
    rng = np.random.default_rng(0)
    moved = {
        k: v + (0.1 * rng.standard_normal(v.shape) if "lora_B" in k else 0)
        for k, v in start.items()
    }
    from_b = (rt, rows, {k: v.astype(np.float32) for k, v in moved.items()})
    ratio4 = replace(SGD, loraplus_ratio=4.0)
    one = train_once(from_b, 1, SGD, make_dp(0.0, 0.05, 1.0))
    four = train_once(from_b, 1, ratio4, make_dp(0.0, 0.05, 1.0))
    for k, step in one.items():
        assert np.abs(step).max() > 0, k
        scale = 4.0 if "lora_B" in k else 1.0
        np.testing.assert_allclose(four[k], scale * step, rtol=1e-4, atol=1e-7, err_msg=k)
    sigma, clip, batch = 2.0, 0.05, len(rows)
    noisy = train_once(from_b, 1, ratio4, make_dp(sigma, clip, 1.0))
    for factor, scale in (("lora_A", 1.0), ("lora_B", 4.0)):
        diff = np.concatenate([(noisy[k] - four[k]).ravel() for k in four if factor in k])
        assert diff.size > 1000
        assert diff.std() == pytest.approx(scale * SGD.lr * sigma * clip / batch, rel=0.05)


def test_dpsgd_clips_each_example_as_a_full_forward_would(site):
    """opacus's per-example gradients flow through the sliced output layer (logits at the loss
    positions only): one noiseless step with a binding clip C equals -lr/B times the sum of each
    example's gradient, clipped to C, each taken here from a full Hugging Face forward."""
    import torch
    import torch.nn.functional as F

    from fedlora.adapter import adapter_parameters

    rt, rows, start = site
    clip = 0.02
    step = train_once(site, 1, SGD, make_dp(0.0, clip, 1.0))
    load_adapter_arrays(rt.model, start)
    params = adapter_parameters(rt.model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for row in rows:
        logits = rt.model(input_ids=torch.tensor([row.input_ids])).logits[0].float()
        n = len(row.input_ids)
        target = torch.tensor(row.input_ids[row.n_prompt : n])
        loss = F.cross_entropy(logits[row.n_prompt - 1 : n - 1], target)
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        norms.append(norm)
        for (name, _), g in zip(params.items(), grads, strict=True):
            total[name] += g * min(1.0, clip / (norm + 1e-6))
    assert min(norms) > clip  # the clip binds for every example
    for name, value in total.items():
        expected = -SGD.lr * value.numpy() / len(rows)
        np.testing.assert_allclose(step[name], expected, rtol=1e-3, atol=1e-8)


def test_dpsgd_batches_and_noise_come_from_the_site_secret_not_the_public_seed(site):
    """The server knows run.seed and so the public stream `local_train` gets; DP-SGD's Poisson
    batches and its noise must not follow from it (they did: batches came from that stream)."""

    def same(a, b):
        return all(np.array_equal(a[k], b[k]) for k in a)

    # sigma 0, q 0.5: only the batches are random
    batches_a = train_once(site, 2, SGD, make_dp(0.0, 1.0, 0.5, secret_seed=1), seed=0)
    public_b = train_once(site, 2, SGD, make_dp(0.0, 1.0, 0.5, secret_seed=1), seed=99)
    secret_b = train_once(site, 2, SGD, make_dp(0.0, 1.0, 0.5, secret_seed=2), seed=0)
    assert same(batches_a, public_b)  # the public seed does not choose the batches
    assert not same(batches_a, secret_b)  # the secret does
    # q 1 (every row in every batch): only the noise is random
    noise_a = train_once(site, 1, SGD, make_dp(1.0, 1.0, 1.0, secret_seed=1))
    assert same(noise_a, train_once(site, 1, SGD, make_dp(1.0, 1.0, 1.0, secret_seed=1)))
    assert not same(noise_a, train_once(site, 1, SGD, make_dp(1.0, 1.0, 1.0, secret_seed=2)))


def test_dpsgd_leaves_the_model_clean_for_plain_use(site):
    rt, rows, _ = site
    train_once(site, 1, SGD, make_dp(1.0, 1.0, 0.5, secret_seed=3))
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in rt.model.parameters()
    )
    assert not rt.model._forward_hooks  # opacus's hooks are gone
    train_once(site, 1, SGD, None)  # and plain training still works


# --- large logical batches and privacy units ------------------------------------------------------


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        CountingSGD.steps += 1
        return super().step(closure)


def train_rows(site, rows, steps, dp, seed=0, optimizer=None):
    """Like train_once, on the given rows; also the optimiser used."""
    rt, _, start = site
    load_adapter_arrays(rt.model, start)
    params = list(adapter_parameters(rt.model).values())
    opt = optimizer or torch.optim.SGD(params, lr=SGD.lr)
    local_train(
        rt.model,
        rows,
        steps,
        SGD,
        TrainingTerms(),
        np.random.default_rng(seed),
        rt.pad_id,
        optimizer=opt,
        dp=dp,
    )
    after = adapter_arrays(rt.model)
    return {k: after[k] - start[k] for k in start}


def test_a_logical_batch_in_physical_pieces_is_one_step_and_changes_nothing_else(site, monkeypatch):
    """q = 1 over 12 rows in pieces of 5: opacus's BatchMemoryManager runs 3 forward passes per
    logical batch, the optimiser steps once per logical batch, and without noise or clipping
    the result is still plain SGD; with noise and Poisson batches, splitting changes nothing."""
    rt, rows, _ = site
    plain = train_once(site, 3, SGD, None)
    passes = []
    original = dpsgd.PrivateSteps.close

    def close(self):
        passes.append(self.physical_batches)
        original(self)

    monkeypatch.setattr(dpsgd.PrivateSteps, "close", close)
    CountingSGD.steps = 0
    opt = CountingSGD(list(adapter_parameters(rt.model).values()), lr=SGD.lr)
    split = train_rows(
        site, rows, 3, make_dp(0.0, 1e9, 1.0, secret_seed=1, physical_batch_size=5), optimizer=opt
    )
    assert CountingSGD.steps == 3 and passes == [9]
    for k in plain:
        np.testing.assert_allclose(split[k], plain[k], rtol=1e-4, atol=1e-7)
    # the accountant counts the same logical steps the optimiser took
    cfg = load_config(None, [{"privacy": {"level": "sample"}, "train": {"batch_size": 12}}])
    mech = sample_mechanism(cfg, len(rows), 3)
    assert mech.steps_per_round == 3 and mech.sample_rate == 1.0
    # Poisson batches, some empty (pure noise) and some split, give the same adapter as unsplit
    # (the draws come from the site secret's batch stream, as they will in training)
    stream = make_dp(1.0, 0.05, 0.15, secret_seed=7).batches
    draws = [len(b) for b in dpsgd.PoissonBatches(12, 0.15, 20, stream)]
    assert 0 in draws and max(draws) > 2
    noisy = {b: make_dp(1.0, 0.05, 0.15, secret_seed=7, physical_batch_size=b) for b in (2, 64)}
    whole, pieces = (train_rows(site, rows, 20, noisy[b], seed=4) for b in (64, 2))
    assert passes[-2] == sum(n > 0 for n in draws)
    assert passes[-1] == sum(math.ceil(n / 2) for n in draws)
    for k in whole:
        np.testing.assert_allclose(pieces[k], whole[k], rtol=1e-4, atol=1e-7)


def summed_clipped_gradient(site, rows, clip, physical=32):
    """sigma 0, q = 1, one SGD step: the step is -lr * (sum of clipped unit gradients) / units."""
    delta = train_rows(
        site, rows, 1, make_dp(0.0, clip, 1.0, secret_seed=1, physical_batch_size=physical)
    )
    n_units = count_units(rows)
    return np.concatenate([-v.ravel() * n_units / SGD.lr for v in delta.values()])


def test_a_units_contribution_is_bounded_by_the_clip_however_many_rows_it_has(site):
    """Neighbouring sites differ by one patient with k notes. At unit level the sums of clipped
    gradients differ by at most the clip C for every k; at row level by about k C."""
    _, rows, _ = site
    clip = 1e-4  # below every row's gradient norm: every unit is clipped
    other = replace(rows[1], unit="b")
    without = summed_clipped_gradient(site, [other], clip)
    for k in (1, 10):
        patient = [replace(rows[0], unit="a")] * k
        with_unit = summed_clipped_gradient(site, [*patient, other], clip)
        assert np.linalg.norm(with_unit - without) <= clip * (1 + 1e-3)
        one_unit_a_pass = summed_clipped_gradient(site, [*patient, other], clip, physical=1)
        np.testing.assert_allclose(one_unit_a_pass, with_unit, rtol=1e-4, atol=1e-9)
        as_rows = [replace(r, unit="") for r in patient]
        with_rows = summed_clipped_gradient(site, [*as_rows, replace(other, unit="")], clip)
        assert np.linalg.norm(with_rows - without) == pytest.approx(k * clip, rel=1e-3)


def test_units_are_counted_capped_and_accounted_per_unit():
    rows = [Encoded([1], 0, 0, u) for u in ["p1", "p2", "p1", "", "p1", "p3", ""]]
    assert privacy_units(rows) == [[0, 2, 4], [1], [3], [5], [6]]
    assert count_units(rows) == 5
    assert cap_units(privacy_units(rows), 2) == ([[0, 2], [1], [3], [5], [6]], 1)
    cfg = load_config(None, [{"privacy": {"level": "sample", "unit": "patient_id"}}])
    mech = sample_mechanism(cfg, count_units(rows), 4)
    assert mech.sample_rate == 1.0  # batch 8 of 5 units
    big = sample_mechanism(cfg, 400, 4)  # 400 patients, however many notes
    assert big.sample_rate == pytest.approx(8 / 400) and big.delta == default_delta(400)


def test_a_unit_over_the_cap_trains_on_its_first_rows_with_a_warning(site):
    _, rows, _ = site
    patient = [replace(r, unit="a") for r in rows[:5]]
    with pytest.warns(UserWarning, match="2 rows of units with more than"):
        capped = train_rows(
            site, patient, 1, make_dp(0.0, 1e9, 1.0, secret_seed=1, max_rows_per_unit=3)
        )
    first = train_rows(site, patient[:3], 1, make_dp(0.0, 1e9, 1.0, secret_seed=1))
    for k in first:
        np.testing.assert_allclose(capped[k], first[k], rtol=1e-5, atol=1e-8)


def test_a_missing_unit_column_is_named_at_load(tmp_path):
    path = tmp_path / "notes.jsonl"
    lines = [{"text": str(i), "label": "xy"[i % 2], "patient_id": f"p{i % 3}"} for i in range(6)]
    del lines[1]["patient_id"]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(FedloraError, match=r"notes.jsonl, row 2 has no 'patient_id' column"):
        load_dataset(DataConfig(path=str(path)), seed=0, unit="patient_id")
    lines[1]["patient_id"] = "p1"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    ds = load_dataset(DataConfig(path=str(path)), seed=0, unit="patient_id")
    assert {e.unit for e in ds.train + ds.test} == {"p0", "p1", "p2"}


def test_step_noise_is_lr_sigma_clip_over_the_expected_batch_by_hand():
    def cfg(**train):
        privacy = {"level": "sample", "noise_multiplier": 0.8, "max_grad_norm": 1.0}
        return load_config(None, [{"privacy": privacy, "train": {"batch_size": 8, **train}}])

    plain = cfg(lr=0.5, optimizer="sgd")
    assert step_noise(plain, sample_mechanism(plain, 1000, 6), 1000) == pytest.approx(0.05)
    # a site with 4 units takes all 4 each step: B = 4, not 8
    assert step_noise(plain, sample_mechanism(plain, 4, 6), 4) == pytest.approx(0.1)
    loraplus = cfg(lr=0.5, optimizer="sgd", loraplus_ratio=4.0)  # B trains at 4 x lr
    assert step_noise(loraplus, sample_mechanism(loraplus, 1000, 6), 1000) == pytest.approx(0.2)
    # the header line: each site's own figure, and the warning only past the collapse
    line = describe_site_noise(plain, [(1000, 6), (4, 6)])
    assert "noise multiplier 0.8 " in line and "0.05 to 0.1 " in line and "collapsed" in line
    assert "collapsed" not in describe_site_noise(plain, [(1000, 6), (2000, 6)])
    assert "use SGD" in describe_site_noise(cfg(lr=0.5, optimizer="adamw"), [(1000, 6)])
    # with a target epsilon, sigma is the one each site's accountant will use
    eps = load_config(None, [{"privacy": {"level": "sample", "target_epsilon": 8.0}}])
    sigma = noise_for_epsilon(8.0, default_delta(500), 8 / 500, 6 * eps.federation.rounds, "rdp")
    assert f"noise multiplier {sigma:.3g} for epsilon 8 per site" in describe_site_noise(
        eps, [(500, 6)]
    )


# --- client level -------------------------------------------------------------------------------


def test_clip_scale_by_hand():
    c = {"delta/a": np.array([3.0, 0.0]), "delta/b": np.array([4.0]), "weight": np.array([1.0])}
    keys = private_keys(c, (DELTA,))
    assert keys == ["delta/a", "delta/b"]  # the public weight is not clipped
    assert clip_scale(c, keys, 10.0) == 1.0
    assert clip_scale(c, keys, 1.0) == pytest.approx(1 / 5)


def test_central_and_distributed_noise_have_the_stated_variance():
    rng = np.random.default_rng(0)
    zeros = {"delta/a": np.zeros(200_000), "weight": np.array([1.0])}
    central = add_gaussian(zeros, ["delta/a"], 0.5 * 2.0, rng)
    assert central["delta/a"].std() == pytest.approx(1.0, rel=0.01)
    assert central["weight"][0] == 1.0
    # distributed: m = 5 surviving sites of threshold t = 3 each add sigma C / sqrt(t)
    std = site_noise_std(0.5, 2.0, 3)
    total = sum(add_gaussian(zeros, ["delta/a"], std, rng)["delta/a"] for _ in range(5))
    assert total.var() == pytest.approx((0.5 * 2.0) ** 2 * 5 / 3, rel=0.02)  # >= (sigma C)^2


def test_scaffold_clipping_keeps_the_client_variate_consistent():
    strategy = make_strategy("scaffold", total_clients=3)
    delta = {"w": np.array([1.0, -2.0])}
    old = {C_I + "w": np.array([0.5, 0.5])}
    work = LocalWork(num_examples=1, steps=2, lr=0.1)
    contribution, state = strategy.client_contribution(delta, work, {}, old)
    scaled, new_state = strategy.scale_private(contribution, state, old, 0.25)
    assert set(strategy.private_prefixes) == {DELTA, DC}
    np.testing.assert_allclose(scaled[DELTA + "w"], 0.25 * contribution[DELTA + "w"])
    np.testing.assert_allclose(scaled[DC + "w"], 0.25 * contribution[DC + "w"])
    # c_i+ = c_i + (what was sent): the server's c accounts for exactly this
    np.testing.assert_allclose(new_state[C_I + "w"], old[C_I + "w"] + scaled[DC + "w"], rtol=1e-6)


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy": {"level": "client", "client_noise": "distributed"}}, "secure.enabled"),
        ({"privacy": {"level": "client"}, "lora": {"aggregation": "svd"}}, "svd"),
        ({"secure": {"enabled": True}, "lora": {"aggregation": "svd"}}, "svd"),
        ({"privacy": {"max_epsilon": 4.0}}, "--privacy"),
        ({"privacy": {"level": "sample"}, "federation": {"personalize_steps": 3}}, "personalize"),
        ({"secure": {"enabled": True}, "federation": {"personalize_steps": 3}}, "in the clear"),
        ({"privacy": {"level": "sample", "noise_multiplier": 0, "max_epsilon": 2}}, "infinite"),
        ({"privacy": {"unit": "patient_id"}}, "--privacy sample"),
        ({"privacy": {"level": "client", "unit": "patient_id"}}, "privacy.unit"),
        ({"privacy": {"level": "sample", "unit": " "}}, "privacy.unit is empty"),
        ({"privacy": {"max_rows_per_unit": 0}}, "max_rows_per_unit"),
        ({"privacy": {"physical_batch_size": 0}}, "physical_batch_size"),
        ({"federation": {"participation": "poisson"}}, "secure.enabled"),
        ({"federation": {"participation": "everyone"}}, "server, poisson"),
    ],
)
def test_meaningless_combinations_are_refused(overrides, message):
    with pytest.raises(FedloraError, match=message):
        load_config(None, [overrides])


# --- whole runs ---------------------------------------------------------------------------------


def test_report_lets_anyone_recompute_each_sites_epsilon(tmp_path, tiny_cfg):
    from opacus.accountants import RDPAccountant

    cfg = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.2})
    said: list[str] = []
    out = run_federation(cfg, log=said.append)
    assert [m for m in said if m.startswith("DP-SGD: noise multiplier 1.2 ")], said
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["privacy"]["level"] == "sample"
    for site, spend in summary["privacy"]["sites"].items():
        assert set(spend) >= {
            "epsilon",
            "delta",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "max_grad_norm",
            "level",
        }
        assert spend["delta"] < 1 / len(cfg.federation.clients * [0]) or spend["delta"] < 1
        accountant = RDPAccountant()
        for _ in range(int(spend["steps"])):
            accountant.step(
                noise_multiplier=spend["noise_multiplier"], sample_rate=spend["sample_rate"]
            )
        assert accountant.get_epsilon(delta=spend["delta"]) == pytest.approx(spend["epsilon"])
        assert int(spend["steps"]) == cfg.federation.rounds * cfg.train.local_steps, site
    assert rows[-1]["epsilon_max"] == pytest.approx(summary["privacy"]["max_epsilon"])
    assert rows[1]["epsilon_max"] < rows[2]["epsilon_max"]  # spending accumulates


def test_server_chosen_sample_every_sites_epsilon_is_current_and_unamplified(
    tmp_path, tiny_cfg, capsys
):
    """fraction 0.5 of 3 sites: the server picks 2 per round from run.seed. Each site spends one
    unamplified release (rate 1) per round it was picked, and summary.json holds that for every
    site (a site left out of the last round used to keep a stale, amplified row)."""
    cfg = tiny_cfg(
        federation={"fraction": 0.5, "rounds": 3},
        privacy={"level": "client", "noise_multiplier": 1.0},
    )
    lines: list[str] = []
    out = run_federation(cfg, log=lines.append)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    privacy = summary["privacy"]
    delta = default_delta(cfg.federation.clients)
    picked = {s: sum(s in r["sites"] for r in rows[1:]) for s in range(cfg.federation.clients)}
    assert sorted(picked.values()) != [3, 3, 3]  # some site sat a round out
    for site, times in picked.items():
        assert privacy["sites"][str(site)]["epsilon"] == pytest.approx(
            epsilon([(1.0, 1.0, 1)] * times, delta)
        ), site
    assert privacy["max_epsilon"] == pytest.approx(
        max(s["epsilon"] for s in privacy["sites"].values())
    )
    assert privacy["amplification"] == "none (server-chosen sample)"
    assert all(r["amplification"] == "none (server-chosen sample)" for r in rows)
    assert "amplification: none (server-chosen sample)" in capsys.readouterr().out
    assert summary["secrets"] == "derived from run.seed (simulation)"
    assert any("derived from run.seed (simulation)" in line for line in lines)


def test_sites_stop_at_their_budget_and_the_run_says_so(tmp_path, tiny_cfg):
    cfg = tiny_cfg(
        privacy={"level": "sample", "noise_multiplier": 1.0, "max_epsilon": 0.95},
        federation={"rounds": 4},
    )
    out = run_federation(cfg)  # round 1 spends ~0.91 per site; round 2 would pass 0.95
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert "Stopped after round 1 of 4" in summary["stopped"]
    assert summary["privacy"]["exhausted"] == [0, 1, 2]
    assert summary["privacy"]["max_epsilon"] <= 0.95


STRATEGY_SECTIONS = {
    "fedavg": {},
    "fedprox": {},
    "scaffold": {"train": {"optimizer": "sgd", "lr": 0.5}},
    "fednova": {"train": {"optimizer": "sgd", "lr": 0.5, "local_steps_spread": 0.5}},
}


#: every strategy under a privacy level, and each level under two strategies (sample-level
#: FedAvg runs in many other tests; the full cross product cost four more simulations in CI)
STRATEGY_LEVELS = [("fedprox", "sample"), ("fednova", "sample"), ("fedavg", "client")]
STRATEGY_LEVELS += [("scaffold", "client")]


@pytest.mark.parametrize(("name", "level"), STRATEGY_LEVELS)
def test_every_strategy_runs_under_a_privacy_level(name, level, tmp_path, tiny_cfg):
    cfg = tiny_cfg(
        {"strategy": {"name": name}, "federation": {"rounds": 1}},
        STRATEGY_SECTIONS[name],
        privacy={"level": level, "noise_multiplier": 0.8},
    )
    out = run_federation(cfg)  # in this process: what the combination computes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["level"] == level
    assert len(summary["privacy"]["sites"]) == cfg.federation.clients
    assert 0 < summary["privacy"]["max_epsilon"] < math.inf
    if level == "client":  # one release of the sum; every site reports the same federation spend
        spends = {json.dumps(s, sort_keys=True) for s in summary["privacy"]["sites"].values()}
        assert len(spends) == 1


def test_a_federation_accounts_each_site_per_patient(tmp_path, tiny_cfg):
    """privacy.unit = "patient_id": every site's sampling rate and delta count its patients."""
    from fedlora.runtime import load_data

    path = tmp_path / "notes.jsonl"
    notes = [
        {
            "text": f"note {i} on a case",
            "label": ["good", "bad", "unsure"][i % 3],
            "patient_id": i % 9,
        }
        for i in range(72)
    ]
    path.write_text("\n".join(json.dumps(r) for r in notes) + "\n")
    cfg = tiny_cfg(
        data={"path": str(path), "partition": "iid"},
        federation={"rounds": 1},
        privacy={"level": "sample", "noise_multiplier": 1.0, "unit": "patient_id"},
        train={"batch_size": 4},
    )
    out = run_federation(cfg)
    spends = json.loads((out / "summary.json").read_text())["privacy"]["sites"]
    dataset, train_parts, _ = load_data(cfg, log=quiet)
    for site, part in enumerate(train_parts):
        patients = {dataset.train[i].unit for i in part}
        assert len(patients) < len(part)  # several notes per patient at every site
        assert spends[str(site)]["sample_rate"] == pytest.approx(4 / len(patients))
        assert spends[str(site)]["delta"] == pytest.approx(default_delta(len(patients)))
