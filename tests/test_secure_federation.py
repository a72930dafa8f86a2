"""Secure aggregation inside whole federations: every strategy, the same numbers as in the
clear (within the fixed-point bound), and with differential privacy on top.

The federations run in this process (`in_process.run_federation`: the same round loop, site
code and secure protocol over Flower messages, without Ray), except the FedAvg pair, which runs
on the simulation engine like every `fedlora simulate`."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from in_process import run_federation
from safetensors.numpy import load_file

from fedlora.simulate import simulate

SGD = {"optimizer": "sgd", "lr": 0.5}
STRATEGIES = {
    "fedavg": {},
    "fedprox": {},
    "scaffold": {"train": SGD},
    "fednova": {"train": SGD | {"local_steps_spread": 0.5, "momentum": 0.9}},
}


def quiet(*_args, **_kwargs) -> None:
    pass


def adapter(folder):
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_secure_equals_plain(plain, secure) -> None:
    """Plaintext sites send float32 (relative error 2^-24), secure ones fixed point: 64 bits
    with 2^-29 steps at 3 sites here, or 32 bits with at least 24 fractional bits (the averaged
    update off by at most 2^-25 = 3e-8 per element and round; FixedPoint.choose). Both are far
    below the 1e-6 allowed here, and below anything training could amplify in two rounds. The
    secure run reports no aggregation error: per-site factors are not visible, and its train
    loss comes from the sites' summed statistics."""
    a, b = adapter(plain), adapter(secure)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6)
    for x, y in zip(rows(plain), rows(secure), strict=True):
        assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-5)
        if x["train_loss"] is not None:  # secure: the summed loss x rows over the summed rows
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
    assert rows(secure)[-1]["agg_error_mean"] is None
    before = None
    for x, y in zip(rows(plain)[1:], rows(secure)[1:], strict=True):  # where a round's time went
        assert "secagg_seconds" not in x
        stages = y["secagg_seconds"]
        # secure.pipeline: a round whose sites were all in the round before got its keys and
        # shares there; the first round, and one with another sample, set up their own
        pipelined = before is not None and set(y["sites"]) <= set(before)
        assert list(stages) == (
            ["mask", "unmask"] if pipelined else ["keys", "share", "mask", "unmask"]
        )
        assert 0 < sum(stages.values()) < y["seconds"]
        before = y["sites"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_secure_aggregation_matches_the_plaintext_federation(name, tmp_path, tiny_cfg):
    sections = {"strategy": {"name": name}} | STRATEGIES[name]

    def run(cfg):  # FedAvg's pair on the simulation engine, the others in this process
        return simulate(cfg, log=quiet) if name == "fedavg" else run_federation(cfg)

    plain = run(tiny_cfg(sections, run={"out": str(tmp_path / "plain")}))
    secure = run(
        tiny_cfg(sections, secure={"enabled": True}, run={"out": str(tmp_path / "secure")}),
    )
    assert_secure_equals_plain(plain, secure)
    assert json.loads((secure / "summary.json").read_text())["secure_aggregation"] is True


def test_a_sample_that_changes_sets_up_its_own_session(tmp_path, tiny_cfg):
    """Three of four sites a round: a round whose sample differs from the round before's runs
    all four stages (the next session is set up only among sites that are in this round), one
    with the same sample only two; the federation equals the plaintext one either way."""
    sections = {"federation": {"clients": 4, "fraction": 0.75, "rounds": 4}}
    # seed 2 samples sites 0-2 twice, then sites 1-3 twice
    plain = run_federation(tiny_cfg(sections, run={"out": str(tmp_path / "plain"), "seed": 2}))
    secure = run_federation(
        tiny_cfg(
            sections, secure={"enabled": True}, run={"out": str(tmp_path / "secure"), "seed": 2}
        ),
    )
    assert_secure_equals_plain(plain, secure)
    samples = [tuple(r["sites"]) for r in rows(secure)[1:]]
    assert len(set(samples)) > 1  # the seeded samples do change here
    assert any(a == b for a, b in itertools.pairwise(samples))  # and repeat once: both cases


def test_clipped_updates_travel_in_32_bits_and_match_the_plaintext_federation(tmp_path, tiny_cfg):
    """Client-level DP clips each site's update to norm C = 1, so its deltas travel in 32 bits
    (3 sites: f = 30 - ceil(log2(3 C)) = 28; weights and statistics stay in 64): the upload is
    about the plaintext float32 one, not twice it, and the result equals the plaintext
    federation's within the fixed-point error (the central noise is drawn alike in both runs:
    its seed is the run seed)."""
    sections = {"privacy": {"level": "client"}}
    plain = run_federation(tiny_cfg(sections, run={"out": str(tmp_path / "plain")}))
    secure = run_federation(
        tiny_cfg(sections, secure={"enabled": True}, run={"out": str(tmp_path / "secure")}),
    )
    assert_secure_equals_plain(plain, secure)
    for x, y in zip(rows(plain)[1:], rows(secure)[1:], strict=True):
        # keys, shares (this round's or, pipelined, the next one's) and the layout's key names
        # add ~7 KB to the ~25 KB here; in 64 bits the deltas alone would double it
        assert x["bytes_up"] < y["bytes_up"] < 1.5 * x["bytes_up"]


def test_distributed_client_noise_under_secure_aggregation(tmp_path, tiny_cfg):
    """Client-level DP with the noise split across the sites: runs, reports the federation's
    epsilon, and the noise makes the result differ from the noiseless one."""
    base = {"privacy": {"level": "client", "client_noise": "distributed", "max_grad_norm": 0.5}}
    noisy = run_federation(
        tiny_cfg(base, secure={"enabled": True}, run={"out": str(tmp_path / "noisy")})
    )
    summary = json.loads((noisy / "summary.json").read_text())
    assert summary["privacy"]["client_noise"] == "distributed"
    assert 0 < summary["privacy"]["max_epsilon"] < float("inf")
    quiet_cfg = tiny_cfg(
        {"privacy": base["privacy"] | {"noise_multiplier": 0.0}},
        secure={"enabled": True},
        run={"out": str(tmp_path / "quiet")},
    )
    noiseless = run_federation(quiet_cfg)
    a, b = adapter(noisy), adapter(noiseless)
    assert any(not np.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.parametrize("privacy", ["none", "client"])
def test_freeze_a_composes_with_secure_aggregation(privacy, tmp_path, tiny_cfg):
    """freeze-a sends only B: still a plain sum, so it runs under secure aggregation (and with
    client-level DP on top)."""
    cfg = tiny_cfg(
        {"lora": {"aggregation": "freeze-a"}, "federation": {"rounds": 1}},
        secure={"enabled": True},
        privacy={"level": privacy},
    )
    out = run_federation(cfg)
    last = rows(out)[-1]
    assert last["clients"] == cfg.federation.clients and last["agg_error_mean"] is None


@pytest.mark.parametrize(("rule", "name"), [("zero-pad", "fednova"), ("partitioned", "scaffold")])
def test_rank_rules_under_secure_aggregation_match_the_plaintext_federation(
    rule, name, tmp_path, tiny_cfg
):
    """Sites of ranks 1, 2 and 4: both rank rules are sums (partitioned adds the per-slot
    weights; SCAFFOLD's c and FedNova's tau_eff per slot ride on them), so the secure run equals
    the plaintext one within the fixed-point rounding, as for equal ranks above."""
    lora = {"lora": {"r": 4, "site_ranks": "1,2,4", "rank_rule": rule}}
    sections = {"strategy": {"name": name}} | STRATEGIES[name] | lora
    plain = run_federation(tiny_cfg(sections, run={"out": str(tmp_path / "plain")}))
    secure = run_federation(
        tiny_cfg(sections, secure={"enabled": True}, run={"out": str(tmp_path / "secure")}),
    )
    assert_secure_equals_plain(plain, secure)
    assert rows(plain)[-1]["agg_error_max"] is not None
