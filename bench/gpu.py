"""Training throughput and peak GPU memory per client with 1, 2, 4 and 8 clients sharing one GPU,
against the same clients trained one at a time on that GPU.

Each client is its own process (as a Ray worker with `federation.gpus_per_client = 1/N` is): it
loads the base on the GPU once, warms up, then runs `--steps` local training steps on its
site's rows and reports the tokens it trained on, its wall time and
`torch.cuda.max_memory_allocated`. "shared" starts the N processes together; "one at a time"
runs them one after another. Tokens per second are the sum over clients divided by the wall
time of the whole group. Needs a CUDA GPU.

    python bench/gpu.py                                # the three bases below, 1/2/4/8 clients
    python bench/gpu.py --models tiny-random --clients 1 2 --steps 3   # a quick smoke run
    python bench/gpu.py --json gpu.json --set train.batch_size=16

Default bases: the default model (bf16 weights), random:llama-1b (bf16 weights) and
random:llama-8b in 4-bit NF4 with bf16 compute (a random:<shape> base is built once in the
fedlora cache: about 2.5 GB and 16 GB on disk).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

#: name -> overrides of each benchmarked base
BASES: dict[str, list[str]] = {
    "SmolLM2-135M-Instruct": ["model.dtype=bf16"],
    "random:llama-1b": ["model.dtype=bf16"],
    "random:llama-8b": ["model.quantization=4bit", "model.dtype=bf16"],
}


def worker(model: str, overrides: list[str], steps: int, site: int) -> dict:
    """One client: load on the GPU, one warm-up step, then `steps` timed steps."""
    import numpy as np
    import torch

    from fedlora.config import load_config, parse_override
    from fedlora.runtime import build_runtime
    from fedlora.strategies import TrainingTerms
    from fedlora.train import local_train

    sets = [f"model.name={model}", "model.device=cuda", "federation.clients=8", *overrides]
    cfg = load_config(None, [parse_override(s) for s in sets])
    rt = build_runtime(cfg, log=lambda _m: None)
    rows = rt.site_rows(site) or rt.site_rows(0)
    rng = np.random.default_rng(site)
    terms = TrainingTerms()
    local_train(rt.model, rows, 1, cfg.train, terms, rng, rt.pad_id, bf16=rt.bf16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    n_batches = steps * cfg.train.accumulation
    batch_tokens = np.mean([len(r.input_ids) for r in rows]) * cfg.train.batch_size
    start = time.perf_counter()
    local_train(rt.model, rows, steps, cfg.train, terms, rng, rt.pad_id, bf16=rt.bf16)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "tokens": float(batch_tokens * n_batches),
        "seconds": seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "bf16": rt.bf16,
    }


def run_group(model: str, overrides: list[str], steps: int, clients: int, shared: bool) -> dict:
    """N client processes, together (shared) or one after another; their wall time in total."""
    cmd = [sys.executable, __file__, "--worker", model, "--steps", str(steps)]
    cmd += [a for o in overrides for a in ("--set", o)]
    start = time.perf_counter()
    if shared:
        procs = [
            subprocess.Popen([*cmd, "--site", str(i)], stdout=subprocess.PIPE, text=True)
            for i in range(clients)
        ]
        outputs = [p.communicate()[0] for p in procs]
        codes = [p.returncode for p in procs]
    else:
        done = [
            subprocess.run([*cmd, "--site", str(i)], stdout=subprocess.PIPE, text=True)
            for i in range(clients)
        ]
        outputs, codes = [d.stdout for d in done], [d.returncode for d in done]
    if any(codes):
        return {"error": f"a client exited with {codes}"}
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outputs]
    # the group's wall time counts the timed steps only: loading is not training
    if shared:
        wall = max(r["seconds"] for r in reports)
    else:
        wall = sum(r["seconds"] for r in reports)
    return {
        "tokens_per_s": sum(r["tokens"] for r in reports) / wall,
        "peak_gib_per_client": max(r["peak_gib"] for r in reports),
        "step_seconds": wall / steps,
        "including_load_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BASES))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--site", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.set, args.steps, args.site)))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU.")
    import flwr
    import transformers

    print(
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, flwr {flwr.__version__}"
    )
    results = []
    print("| base | clients | mode | tokens/s | step s | peak GiB per client |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        overrides = BASES.get(model, []) + args.set
        for n in args.clients:
            for shared in (True, False):
                row = run_group(model, overrides, args.steps, n, shared)
                mode = "shared" if shared else "one at a time"
                results.append({"model": model, "clients": n, "mode": mode} | row)
                if "error" in row:
                    print(f"| {model} | {n} | {mode} | {row['error']} | | |")
                    continue
                print(
                    f"| {model} | {n} | {mode} | {row['tokens_per_s']:.0f} | "
                    f"{row['step_seconds']:.3f} | {row['peak_gib_per_client']:.2f} |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
