"""`fedlora simulate`: a whole federation on one machine, on Flower's simulation engine (Ray).

Results go to `<out>.partial/` while the run is going and are moved to `<out>/` only when it
has finished, so a folder without the suffix is always a complete result (fedlora.results).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from fedlora import checkpoint, worker_log
from fedlora.config import Config, ray_address
from fedlora.data import partition_summary
from fedlora.errors import FedloraError
from fedlora.interrupt import Interrupted, StopSwitch, end_children, on_signals, signal_of
from fedlora.privacy.secrets import SIMULATED
from fedlora.quiet import quiet_libraries
from fedlora.report import Reporter, human_bytes
from fedlora.results import (
    check_out,
    check_partial,
    close_results,
    finish,
    open_results,
    precision_name,
    results_dir,
    resume_dir,
    run_state_dir,
    settle_precision,
    work_dir,
)
from fedlora.trackers import open_trackers


def quiet_engines() -> None:
    """Loopback-only Ray without telemetry or noisy logs (set before Ray or Flower start)."""
    quiet_libraries()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray binds to 127.0.0.1
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # a signal ends the run with fedlora's one line, not a stack dump from Ray's C++ core
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray workers inherit the environment: keep library chatter out of the round table
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


def worker_count(cfg: Config, gpus: int | None = None) -> int:
    """Parallel site workers on this machine: federation.workers, else as many as the cores
    hold at train.threads each and, with gpus_per_client, as many as the `gpus` hold."""
    cores = os.cpu_count() or 1
    if cfg.federation.workers:
        return cfg.federation.workers
    count = min(cfg.federation.clients, cores // cfg.train.threads)
    share = cfg.federation.gpus_per_client
    if share > 0:
        count = min(count, int((local_gpus() if gpus is None else gpus) / share + 1e-9))
    return max(1, count)


def workers_text(cfg: Config) -> str:
    """How many sites train at once, as the run's first lines say it."""
    share = cfg.federation.gpus_per_client
    gpu = f", {share:g} GPU each" if share else ""
    if address := ray_address(cfg):
        return f"workers as the Ray cluster at {address} holds them ({cfg.train.threads} CPU{gpu})"
    return f"{worker_count(cfg)} parallel workers{gpu}"


def queueing_note(cfg: Config) -> str:
    """What federation.reply_timeout means in a simulation whose sites outnumber its workers:
    the wait counts from sending a request, so a site still queued for a worker counts too."""
    timeout, sites = cfg.federation.reply_timeout, cfg.federation.clients
    if not timeout or ray_address(cfg) or (workers := worker_count(cfg)) >= sites:
        return ""
    return (
        f"Note: federation.reply_timeout = {timeout:g} s counts from sending a request, and "
        f"{sites} sites queue for {workers} workers: a site still waiting for a worker after "
        "that long counts as dropped for the round."
    )


def local_gpus() -> int:
    from fedlora.device import cuda_count

    return cuda_count()


def backend_config(cfg: Config, gpus: int | None = None) -> dict:
    """Flower's Ray backend settings. On a running cluster (federation.ray_address or
    RAY_ADDRESS) Ray owns the resources: ray.init gets the address and no num_cpus/num_gpus,
    and every node contributes the workers its CPUs and GPUs hold."""
    threads = cfg.train.threads
    resources = {"num_cpus": threads, "num_gpus": cfg.federation.gpus_per_client}
    address = ray_address(cfg)
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
    if address:
        host = address.rpartition(":")[0]
        local = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
        return {"client_resources": resources, "init_args": {"address": address} | quiet | local}
    gpus = local_gpus() if gpus is None and cfg.federation.gpus_per_client > 0 else gpus or 0
    return {
        "client_resources": resources,
        "init_args": {
            # a Ray of its own, even where `ray start` left a cluster running on this machine
            "address": "local",
            "num_cpus": worker_count(cfg, gpus) * threads,
            "num_gpus": gpus,
            "object_store_memory": 256 * 1024 * 1024,
            "_node_ip_address": "127.0.0.1",
        }
        | quiet,
    }


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the address, when no Ray head answers there (Ray itself
    would retry for a minute and Flower then wait for sites that never come)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FedloraError(
            f"federation.ray_address (or RAY_ADDRESS) = {address!r}: expected the head node's "
            "host:port, e.g. 10.0.0.5:6379 (what `ray start --head` printed)."
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise FedloraError(
            f"No Ray cluster answers at {address} ({exc}); start one with `ray start --head "
            f"--port={port}` on that machine, or fix federation.ray_address / RAY_ADDRESS."
        ) from None


def simulate(cfg: Config, log=print, resume: bool = False, restart: bool = False) -> Path:
    """Run the federation described by `cfg`; return the finished results folder. With
    `resume`, continue an interrupted run from its last saved round; with `restart`, replace
    an interrupted run's saved rounds. SIGINT/SIGTERM raise `Interrupted` within seconds."""
    switch = StopSwitch()
    with on_signals(switch):
        try:
            return _simulate(cfg, log, resume, restart, switch)
        except BaseException as exc:
            signum = signal_of(exc, switch)
            if not signum:
                raise
            switch.throw(signum)  # the round loop's thread saves nothing more
            stop_ray()
            end_children(switch)
            out = results_dir(cfg) if cfg.run.out else None
            work = None if out is None else work_dir(out)
            saved = None if out is None else checkpoint.saved_round(run_state_dir(out))
            raise Interrupted(signum, work, saved) from None


def stop_ray() -> None:
    """Ray's helper processes (started by this process) end with it, also when Ray was
    interrupted while starting."""
    if "ray" in sys.modules:
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()


def _simulate(cfg: Config, log, resume: bool, restart: bool, switch: StopSwitch) -> Path:
    quiet_engines()
    out = results_dir(cfg)
    if resume:
        resume_dir(cfg)
        from fedlora.apps.site_state import forget_unfinished_rounds

        state = run_state_dir(out)
        forget_unfinished_rounds(state, checkpoint.saved_round(state), checkpoint.STARTED_FILE)
    else:
        check_out(out)
        if not restart:
            check_partial(out)
    cfg.run.out = str(out)  # resolved once: every site worker keeps its state under it
    if (address := ray_address(cfg)) and address != "auto":  # "auto": Ray finds a local head
        check_ray_address(address)
    from fedlora.runtime import build_runtime, load_data

    for note in cfg.notes:  # what the config chose on the user's behalf, first
        log(note)
    dataset, train_parts, test_parts = load_data(cfg, log)  # fail fast on data errors
    log(
        f"Data: {dataset.name}, {len(dataset.train)} training rows, {len(dataset.test)} held out; "
        f"{cfg.federation.clients} sites:"
    )
    log(partition_summary(dataset, train_parts, test_parts))
    started = time.perf_counter()
    log(f"Loading base model {cfg.model.name} ...")
    # the server evaluates while the site workers wait: it may use every core
    runtime = build_runtime(cfg, log, threads=os.cpu_count() or 1)  # checks lora.targets too
    # "auto" is decided once, here, and every site worker gets the decision (a cluster's nodes
    # may differ); a resumed run keeps the decision of the run it continues.
    requested = cfg.model.precision
    runtime.bf16 = settle_precision(cfg, runtime.bf16, out if resume else None)
    n_params = sum(p.numel() for p in runtime.model.parameters())
    n_lora = sum(p.numel() for p in runtime.model.parameters() if p.requires_grad)
    log(
        f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules())}: {n_lora:,} trainable "
        f"of {n_params:,} parameters ({n_lora / n_params:.2%}), {human_bytes(4 * n_lora)} "
        "per adapter."
    )
    log(
        f"Strategy {cfg.strategy.name}, {cfg.federation.rounds} rounds, "
        f"{cfg.train.local_steps} local steps, {workers_text(cfg)}, "
        f"{precision_name(runtime.bf16)} (model.precision = {requested}) on {runtime.device}."
    )
    if cfg.privacy.level == "sample":
        log(site_noise_line(cfg, dataset, train_parts))
    if note := queueing_note(cfg):
        log(note)
    log(
        f"Site secrets (batches, dropout, DP noise, participation): {SIMULATED}, so the run "
        "repeats; a site daemon draws its own from its OS CSPRNG."
    )
    work = open_results(cfg, out, resume, restart)
    reporter = Reporter(
        work,
        total_rounds=cfg.federation.rounds,
        trackers=open_trackers(cfg.run.trackers, work, cfg.to_dict()),
    )
    try:
        federation = run_engine(
            cfg,
            runtime,
            reporter,
            run_state_dir(out),
            switch,
        )
        finish(cfg, runtime, federation, work, time.perf_counter() - started, SIMULATED)
    except BaseException as exc:
        if signal_of(exc, switch):
            raise
        log(
            f"The run did not finish; partial output kept in {work} (continue it with the same "
            "command and --resume)."
        )
        raise
    finally:
        reporter.close()
    return close_results(out, work)


def site_noise_line(cfg: Config, dataset, train_parts) -> str:
    """DP-SGD's noise at every site that holds rows, worked out as each site will."""
    from fedlora.apps.contribution import site_local_steps
    from fedlora.privacy.accounting import unsafe_delta
    from fedlora.privacy.dpsgd import count_units
    from fedlora.privacy.policy import describe_site_noise

    clients = cfg.federation.clients
    sites = [
        (count_units([dataset.train[i] for i in part]), site_local_steps(cfg.train, s, clients))
        for s, part in enumerate(train_parts)
        if part
    ]
    # the strictest 1/n; a site given more uses 1/(10 n), not the delta the operator asked for
    largest = max(n for n, _ in sites)
    if unsafe := unsafe_delta(cfg.privacy.delta, largest):
        raise FedloraError(f"At the largest site, {unsafe}.")
    return describe_site_noise(cfg, sites)


def run_engine(
    cfg: Config, runtime, reporter: Reporter, state_dir: Path, switch: StopSwitch | None = None
):
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)

    from fedlora.apps.client import make_client_app
    from fedlora.apps.server import Federation, make_server_app

    switch = switch or StopSwitch()
    federation = Federation(cfg, runtime, reporter, state_dir, switch=switch)
    result: dict = {}
    start_ray(cfg, reporter.note)
    flwr_log = logging.getLogger("flwr")
    hush = _Hush(switch)  # once interrupted, the actors Ray stops are no errors to report
    flwr_log.addFilter(hush)
    try:
        with on_signals(switch):  # ray.init replaced fedlora's SIGTERM handler: back to ours
            run_simulation(
                server_app=make_server_app(federation, result),
                client_app=make_client_app(cfg),
                num_supernodes=cfg.federation.clients,
                backend_config=backend_config(cfg),
            )
    finally:
        flwr_log.removeFilter(hush)
    if "adapter" not in result:
        raise FedloraError("The simulation ended without a result; see the messages above.")
    return federation


class _Hush(logging.Filter):
    def __init__(self, switch: StopSwitch) -> None:
        super().__init__()
        self.switch = switch

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.switch.thrown


def start_ray(cfg: Config, log) -> None:
    """Start Ray here rather than inside Flower (which then uses it), to say how long it took:
    it can be tens of seconds on a busy machine."""
    import ray

    started = time.perf_counter()
    log(f"Starting the simulation engine (Ray) with {worker_count(cfg)} site workers ...")
    # as Flower does: the workers import what this process can import
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath += os.pathsep + os.environ["PYTHONPATH"]
    os.environ["PYTHONPATH"] = pythonpath
    init_args = backend_config(cfg)["init_args"]
    runtime_env: dict = {"env_vars": {"PYTHONPATH": pythonpath}}
    if not ray_address(cfg):  # this machine's workers: their chatter goes to <results>/logs/
        runtime_env = worker_log.runtime_env(work_dir(results_dir(cfg)) / "logs", runtime_env)
        init_args["log_to_driver"] = False
    ray.init(runtime_env=runtime_env, **init_args)
    log(f"Simulation engine started in {time.perf_counter() - started:.0f} s.")
