"""A run's results folder, from start to finish: one life cycle for `fedlora simulate`,
`fedlora server` and sweeps.

A run writes into `<out>.partial/` (its effective config, metrics.jsonl, the saved state in
`state/`) and the folder is renamed to `<out>` only once the run has finished (`finish` wrote
the adapter, summary.json and the plot), so a folder without the suffix is always a complete
result. A fresh run never overwrites a result or an interrupted run's saved rounds; `--resume`
continues in the `.partial` folder it left.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np

from fedlora import checkpoint
from fedlora.config import Config, write_config
from fedlora.errors import FedloraError
from fedlora.privacy.server import privacy_summary
from fedlora.report import plot_metrics

#: the suffix of a results folder while its run is going
PARTIAL = ".partial"
#: inside the working folder: the run's effective config, and the server's and sites' state
CONFIG, STATE = "config.toml", "state"


def work_dir(out: Path) -> Path:
    """Where a run writes until it has finished: `<out>.partial`."""
    return out.with_name(out.name + PARTIAL)


def run_state_dir(out: Path) -> Path:
    """Where a run's server and site state lives: inside its `.partial` results folder, which
    is renamed to `out` (and the state removed) only when the run has finished."""
    return work_dir(out) / STATE


def results_dir(cfg: Config) -> Path:
    """run.out, else a new folder under runs/ named by the time and the strategy."""
    if cfg.run.out:
        return Path(cfg.run.out).expanduser()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.strategy.name}"


def check_out(out: Path) -> None:
    """A finished result is never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedloraError(
            f"Results folder {out} already exists; choose another --out or remove it."
        )


def check_partial(out: Path) -> None:
    """Saved rounds are the user's: a fresh run never deletes them without --restart."""
    saved = checkpoint.saved_round(run_state_dir(out))
    if saved is not None:
        raise FedloraError(
            f"{work_dir(out).name} holds an interrupted run with rounds 0-{saved} saved; resume it "
            "with --resume, or remove it with --restart."
        )


def check_no_saved_state(out: Path) -> None:
    """`fedlora server`: an interrupted federation's state is never overwritten (its sites have
    taken its rounds), and the server has no --restart: the operator removes the folder."""
    if (run_state_dir(out) / checkpoint.FILE).exists():
        raise FedloraError(
            f"{work_dir(out).name} holds the saved state of an interrupted federation; "
            "continue it with --resume, or remove that folder to start afresh."
        )


def prepare_out(out: Path, restart: bool = False) -> Path:
    """Refuse to overwrite a result or an interrupted run's saved rounds (unless `restart`);
    return the `.partial` working folder."""
    check_out(out)
    if not restart:
        check_partial(out)
    work = work_dir(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def resume_dir(cfg: Config) -> Path:
    """The `.partial` folder of an interrupted run, which must hold a saved server state."""
    if not cfg.run.out:
        raise FedloraError("--resume needs --out: the results folder of the interrupted run.")
    out = results_dir(cfg)
    work = work_dir(out)
    if not (run_state_dir(out) / checkpoint.FILE).exists():
        raise FedloraError(
            f"Nothing to resume: {work} holds no saved server state (it is saved after every "
            "round; a run interrupted before round 0 finished starts afresh without --resume)."
        )
    return work


def open_results(cfg: Config, out: Path, resume: bool, restart: bool = False) -> Path:
    """The `.partial` working folder: the interrupted run's (resume), or a fresh one holding
    the effective config."""
    if resume:
        return resume_dir(cfg)
    work = prepare_out(out, restart)
    write_config(cfg, work / CONFIG)
    return work


def close_results(out: Path, work: Path) -> Path:
    """A finished run: drop its saved state and give the folder its final name."""
    shutil.rmtree(run_state_dir(out))  # a finished result needs no saved state
    if out.exists():
        out.rmdir()
    work.rename(out)
    return out


def settle_precision(cfg, bf16: bool, resumed_out: Path | None) -> bool:
    """Write the resolved model.precision into `cfg` (so the effective config and every worker
    carry the decision, not "auto") and return it. A resumed run whose precision was "auto"
    takes the decision of the run it continues (from its saved config.toml): the same machine
    decides the same, but a run moved to another machine must not switch half-way; an explicit
    precision that differs from the saved one is refused by the fingerprint, naming the key."""
    decided = "bf16" if bf16 else "fp32"
    if resumed_out is not None and cfg.model.precision == "auto":
        import tomllib

        saved = work_dir(resumed_out) / CONFIG
        try:
            previous = tomllib.loads(saved.read_text()).get("model", {}).get("precision")
        except (OSError, tomllib.TOMLDecodeError):
            previous = None
        if previous in ("bf16", "fp32"):
            decided = previous
    cfg.model.precision = decided
    return decided == "bf16"


def precision_name(bf16: bool) -> str:
    """The precision as the first lines and summary.json name it."""
    return "bf16 autocast" if bf16 else "fp32"


#: the global adapter the last round began from, as the sites received it
ROUND_START = "last_round_start.safetensors"


def save_round_start(work: Path, round_: int, arrays: dict) -> None:
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
        str(work / ROUND_START),
        metadata={"round": str(round_)},
    )


def load_round_start(folder: Path) -> tuple[int, dict] | None:
    """(round, arrays) of a results folder's last round start; None when it kept none."""
    from safetensors import safe_open

    path = folder / ROUND_START
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as fh:
        round_ = int(fh.metadata()["round"])
        return round_, {k: fh.get_tensor(k) for k in fh.keys()}


def finish(cfg: Config, runtime, federation, work: Path, wall: float, secrets: str) -> None:
    """Write the adapter, summary.json (`secrets`: where the sites' secrets came from) and the
    plot of a finished run."""
    from fedlora.adapter import save_adapter

    save_adapter(runtime.model, federation.global_arrays, work / "adapter")
    if federation.round_start is not None:
        round_, arrays = federation.round_start
        save_round_start(work, round_, arrays)
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
    summary["privacy"] = privacy_summary(cfg, rows, federation.exhausted)
    summary["secure_aggregation"] = cfg.secure.enabled
    summary["secrets"] = secrets
    if federation.stopped:
        summary["stopped"] = federation.stopped
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(rows, work / "metrics.png", f"{cfg.strategy.name}, {cfg.federation.clients} sites")
