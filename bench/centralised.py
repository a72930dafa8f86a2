"""Centralised LoRA on the pooled training rows: the ceiling a federation is compared with.

Same model, LoRA, optimiser and loss as a site's local training; evaluates the adapter on the
same held-out rows at the given checkpoints. Prints one JSON line per checkpoint.

    python bench/centralised.py --steps 50,100,150 --set train.lr=1e-3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedlora.config import load_config, parse_override
from fedlora.runtime import build_runtime
from fedlora.strategies import TrainingTerms
from fedlora.train import evaluate, local_train, make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--steps", default="50,100,150", help="checkpoints (cumulative steps)")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, [parse_override(s) for s in args.set])
    cfg.train.threads = max(cfg.train.threads, 2)
    rt = build_runtime(cfg)
    rows = rt.encoder.encode_all(rt.dataset.train)
    eval_rows, _ = rt.eval_set()
    optimizer = make_optimizer(rt.model, cfg.train)
    rng = np.random.default_rng(cfg.run.seed)
    done, train_seconds = 0, 0.0

    def report(loss: float | None) -> None:
        t = time.perf_counter()
        res = evaluate(rt.model, rt.encoder, eval_rows, rt.pad_id, bf16=rt.bf16)
        print(
            json.dumps(
                {
                    "steps": done,
                    "train_loss": loss,
                    "eval_loss": res.loss,
                    "eval_accuracy": res.accuracy,
                    "eval_macro_f1": res.macro_f1,
                    "train_seconds": round(train_seconds, 1),
                    "eval_seconds": round(time.perf_counter() - t, 1),
                }
            ),
            flush=True,
        )

    report(None)
    for target in [int(s) for s in args.steps.split(",")]:
        t = time.perf_counter()
        result = local_train(
            rt.model,
            rows,
            target - done,
            cfg.train,
            TrainingTerms(),
            rng,
            rt.pad_id,
            bf16=rt.bf16,
            optimizer=optimizer,
        )
        train_seconds += time.perf_counter() - t
        done = target
        report(result.mean_loss)


if __name__ == "__main__":
    main()
