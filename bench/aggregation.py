"""Server-side aggregation time per round for each `lora.aggregation` mode, at 10 and 100 sites.

Synthetic contributions with the shapes of SmolLM2-135M's q/v adapter (30 layers, LoRA r=8 on
q_proj 576->576 and v_proj 576->192; the default until the learning study made it o_proj),
FedAvg weights. Times the server's own functions
(fedlora.aggregation), including the factor-averaging error it reports each round. Medians of
--repeats, the modes alternating. "svd" is the path the server takes (a QR of the stacked
factors), "svd-dense" the dense d x k products and full SVDs it replaced (still used with
server momentum), side by side on the same contributions.

    python bench/aggregation.py --sites 10,100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fedlora.aggregation import (
    _svd_dense,
    aggregate_factors,
    aggregate_svd,
    factor_error,
    site_adapters,
)
from fedlora.strategies import LocalWork, ServerOptimizer, make_strategy

R, LAYERS, SHAPES = 8, 30, {"q_proj": (576, 576), "v_proj": (192, 576)}


def adapter(rng: np.random.Generator, scale: float = 0.01, b_only: bool = False) -> dict:
    out = {}
    for layer in range(LAYERS):
        for module, (d_out, d_in) in SHAPES.items():
            prefix = f"model.layers.{layer}.self_attn.{module}"
            if not b_only:
                out[f"{prefix}.lora_A.default.weight"] = rng.normal(0, scale, (R, d_in))
            out[f"{prefix}.lora_B.default.weight"] = rng.normal(0, scale, (d_out, R))
    return {k: v.astype(np.float32) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,100")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for n in (int(s) for s in args.sites.split(",")):
        strategy = make_strategy("fedavg", total_clients=n)
        work = LocalWork(num_examples=60, steps=6, lr=1e-3)
        full_global, b_global = adapter(rng), adapter(rng, b_only=True)
        frozen = {k: v for k, v in full_global.items() if "lora_A" in k}
        contrib = {
            "factors": [
                strategy.client_contribution(adapter(rng), work, {}, {})[0] for _ in range(n)
            ],
            "freeze-a": [
                strategy.client_contribution(adapter(rng, b_only=True), work, {}, {})[0]
                for _ in range(n)
            ],
        }
        contrib["svd"] = contrib["svd-dense"] = contrib["factors"]
        times: dict[str, list[float]] = {m: [] for m in contrib}
        for _ in range(args.repeats):
            for mode, cs in contrib.items():
                t = time.perf_counter()
                if mode == "svd":
                    aggregate_svd(strategy, ServerOptimizer(), full_global, cs, [work] * n, R)
                elif mode == "svd-dense":
                    locals_ = list(site_adapters(strategy, full_global, cs))
                    _svd_dense(strategy, ServerOptimizer(), full_global, locals_, [work] * n, R)
                else:
                    x = b_global if mode == "freeze-a" else full_global
                    factor_error(strategy, x, frozen if mode == "freeze-a" else {}, cs)
                    aggregate_factors(strategy, ServerOptimizer(), x, cs)
                times[mode].append(time.perf_counter() - t)
        results[f"{n} sites"] = {m: round(statistics.median(v), 3) for m, v in times.items()}
        print(json.dumps({f"{n} sites": results[f"{n} sites"]}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
