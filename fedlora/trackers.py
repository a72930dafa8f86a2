"""Optional copies of each round's metrics in the tools people already look at (`run.trackers`):
TensorBoard event files in the results folder, and an MLflow run. The results folder's
metrics.jsonl stays the record; a tracker only mirrors it, so a tracker's failure to start is
an error at config load (its library is missing), never a silent gap.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedlora.errors import FedloraError

#: tracker name -> (module it needs, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
TENSORBOARD_DIR = "tensorboard"  # inside the results folder


def check_trackers(names: Sequence[str]) -> None:
    """Refuse an unknown tracker, or one whose library is not installed (naming the extra)."""
    for name in names:
        if name not in TRACKERS:
            raise FedloraError(
                f"run.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}."
            )
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise FedloraError(
                f'run.trackers includes "{name}", but the {module} package is not installed; '
                f'install it with: pip install "fedlora[{extra}]" (or -e ".[{extra}]" in a '
                "checkout), or remove it from run.trackers."
            )


def scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics row's numbers, nested dicts flattened (site_accuracy/3); lists, strings and
    missing values (None) left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= scalars(value, name + "/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars per round (step = round) under <results>/tensorboard/."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for name, value in scalars(row).items():
            if name != "round":
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fedlora run (experiment "fedlora"; where it is stored is MLflow's
    own setting, MLFLOW_TRACKING_URI), with the effective config as parameters. It names its
    run explicitly: the rounds are logged from the server app's thread, and MLflow's "active
    run" is per thread."""

    def __init__(self, run_name: str, params: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.client, self.metric, self.clock = MlflowClient(), Metric, time.time
        found = self.client.get_experiment_by_name("fedlora")
        experiment = found.experiment_id if found else self.client.create_experiment("fedlora")
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        self.client.log_batch(
            self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()]
        )

    def log(self, row: Mapping[str, Any]) -> None:
        step, now = int(row["round"]), int(self.clock() * 1000)
        metrics = [
            self.metric(k.replace("/", "."), v, now, step)
            for k, v in scalars(row).items()
            if k != "round"
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(names: Sequence[str], work: Path, config: Mapping[str, Any]) -> list[Tracker]:
    """The trackers a run asked for; `work` is its results folder (maybe still `.partial`)."""
    check_trackers(names)
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(work / TENSORBOARD_DIR))
        else:
            params = {f"{s}.{k}": v for s, entries in config.items() for k, v in entries.items()}
            trackers.append(MlflowTracker(work.name.removesuffix(".partial"), params))
    return trackers
