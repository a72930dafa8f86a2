"""Site secrets: every random value that protects a site comes from a secret of at least 128
bits that the site drew from the OS CSPRNG (simulation: derived from run.seed, and said so);
nothing of it follows from what the server holds."""

from __future__ import annotations

import stat

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from in_process import run_federation

from fedlora.apps.contribution import STATE_DIR, site_secret
from fedlora.config import load_config
from fedlora.errors import FedloraError
from fedlora.privacy import secrets
from fedlora.privacy.secrets import SiteSecret, gaussian_like, simulated_secret


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_site_daemon_draws_its_secret_from_the_os_csprng_and_keeps_it(tmp_path, monkeypatch):
    drawn = []

    def urandom(n: int) -> bytes:
        drawn.append(n)
        return bytes(range(n))

    monkeypatch.setattr(secrets.os, "urandom", urandom)
    cfg = load_config(None, [{"run": {"seed": 7}}])
    daemon = context({STATE_DIR: str(tmp_path / "state"), "partition-id": 0})
    first = site_secret(cfg, daemon, tmp_path / "state")
    again = site_secret(cfg, daemon, tmp_path / "state")
    assert drawn == [32]  # 256 bits, once; afterwards read back from the state folder
    assert first == again and first.key == bytes(range(32))
    assert first.source == secrets.SITE_CSPRNG
    path = tmp_path / "state" / secrets.FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_bytes(b"short")
    with pytest.raises(FedloraError, match="damaged"):
        site_secret(cfg, daemon, tmp_path / "state")


def test_a_simulated_site_derives_its_secret_from_the_run_seed_and_says_so():
    cfg = load_config(None, [{"run": {"seed": 7}}])
    one, two = (site_secret(cfg, context({"partition-id": s}), None) for s in (0, 1))
    assert isinstance(one, SiteSecret) and one.source == secrets.SIMULATED
    assert len(one.key) * 8 >= 128 and one != two  # one secret per site
    assert one == simulated_secret(7, 0) != simulated_secret(8, 0)  # same seed, same run


def test_every_stream_is_keyed_by_the_whole_secret_never_a_small_seed():
    secret = simulated_secret(0, 3)
    key = secret.use_key(secrets.CLIENT_NOISE, 4, 3)
    assert len(key) * 8 == 256
    seq = secret.rng(secrets.CLIENT_NOISE, 4, 3).bit_generator.seed_seq
    assert seq.entropy == int.from_bytes(key, "little") and seq.entropy.bit_length() > 128
    draws = {
        (purpose, round_): secret.rng(purpose, round_, 3).random(4).tobytes()
        for purpose in (secrets.DPSGD_NOISE, secrets.DPSGD_BATCHES, secrets.CLIENT_NOISE)
        for round_ in (1, 2)
    }
    assert len(set(draws.values())) == len(draws)  # one independent stream per use
    assert (
        draws[(secrets.CLIENT_NOISE, 1)]
        == secret.rng(secrets.CLIENT_NOISE, 1, 3).random(4).tobytes()
    )
    # a secret differing only in its last byte (beyond any 32- or 64-bit prefix) gives
    # different streams: every bit of the secret is behind every draw
    other = SiteSecret(secret.key[:-1] + bytes([secret.key[-1] ^ 1]), secret.source)
    assert (
        other.rng(secrets.CLIENT_NOISE, 1, 3).random(4).tobytes()
        != draws[(secrets.CLIENT_NOISE, 1)]
    )
    with pytest.raises(ValueError, match="at least 16 bytes"):
        SiteSecret(b"\x01" * 4, secrets.SITE_CSPRNG)


def test_why_not_torch_generators_their_cpu_seed_keeps_32_bits():
    """The reason secrets.gaussian_like draws in numpy: a torch CPU generator seeded with s and
    with s + 2^32 gives the same numbers, so a torch-seeded noise is a 32-bit search."""
    a = torch.randn(4, generator=torch.Generator().manual_seed(5))
    b = torch.randn(4, generator=torch.Generator().manual_seed(5 + 2**32))
    assert torch.equal(a, b)
    ref = torch.zeros(50_000, dtype=torch.float32)
    noise = gaussian_like(ref, 2.0, simulated_secret(0, 0).rng(secrets.DPSGD_NOISE, 1, 0))
    assert noise.dtype == ref.dtype and noise.shape == ref.shape
    assert float(noise.std()) == pytest.approx(2.0, rel=0.02)
    assert abs(float(noise.mean())) < 4 * 2.0 / np.sqrt(ref.numel())


# --- self-selection (federation.participation = "poisson") -------------------------------------


def test_a_site_that_sits_out_sends_a_zero_of_the_same_layout_and_keeps_its_state():
    from fedlora.apps import records as R
    from fedlora.apps.contribution import self_selection
    from fedlora.apps.evidence import took_part

    cfg = load_config(
        None,
        [
            {
                "federation": {"participation": "poisson", "fraction": 0.5},
                "secure": {"enabled": True},
            }
        ],
    )
    contribution = {"delta/a": np.ones((2, 3)), "weight": np.array([1.0]), "count": np.array([1.0])}
    old, new = {"c_i/a": np.zeros((2, 3))}, {"c_i/a": np.ones((2, 3))}
    secret = simulated_secret(0, 0)
    coins = [secrets.coin(secret, r, 0, 0.5) for r in range(1, 41)]
    assert 10 < sum(coins) < 30  # a fair-ish coin, from the site's secret
    sums = {}
    for round_, takes_part in enumerate(coins[:6], start=1):
        sent, state = self_selection(cfg, secret, round_, 0, contribution, new, old)
        assert set(sent) == set(contribution) | {R.PARTICIPANT}
        assert all(sent[k].shape == v.shape for k, v in contribution.items())
        assert sent[R.PARTICIPANT][0] == float(takes_part)
        if takes_part:
            assert state is new and np.array_equal(sent["delta/a"], contribution["delta/a"])
        else:
            assert state is old and not any(np.any(v) for v in sent.values())
        sums = {k: sums.get(k, 0) + v for k, v in sent.items()}
    rest, participants = took_part(cfg, sums, [0])
    assert participants == sum(coins[:6]) and R.PARTICIPANT not in rest
    assert rest["weight"][0] == participants


def test_self_selected_sites_are_accounted_with_amplification_and_hidden_in_the_sum(
    tmp_path, tiny_cfg, capsys
):
    """Secure aggregation, distributed client-level noise, fraction 0.5: every site is asked and
    sends every round; the server learns how many took part (from the sum), not who; every site
    spends the amplified release (rate 0.5) of every round."""
    import json

    from fedlora.privacy.accounting import default_delta, epsilon

    sites, rounds = 3, 2

    def coins(seed: int) -> list[int]:
        return [
            sum(secrets.coin(simulated_secret(seed, s), r, s, 0.5) for s in range(sites))
            for r in range(1, rounds + 1)
        ]

    seed = next(s for s in range(100) if all(0 < c < sites for c in coins(s)))
    cfg = tiny_cfg(
        federation={"participation": "poisson", "fraction": 0.5, "rounds": rounds},
        privacy={"level": "client", "client_noise": "distributed", "noise_multiplier": 1.0},
        secure={"enabled": True},
        run={"seed": seed},
    )
    out = run_federation(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["sites"] for r in rows] == [[0, 1, 2]] * rounds  # everyone asked, everyone sent
    assert [r["clients"] for r in rows] == coins(seed)  # the count, from the secure sum
    assert all(r["train_loss"] is None for r in rows)  # under DP no loss leaves a site
    assert all(r["amplification"] == "poisson self-selection" for r in rows)
    expected = epsilon([(1.0, 0.5, 1)] * rounds, default_delta(sites))
    assert expected < epsilon([(1.0, 1.0, 1)] * rounds, default_delta(sites))
    for site in map(str, range(sites)):
        assert summary["privacy"]["sites"][site]["epsilon"] == pytest.approx(expected)
        assert summary["privacy"]["sites"][site]["sample_rate"] == 0.5
    assert summary["privacy"]["amplification"] == "poisson self-selection"
    assert "amplification: poisson self-selection" in capsys.readouterr().out


def test_a_site_trains_the_same_round_of_two_federations_from_other_batches(tiny_cfg, tmp_path):
    """A server runs two federations with the same config and adapter, one with site 3 and one
    without, and subtracts the two sums (each a secure sum; the server may start as many
    federations as it likes). Batches and LoRA dropout were seeded by run.seed, round and site,
    all the server's: every other site trained exactly the same in both, and the difference
    was site 3's update, to float precision (on the code before). They come from the site's
    secret now, which a site daemon draws for each federation."""
    from flwr.app import Message, MessageType
    from in_process import LocalGrid, task_identity
    from test_site_policy import global_adapter, round_content

    from fedlora import transport
    from fedlora.apps import records as R
    from fedlora.deploy import runconfig
    from fedlora.strategies.base import sum_contributions

    cfg = tiny_cfg(federation={"clients": 4}, lora={"dropout": 0.1})
    content = round_content(1, global_adapter(cfg))

    def updates(federation: str, sites: range) -> list[dict[str, np.ndarray]]:
        grid = LocalGrid(cfg, 4)
        for node in grid.contexts:  # as a site daemon runs (fedlora.deploy.apps)
            grid.contexts[node] = Context(
                run_id=1,
                node_id=node,
                node_config={
                    "partition-id": node - 100,
                    "num-partitions": 4,
                    STATE_DIR: str(tmp_path / f"site-{node}" / federation),
                },
                state=RecordDict(),
                run_config={runconfig.FEDERATION: federation},
            )
        with task_identity():
            msgs = [
                Message(content, dst_node_id=100 + s, message_type=MessageType.TRAIN) for s in sites
            ]
            replies = grid.pull_messages(grid.push_messages(msgs))
        return [transport.decode(R.from_record(r.content[R.CONTRIBUTION])) for r in replies]

    with_site_3 = updates("x", range(4))
    without = sum_contributions(updates("y", range(3)))
    difference = {k: v - without[k] for k, v in sum_contributions(with_site_3).items()}
    site_3 = with_site_3[3]
    keys = [k for k in site_3 if "lora" in k]
    error = np.sqrt(sum(np.sum((difference[k] - site_3[k]) ** 2) for k in keys))
    size = np.sqrt(sum(np.sum(site_3[k] ** 2) for k in keys))
    assert error > 0.2 * size, f"the difference of the sums is site 3's update ({error / size:.2g})"
