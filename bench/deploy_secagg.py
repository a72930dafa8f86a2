"""Secure-aggregation overhead per round in a real deployment: `fedlora server` and `--sites`
`fedlora client` site daemons as separate processes on 127.0.0.1, over TLS with node
authentication (certificates and site keys from `fedlora certs`).

The same federation runs in both modes, plaintext (`secure.enabled = false`) and secure
(`true`), `--repeats` times, the order alternating from one repeat to the next (plaintext
first, then secure first, ...; the poll intervals' order too) so that a drift in the machine's
load hits both alike; same seed, model, data and settings: FedAvg, `--rounds` rounds,
`--local-steps` local steps of batch 8 per site, one torch thread per site, evaluation of the
global adapter on `--eval-rows` held-out rows after every round. Each mode gets a fresh server
and fresh site daemons (each on a free port, with its own state), so both start equally cold.
Every process runs on this machine: the network is loopback, so the seconds are compute
(training, masking, secret sharing, unmasking, evaluation) and the protocol's message round
trips, not bandwidth.

From each results folder's metrics.jsonl, for the rounds after round 0 (round 0 only evaluates
the initial adapter): the mean of "seconds" (one round at the server, from sending the train
messages to the end of the evaluation), and the mean "bytes_up" / "bytes_down" (tensor payload
of the round, all sites together; under secure aggregation the SecAgg stages: keys, shares,
masked inputs, confirmations, unmasking shares, and, since every site lists the others under
`[peers]`, the evidence of the round before that each round after the first carries: its masked
inputs, fedlora/apps/evidence.py) and, for a secure mode, the seconds of each stage
("secagg_seconds": from sending its messages to the last reply). Then a markdown table: each
mode's seconds per round (mean ± sample std over repeats, and each repeat's mean), bytes, and
secure / plaintext: the ratio of the means and the median of the per-repeat ratios; and each
secure mode's seconds per stage.

A secure round sets up the next round's session in its mask and unmask messages
(`secure.pipeline`, the default), so round 1 has four message stages and every later round two
(a fifth, the confirmation of the survivors, only in a round where a site dropped);
the table gives the mean over all rounds and over the rounds after the first.
`--own-sessions` adds a mode whose every round sets up its own session (`secure.pipeline =
false`; its sites still train from the keys stage on). `--at-mask` adds one whose every round
sets up its own session and whose sites train only when the mask stage's message arrives
(`site.train_during_key_exchange = false`).

`--poll-intervals 3,0.5` runs both modes at each site poll interval (`site.poll_interval`:
the seconds a site waits before asking again when the server had no message for it; 3 s is
Flower's own wait), every interval in every repeat, and gives a secure / plaintext line per
interval.

Everything is written to a temporary folder that is deleted at the end (`--keep` keeps it and
prints where); every process started is stopped at the end, whatever happened. The base model
comes from the fedlora cache (`$FEDLORA_CACHE`), as for any fedlora command.

    python bench/deploy_secagg.py --rounds 3
    python bench/deploy_secagg.py --model SmolLM2-135M-Instruct --sites 10 --local-steps 6 \
        --rounds 3 --repeats 3 --own-sessions
    python bench/deploy_secagg.py --sites 10 --repeats 2 --poll-intervals 3,1,0.5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlora.deploy.ports import free_port
from fedlora.deploy.settings import DEFAULT_POLL_INTERVAL


@dataclass(frozen=True)
class Mode:
    name: str
    secure: bool
    #: site.train_during_key_exchange: a secure round trains from its keys stage on
    overlap: bool = True
    #: secure.pipeline: a round's keys and shares ride on the round before's messages
    pipeline: bool = True


MODES = (Mode("plaintext", False), Mode("secure", True))
#: --at-mask adds: secure, each site training only when the mask stage's message arrives
AT_MASK = Mode("secure-at-mask", True, overlap=False, pipeline=False)
#: --own-sessions adds: secure, each round setting up its own session (secure.pipeline = false)
OWN_SESSIONS = Mode("secure-own-sessions", True, pipeline=False)
WORDS = {
    "positive": ["great", "helped", "better", "relief", "calm"],
    "negative": ["awful", "worse", "dizzy", "rash", "stopped"],
    "neutral": ["okay", "mixed", "average", "fine", "unsure"],
}


def write_rows(path: Path, seed: int, n: int) -> None:
    """n classification rows (`text`, `label`) of six words each, deterministic in seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        rows.append({"text": " ".join(rng.choice(WORDS[label]) for _ in range(6)), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Processes:
    """Every process this script starts, each in its own process group (a daemon's SuperNode
    and message handler are its children); `stop_all` ends them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def fedlora(self, name: str, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        with (self.root / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedlora.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
        """SIGTERM (a daemon stops cleanly), then SIGKILL; then whatever is left of its
        process group."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group's id is the leader's pid
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            self.stop(proc)


def site_names(count: int) -> list[str]:
    return [f"site{i:02d}" for i in range(1, count + 1)]


def make_certs(root: Path, sites: list[str], timeout: float) -> None:
    """The federation CA, the server certificate for localhost / 127.0.0.1 and every site's
    node-authentication key pair, with `fedlora certs`."""
    args = ["certs", "certs", "--server-name", "localhost", "--server-ip", "127.0.0.1"]
    for site in sites:
        args += ["--site", site]
    subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        cwd=root,
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def site_toml(
    root: Path, mode: str, site: str, port: int, poll_interval: float, overlap: bool
) -> Path:
    path = root / f"site-{mode}-{site}.toml"
    path.write_text(
        "[site]\n"
        f'name = "{site}"\n'
        f'server = "localhost:{port}"\n'
        'ca_cert = "certs/ca.pem"\n'
        f'auth_key = "certs/sites/{site}/auth.key"\n'
        f'state_dir = "state-{mode}-{site}"\n'
        f"poll_interval = {poll_interval}\n"
        f"train_during_key_exchange = {'true' if overlap else 'false'}\n"
        "threads = 1\n\n"
        f'[data]\npath = "{site}.jsonl"\n\n'
        f"[peers]\n{peers_table(root, site)}"
    )
    return path


def peers_table(root: Path, site: str) -> str:
    """Every other site's key fingerprint, as each site lists them (clients/README, "Peers")."""
    from fedlora.secure.identity import fingerprint

    keys = sorted((root / "certs" / "sites").glob("*/auth.pub"))
    return "".join(
        f'{key.parent.name} = "{fingerprint(key.read_bytes())}"\n'
        for key in keys
        if key.parent.name != site
    )


def server_toml(root: Path, mode: str, kind: Mode, port: int, args: argparse.Namespace) -> Path:
    path = root / f"server-{mode}.toml"
    sites = "".join(f'{s} = "certs/sites/{s}/auth.pub"\n' for s in site_names(args.sites))
    path.write_text(
        "[server]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'state_dir = "server-state-{mode}"\n'
        'ca_cert = "certs/ca.pem"\ncert = "certs/server.pem"\nkey = "certs/server.key"\n\n'
        f"[sites]\n{sites}\n"
        f"[model]\nname = {json.dumps(args.model)}\nprecision = {json.dumps(args.precision)}\n\n"
        f'[data]\npath = "eval.jsonl"\ntest_path = "eval.jsonl"\neval_rows = {args.eval_rows}\n\n'
        f"[train]\nlocal_steps = {args.local_steps}\n\n"
        '[strategy]\nname = "fedavg"\n\n'
        f"[federation]\nrounds = {args.rounds}\nmin_clients = {args.sites}\n\n"
        f"[secure]\nenabled = {'true' if kind.secure else 'false'}\n"
        + (f"pipeline = {'true' if kind.pipeline else 'false'}\n\n" if kind.secure else "\n")
        + f'[run]\nseed = {args.seed}\nout = "runs/{mode}"\n'
    )
    return path


def federation(
    root: Path,
    procs: Processes,
    mode: str,
    kind: Mode,
    poll_interval: float,
    args: argparse.Namespace,
) -> list[dict]:
    """One federation with a fresh server and fresh site daemons; its metrics.jsonl rows."""
    port = free_port()
    config = server_toml(root, mode, kind, port, args)
    name = f"server-{mode}"
    server = procs.fedlora(name, "server", "--config", config.name)
    sites = []
    try:
        wait_for(
            lambda: "Listening on" in procs.log(name) or server.poll() is not None,
            args.start_timeout,
            f"the {mode} server to listen",
        )
        if server.poll() is not None:
            raise RuntimeError(f"the {mode} server exited:\n{procs.log(name)[-3000:]}")
        for site in site_names(args.sites):
            site_config = site_toml(root, mode, site, port, poll_interval, kind.overlap)
            sites.append(
                procs.fedlora(f"site-{mode}-{site}", "client", "--config", site_config.name)
            )
        started = time.monotonic()
        try:
            code = server.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"the {mode} federation did not finish in {args.timeout:.0f} s:\n"
                f"{procs.log(name)[-3000:]}"
            ) from None
        if code != 0:
            raise RuntimeError(f"the {mode} server exited {code}:\n{procs.log(name)[-3000:]}")
        print(f"{mode}: {time.monotonic() - started:.0f} s wall", file=sys.stderr)
    finally:
        for proc in [server, *sites]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [server, *sites]:
            Processes.stop(proc)
    lines = (root / "runs" / mode / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@dataclass
class PerRound:
    """Means over the rounds after round 0, and each round's seconds."""

    seconds: float
    bytes_up: float
    bytes_down: float
    each: list[float]
    #: secure: mean seconds of each stage (keys, share, mask, unmask) over the rounds that had
    #: it (with secure.pipeline only round 1 has keys and share stages of its own)
    stages: dict[str, float]

    @property
    def after_first(self) -> float:
        """Mean seconds of the rounds after round 1 (those a pipelined session speeds up)."""
        return statistics.mean(self.each[1:] or self.each)


def per_round(rows: list[dict], rounds: int) -> PerRound:
    later = [r for r in rows if r["round"] > 0]
    if [r["round"] for r in later] != list(range(1, rounds + 1)):
        raise RuntimeError(f"expected rounds 1..{rounds}, got {[r['round'] for r in rows]}")
    stages = [r.get("secagg_seconds", {}) for r in later]
    return PerRound(
        seconds=statistics.mean(r["seconds"] for r in later),
        bytes_up=statistics.mean(r["bytes_up"] for r in later),
        bytes_down=statistics.mean(r["bytes_down"] for r in later),
        each=[r["seconds"] for r in later],
        stages={
            stage: statistics.mean(s[stage] for s in stages if stage in s)
            for stage in dict.fromkeys(k for s in stages for k in s)
        },
    )


def table(results: dict[str, list[PerRound]], modes: list[Mode], intervals: list[float]) -> str:
    """Seconds per round per mode (and poll interval) over repeats, bytes, and each secure
    mode's ratio to plaintext per poll interval."""
    lines = [
        "| mode | s / round, mean ± std over repeats | each repeat (mean of its rounds) | "
        "rounds after the first, s | bytes up / round | bytes down / round |",
        "|---|---|---|---|---|---|",
    ]
    for mode, runs in results.items():
        means = [r.seconds for r in runs]
        spread = statistics.stdev(means) if len(means) > 1 else 0.0
        each = ", ".join(f"{m:.1f}" for m in means)
        lines.append(
            f"| {mode} | {statistics.mean(means):.1f} ± {spread:.1f} | {each} | "
            f"{statistics.mean(r.after_first for r in runs):.1f} | "
            f"{runs[0].bytes_up:,.0f} | {runs[0].bytes_down:,.0f} |"
        )

    def ratios(secure: list[PerRound], plain: list[PerRound], of: Callable) -> str:
        mean = statistics.mean(map(of, secure)) / statistics.mean(map(of, plain))
        paired = statistics.median(of(s) / of(p) for s, p in zip(secure, plain, strict=True))
        return f"{mean:.2f}x (median of the per-repeat ratios {paired:.2f}x)"

    for interval in intervals:
        plain = results[label("plaintext", interval, intervals)]
        for mode in [m for m in modes if m.secure]:
            secure = results[label(mode.name, interval, intervals)]
            lines.append(
                f"| {label(f'{mode.name} / plaintext', interval, intervals)} "
                f"| {ratios(secure, plain, lambda r: r.seconds)} | "
                f"| {ratios(secure, plain, lambda r: r.after_first)} "
                f"| {secure[0].bytes_up / plain[0].bytes_up:.2f}x "
                f"| {secure[0].bytes_down / plain[0].bytes_down:.2f}x |"
            )
    lines.append("")
    for mode, runs in results.items():
        if runs[0].stages:
            stages = ", ".join(
                f"{stage} {statistics.mean(r.stages[stage] for r in runs):.1f}"
                for stage in runs[0].stages
            )
            lines.append(f"{mode}: seconds per stage, mean over rounds and repeats: {stages}")
    return "\n".join(lines)


def label(mode: str, interval: float, intervals: list[float]) -> str:
    return mode if len(intervals) == 1 else f"{mode}, poll {interval:g} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per federation (3)")
    parser.add_argument("--sites", type=int, default=3, help="site daemons (3)")
    parser.add_argument("--repeats", type=int, default=1, help="federations per mode (1)")
    parser.add_argument("--model", default="tiny-random", help="base model (tiny-random)")
    parser.add_argument("--precision", default="fp32", help="model.precision (fp32)")
    parser.add_argument("--local-steps", type=int, default=2, help="local steps per round (2)")
    parser.add_argument("--rows", type=int, default=40, help="training rows per site (40)")
    parser.add_argument("--eval-rows", type=int, default=20, help="server eval rows (20)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed, both modes (0)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per federation (900)")
    parser.add_argument(
        "--start-timeout", type=float, default=300.0, help="seconds for a server to listen (300)"
    )
    parser.add_argument(
        "--poll-intervals",
        default=str(DEFAULT_POLL_INTERVAL),
        help=f"comma list of site.poll_interval seconds ({DEFAULT_POLL_INTERVAL})",
    )
    parser.add_argument(
        "--at-mask",
        action="store_true",
        help="also run secure rounds whose sites train only at the mask stage "
        "(site.train_during_key_exchange = false)",
    )
    parser.add_argument(
        "--own-sessions",
        action="store_true",
        help="also run secure rounds that each set up their own session (secure.pipeline = false)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    intervals = [float(x) for x in args.poll_intervals.split(",")]
    modes = [*MODES, *([OWN_SESSIONS] if args.own_sessions else [])]
    modes += [AT_MASK] if args.at_mask else []

    from fedlora.model import resolve_model

    resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))  # fetched/built once

    root = Path(tempfile.mkdtemp(prefix="fedlora-deploy-secagg-"))
    procs = Processes(root)
    # the daemons run in sessions of their own: a SIGTERM to this script must reach them too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        sites = site_names(args.sites)
        make_certs(root, sites, timeout=120)
        for i, site in enumerate(sites):
            write_rows(root / f"{site}.jsonl", seed=i, n=args.rows)
        write_rows(root / "eval.jsonl", seed=99, n=max(args.eval_rows, 1))
        results: dict[str, list[PerRound]] = {
            label(mode.name, interval, intervals): [] for interval in intervals for mode in modes
        }
        for repeat in range(args.repeats):
            order = modes if repeat % 2 == 0 else modes[::-1]
            by_interval = list(enumerate(intervals))
            for i, interval in by_interval if repeat % 2 == 0 else by_interval[::-1]:
                for mode in order:
                    name = f"{mode.name}-{i}-{repeat + 1}"
                    rows = federation(root, procs, name, mode, interval, args)
                    runs = results[label(mode.name, interval, intervals)]
                    runs.append(per_round(rows, args.rounds))
                    each = ", ".join(f"{x:.1f}" for x in runs[-1].each)
                    print(f"{name} (poll {interval:g} s): s / round {each}", file=sys.stderr)
        print(
            f"{args.model}, {args.sites} site daemons + server on 127.0.0.1 (TLS, node auth), "
            f"fedavg, {args.rounds} rounds x {args.local_steps} local steps, "
            f"precision {args.precision}, seed {args.seed}\n"
        )
        print(table(results, modes, intervals))
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
