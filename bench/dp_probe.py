"""Privacy/utility probes: choose DP-SGD settings by measurement, fast.

Runs the federation's rounds in one process on any torch device (on a GPU a probe of the default
federation takes under a minute instead of a quarter of an hour on two cores), built from
fedlora's own pieces: each site's mechanism (the noise for a target epsilon from its row count,
Poisson rate and steps), `local_train` with opacus, the strategy's two halves and the server
step. It leaves out transport (Flower), secure aggregation and budgets, and it seeds sites its
own way: settings it points to are confirmed with `fedlora simulate` / `fedlora sweep`.

Each line of a points file is `NAME key=value key=value ...` (config overrides, as `--set`);
`--shard i/n` runs every n-th point, so several processes can share one GPU.

    python bench/dp_probe.py --points bench/dp_points.txt --device cuda --out probes.jsonl \
        --set privacy.level=sample --set privacy.target_epsilon=8

`loss=choice` in a point (not a config key) trains on the cross-entropy over the candidate
answers' first tokens only, instead of over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fedlora.train as train_module
from fedlora.adapter import adapter_arrays, load_adapter_arrays
from fedlora.aggregation import aggregate_factors
from fedlora.config import load_config, parse_override
from fedlora.privacy import dpsgd
from fedlora.privacy.policy import sample_mechanism, spend
from fedlora.privacy.secrets import simulated_secret
from fedlora.runtime import build_runtime
from fedlora.strategies import LocalWork, ServerOptimizer, strategy_for
from fedlora.train import evaluate, local_train, token_losses

ANSWER_LOSS = train_module.batch_loss  # fedlora's own loss (cross-entropy over the vocabulary)


def read_points(path: Path) -> list[tuple[str, list[str]]]:
    points = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, *sets = line.split()
            points.append((name, sets))
    return points


def choice_loss(candidates: list[int]):
    """Cross-entropy over the candidates' first tokens at each row's first answer position."""
    firsts = torch.tensor(candidates)

    def batch_loss(model, batch, pad_id, bf16=False):
        _, logits, rows = token_losses(model, batch, pad_id, bf16)
        first = torch.tensor([int((rows == i).nonzero()[0]) for i in range(len(batch))])
        labels = torch.tensor([b.label for b in batch])
        return F.cross_entropy(logits[first][:, firsts.to(logits.device)], labels)

    return batch_loss


def on_device(device: str) -> None:
    """Route fedlora's tensor factories to `device` (DP noise follows each parameter's device)."""
    torch.set_default_device(device)


def probe(name: str, sets: list[str], base_sets: list[str], device: str, emit) -> None:
    """Run one point's federation; `emit` gets one row per round (round 0 = no training)."""
    loss_kind = "answer"
    overrides = []
    for s in [*base_sets, *sets]:
        if s.startswith("loss="):
            loss_kind = s.split("=", 1)[1]
        else:
            overrides.append(parse_override(s))
    cfg = load_config(None, overrides)
    rt = build_runtime(cfg, log=lambda _m: None, threads=2)
    rt.model.to(device)
    train_module.batch_loss = (
        choice_loss([c[0] for c in rt.encoder.candidates]) if loss_kind == "choice" else ANSWER_LOSS
    )
    strategy = strategy_for(cfg)
    server_opt = ServerOptimizer(lr=cfg.strategy.server_lr, momentum=cfg.strategy.server_momentum)
    eval_rows, _ = rt.eval_set()
    global_arrays = adapter_arrays(rt.model)
    steps = cfg.train.local_steps
    started = time.perf_counter()

    def record(round_: int, epsilon: float) -> None:
        load_adapter_arrays(rt.model, global_arrays)
        ev = evaluate(rt.model, rt.encoder, eval_rows, rt.pad_id, batch_size=64)
        row = {
            "point": name,
            "sets": sets,
            "round": round_,
            "accuracy": ev.accuracy,
            "macro_f1": ev.macro_f1,
            "eval_loss": ev.loss,
            "epsilon": epsilon,
            "seconds": round(time.perf_counter() - started, 1),
        }
        emit(row)

    record(0, 0.0)
    for round_ in range(1, cfg.federation.rounds + 1):
        contributions, epsilon_now = [], 0.0 if cfg.privacy.level == "sample" else float("inf")
        for site in range(cfg.federation.clients):
            rows = rt.site_rows(site)
            seed = int(np.random.SeedSequence([cfg.run.seed, round_, site]).generate_state(1)[0])
            torch.manual_seed(seed)
            load_adapter_arrays(rt.model, global_arrays)
            dp = None
            if cfg.privacy.level == "sample":
                mech = sample_mechanism(cfg, len(rows), steps)
                dp = dpsgd.DPSGD.for_round(
                    mech.noise_multiplier,
                    mech.max_grad_norm,
                    mech.sample_rate,
                    secret=simulated_secret(cfg.run.seed, site),
                    round_=round_,
                    site=site,
                )
                entry = (mech.noise_multiplier, mech.sample_rate, steps)
                epsilon_now = max(epsilon_now, spend(cfg, mech, [entry] * round_).epsilon)
            local_train(
                rt.model,
                rows,
                steps,
                cfg.train,
                train_module.TrainingTerms(),
                np.random.default_rng(seed),
                rt.pad_id,
                dp=dp,
            )
            local = adapter_arrays(rt.model)
            delta = {k: local[k] - global_arrays[k] for k in global_arrays}
            work = LocalWork(len(rows), steps, cfg.train.lr, cfg.train.momentum)
            contributions.append(strategy.client_contribution(delta, work, {}, {})[0])
        global_arrays = aggregate_factors(strategy, server_opt, global_arrays, contributions)
        record(round_, epsilon_now)


def write(out, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="applies to every point")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th point from i")
    parser.add_argument("--out", type=Path, required=True, help="JSONL, one row per round")
    args = parser.parse_args()
    i, n = (int(x) for x in args.shard.split("/"))
    if args.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        on_device(args.device)
    with args.out.open("a") as out:
        for name, sets in read_points(args.points)[i::n]:
            try:
                probe(name, sets, args.set, args.device, lambda row: write(out, row))
            except Exception:  # a probe that breaks must not stop the others
                print(f"probe {name} failed:\n{traceback.format_exc()}")


if __name__ == "__main__":
    main()
