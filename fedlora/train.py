"""Local training and evaluation: the one place for the loss, the proximal term, the SCAFFOLD
correction and step counting.

Logits are computed only at the positions that carry loss: the output layer of a 49k-word
vocabulary would otherwise dominate CPU time and activation memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.adapter import adapter_parameters
from fedlora.config import TrainConfig
from fedlora.data import Dataset, Example
from fedlora.device import model_device
from fedlora.errors import FedloraError
from fedlora.metrics import macro_f1
from fedlora.privacy.dpsgd import DPSGD, PrivateSteps
from fedlora.strategies.base import TrainingTerms


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    n_prompt: int  # loss is taken on input_ids[n_prompt:]
    label: int  # index into the candidate list, -1 for plain text
    unit: str = ""  # privacy unit (Example.unit); "" = the row is its own unit


class Encoder:
    """Tokenises examples once; the free text is cut to `max_text_tokens`."""

    def __init__(self, tokenizer, dataset: Dataset, max_text_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.task = dataset.task
        self.max_text_tokens = max_text_tokens
        self.labels = dataset.labels
        self.candidates = [self._ids(dataset.completion_of(lab)) for lab in dataset.labels]
        firsts = [c[0] for c in self.candidates]
        #: each candidate answer starts with its own token: one forward pass scores them all.
        self.first_token_decides = len(set(firsts)) == len(firsts)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, ex: Example) -> Encoded:
        text = self._ids(ex.text)[: self.max_text_tokens]
        if self.task == "text":
            return Encoded(text, 1, -1, ex.unit)
        prompt = self._ids(ex.prefix) + text + self._ids(ex.suffix)
        label = self.labels.index(ex.label)
        return Encoded(prompt + self.candidates[label], len(prompt), label, ex.unit)

    def encode_all(self, rows: Sequence[Example]) -> list[Encoded]:
        return [self.encode(e) for e in rows]


def collate(
    batch: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, on `device` (the model's: built on the host and
    moved in one copy each)."""
    width = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b.input_ids)] = torch.tensor(b.input_ids)
        mask[i, : len(b.input_ids)] = 1
    return ids.to(device), mask.to(device)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings()


def loss_positions(batch: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, target) for every token that carries loss: position p predicts p+1."""
    rows, pos, tgt = [], [], []
    for i, b in enumerate(batch):
        for p in range(max(b.n_prompt, 1), len(b.input_ids)):
            rows.append(i)
            pos.append(p - 1)
            tgt.append(b.input_ids[p])
    return (
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(pos, dtype=torch.long),
        torch.tensor(tgt, dtype=torch.long),
    )


def token_losses(model, batch: Sequence[Encoded], pad_id: int, bf16: bool = False):
    """Per-token cross-entropy over the full vocabulary at loss positions only."""
    decoder, head = _decoder_and_head(model)
    device = model_device(model)
    ids, mask = collate(batch, pad_id, device)
    rows, pos, tgt = (t.to(device) for t in loss_positions(batch))
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[rows, pos]).float()
    return F.cross_entropy(logits, tgt, reduction="none"), logits, rows


def batch_loss(model, batch: Sequence[Encoded], pad_id: int, bf16: bool = False) -> torch.Tensor:
    """Mean over sequences of each sequence's mean token loss (a per-sequence loss, so that
    every example weighs the same whatever its answer length)."""
    losses, _, rows = token_losses(model, batch, pad_id, bf16)
    per_seq = losses.new_zeros(len(batch)).index_add(0, rows, losses)
    counts = losses.new_zeros(len(batch)).index_add(0, rows, torch.ones_like(losses))
    has_loss = counts > 0  # a one-token text row carries no loss: leave it out of the mean
    return (per_seq[has_loss] / counts[has_loss]).mean()


def batches(
    rows: Sequence[Encoded], batch_size: int, rng: np.random.Generator, balance: float = 0.0
) -> Iterator[list[Encoded]]:
    """Endless shuffled passes over the rows (a new permutation each epoch) at `balance` 0.
    Above it (train.class_balance): each row of a batch is of an answer drawn with probability
    proportional to n^(1 - balance), n that answer's rows here (1 = uniform over the answers,
    0.5 = square-root sampling), then a row of that answer, drawn with replacement."""
    if balance > 0:
        by_label: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_label.setdefault(row.label, []).append(i)
        groups = [np.array(idx) for _, idx in sorted(by_label.items())]
        p = np.array([len(g) for g in groups], dtype=float) ** (1.0 - balance)
        p /= p.sum()
        while True:
            if balance >= 1:  # uniform: the draws of the earlier boolean switch, unchanged
                picks = rng.integers(len(groups), size=batch_size)
            else:
                picks = rng.choice(len(groups), size=batch_size, p=p)
            yield [rows[int(rng.choice(groups[g]))] for g in picks]
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order), batch_size):
            yield [rows[i] for i in order[start : start + batch_size]]


@dataclass(frozen=True)
class LocalResult:
    mean_loss: float
    steps: int


def round_lr(cfg: TrainConfig, round_: int, rounds: int) -> float:
    """Round `round_`'s learning rate (1-based, of `rounds`) under train.lr_schedule: train.lr in
    round 1, train.lr * lr_final in the last, cosine or linear in between (clamped outside).
    Sites and the server both compute it from the round number, so they agree on it."""
    if cfg.lr_schedule == "constant" or rounds <= 1:
        return cfg.lr
    done = min(1.0, max(0.0, (round_ - 1) / (rounds - 1)))
    shape = 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1 - done
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * shape)


def for_round(cfg: TrainConfig, round_: int, rounds: int) -> TrainConfig:
    """The training settings of one round: train.lr replaced by the round's rate."""
    return replace(cfg, lr=round_lr(cfg, round_, rounds))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's trainable adapter; with train.loraplus_ratio != 1, peft's
    LoRA+ parameter groups (B at lr x ratio, A at lr)."""
    kind = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    options = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    if cfg.loraplus_ratio == 1:
        params = list(adapter_parameters(model).values())
        return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        kind,
        lr=cfg.lr,
        loraplus_lr_ratio=cfg.loraplus_ratio,
        loraplus_weight_decay=cfg.weight_decay,
        **options,
    )


def local_train(
    model,
    rows: Sequence[Encoded],
    steps: int,
    cfg: TrainConfig,
    terms: TrainingTerms,
    rng: np.random.Generator,
    pad_id: int,
    bf16: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    dp: DPSGD | None = None,
) -> LocalResult:
    """Run `steps` optimiser steps from the adapter currently in `model` (a fresh optimiser
    unless one is passed in, as centralised training across checkpoints does).

    FedProx's proximal term and SCAFFOLD's control-variate correction are added to the gradient
    here, after clipping the data gradient, so that neither is clipped away. With `dp`, batches
    are Poisson samples of privacy units and the data gradient is opacus's clipped, noised
    per-unit mean; a step is one logical batch, however many physical pieces it takes.
    """
    params = adapter_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    start = before if terms.prox_mu else {}
    correction = (
        {
            n: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(params[n].device)
            for n, v in terms.grad_correction.items()
        }
        if terms.grad_correction
        else {}
    )
    optimizer = optimizer or make_optimizer(model, cfg)
    private = PrivateSteps(model, optimizer, dp, rows, steps) if dp else None
    model.train()
    total, batches_seen = 0.0, 0
    stream = batches(rows, cfg.batch_size, rng, cfg.class_balance)
    try:
        for _ in range(steps):
            loss = _gradient(model, params, stream, cfg, private, pad_id, bf16)
            if loss is not None:
                total += loss
                batches_seen += 1
            with torch.no_grad():
                for name, p in params.items():
                    if terms.prox_mu:
                        p.grad.add_(p - start[name], alpha=terms.prox_mu)
                    if name in correction:
                        p.grad.add_(correction[name])
            optimizer.step()
    finally:
        if private:
            private.close()
    model.eval()
    if steps and all(torch.equal(p, before[n]) for n, p in params.items()):
        raise FedloraError(
            f"{steps} local steps left the adapter exactly unchanged: the model passed no "
            "gradient to the LoRA parameters (a quantised base whose backend cannot train, or a "
            "learning rate of 0). Check model.quantization and train.lr."
        )
    return LocalResult(total / max(1, batches_seen), steps)


def _gradient(
    model,
    params: dict[str, torch.nn.Parameter],
    stream: Iterator[list[Encoded]],
    cfg: TrainConfig,
    private: PrivateSteps | None,
    pad_id: int,
    bf16: bool,
) -> float | None:
    """Set p.grad to this step's data gradient; return the batch loss (None: empty batch)."""
    if private is None:
        for p in params.values():
            p.grad = None
        # train.accumulation micro-batches, each weighted by its share of the logical batch,
        # so the gradient is the one of a single batch_size * accumulation batch
        micro = [next(stream) for _ in range(cfg.accumulation)]
        total_rows = sum(len(b) for b in micro)
        value = 0.0
        for batch in micro:
            loss = batch_loss(model, batch, pad_id, bf16) * (len(batch) / total_rows)
            loss.backward()
            value += float(loss.detach())
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        return value
    return private.logical_step(lambda batch: batch_loss(model, batch, pad_id, bf16))


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float | None
    macro_f1: float | None
    perplexity: float | None
    correct: list[bool]  # per row (classification), for per-site accuracy and paired tests


@torch.no_grad()
def score_rows(
    model,
    encoder: Encoder,
    rows: Sequence[Encoded],
    pad_id: int,
    batch_size: int = 16,
    bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per row: the summed answer-token loss, its number of loss tokens, and (classification)
    the index of the most likely candidate answer. Rows are batched by length so that little
    is spent on padding; results come back in row order."""
    model.eval()
    n = len(rows)
    loss_sum, tokens = np.zeros(n), np.zeros(n, dtype=np.int64)
    pred = np.full(n, -1, dtype=np.int64) if encoder.task == "classify" else None
    order = sorted(range(n), key=lambda i: len(rows[i].input_ids))
    for start in range(0, n, batch_size):
        ids = order[start : start + batch_size]
        batch = [rows[i] for i in ids]
        losses, logits, row_of = token_losses(model, batch, pad_id, bf16)
        loss_sum[ids] = (
            losses.new_zeros(len(batch), dtype=torch.float64)
            .index_add(0, row_of, losses.double())
            .cpu()
            .numpy()
        )
        tokens[ids] = torch.bincount(row_of, minlength=len(batch)).cpu().numpy()
        if pred is None:
            continue
        if encoder.first_token_decides:
            # the first loss position of each row predicts the first answer token
            first = [int((row_of == i).nonzero()[0]) for i in range(len(batch))]
            firsts = torch.tensor([c[0] for c in encoder.candidates])
            pred[ids] = logits[first][:, firsts.to(logits.device)].argmax(dim=1).cpu().numpy()
        else:
            pred[ids] = score_candidates(model, encoder, batch, pad_id, bf16)
    return loss_sum, tokens, pred


def evaluate(
    model,
    encoder: Encoder,
    rows: Sequence[Encoded],
    pad_id: int,
    batch_size: int = 16,
    bf16: bool = False,
) -> EvalResult:
    """Eval loss (full-vocabulary cross-entropy on the answer tokens), and for classification the
    accuracy and macro-F1 of picking the most likely candidate answer."""
    loss_sum, tokens, pred = score_rows(model, encoder, rows, pad_id, batch_size, bf16)
    loss = float(loss_sum.sum() / max(1, tokens.sum()))
    if pred is None:
        return EvalResult(loss, None, None, math.exp(min(loss, 50.0)), [])
    gold = [r.label for r in rows]
    preds = pred.tolist()
    correct = [p == g for p, g in zip(preds, gold, strict=True)]
    return EvalResult(
        loss, sum(correct) / len(correct), macro_f1(gold, preds, len(encoder.labels)), None, correct
    )


def score_candidates(
    model, encoder: Encoder, batch: Sequence[Encoded], pad_id: int, bf16: bool
) -> list[int]:
    """Sum of log-probabilities of each full candidate answer (when first tokens are shared)."""
    scores = torch.zeros(len(batch), len(encoder.candidates))
    for c, cand in enumerate(encoder.candidates):
        variants = [Encoded(b.input_ids[: b.n_prompt] + cand, b.n_prompt, c) for b in batch]
        losses, _, rows = token_losses(model, variants, pad_id, bf16)
        scores[:, c] = -losses.new_zeros(len(batch)).index_add(0, rows, losses).cpu()
    return scores.argmax(dim=1).tolist()
