"""Local training and evaluation on tiny-random: loss positions, the loss itself against a full
Hugging Face forward pass, training, frozen base weights, FedProx's pull, macro-F1, evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlora.adapter import adapter_arrays, adapter_parameters, load_adapter_arrays
from fedlora.config import TrainConfig
from fedlora.runtime import build_runtime
from fedlora.strategies.base import TrainingTerms
from fedlora.train import (
    Encoded,
    batch_loss,
    evaluate,
    local_train,
    loss_positions,
    macro_f1,
    round_lr,
)


@pytest.fixture(scope="module")
def rt(tmp_path_factory, tiny_cfg_at):
    """One tiny-random runtime for the module (no LoRA dropout, so runs are deterministic)."""
    cfg = tiny_cfg_at(tmp_path_factory.mktemp("train"), lora={"dropout": 0.0})
    return build_runtime(cfg, log=lambda _msg: None)


@pytest.fixture
def fresh(rt):
    """Restore the initial adapter after each test."""
    initial = adapter_arrays(rt.model)
    yield rt
    load_adapter_arrays(rt.model, initial)
    rt.model.eval()


def randomise_adapter(model, seed: int = 0, scale: float = 0.2) -> None:
    """Non-zero LoRA B (peft starts it at zero), so the adapter changes the forward pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_loss_positions_cover_answer_tokens_only():
    batch = [
        Encoded([10, 11, 12, 13, 14], n_prompt=3, label=0),  # answer = 13, 14
        Encoded([20, 21, 22], n_prompt=2, label=1),  # answer = 22
    ]
    rows, pos, tgt = loss_positions(batch)
    triples = list(zip(rows.tolist(), pos.tolist(), tgt.tolist(), strict=True))
    # position p - 1 predicts token p, for p from n_prompt to the end
    assert triples == [(0, 2, 13), (0, 3, 14), (1, 1, 22)]


def test_loss_positions_on_encoded_examples(rt):
    rows = rt.site_rows(0)[:4]
    r, p, t = loss_positions(rows)
    for i, b in enumerate(rows):
        mine = (r == i).nonzero().flatten()
        answer = b.input_ids[b.n_prompt :]
        assert len(mine) == len(answer) > 0
        assert t[mine].tolist() == answer  # targets are exactly the answer tokens
        assert p[mine].tolist() == list(range(b.n_prompt - 1, len(b.input_ids) - 1))
        candidate = rt.encoder.candidates[b.label]
        assert answer == candidate


def reference_loss(model, batch: list[Encoded], pad_id: int) -> torch.Tensor:
    """Full HF forward (logits everywhere), CE on the answer tokens, per-sequence mean, then
    batch mean; padding on the right, written independently of fedlora.train."""
    width = max(len(b.input_ids) for b in batch)
    ids = torch.tensor([b.input_ids + [pad_id] * (width - len(b.input_ids)) for b in batch])
    mask = torch.tensor([[1] * len(b.input_ids) + [0] * (width - len(b.input_ids)) for b in batch])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    per_seq = []
    for i, b in enumerate(batch):
        n = len(b.input_ids)
        pred = logits[i, b.n_prompt - 1 : n - 1]
        target = ids[i, b.n_prompt : n]
        per_seq.append(F.cross_entropy(pred, target))
    return torch.stack(per_seq).mean()


def test_batch_loss_matches_full_forward(fresh):
    rt = fresh
    randomise_adapter(rt.model)
    rt.model.eval()
    rows = rt.site_rows(1)[:6]
    assert len({len(b.input_ids) for b in rows}) > 1  # unequal lengths: padding is exercised
    with torch.no_grad():
        ours = batch_loss(rt.model, rows, rt.pad_id)
        ref = reference_loss(rt.model, rows, rt.pad_id)
    assert abs(float(ours) - float(ref)) < 1e-5
    # and the adapter matters: the same loss without it is different
    with torch.no_grad(), rt.model.disable_adapter():
        base = reference_loss(rt.model, rows, rt.pad_id)
    assert abs(float(base) - float(ref)) > 1e-4


def test_batch_loss_gradients_match_full_forward(fresh):
    rt = fresh
    randomise_adapter(rt.model, seed=1)
    rt.model.eval()
    rows = rt.site_rows(2)[:3]
    params = list(adapter_parameters(rt.model).values())
    ours = torch.autograd.grad(batch_loss(rt.model, rows, rt.pad_id), params)
    ref = torch.autograd.grad(reference_loss(rt.model, rows, rt.pad_id), params)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def train_cfg(rt, **changes):
    from dataclasses import replace

    return replace(rt.cfg.train, **changes)


def test_local_train_lowers_the_loss(tiny_cfg):
    # on q/v: o_proj alone is too small on tiny-random to fit these rows (it levels off 0.42 down)
    rt = build_runtime(tiny_cfg(lora={"dropout": 0.0, "targets": "qv"}), log=lambda _msg: None)
    rows = rt.site_rows(0)[:4]
    with torch.no_grad():
        before = float(batch_loss(rt.model, rows, rt.pad_id))
    cfg = train_cfg(rt, optimizer="adamw", lr=2e-2, batch_size=4)
    result = local_train(
        rt.model, rows, 40, cfg, TrainingTerms(), np.random.default_rng(0), rt.pad_id
    )
    with torch.no_grad():
        after = float(batch_loss(rt.model, rows, rt.pad_id))
    assert result.steps == 40
    assert np.isfinite(result.mean_loss)
    assert after < before - 0.5, (before, after)
    assert not rt.model.training  # left in eval mode


def test_only_lora_parameters_change(fresh):
    rt = fresh
    lora = set(adapter_parameters(rt.model))
    assert lora and all("lora_A" in n or "lora_B" in n for n in lora)
    frozen_before = {n: p.detach().clone() for n, p in rt.model.named_parameters() if n not in lora}
    lora_before = {n: p.detach().clone() for n, p in rt.model.named_parameters() if n in lora}
    assert all(not p.requires_grad for n, p in rt.model.named_parameters() if n not in lora)
    cfg = train_cfg(rt, optimizer="adamw", lr=1e-2, weight_decay=0.1)
    local_train(
        rt.model, rt.site_rows(0), 5, cfg, TrainingTerms(), np.random.default_rng(0), rt.pad_id
    )
    after = dict(rt.model.named_parameters())
    for n, value in frozen_before.items():
        assert torch.equal(after[n].detach(), value), n
    changed = [n for n, value in lora_before.items() if not torch.equal(after[n].detach(), value)]
    assert changed  # the adapter did train


def adapter_distance(rt, mu: float) -> float:
    start = adapter_arrays(rt.model)
    cfg = train_cfg(rt, optimizer="sgd", lr=0.05, momentum=0.0, batch_size=4)
    local_train(
        rt.model,
        rt.site_rows(1)[:8],
        20,
        cfg,
        TrainingTerms(prox_mu=mu),
        np.random.default_rng(0),
        rt.pad_id,
    )
    end = adapter_arrays(rt.model)
    load_adapter_arrays(rt.model, start)
    return float(np.sqrt(sum(((end[k] - start[k]) ** 2).sum() for k in start)))


def test_fedprox_huge_mu_keeps_the_adapter_near_the_start(fresh):
    rt = fresh
    free = adapter_distance(rt, mu=0.0)
    held = adapter_distance(rt, mu=19.0)  # lr * mu = 0.95: a strong, still stable pull
    assert free > 0
    assert held < 0.25 * free, (held, free)


def test_grad_correction_is_added_to_the_gradient(fresh):
    """A constant SCAFFOLD correction c is added after clipping: with the data gradient clipped
    to ~0 by a tiny max_grad_norm, one SGD step moves each tensor by -lr * c."""
    rt = fresh
    start = adapter_arrays(rt.model)
    correction = {k: np.full(v.shape, 0.5, dtype=np.float32) for k, v in start.items()}
    cfg = train_cfg(rt, optimizer="sgd", lr=0.1, momentum=0.0, max_grad_norm=1e-12)
    local_train(
        rt.model,
        rt.site_rows(0)[:4],
        1,
        cfg,
        TrainingTerms(grad_correction=correction),
        np.random.default_rng(0),
        rt.pad_id,
    )
    end = adapter_arrays(rt.model)
    for k in start:
        np.testing.assert_allclose(end[k] - start[k], -0.05, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    ("gold", "pred", "n", "expected"),
    [
        # class 0: tp 1 fp 1 fn 1 -> 2/4; class 1: tp 2 fp 1 fn 0 -> 4/5; class 2: tp 0 fn 1 -> 0
        ([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3, (0.5 + 0.8 + 0.0) / 3),
        # only class 0 occurs anywhere: classes 1 and 2 are left out of the mean
        ([0, 0], [0, 0], 3, 1.0),
        # both classes always wrong
        ([0, 1], [1, 0], 2, 0.0),
        # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 0 fp 1 fn 0 -> 0
        ([0, 0, 0], [0, 0, 1], 2, 0.4),
        ([], [], 3, 0.0),
    ],
)
def test_macro_f1_by_hand(gold, pred, n, expected):
    assert macro_f1(gold, pred, n) == pytest.approx(expected)


def test_evaluate(rt):
    rows, sites = rt.eval_set()
    assert len(rows) == rt.cfg.data.eval_rows == len(sites)
    result = evaluate(rt.model, rt.encoder, rows, rt.pad_id, batch_size=16)
    assert 0.0 <= result.accuracy <= 1.0
    assert len(result.correct) == len(rows)
    assert result.accuracy == pytest.approx(sum(result.correct) / len(rows))
    assert 0.0 <= result.macro_f1 <= 1.0
    assert np.isfinite(result.loss) and result.loss > 0
    assert result.perplexity is None
    # batch size does not change the result
    again = evaluate(rt.model, rt.encoder, rows, rt.pad_id, batch_size=7)
    assert again.correct == result.correct
    assert again.loss == pytest.approx(result.loss, rel=1e-5)


def test_evaluate_predictions_match_full_answer_scores(rt):
    """The predicted class is the candidate answer with the highest total log-probability,
    scored here independently with one full forward per (row, candidate)."""
    rows, _ = rt.eval_set()
    rows = rows[:12]
    result = evaluate(rt.model, rt.encoder, rows, rt.pad_id)
    with torch.no_grad():
        for row, ok in zip(rows, result.correct, strict=True):
            prompt = row.input_ids[: row.n_prompt]
            scores = []
            for cand in rt.encoder.candidates:
                ids = torch.tensor([prompt + cand])
                logp = rt.model(input_ids=ids).logits[0].log_softmax(-1)
                scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cand)))
            assert (int(np.argmax(scores)) == row.label) == ok


def test_class_balanced_batches_draw_every_answer_alike():
    """90 / 9 / 1 rows of three answers: plain batches follow the rows (about 90% of the first
    answer), fully balanced ones draw each answer a third of the time, the single rare row
    included. Tolerance: 3,000 draws, a proportion's standard error is at most 0.009."""
    from fedlora.train import Encoded, batches

    rows = [Encoded([1, 2], 1, label) for label in [0] * 90 + [1] * 9 + [2]]
    rng = np.random.default_rng(0)

    def shares(balance: float) -> np.ndarray:
        stream = batches(rows, 8, rng, balance)
        drawn = [r.label for _ in range(375) for r in next(stream)]
        return np.bincount(drawn, minlength=3) / len(drawn)

    np.testing.assert_allclose(shares(0.0), [0.9, 0.09, 0.01], atol=0.03)
    np.testing.assert_allclose(shares(1.0), [1 / 3] * 3, atol=0.03)


def test_square_root_class_balance_draws_answers_by_the_root_of_their_rows():
    """100 / 25 / 4 / 1 rows of four answers at class_balance 0.5: the answers are drawn in
    proportion 10 : 5 : 2 : 1 (the square roots), far from both the rows' own shares (0.77 for
    the first) and uniform (0.25). 20,000 draws; each share within 4 binomial standard errors
    (at most 0.014), while for the first answer (0.556) both of those are over 60 of them
    away, so a sampler drawing either would fail."""
    from fedlora.train import Encoded, batches

    counts = [100, 25, 4, 1]
    rows = [Encoded([1, 2], 1, label) for label, n in enumerate(counts) for _ in range(n)]
    stream = batches(rows, 8, np.random.default_rng(3), 0.5)
    drawn = [r.label for _ in range(2500) for r in next(stream)]
    shares = np.bincount(drawn, minlength=4) / len(drawn)
    expected = np.sqrt(counts) / np.sqrt(counts).sum()
    std = np.sqrt(expected * (1 - expected) / len(drawn))
    assert np.all(np.abs(shares - expected) <= 4 * std), (shares, expected, std)
    for other in (np.array(counts) / sum(counts), np.full(4, 0.25)):
        assert abs(other[0] - expected[0]) > 60 * std[0]


def _old_batches(rows, batch_size, rng, balanced):
    """batches() as it was when train.class_balance was a switch (the earlier study's runs)."""
    if balanced:
        by_label: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_label.setdefault(row.label, []).append(i)
        groups = [np.array(idx) for _, idx in sorted(by_label.items())]
        while True:
            picks = rng.integers(len(groups), size=batch_size)
            yield [rows[int(rng.choice(groups[g]))] for g in picks]
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order), batch_size):
            yield [rows[i] for i in order[start : start + batch_size]]


@pytest.mark.parametrize(("balance", "old"), [(0.0, False), (1.0, True), (True, True)])
def test_class_balance_0_and_1_draw_exactly_as_the_former_switch(balance, old):
    """0 is the plain shuffled passes and 1 the uniform draws of the former boolean, row for
    row from the same generator, so results measured before reproduce."""
    from fedlora.train import Encoded, batches

    rows = [Encoded([i, 2], 1, label) for i, label in enumerate([0] * 30 + [1] * 7 + [2] * 2)]
    new = batches(rows, 8, np.random.default_rng(5), balance)
    ref = _old_batches(rows, 8, np.random.default_rng(5), old)
    for _ in range(20):
        assert [r.input_ids for r in next(new)] == [r.input_ids for r in next(ref)]


@pytest.mark.parametrize(
    "sections, words",
    [
        ({"privacy": {"level": "sample"}}, "Poisson batches"),
        ({"data": {"task": "text"}}, 'data.task = "text"'),
    ],
)
@pytest.mark.parametrize("balance", [True, 1.0, 0.5, 0.01])
def test_class_balance_is_refused_where_it_cannot_hold(sections, words, balance):
    from fedlora.config import load_config
    from fedlora.errors import FedloraError

    with pytest.raises(FedloraError, match=words):
        load_config(None, [{"train": {"class_balance": balance}}, sections])
    load_config(None, [{"train": {"class_balance": 0.0}}, sections])  # off: nothing to refuse


@pytest.mark.parametrize(
    ("schedule", "round_", "rounds", "factor"),
    [
        # cosine: f = final + (1 - final) * (1 + cos(pi * (t - 1) / (T - 1))) / 2, final = 0.1
        ("cosine", 1, 5, 1.0),
        ("cosine", 2, 5, 0.1 + 0.9 * (1 + 0.7071067811865476) / 2),  # cos(pi/4)
        ("cosine", 3, 5, 0.55),
        ("cosine", 5, 5, 0.1),
        # linear: f = 1 - (1 - final) * (t - 1) / (T - 1)
        ("linear", 2, 5, 0.775),
        ("linear", 4, 5, 0.325),
        ("linear", 5, 5, 0.1),
        ("linear", 7, 5, 0.1),  # past the last round (a resumed run given more): the floor
        ("linear", 1, 1, 1.0),  # one round: train.lr
        ("constant", 4, 5, 1.0),
    ],
)
def test_round_lr_by_hand(schedule, round_, rounds, factor):
    cfg = TrainConfig(lr=0.2, lr_schedule=schedule, lr_final=0.1)
    assert round_lr(cfg, round_, rounds) == pytest.approx(0.2 * factor, rel=1e-12)
