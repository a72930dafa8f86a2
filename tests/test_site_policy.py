"""A site's policy holds against the server: refusals before training, one contribution per
round, minimum cohorts, noise split over the site's own session, nothing per site in the clear
under secure aggregation, and SCAFFOLD's c_i in step with the server after a failed masking;
all of it also when a site daemon trains in a background thread from the keys stage on.

The secure rounds here run in one process: `LocalGrid` hands each message straight to the
sites' ClientApp (the code a site daemon and a simulation run) and records everything the
server receives."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from in_process import LocalGrid

from fedlora.apps import records as R
from fedlora.apps.secure import BackgroundTraining, NextRound, SecureRoundFailed, secure_sum
from fedlora.apps.site_state import RoundsTaken, SiteStore
from fedlora.errors import FedloraError
from fedlora.privacy.client_level import add_gaussian, site_noise_std
from fedlora.privacy.site_policy import PolicyRefused, SitePolicy, load_policy
from fedlora.secure.secagg import SecAggClient, SecAggError, SecAggServer, ValueOutOfRange
from fedlora.strategies.base import C_I


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps new messages with the current task's identity; give the test one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def round_content(round_: int, arrays: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict(
        {
            R.GLOBAL_ADAPTER: R.to_record(arrays),
            R.BROADCAST: R.to_record({}),
            R.ROUND_CONFIG: ConfigRecord({R.ROUND: round_}),
        }
    )


def global_adapter(cfg) -> dict[str, np.ndarray]:
    """Round 1's global adapter: the one every party builds from run.seed."""
    from fedlora.runtime import get_runtime

    return get_runtime(cfg).initial_adapter


def next_content(cfg, before) -> RecordDict:
    """The training content an honest server sends after the secure round `before`: the
    adapter and broadcast made of its sum, with the evidence to check them by."""
    from fedlora.apps.evidence import replay

    adapter, broadcast, server_state = replay(cfg, before.evidence)
    content = round_content(before.evidence.round_ + 1, adapter)
    content[R.BROADCAST] = R.to_record(broadcast)
    if server_state:
        content[R.SERVER_STATE] = R.to_record(server_state)
    before.evidence.attach(content)
    return content


def run_secure(grid: LocalGrid, cfg, round_: int, threshold: int = 2, content=None, **options):
    """A secure round of every site of `grid`; `options`: secure_sum's (upcoming, prepared)."""
    nodes = {i: 100 + i for i in range(len(grid.contexts))}
    content = content or round_content(round_, global_adapter(cfg))
    return secure_sum(grid, nodes, content, threshold, lambda _: 0, **options)


# --- the policy itself (pure) -------------------------------------------------------------------


def test_policy_refuses_what_the_site_does_not_accept(tiny_cfg):
    policy = SitePolicy(require_secure_aggregation=True, max_epsilon=8.0)
    plain = tiny_cfg(privacy={"level": "sample"})
    with pytest.raises(PolicyRefused, match="secure aggregation required"):
        policy.check_request(plain, secure=False)
    policy.check_request(plain, secure=True)
    with pytest.raises(PolicyRefused, match="differential privacy required"):
        policy.check_request(tiny_cfg(), secure=True)
    narrow = SitePolicy(
        strategies=("fedavg",), aggregations=("factors",), privacy_levels=("client",)
    )
    with pytest.raises(PolicyRefused, match="strategy .fedprox."):
        narrow.check_request(
            tiny_cfg(strategy={"name": "fedprox"}, privacy={"level": "client"}), secure=False
        )
    with pytest.raises(PolicyRefused, match="privacy level 'sample'"):
        narrow.check_request(plain, secure=False)
    noisy = SitePolicy(min_noise_multiplier=1.0)
    central = tiny_cfg(privacy={"level": "client", "client_noise": "central"})
    with pytest.raises(PolicyRefused, match="central client-level noise"):
        noisy.check_request(central, secure=False)
    with pytest.raises(PolicyRefused, match="cohort of 2"):
        SitePolicy().check_session(cohort=2, threshold=2)
    with pytest.raises(PolicyRefused, match="threshold 2"):
        SitePolicy(min_threshold=3).check_session(cohort=4, threshold=2)
    with pytest.raises(PolicyRefused, match="only 2 inputs"):
        SitePolicy().check_sum(2)


def test_policy_table_errors_name_the_key():
    assert load_policy({"min_cohort": 5}, "site.toml").min_cohort == 5
    with pytest.raises(FedloraError, match="policy.min_kohort"):
        load_policy({"min_kohort": 5}, "site.toml")
    with pytest.raises(FedloraError, match="policy.strategies .* fedavg"):
        load_policy({"strategies": ["fedsgd"]}, "site.toml")
    with pytest.raises(FedloraError, match="at least 2"):
        load_policy({"min_cohort": 1}, "site.toml")


def test_secure_aggregation_below_the_minimum_cohort_is_refused_at_load(tiny_cfg):
    with pytest.raises(FedloraError, match="secure.min_cohort = 3"):
        tiny_cfg(federation={"clients": 2}, secure={"enabled": True})
    tiny_cfg(federation={"clients": 2})  # plaintext: no cohort to protect


def test_cli_secure_agg_with_two_clients_exits_2(capsys):
    from fedlora.cli import main

    assert main(["simulate", "--model", "tiny-random", "--clients", "2", "--secure-agg"]) == 2
    err = capsys.readouterr().err
    assert "secure.min_cohort" in err and "Traceback" not in err


def test_a_round_is_taken_once_across_site_restarts(tmp_path):
    assert RoundsTaken(tmp_path, 0).take(4)
    assert not RoundsTaken(tmp_path, 0).take(4)  # a new instance: a restarted site
    assert RoundsTaken(tmp_path, 0).take(5) and RoundsTaken(tmp_path, 1).take(4)


def test_distributed_noise_carries_the_accounted_variance_at_fraction_half():
    """10 sites, federation.fraction = 0.5: 5 sampled, threshold t = 4 (the server's rule,
    2/3 of 5 rounded up). Each site adds N(0, (sigma C)^2 / t) with t taken from its own
    session, so any t or more survivors sum to at least the accounted (sigma C)^2. The old
    rule split the noise over 2/3 of ALL 10 sites (7): 5 survivors gave 5/7 of it.
    Tolerance: 200,000 coordinates per draw, so the sample variance is within 1% of the true
    one (its relative standard error is sqrt(2 / n) = 0.3%)."""
    sigma, clip, sampled, n = 1.3, 0.5, 5, 200_000
    t = math.ceil(2 * sampled / 3)
    sessions = [SecAggClient.create(session=1, site=s, threshold=t) for s in range(sampled)]
    rng = np.random.default_rng(0)
    for survivors in (t, sampled):
        total = np.zeros(n)
        for session in sessions[:survivors]:
            std = site_noise_std(sigma, clip, session.threshold)
            total += add_gaussian({"delta/x": np.zeros(n)}, ["delta/x"], std, rng)["delta/x"]
        accounted = (sigma * clip) ** 2
        assert np.var(total) == pytest.approx(accounted * survivors / t, rel=0.01)
        assert np.var(total) >= 0.99 * accounted


# --- secure rounds in one process ---------------------------------------------------------------


def test_the_server_sees_no_per_site_number_in_a_secure_round(tiny_cfg, task_identity):
    """Everything the server receives in a secure round with client-level DP: public keys,
    ciphertexts, masked uint64 vectors, layouts (names and shapes) and site ids; the round's
    epsilon only as a sum (in the unmasked result), and no train loss at all."""
    cfg = tiny_cfg(
        privacy={"level": "client", "client_noise": "distributed"}, secure={"enabled": True}
    )
    grid = LocalGrid(cfg, 3)
    result = run_secure(grid, cfg, 1)
    from fedlora.apps.secure import PROTOCOL

    assert result.sites == [0, 1, 2] and not result.failures
    for content in grid.received:
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                assert name == R.SECAGG_MASKED
                assert all(a.dtype == "uint64" for a in record.values())
            elif name == R.SITE_METRICS:
                assert dict(record).keys() == {R.SITE_ID}
            elif name == R.SECAGG_LAYOUT:
                for value in record.values():  # key names and shapes
                    items = value if isinstance(value, list) else [value]
                    assert all(isinstance(v, str | int) for v in items), value
            else:
                assert name == R.SECAGG
                for key, value in record.items():
                    items = value if isinstance(value, list) else [value]
                    if key in (R.C_PKS, R.S_PKS, R.CIPHERTEXTS, R.B_SHARES, R.S_SHARES):
                        assert all(isinstance(v, bytes) for v in items), key
                    elif key == R.ROSTERED:  # whether the site has a roster ([peers])
                        assert items == [False], items
                    elif key == R.PROTOCOL:  # the protocol's version, every site's
                        assert items == [PROTOCOL], items
                    else:  # site ids
                        assert key in (R.SITES, R.PEERS, R.SURVIVORS, R.DROPPED), key
                        assert all(isinstance(v, int) for v in items), key
    # under DP a site's loss (and the rows it is weighted by) never leaves the site, not even
    # inside the sum: it is an unnoised statistic of its rows, outside the accounting
    assert R.STATS_LOSS not in result.sums and R.STATS_ROWS not in result.sums
    assert result.sums[R.STATS_EPSILON][0] > 0


@pytest.mark.parametrize("level", ["none", "sample", "client"])
def test_a_site_under_dp_sends_no_train_loss_in_a_plaintext_round(tiny_cfg, task_identity, level):
    """Under differential privacy a site's train loss is an unnoised statistic of its rows,
    outside the accounting: it stays at the site (without DP it is reported as before)."""
    cfg = tiny_cfg(privacy={"level": level})
    grid = LocalGrid(cfg, 1, SitePolicy())
    train = Message(
        round_content(1, global_adapter(cfg)), dst_node_id=100, message_type=MessageType.TRAIN
    )
    (reply,) = grid.pull_messages(grid.push_messages([train]))
    metrics = dict(reply.content[R.SITE_METRICS])
    assert (R.TRAIN_LOSS in metrics) == (level == "none")
    assert metrics[R.NUM_EXAMPLES] > 0


@pytest.mark.parametrize("background", [False, True], ids=["at-mask", "background"])
def test_a_replayed_round_and_a_small_cohort_are_refused(background, tiny_cfg, task_identity):
    """A second session for round 1 (a new KEYS message) is refused by every site, with the
    reason; so is a plain TRAIN of that round. A session of two sites is refused by a site
    that demands three (in the background, the training it had started is dropped)."""
    cfg = tiny_cfg(secure={"enabled": True})
    threads = BackgroundTraining() if background else None
    # plain TRAIN allowed: only the replay is refused
    grid = LocalGrid(cfg, 3, SitePolicy(), background=threads)
    run_secure(grid, cfg, 1)
    with pytest.raises(SecureRoundFailed, match="already taken") as failed:
        run_secure(grid, cfg, 1)
    assert set(failed.value.refused) == {0, 1, 2}
    train = Message(
        round_content(1, global_adapter(cfg)), dst_node_id=100, message_type=MessageType.TRAIN
    )
    (msg_id,) = grid.push_messages([train])
    (reply,) = grid.pull_messages([msg_id])
    assert "already taken" in reply.content[R.REFUSAL][R.REASON]

    pair = LocalGrid(cfg, 2, background=threads)
    with pytest.raises(SecureRoundFailed, match="cohort of 2 sites") as failed:
        secure_sum(pair, {0: 100, 1: 101}, round_content(7, global_adapter(cfg)), 2, lambda _: 0)
    assert set(failed.value.refused) == {0, 1}
    if threads is not None:
        for site in (0, 1):
            with pytest.raises(SecAggError, match="no training for round 7"):
                threads.result(1, site, 7)


def test_a_plain_train_to_a_site_that_requires_secure_aggregation_is_refused(
    tiny_cfg, task_identity
):
    cfg = tiny_cfg()
    grid = LocalGrid(cfg, 3, SitePolicy(require_secure_aggregation=True))
    train = Message(
        round_content(1, global_adapter(cfg)), dst_node_id=101, message_type=MessageType.TRAIN
    )
    (msg_id,) = grid.push_messages([train])
    (reply,) = grid.pull_messages([msg_id])
    assert dict(reply.content[R.REFUSAL]) == {
        R.SITE_ID: 1,
        R.ROUND: 1,
        R.REASON: "secure aggregation required",
    }
    assert R.CONTRIBUTION not in reply.content
    assert not (SiteStore(grid_state(cfg), 1).path.exists())  # it did not train


def grid_state(cfg):
    from pathlib import Path

    from fedlora.results import run_state_dir

    return run_state_dir(Path(cfg.run.out)) / "sites"


@pytest.mark.parametrize("background", [False, True], ids=["at-mask", "background"])
@pytest.mark.parametrize("failure", ["out-of-range", "too-few-sharers"])
def test_scaffold_c_i_moves_only_when_the_masked_input_is_summed(
    failure, background, tiny_cfg, task_identity, monkeypatch
):
    """The masking fails at one site (a value beyond the bound, or fewer sharers than its
    threshold): its c_i stays where it was, so the server's c (which never gets its dc) and
    the site agree. The sites whose inputs were summed move theirs."""
    cfg = tiny_cfg(
        strategy={"name": "scaffold"},
        train={"optimizer": "sgd", "lr": 0.5},
        federation={"clients": 4},
    )
    grid = LocalGrid(cfg, 4, background=BackgroundTraining() if background else None)
    real_mask = SecAggClient.mask_input

    def fails_at_site_0(self, contribution, ciphertexts):
        if self.site == 0 and failure == "out-of-range":
            raise ValueOutOfRange("site 0: value beyond the bound")
        if self.site == 0:
            ciphertexts = dict(list(ciphertexts.items())[:1])  # 2 sharers < threshold 3
        return real_mask(self, contribution, ciphertexts)

    monkeypatch.setattr(SecAggClient, "mask_input", fails_at_site_0)
    result = run_secure(grid, cfg, 1, threshold=3)
    assert result.sites == [1, 2, 3]
    assert any("site 0, mask" in f for f in result.failures)
    folder = grid_state(cfg)
    assert SiteStore(folder, 0).before(2) == {}  # c_0 = 0, as the server's sum assumes
    for site in (1, 2, 3):
        saved = SiteStore(folder, site).before(2)
        assert any(np.any(v) for k, v in saved.items() if k.startswith(C_I)), site


def test_server_check_of_threshold_majority_still_holds():
    """The site's cohort check sits beside, not instead of, the protocol's 2t > n."""
    server = SecAggServer(threshold=2)
    keys = {i: SecAggClient.create(1, i, 2).public_keys() for i in range(4)}
    with pytest.raises(ValueError, match="exceed half"):
        server.receive_keys(keys)


@pytest.mark.parametrize("background", [False, True], ids=["at-mask", "background"])
def test_a_spent_budget_under_secure_aggregation_tells_the_server_no_number(
    background, tiny_cfg, task_identity
):
    """Under secure aggregation a site's epsilon tells its size (sample level) or how often it
    took part (Poisson participation): a site that stops at its budget says only that (at the
    mask stage, where its training's outcome is answered, also when it trained in a thread)."""
    cfg = tiny_cfg(privacy={"level": "sample", "max_epsilon": 0.01}, secure={"enabled": True})
    grid = LocalGrid(cfg, 3, background=BackgroundTraining() if background else None)
    with pytest.raises(SecureRoundFailed) as failed:  # no site is left to sum
        run_secure(grid, cfg, 1)
    failures = str(failed.value).split("Site failures: ")[1].split("; ")
    assert len(failures) == 3, failed.value
    for failure in failures:  # "site 0, mask: BudgetExhausted: [privacy budget exhausted] ..."
        assert failure.split(":")[0].endswith(", mask"), failure
        assert "[privacy budget exhausted] site" in failure, failure
        assert not re.search(r"\d\.\d|epsilon", failure.split("exhausted]", 1)[1]), failure


# --- training in a background thread (a site daemon) --------------------------------------------


def test_training_in_the_background_gives_the_same_secure_round(tiny_cfg, task_identity, tmp_path):
    """A site that trains from the keys stage on in a thread (a site daemon) sums to exactly
    what a site that trains at the mask stage sums to, saves the same strategy state, and the
    server receives the same kinds of record: only where the training runs differs."""
    sums, states, start = [], [], None
    for name, background in (("at-mask", None), ("background", BackgroundTraining())):
        cfg = tiny_cfg(
            strategy={"name": "scaffold"},
            federation={"clients": 3},
            run={"out": str(tmp_path / name)},
        )
        start = start or global_adapter(cfg)  # before training moves the shared model's
        grid = LocalGrid(cfg, 3, background=background)
        result = run_secure(grid, cfg, 1, content=round_content(1, start))
        assert result.sites == [0, 1, 2] and not result.failures and not result.refused
        sums.append(result.sums)
        states.append([SiteStore(grid_state(cfg), s).before(2) for s in range(3)])
    assert sums[0].keys() == sums[1].keys()
    for key in sums[0]:
        np.testing.assert_array_equal(sums[0][key], sums[1][key], err_msg=key)
    for at_mask, in_thread in zip(*states, strict=True):
        assert at_mask.keys() == in_thread.keys() and at_mask
        for key in at_mask:
            np.testing.assert_array_equal(at_mask[key], in_thread[key], err_msg=key)


def test_keys_whose_training_is_for_another_round_are_answered_with_an_error(
    tiny_cfg, task_identity
):
    """The round a site trains for is the session's: keys for round 2 carrying round 1's
    training content (a replay of an old round's adapter) fail at the keys stage, and the site
    has taken no round."""
    cfg = tiny_cfg(secure={"enabled": True})
    grid = LocalGrid(cfg, 3)
    content = round_content(1, global_adapter(cfg))
    content[R.SECAGG] = ConfigRecord(
        {R.SECAGG_STAGE: "keys", R.ROUND: 2, R.THRESHOLD: 2, R.VALUE_BOUND: 1e6}
    )
    msg = Message(content, dst_node_id=100, message_type="query.secagg")
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    assert reply.has_error()
    assert "session for round 2 with training for round 1" in reply.error.reason
    assert RoundsTaken(grid_state(cfg), 0).take(2)  # not taken by the failed request


def test_background_training_runs_one_job_at_a_time_and_reports_its_outcome():
    """`start` returns at once; jobs and work holding `exclusive` never overlap (one model per
    process); `result` waits for its job and raises what it raised; a session abandoned before
    its training began is dropped; asking for a round the site did not start is an error."""
    import threading

    background = BackgroundTraining()
    release, running = threading.Event(), threading.Event()
    log: list[str] = []

    def slow() -> str:
        running.set()
        release.wait(10)
        log.append("site 0")
        return "trained"

    def other_work() -> None:
        with background.exclusive():
            log.append("other work")

    background.start(1, 0, 1, slow)
    assert running.wait(10) and not log  # start returned while the job runs
    background.start(1, 1, 1, lambda: log.append("site 1, round 1") or "abandoned")
    background.start(1, 1, 2, lambda: log.append("site 1, round 2") or "done")
    waiting = threading.Thread(target=other_work)
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive() and not log  # the model is busy
    with pytest.raises(SecAggError, match="no training for round 1"):
        background.result(1, 1, 1)  # replaced by round 2 before it began
    release.set()
    assert background.result(1, 0, 1) == "trained"
    assert background.result(1, 1, 2) == "done"
    waiting.join(10)
    assert log[0] == "site 0" and sorted(log[1:]) == ["other work", "site 1, round 2"]

    def refuses() -> str:
        raise PolicyRefused("budget")

    background.start(2, 0, 1, refuses)
    with pytest.raises(PolicyRefused, match="budget"):
        background.result(2, 0, 1)


# --- a round's session set up during the round before (secure.pipeline) ---------------------------


def two_rounds(grid: LocalGrid, start, upcoming_sites=None, threshold: int = 2):
    """Round 1 with the next round's session set up during it (for `upcoming_sites`, default
    all), then round 2 on that session when there is one, else on a session of its own."""
    nodes = {i: 100 + i for i in range(len(grid.contexts))}
    sites = list(nodes) if upcoming_sites is None else upcoming_sites
    first = secure_sum(
        grid,
        nodes,
        round_content(1, start),
        threshold,
        lambda _: 0,
        upcoming=NextRound(2, sites, threshold),
    )
    second = secure_sum(
        grid, nodes, round_content(2, start), threshold, lambda _: 0, prepared=first.prepared
    )
    return first, second


@pytest.mark.parametrize("background", [False, True], ids=["at-mask", "background"])
def test_a_session_set_up_in_the_round_before_sums_the_same_in_two_stages(
    background, tiny_cfg, task_identity, tmp_path
):
    """Round 2's keys and shares ride on round 1's mask and unmask messages: round 2 then has
    only the mask and unmask stages, its training content comes with the mask message, and
    both rounds' sums and the sites' saved SCAFFOLD states are exactly those of two rounds that
    each set up their own session."""
    results, states, start = {}, {}, None
    for name in ("own sessions", "pipelined"):
        cfg = tiny_cfg(
            strategy={"name": "scaffold"},
            federation={"clients": 3},
            run={"out": str(tmp_path / name)},
        )
        start = start or global_adapter(cfg)
        grid = LocalGrid(cfg, 3, background=BackgroundTraining() if background else None)
        if name == "pipelined":
            results[name] = two_rounds(grid, start)
        else:
            results[name] = tuple(
                run_secure(grid, cfg, r, content=round_content(r, start)) for r in (1, 2)
            )
        states[name] = [SiteStore(grid_state(cfg), s).before(3) for s in range(3)]
    first, second = results["pipelined"]
    assert first.prepared is not None and first.prepared.sites == [0, 1, 2]
    assert list(first.seconds) == ["keys", "share", "mask", "unmask"]
    assert list(second.seconds) == ["mask", "unmask"] and second.prepared is None
    for own, piped in zip(results["own sessions"], results["pipelined"], strict=True):
        assert piped.sites == own.sites == [0, 1, 2] and not piped.failures
        assert own.sums.keys() == piped.sums.keys()
        for key in own.sums:
            np.testing.assert_array_equal(own.sums[key], piped.sums[key], err_msg=key)
    for own, piped in zip(states["own sessions"], states["pipelined"], strict=True):
        assert own.keys() == piped.keys() and own
        for key in own:
            np.testing.assert_array_equal(own[key], piped[key], err_msg=key)


@pytest.mark.parametrize(
    ("upcoming", "policy", "why"),
    [
        ([0, 1], SitePolicy(min_cohort=3), "cohort of 2 sites"),
        ([0, 1, 2], SitePolicy(), None),  # set up: the control
    ],
    ids=["refused", "accepted"],
)
def test_a_refused_next_session_leaves_this_round_whole(
    upcoming, policy, why, tiny_cfg, task_identity
):
    """A site that refuses the next round's session (here: a cohort below its minimum) says so
    in that session's part of its reply; this round's sum stands, and the next round sets up a
    session of its own."""
    cfg = tiny_cfg(secure={"enabled": True})
    grid = LocalGrid(cfg, 3, policy)
    first, second = two_rounds(grid, global_adapter(cfg), upcoming)
    assert first.sites == second.sites == [0, 1, 2] and not first.refused
    if why is None:
        assert first.prepared is not None and list(second.seconds) == ["mask", "unmask"]
        return
    assert first.prepared is None and list(second.seconds) == ["keys", "share", "mask", "unmask"]
    nexts = [c[R.SECAGG_NEXT] for c in grid.received if R.SECAGG_NEXT in c]
    reasons = [str(n[R.REASON]) for n in nexts if R.REASON in n]
    assert len(reasons) == 2 and all(why in r for r in reasons)
    assert all(R.SECAGG_NEXT_STATE not in c.state for c in grid.contexts.values())


def test_no_next_session_when_a_site_of_the_next_round_is_not_in_this_one(tiny_cfg, task_identity):
    """Every site of the next round must exchange keys with every other: one that is not in
    this round would miss them, so nothing of the next session travels."""
    cfg = tiny_cfg(secure={"enabled": True})
    grid = LocalGrid(cfg, 4)
    nodes = {i: 100 + i for i in range(3)}
    result = secure_sum(
        grid,
        nodes,
        round_content(1, global_adapter(cfg)),
        2,
        lambda _: 0,
        upcoming=NextRound(2, [0, 1, 3], 2),
    )
    assert result.sites == [0, 1, 2] and result.prepared is None
    assert not any(R.SECAGG_NEXT in content for content in grid.received)


def test_a_prepared_session_trains_only_on_its_own_round(tiny_cfg, task_identity):
    """The mask message of a session set up in the round before carries the training content,
    which must be for the session's round (else a server could replay an old adapter into it),
    and the site takes the round then: a second session for that round is refused."""
    cfg = tiny_cfg(secure={"enabled": True})
    grid = LocalGrid(cfg, 3)
    start = global_adapter(cfg)
    nodes = {i: 100 + i for i in range(3)}
    first = secure_sum(
        grid, nodes, round_content(1, start), 2, lambda _: 0, upcoming=NextRound(2, [0, 1, 2], 2)
    )
    assert first.prepared is not None
    stale = round_content(1, start)  # round 1's content on round 2's mask message
    incoming = first.prepared.routed[0]
    stale[R.SECAGG] = ConfigRecord(
        {
            R.SECAGG_STAGE: "mask",
            R.ROUND: 2,
            R.PEERS: list(incoming),
            R.CIPHERTEXTS: list(incoming.values()),
        }
    )
    msg = Message(stale, dst_node_id=100, message_type="train.secagg")
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    assert reply.has_error()
    assert "session for round 2 with training for round 1" in reply.error.reason
    assert 2 not in RoundsTaken(grid_state(cfg), 0).taken()  # not by the failed request
    second = secure_sum(
        grid, nodes, round_content(2, start), 2, lambda _: 0, prepared=first.prepared
    )
    assert second.sites == [0, 1, 2] and list(second.seconds) == ["mask", "unmask"]
    assert all(2 in RoundsTaken(grid_state(cfg), s).taken() for s in range(3))
    with pytest.raises(SecureRoundFailed, match="already taken"):
        run_secure(grid, cfg, 2)


# --- personalisation: scores of a site's rows ---------------------------------------------------


def personalisation(arrays: dict[str, np.ndarray], node: int = 100, steps: int = 1) -> Message:
    """An EVALUATE message as the server's personalisation sends it, `arrays` as the adapter."""
    content = RecordDict(
        {
            R.ROUND_CONFIG: ConfigRecord({R.PERSONALIZE_STEPS: steps}),
            R.GLOBAL_ADAPTER: R.to_record(arrays),
        }
    )
    return Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)


def personalise(grid: LocalGrid, arrays: dict[str, np.ndarray], steps: int = 1) -> dict:
    """The site's metrics for a personalisation request, or its refusal."""
    (reply,) = grid.pull_messages(grid.push_messages([personalisation(arrays, steps=steps)]))
    assert not reply.has_error(), reply.error.reason
    if R.REFUSAL in reply.content:
        return dict(reply.content[R.REFUSAL])
    return dict(reply.content[R.SITE_METRICS])


def test_personalisation_is_no_oracle_on_a_sites_rows(tiny_cfg, task_identity):
    """A server may send a personalisation request whatever its config says, with any adapter:
    each reply is a score of the site's held-out rows, in the clear and outside any privacy
    accounting. A site whose policy requires secure aggregation or differential privacy (or a
    federation under DP) sends none; any site answers once per federation, so a server cannot
    send adapters of its own one after another and read the site's loss under each."""
    adapter = global_adapter(tiny_cfg())
    private = tiny_cfg(privacy={"level": "sample", "noise_multiplier": 1.0})
    for cfg, policy, why in [
        (tiny_cfg(), SitePolicy(require_secure_aggregation=True), "secure aggregation required"),
        (tiny_cfg(), SitePolicy(max_epsilon=8.0), "differential privacy"),
        (private, None, "differential privacy"),
    ]:
        reply = personalise(LocalGrid(cfg, 1, policy), adapter)
        assert R.GLOBAL_LOSS not in reply and R.HELD_OUT_ROWS not in reply, reply
        assert why in reply[R.REASON] and "personalisation" in reply[R.REASON]

    grid = LocalGrid(tiny_cfg(), 1)
    assert R.PERSONAL_LOSS in personalise(grid, adapter)
    crafted = {k: v + 0.5 for k, v in adapter.items()}
    assert "personalisation already done" in personalise(grid, crafted)[R.REASON]


def test_a_site_daemon_audits_the_scores_it_sends(tiny_cfg, task_identity):
    """Scores of a site's rows leave it only as an audited reply, like an update."""
    from fedlora.deploy.apps import audit_entry

    cfg = tiny_cfg()
    msg = personalisation(global_adapter(cfg))
    grid = LocalGrid(cfg, 1)
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    entry = audit_entry(msg, reply, "federation-1")
    assert entry["message"] == "evaluate" and entry["federation"] == "federation-1"
    assert entry["scores"] == dict(reply.content[R.SITE_METRICS])
    assert entry["scores"][R.HELD_OUT_ROWS] > 0


def test_a_server_cannot_read_a_value_through_a_small_value_bound(tiny_cfg, task_identity):
    """The session's value bound is the server's to send: one below what the protocol uses
    made masking fail, and the failure quoted the site's first value beyond it, its index and
    how many there were, in the clear. The site refuses a smaller bound before it trains, and a
    value beyond the bound is named to the server without the value (the site's log has it)."""
    from fedlora.apps.secure import _keys_fields, _stage

    cfg = tiny_cfg(secure={"enabled": True})
    grid = LocalGrid(cfg, 3)
    content = round_content(1, global_adapter(cfg))
    content[R.SECAGG] = _stage("keys", 1, _keys_fields(2, 1e-9, [0, 1, 2]))
    msg = Message(content, dst_node_id=100, message_type=f"query.{R.SECAGG_ACTION}")
    (reply,) = grid.pull_messages(grid.push_messages([msg]))
    assert R.REFUSAL in reply.content, "the site opened a session with the server's tiny bound"
    assert "value bound 1e-09" in reply.content[R.REFUSAL][R.REASON]

    real_mask = SecAggClient.mask_input

    def tight(self, contribution, ciphertexts):  # a bound the values exceed, as at 1e-9
        self.value_bound, self.key_bounds = 1e-9, {}
        return real_mask(self, contribution, ciphertexts)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SecAggClient, "mask_input", tight)
        with pytest.raises(SecureRoundFailed) as failed:
            run_secure(grid, cfg, 2)
    said = str(failed.value)
    assert "outside the secure-aggregation range" in said
    assert not re.search(r"value -?\d|value np\.|at index|values in all", said), said


def test_what_is_wrong_with_a_sites_data_stays_at_the_site(tiny_cfg, tmp_path):
    """A site daemon loads its data when the first request comes, and the reason of a failure
    goes back to the server: the site's labels, its row counts and its rare labels (one
    patient's diagnosis) were in that text. The server hears that the data cannot be used; the
    site's log (local_detail) hears why."""
    from fedlora.deploy.executor import relayed_reason
    from fedlora.runtime import load_data

    rows = [{"text": f"note {i}", "label": "flu" if i % 2 else "cold"} for i in range(30)]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text(json.dumps({"text": "note", "label": "rare-syndrome-x"}) + "\n")
    cfg = tiny_cfg(data={"path": str(train), "test_path": str(test)})
    with pytest.raises(FedloraError) as failed:
        load_data(cfg, own_site=0)
    told = relayed_reason(failed.value, "city")
    assert "rare-syndrome-x" not in told and "data" in told, told
    assert "rare-syndrome-x" in failed.value.local_detail
    with pytest.raises(FedloraError, match="rare-syndrome-x"):  # a simulation's operator: all
        load_data(cfg)


def test_a_site_with_a_list_of_models_loads_no_other(tiny_cfg, tmp_path, task_identity):
    """model.name is the server's: a hub id the site would download, or a folder on the site's
    machine, whose existence the site's answer gave away (a folder without a model is not
    the same error as no folder). policy.models: the site loads only those it lists."""
    folder = tmp_path / "hiv-clinic-exports"
    folder.mkdir()
    adapter = global_adapter(tiny_cfg())

    def answer(name: str, policy: SitePolicy | None) -> str:
        cfg = tiny_cfg(model={"name": name})
        msg = Message(round_content(1, adapter), dst_node_id=100, message_type=MessageType.TRAIN)
        grid = LocalGrid(cfg, 1, policy)
        (reply,) = grid.pull_messages(grid.push_messages([msg]))
        if reply.has_error():
            return reply.error.reason
        return str(reply.content[R.REFUSAL][R.REASON])

    probes = [str(folder), str(tmp_path / "absent")]
    assert len({answer(name, None) for name in probes}) == 2  # the probe, answered
    listed = SitePolicy(models=("tiny-random",))
    refusals = {answer(name, listed).replace(name, "NAME") for name in probes}
    assert refusals == {"model.name 'NAME' not accepted (policy: tiny-random)"}
    assert load_policy({"models": ["tiny-random"]}, "site.toml").models == ("tiny-random",)
    with pytest.raises(FedloraError, match="policy.models in site.toml must be a non-empty"):
        load_policy({"models": []}, "site.toml")


def test_a_site_caps_the_work_a_round_asks_of_its_machine(tiny_cfg, task_identity):
    """The local steps and the batch size are the server's: without a cap, a round may keep
    a site's machine busy (or out of memory) for as long as the server likes.
    policy.max_local_steps and max_batch_size refuse more, before any training: a round's
    steps as this site would run them (train.local_steps_spread gives the sites different
    ones), and a personalisation's."""
    adapter = global_adapter(tiny_cfg())
    capped = SitePolicy(max_local_steps=4, max_batch_size=8)

    rounds = itertools.count(1)  # the sites' state folder is shared: a new round each time

    def train(cfg, site: int = 0) -> dict:
        content = round_content(next(rounds), adapter)
        msg = Message(content, dst_node_id=100 + site, message_type=MessageType.TRAIN)
        grid = LocalGrid(cfg, 3, capped)
        (reply,) = grid.pull_messages(grid.push_messages([msg]))
        assert not reply.has_error(), reply.error.reason
        key = R.REFUSAL if R.REFUSAL in reply.content else R.SITE_METRICS
        return dict(reply.content[key])

    assert train(tiny_cfg(train={"local_steps": 4}))[R.LOCAL_STEPS] == 4
    refused = train(tiny_cfg(train={"local_steps": 6}))
    assert refused[R.REASON] == "6 local steps, this site's policy.max_local_steps is 4"
    spread = tiny_cfg(train={"local_steps": 4, "local_steps_spread": 0.5})  # sites: 2, 4, 6
    assert train(spread, site=1)[R.LOCAL_STEPS] == 4
    assert "6 local steps" in train(spread, site=2)[R.REASON]
    refused = train(tiny_cfg(train={"local_steps": 2, "batch_size": 16}), site=2)
    assert refused[R.REASON] == "batches of 16 rows, this site's policy.max_batch_size is 8"
    assert not SiteStore(grid_state(tiny_cfg()), 2).path.exists()  # site 2 never trained
    secure = tiny_cfg(secure={"enabled": True}, train={"local_steps": 6})
    with pytest.raises(SecureRoundFailed) as failed:  # refused before the session's keys
        run_secure(LocalGrid(secure, 3, capped), secure, 100)
    assert "'keys' stage" in str(failed.value) and sorted(failed.value.refused) == [0, 1, 2]
    grid = LocalGrid(tiny_cfg(), 1, capped)
    assert "10 local steps" in personalise(grid, adapter, steps=10)[R.REASON]
    assert R.PERSONAL_LOSS in personalise(grid, adapter, steps=4)
    policy = load_policy({"max_local_steps": 4, "max_batch_size": 8}, "site.toml")
    assert (policy.max_local_steps, policy.max_batch_size) == (4, 8)
