"""Side-by-side timing of one LoRA training step and one evaluation pass: fp32 vs bf16 autocast
(`--compare precision`, the default), or the output layer at the loss positions only (fedlora's
`token_losses`) vs at every position, as a plain `model(...).logits` forward does
(`--compare logits`, at the configured precision).

Alternates the variants so that machine noise hits both alike; prints the median seconds and
the ratio. `python bench/step_speed.py --repeats 5 --threads 2`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedlora import train
from fedlora.config import load_config, parse_override
from fedlora.runtime import build_runtime
from fedlora.strategies import TrainingTerms
from fedlora.train import collate, evaluate, local_train, loss_positions


def full_token_losses(model, batch, pad_id: int, bf16: bool = False):
    """`train.token_losses` as it would be without slicing: logits at every position of every
    row (49k x sequence x batch), then the loss positions picked out."""
    ids, mask = collate(batch, pad_id)
    rows, pos, tgt = loss_positions(batch)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids, attention_mask=mask).logits[rows, pos].float()
    return F.cross_entropy(logits, tgt, reduction="none"), logits, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--compare", choices=("precision", "logits"), default="precision")
    args = parser.parse_args()
    cfg = load_config(None, [parse_override(s) for s in args.set])
    cfg.train.threads = args.threads
    rt = build_runtime(cfg)
    rows = rt.encoder.encode_all(rt.dataset.train)
    eval_rows = rt.encoder.encode_all(rt.dataset.test[: args.eval_rows])
    sliced = train.token_losses
    if args.compare == "precision":
        variants = [("fp32", False, sliced), ("bf16", True, sliced)]
    else:
        variants = [("sliced", rt.bf16, sliced), ("full", rt.bf16, full_token_losses)]
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first pass warms up and is dropped
        for name, bf16, losses in variants:
            train.token_losses = losses  # batch_loss and score_rows look it up in the module
            rng = np.random.default_rng(repeat)
            t = time.perf_counter()
            local_train(rt.model, rows, 1, cfg.train, TrainingTerms(), rng, rt.pad_id, bf16=bf16)
            step = time.perf_counter() - t
            t = time.perf_counter()
            evaluate(rt.model, rt.encoder, eval_rows, rt.pad_id, bf16=bf16)
            ev = time.perf_counter() - t
            if repeat:
                times.setdefault(f"{name}_step", []).append(step)
                times.setdefault(f"{name}_eval{args.eval_rows}", []).append(ev)
    train.token_losses = sliced
    med = {k: statistics.median(v) for k, v in times.items()}
    (a, *_), (b, *_) = variants
    med[f"{b}/{a} step"] = med[f"{b}_step"] / med[f"{a}_step"]
    med[f"{b}/{a} eval"] = med[f"{b}_eval{args.eval_rows}"] / med[f"{a}_eval{args.eval_rows}"]
    # each repeat runs both variants back to back: the median of those pairs' ratios is the
    # figure least moved by a load that changes between repeats
    for what in ("step", f"eval{args.eval_rows}"):
        pairs = zip(times[f"{b}_{what}"], times[f"{a}_{what}"], strict=True)
        med[f"{b}/{a} {what} paired"] = statistics.median(x / y for x, y in pairs)
    if args.compare == "logits":
        med["bf16"] = float(rt.bf16)  # the precision both variants ran at (model.precision)
    print(json.dumps({k: round(v, 3) for k, v in med.items()}, indent=1))


if __name__ == "__main__":
    main()
