"""Side-by-side cost of a DP-SGD training step (opacus per-example gradients, clipping, noise)
against a plain step on the same model, batch size and precision.

The variants alternate so that machine noise hits both alike; prints the median seconds per
step and the ratio. `python bench/dp_step.py --repeats 5 --steps 6 --threads 2`
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fedlora.config import load_config, parse_override
from fedlora.privacy.dpsgd import DPSGD
from fedlora.privacy.secrets import simulated_secret
from fedlora.runtime import build_runtime
from fedlora.strategies import TrainingTerms
from fedlora.train import local_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="steps per timed call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(None, [parse_override(s) for s in args.set])
    cfg.train.threads = args.threads
    rt = build_runtime(cfg)
    rows = rt.site_rows(0)
    # the same expected batch as the plain loop's fixed one
    q = min(1.0, cfg.train.batch_size / len(rows))
    dp = DPSGD.for_round(1.0, 1.0, q, secret=simulated_secret(cfg.run.seed, 0), round_=1, site=0)
    times: dict[str, list[float]] = {"plain": [], "dp-sgd": []}
    for repeat in range(args.repeats + 1):  # the first pass warms up and is dropped
        for name, mech in (("plain", None), ("dp-sgd", dp)):
            rng = np.random.default_rng(repeat)
            started = time.perf_counter()
            local_train(
                rt.model,
                rows,
                args.steps,
                cfg.train,
                TrainingTerms(),
                rng,
                rt.pad_id,
                bf16=rt.bf16,
                dp=mech,
            )
            if repeat:
                times[name].append((time.perf_counter() - started) / args.steps)
    plain, private = (statistics.median(times[k]) for k in ("plain", "dp-sgd"))
    print(
        f"model {cfg.model.name}, LoRA r={cfg.lora.r} on {cfg.lora.targets}, "
        f"batch {cfg.train.batch_size}, {'bf16' if rt.bf16 else 'fp32'}, {args.threads} threads"
    )
    print("| step | median s/step |\n|---|---|")
    print(f"| plain | {plain:.3f} |\n| DP-SGD (opacus) | {private:.3f} |")
    print(f"DP-SGD / plain = {private / plain:.2f}")


if __name__ == "__main__":
    main()
