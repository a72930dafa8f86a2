"""Site discovery and one round at many simulated sites (tiny-random, federation.fraction 0.01).

For each site count, in a fresh process (its own Ray instance): writes a synthetic data file
with enough rows, runs one round of `fedlora simulate` and prints the seconds spent in site
discovery, the seconds per site, the whole run's wall time, and the peak resident memory of the
driver and of the driver with every process it started (Ray's), sampled every half second.
`python bench/discovery.py --sites 100 1000`
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def peak_tree_rss(stop: threading.Event, peak: list[int]) -> None:
    """Largest summed RSS of this process and its descendants, until `stop`."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        stop.wait(0.5)


def one(sites: int, fraction: float, folder: Path) -> dict:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import fedlora.apps.server as server
    from fedlora.config import load_config
    from fedlora.simulate import simulate

    data = folder / "rows.jsonl"
    with data.open("w") as fh:
        for i in range(2 * sites + 100):
            fh.write(
                json.dumps({"text": f"review {i}", "label": "good" if i % 2 else "bad"}) + "\n"
            )
    cfg = load_config(
        None,
        [
            {"model": {"name": "tiny-random", "precision": "fp32"}},
            {"data": {"path": str(data), "partition": "iid", "eval_rows": 20}},
            {"federation": {"clients": sites, "rounds": 1, "fraction": fraction}},
            {"train": {"local_steps": 1}},
            {"run": {"out": str(folder / "run")}},
        ],
    )
    timed: dict[str, float] = {}
    discover = server.discover_sites

    def timed_discovery(*args, **kwargs):
        t = time.perf_counter()
        nodes = discover(*args, **kwargs)
        timed["discovery_s"] = time.perf_counter() - t
        return nodes

    server.discover_sites = timed_discovery
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_tree_rss, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    out = simulate(cfg, log=lambda _m: None)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "sites": sites,
        "sampled": rows[-1]["clients"],
        "discovery_s": round(timed["discovery_s"], 2),
        "discovery_ms_per_site": round(1000 * timed["discovery_s"] / sites, 2),
        "round_s": round(rows[-1]["seconds"], 2),
        "wall_s": round(wall, 2),
        "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "tree_peak_mb": round(peak[0] / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's own count
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one(args.one, args.fraction, Path(tmp))), flush=True)
        return
    for sites in args.sites:
        cmd = [sys.executable, __file__, "--one", str(sites), "--fraction", str(args.fraction)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(json.dumps({"sites": sites, "error": done.stderr.strip()[-400:]}), flush=True)
            continue
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
