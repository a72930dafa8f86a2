"""`fedlora simulate`: a whole federation on one machine, on Flower's simulation engine (Ray).

Results go to `<out>.partial/` while the run is going and are moved to `<out>/` only when it
has finished, so a folder without the suffix is always a complete result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from datetime import datetime
from pathlib import Path

from fedlora import checkpoint
from fedlora.config import Config, write_config
from fedlora.data import partition_summary
from fedlora.errors import FedloraError
from fedlora.report import Reporter, human_bytes, plot_metrics


def results_dir(cfg: Config) -> Path:
    if cfg.run.out:
        return Path(cfg.run.out).expanduser()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.strategy.name}"


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedloraError(
            f"Results folder {out} already exists; choose another --out or remove it."
        )


def prepare_out(out: Path) -> Path:
    """Refuse to overwrite a result; return the `.partial` working folder."""
    check_out(out)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def quiet_engines() -> None:
    """Loopback-only Ray without telemetry or noisy logs (set before Ray or Flower start)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray binds to 127.0.0.1
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray workers inherit the environment: keep library chatter out of the round table
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def worker_count(cfg: Config) -> int:
    cores = os.cpu_count() or 1
    if cfg.federation.workers:
        return cfg.federation.workers
    return max(1, min(cfg.federation.clients, cores // cfg.train.threads))


def backend_config(cfg: Config) -> dict:
    workers = worker_count(cfg)
    threads = cfg.train.threads
    return {
        "client_resources": {"num_cpus": threads, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": workers * threads,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 256 * 1024 * 1024,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
            "_node_ip_address": "127.0.0.1",
        },
    }


def resume_dir(cfg: Config) -> Path:
    """The `.partial` folder of an interrupted run, which must hold a saved server state."""
    if not cfg.run.out:
        raise FedloraError("--resume needs --out: the results folder of the interrupted run.")
    out = results_dir(cfg)
    work = out.with_name(out.name + ".partial")
    if not (checkpoint.run_state_dir(out) / checkpoint.FILE).exists():
        raise FedloraError(
            f"Nothing to resume: {work} holds no saved server state (it is saved after every "
            "round; a run interrupted before round 0 finished starts afresh without --resume)."
        )
    return work


def simulate(cfg: Config, log=print, resume: bool = False) -> Path:
    """Run the federation described by `cfg`; return the finished results folder. With
    `resume`, continue an interrupted run from its last saved round."""
    quiet_engines()
    out = results_dir(cfg)
    if resume:
        resume_dir(cfg)
    else:
        check_out(out)
    cfg.run.out = str(out)  # resolved once: every site worker keeps its state under it
    from fedlora.runtime import build_runtime, load_data

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
    # "auto" is decided once, here, and every site worker gets the decision: a worker timing
    # its own matmul on a busy machine could decide otherwise and break reproducibility.
    requested = cfg.model.precision
    cfg.model.precision = "bf16" if runtime.bf16 else "fp32"
    n_params = sum(p.numel() for p in runtime.model.parameters())
    n_lora = sum(p.numel() for p in runtime.model.parameters() if p.requires_grad)
    log(
        f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules())}: {n_lora:,} trainable "
        f"of {n_params:,} parameters ({n_lora / n_params:.2%}), {human_bytes(4 * n_lora)} "
        "per adapter."
    )
    log(
        f"Strategy {cfg.strategy.name}, {cfg.federation.rounds} rounds, "
        f"{cfg.train.local_steps} local steps, {worker_count(cfg)} parallel workers, "
        f"{precision_name(runtime.bf16)} (model.precision = {requested})."
    )
    work = open_results(cfg, out, resume)
    try:
        federation = run_engine(cfg, runtime, Reporter(work), checkpoint.run_state_dir(out))
        finish(cfg, runtime, federation, work, time.perf_counter() - started)
    except BaseException:
        log(
            f"The run did not finish; partial output kept in {work} (continue it with the same "
            "command and --resume)."
        )
        raise
    return close_results(out, work)


def open_results(cfg: Config, out: Path, resume: bool) -> Path:
    """The `.partial` working folder: the interrupted run's (resume), or a fresh one holding
    the effective config. Shared with `fedlora server`."""
    if resume:
        return resume_dir(cfg)
    work = prepare_out(out)
    write_config(cfg, work / "config.toml")
    return work


def close_results(out: Path, work: Path) -> Path:
    """A finished run: drop its saved state and give the folder its final name."""
    shutil.rmtree(checkpoint.run_state_dir(out))  # a finished result needs no saved state
    if out.exists():
        out.rmdir()
    work.rename(out)
    return out


def precision_name(bf16: bool) -> str:
    return "bf16 autocast" if bf16 else "fp32"


def run_engine(cfg: Config, runtime, reporter: Reporter, state_dir: Path):
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)

    from fedlora.apps.client import make_client_app
    from fedlora.apps.server import Federation, make_server_app

    federation = Federation(cfg, runtime, reporter, state_dir)
    result: dict = {}
    run_simulation(
        server_app=make_server_app(federation, result),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.clients,
        backend_config=backend_config(cfg),
    )
    if "adapter" not in result:
        raise FedloraError("The simulation ended without a result; see the messages above.")
    return federation


def privacy_summary(cfg: Config, federation, rows: list[dict]) -> dict:
    """Each site's latest spend (enough to recompute its epsilon) and the largest epsilon."""
    if cfg.privacy.level == "none":
        return {"level": "none", "max_epsilon": None}
    sites: dict[str, dict] = {}
    for row in rows:
        sites.update(row.get("privacy", {}))
    if cfg.secure.enabled and cfg.privacy.level == "sample":  # epsilons depend on a site's rows
        means = [row["epsilon_mean"] for row in rows if "epsilon_mean" in row]
        return {
            "level": "sample",
            "accountant": cfg.privacy.accountant,
            "max_epsilon": None,  # kept at each site (its audit log): only their sum is sent
            "epsilon_mean": means[-1] if means else None,
            "budget": cfg.privacy.max_epsilon or None,
            "exhausted": sorted(federation.exhausted),
        }
    return {
        "level": cfg.privacy.level,
        "client_noise": cfg.privacy.client_noise if cfg.privacy.level == "client" else None,
        "accountant": cfg.privacy.accountant,
        "max_epsilon": max((s["epsilon"] for s in sites.values()), default=0.0),
        "budget": cfg.privacy.max_epsilon or None,
        "exhausted": sorted(federation.exhausted),
        "sites": dict(sorted(sites.items(), key=lambda kv: int(kv[0]))),
    }


def finish(cfg: Config, runtime, federation, work: Path, wall: float) -> None:
    from fedlora.model import save_adapter

    save_adapter(runtime.model, federation.global_arrays, work / "adapter")
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    final, first = rows[-1], rows[0]
    summary = {
        "strategy": cfg.strategy.name,
        "clients": cfg.federation.clients,
        "rounds": cfg.federation.rounds,
        "seed": cfg.run.seed,
        "model": cfg.model.name,
        "precision": precision_name(runtime.bf16),
        "final": {
            k: final.get(k)
            for k in (
                "eval_loss",
                "eval_accuracy",
                "eval_macro_f1",
                "eval_perplexity",
                "site_accuracy",
            )
        },
        "round0": {
            k: first.get(k)
            for k in ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_perplexity")
        },
        "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
        "bytes_down": sum(r.get("bytes_down", 0) for r in rows),
        "wall_seconds": wall,
    }
    if federation.personalization:
        summary["personalization"] = federation.personalization
    summary["privacy"] = privacy_summary(cfg, federation, rows)
    summary["secure_aggregation"] = cfg.secure.enabled
    if federation.stopped:
        summary["stopped"] = federation.stopped
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(rows, work / "metrics.png", f"{cfg.strategy.name}, {cfg.federation.clients} sites")
