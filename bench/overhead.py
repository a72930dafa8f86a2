"""Framework overhead: a `fedlora simulate` run against a bare loop doing the same work.

The bare loop runs in one process with all cores: every site's local steps of every round
(same rows, same seeds, same optimiser), then the same number of evaluations of the held-out
rows. Both are timed in one invocation, one after the other, so the ratio compares like with
like on the same machine. Prints one JSON object.

    python bench/overhead.py --strategy fedprox
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fedlora.apps.contribution import seed_training, site_local_steps
from fedlora.config import load_config, parse_override
from fedlora.privacy.secrets import simulated_secret
from fedlora.runtime import build_runtime
from fedlora.simulate import simulate
from fedlora.strategies import TrainingTerms
from fedlora.train import evaluate, local_train


def bare_loop(cfg) -> dict[str, float]:
    cfg.train.threads = os.cpu_count() or 1
    rt = build_runtime(cfg)
    eval_rows, _ = rt.eval_set()
    train_s = 0.0
    t0 = time.perf_counter()
    for round_ in range(1, cfg.federation.rounds + 1):
        for site in range(cfg.federation.clients):
            batches = seed_training(simulated_secret(cfg.run.seed, site), round_, site)
            steps = site_local_steps(cfg.train, site, cfg.federation.clients)
            local_train(
                rt.model,
                rt.site_rows(site),
                steps,
                cfg.train,
                TrainingTerms(),
                batches,
                rt.pad_id,
                bf16=rt.bf16,
            )
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(cfg.federation.rounds + 1):
        evaluate(rt.model, rt.encoder, eval_rows, rt.pad_id, bf16=rt.bf16)
    return {"bare_train_seconds": train_s, "bare_eval_seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fedprox")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    overrides = [{"strategy": {"name": args.strategy}}] + [parse_override(s) for s in args.set]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, overrides + [{"run": {"out": str(Path(tmp) / "run")}}])
        t0 = time.perf_counter()
        out = simulate(cfg, log=lambda _: None)
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
    bare = bare_loop(load_config(None, overrides))
    bare_total = bare["bare_train_seconds"] + bare["bare_eval_seconds"]
    print(
        json.dumps(
            {
                "strategy": args.strategy,
                "simulate_wall_seconds": round(wall, 1),
                **{k: round(v, 1) for k, v in bare.items()},
                "overhead_vs_train_and_eval": round(wall / bare_total, 3),
                "overhead_vs_train_only": round(wall / bare["bare_train_seconds"], 3),
                "final_accuracy": summary["final"]["eval_accuracy"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
