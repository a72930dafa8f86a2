"""Side-by-side timing of one LoRA training step and one evaluation pass, fp32 vs bf16 autocast.

Alternates the variants so that machine noise hits both alike; prints the median seconds and
the ratio. `python bench/step_speed.py --repeats 5 --threads 2`
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fedlora.config import load_config, parse_override
from fedlora.runtime import build_runtime
from fedlora.strategies import TrainingTerms
from fedlora.train import evaluate, local_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(None, [parse_override(s) for s in args.set])
    cfg.train.threads = args.threads
    rt = build_runtime(cfg)
    rows = rt.encoder.encode_all(rt.dataset.train)
    eval_rows = rt.encoder.encode_all(rt.dataset.test[: args.eval_rows])
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first pass warms up and is dropped
        for bf16 in (False, True):
            rng = np.random.default_rng(repeat)
            t = time.perf_counter()
            local_train(rt.model, rows, 1, cfg.train, TrainingTerms(), rng, rt.pad_id, bf16=bf16)
            step = time.perf_counter() - t
            t = time.perf_counter()
            evaluate(rt.model, rt.encoder, eval_rows, rt.pad_id, bf16=bf16)
            ev = time.perf_counter() - t
            if repeat:
                name = "bf16" if bf16 else "fp32"
                times.setdefault(f"{name}_step", []).append(step)
                times.setdefault(f"{name}_eval{args.eval_rows}", []).append(ev)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["bf16/fp32 step"] = med["bf16_step"] / med["fp32_step"]
    med["bf16/fp32 eval"] = med[f"bf16_eval{args.eval_rows}"] / med[f"fp32_eval{args.eval_rows}"]
    print(json.dumps({k: round(v, 3) for k, v in med.items()}, indent=1))


if __name__ == "__main__":
    main()
