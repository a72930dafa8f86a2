"""Training throughput and peak GPU memory per client with 1, 2, 4 and 8 clients sharing one GPU,
against the same clients trained one at a time on that GPU.

"one at a time" is one process that loads the base once and trains the sites one after another
(what a single simulation worker does with `federation.gpus_per_client = 1`); a round of N sites
then takes the sum of their times. "shared" is N processes at once (what N workers with
`gpus_per_client = 1/N` are): each loads the base, takes one warm-up step and waits; all start
their timed steps together, and the round takes from the first start to the last finish. Every
site trains `--steps` local steps on its own rows. Tokens are each row's real (unpadded) length
summed over the batches a site trains. Memory is PyTorch's peak per process: allocated (tensors)
and reserved (what its allocator holds on the GPU; the CUDA context, about 0.5 GiB, comes on top).

    python bench/gpu.py                                # the three bases below, 1/2/4/8 clients
    python bench/gpu.py --models tiny-random --clients 1 2 --steps 3 --device cpu   # smoke run
    python bench/gpu.py --json gpu.json --set train.batch_size=16

Default bases: the default model (bf16 weights), random:llama-1b (bf16 weights) and
random:llama-8b in 4-bit NF4 with bf16 compute (a random:<shape> base is built once in the
fedlora cache: about 2.5 GB and 16 GB on disk).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

#: name -> overrides of each benchmarked base
BASES: dict[str, list[str]] = {
    "SmolLM2-135M-Instruct": ["model.dtype=bf16"],
    "random:llama-1b": ["model.dtype=bf16"],
    "random:llama-8b": ["model.quantization=4bit", "model.dtype=bf16"],
}


def worker(args: argparse.Namespace) -> None:
    """One process: load, warm up, say "ready", wait for "go" on stdin, then train each of its
    sites for `steps` steps; the last stdout line is a JSON report."""
    import numpy as np
    import torch

    from fedlora.config import load_config, parse_override
    from fedlora.runtime import build_runtime
    from fedlora.strategies import TrainingTerms
    from fedlora.train import local_train

    sets = [
        f"model.name={args.worker}",
        f"model.device={args.device}",
        f"federation.clients={args.sites_in_federation}",
        *args.set,
    ]
    cfg = load_config(None, [parse_override(s) for s in sets])
    rt = build_runtime(cfg, log=lambda _m: None)
    cuda = rt.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    terms = TrainingTerms()
    local_train(rt.model, rt.site_rows(args.sites[0]), 1, cfg.train, terms,
                np.random.default_rng(0), rt.pad_id, bf16=rt.bf16)  # fmt: skip
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    print("ready", flush=True)
    sys.stdin.readline()
    sites = []
    for site in args.sites:
        rows = rt.site_rows(site)
        batch_rows = args.steps * cfg.train.accumulation * min(cfg.train.batch_size, len(rows))
        start = time.time()
        local_train(rt.model, rows, args.steps, cfg.train, terms,
                    np.random.default_rng(site), rt.pad_id, bf16=rt.bf16)  # fmt: skip
        sync()
        end = time.time()
        mean_len = float(np.mean([len(r.input_ids) for r in rows]))
        sites.append({"site": site, "start": start, "end": end, "tokens": mean_len * batch_rows})
    report = {"sites": sites, "bf16": rt.bf16, "device": str(rt.device)}
    if cuda:
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print(json.dumps(report), flush=True)


def start_workers(args, model: str, overrides: list[str], groups: list[list[int]]) -> list[dict]:
    """One process per group of sites; all load and warm up, then start their timed steps at
    once. Returns each process's report."""
    cmd = [sys.executable, __file__, "--worker", model, "--steps", str(args.steps)]
    cmd += ["--device", args.device, "--sites-in-federation", str(max(args.clients))]
    cmd += [a for o in overrides for a in ("--set", o)]
    procs = [
        subprocess.Popen(
            [*cmd, "--sites", *map(str, sites)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        for sites in groups
    ]  # fmt: skip
    try:
        for p in procs:  # wait until every process has loaded and warmed up
            line = "-"
            while line and line.strip() != "ready":
                line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a worker exited before its timed steps ({p.wait()})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate()[0] for p in procs]
    finally:  # no worker outlives the group (an error, Ctrl-C, a timeout's SIGTERM)
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker exited with {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outputs]


def row(model, clients, mode, seconds, tokens, reports) -> dict:
    peak = {
        k: max(r.get(k, 0.0) for r in reports) for k in ("peak_allocated_gib", "peak_reserved_gib")
    }
    return {
        "model": model, "clients": clients, "mode": mode, "round_s": seconds,
        "tokens_per_s": tokens / seconds, "bf16": reports[0]["bf16"], **peak,
    }  # fmt: skip


def bench_base(args, model: str, overrides: list[str], rows: list[dict]) -> None:
    """One at a time: one process trains sites 0..max-1 in turn (its first N sites make the
    N-site round). Shared: N processes, one site each. Appends to `rows` as it goes."""
    most = max(args.clients)
    (alone,) = start_workers(args, model, overrides, [list(range(most))])
    for n in args.clients:
        sites = alone["sites"][:n]
        seconds = sum(s["end"] - s["start"] for s in sites)
        rows.append(
            row(model, n, "one at a time", seconds, sum(s["tokens"] for s in sites), [alone])
        )
        emit(rows[-1], args.json, rows)
    for n in args.clients:
        if n == 1:  # one process with one site: the same as one at a time
            continue
        reports = start_workers(args, model, overrides, [[i] for i in range(n)])
        sites = [s for r in reports for s in r["sites"]]
        seconds = max(s["end"] for s in sites) - min(s["start"] for s in sites)
        rows.append(row(model, n, "shared", seconds, sum(s["tokens"] for s in sites), reports))
        emit(rows[-1], args.json, rows)


def emit(r: dict, path: str | None, rows: list[dict]) -> None:
    """Print a row of the table, and rewrite the JSON file (a timeout keeps what was done)."""
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)
    print(
        f"| {r['model']} | {r['clients']} | {r['mode']} | {r['round_s']:.2f} | "
        f"{r['tokens_per_s']:.0f} | {r['peak_allocated_gib']:.2f} | {r['peak_reserved_gib']:.2f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BASES))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=10, help="local steps per site")
    parser.add_argument("--device", default="cuda", help="model.device of every client")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sites", nargs="+", type=int, default=[0], help=argparse.SUPPRESS)
    parser.add_argument("--sites-in-federation", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the workers' clean-up
    if args.worker:
        worker(args)
        return
    import torch
    import transformers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu.py --device cuda needs a CUDA GPU (--device cpu for a smoke run).")
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"{where}, torch {torch.__version__}, transformers {transformers.__version__}")
    print("| base | clients | mode | round s | tokens/s | peak alloc GiB | peak reserved GiB |")
    print("|---|---|---|---|---|---|---|")
    results: list[dict] = []
    for model in args.models:
        try:
            bench_base(args, model, BASES.get(model, []) + args.set, results)
        except RuntimeError as e:
            print(f"| {model} | | failed: {e} | | | | |", flush=True)


if __name__ == "__main__":
    main()
