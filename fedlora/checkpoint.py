"""The server's state between rounds, saved atomically so a killed server resumes exactly.

One file, ``<state_dir>/checkpoint.npz``: every array (global adapter, strategy state such as
SCAFFOLD's c, server-optimiser momentum) under a prefixed name, plus a JSON record (round, the
metrics rows so far, the privacy ledger, a fingerprint of the config) stored as bytes. It is
written to a temporary file, flushed to disk and renamed over the old one (``os.replace`` is
atomic on POSIX), so a kill at any moment leaves either the previous round's state or this one's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import FedloraError

Arrays = dict[str, np.ndarray]

FILE = "checkpoint.npz"
_META = "__meta__"
#: the state file that names the latest round begun (see mark_started)
STARTED_FILE = "round-started.txt"

#: config sections that may differ between the interrupted and the resumed run
_FREE_SECTIONS = ("run",)
#: keys that say where a run computes and how long it waits for sites, not what it computes: a
#: run may resume on another device or cluster, or with another reply_timeout
_FREE_KEYS = (
    ("model", "device"),
    ("federation", "gpus_per_client"),
    ("federation", "ray_address"),
    ("federation", "workers"),
    ("federation", "reply_timeout"),
)


def shaping_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Everything in a config that shapes the result (not where it is written or computed)."""
    kept = {
        section: {k: v for k, v in entries.items() if (section, k) not in _FREE_KEYS}
        for section, entries in cfg_dict.items()
        if section not in _FREE_SECTIONS
    }
    kept["seed"] = cfg_dict.get("run", {}).get("seed")
    return kept


def config_fingerprint(cfg_dict: dict[str, Any]) -> str:
    """Hash of everything that shapes the result (not where it is written)."""
    return hashlib.sha256(json.dumps(shaping_config(cfg_dict), sort_keys=True).encode()).hexdigest()


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`section.key (saved -> current)` for every shaping key that differs."""
    out = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section), current.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                out.append(f"run.{section} ({a!r} -> {b!r})")
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key} ({a.get(key)!r} -> {b.get(key)!r})")
    return out


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, Arrays]  # group name ("global", "strategy", ...) -> arrays
    rows: list[dict[str, Any]]
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the privacy ledger
    #: shaping_config of the run: names the keys when a resume is refused
    config: dict[str, Any] | None = None


def save(state_dir: Path, ckpt: Checkpoint) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    flat = {
        f"{group}/{k}": np.asarray(v)
        for group, arrays in ckpt.arrays.items()
        for k, v in arrays.items()
    }
    meta = {
        "round": ckpt.round,
        "rows": ckpt.rows,
        "fingerprint": ckpt.fingerprint,
        "config": ckpt.config,
        "groups": sorted(ckpt.arrays),
        "extra": ckpt.extra,
    }
    flat[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    target = state_dir / FILE
    tmp = target.with_name(FILE + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(buffer.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def saved_round(state_dir: Path) -> int | None:
    """The last round saved in `state_dir` (None: nothing saved, or unreadable)."""
    try:
        with np.load(state_dir / FILE) as data:
            return int(json.loads(bytes(data[_META]).decode())["round"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def load(
    state_dir: Path, fingerprint: str, config: dict[str, Any] | None = None
) -> Checkpoint | None:
    """The saved state, or None when there is none; refuses state from another config (naming
    the keys that differ, given the current `config` as a shaping_config)."""
    path = state_dir / FILE
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data[_META]).decode())
            arrays: dict[str, Arrays] = {g: {} for g in meta["groups"]}
            for key in data.files:
                if key != _META:
                    group, name = key.split("/", 1)
                    arrays[group][name] = data[key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise FedloraError(f"Server state {path} is unreadable ({exc}).") from None
    if meta["fingerprint"] != fingerprint:
        changed = config_differences(meta.get("config") or {}, config or {})
        which = f": {', '.join(changed)}" if meta.get("config") and config and changed else ""
        raise FedloraError(
            f"Server state {path} belongs to a federation with another configuration{which}; "
            "resume with the same config, or start a new run with another state folder."
        )
    return Checkpoint(
        meta["round"], arrays, meta["rows"], meta["fingerprint"], meta["extra"], meta.get("config")
    )


def save_federation(
    state_dir: Path,
    cfg_dict: dict[str, Any],
    round_: int,
    arrays: dict[str, Arrays],
    rows: list[dict[str, Any]],
    extra: dict[str, Any],
) -> None:
    """Save a federation's state after `round_`, fingerprinted by what shapes its result."""
    fingerprint = config_fingerprint(cfg_dict)
    save(state_dir, Checkpoint(round_, arrays, rows, fingerprint, extra, shaping_config(cfg_dict)))


def load_federation(state_dir: Path, cfg_dict: dict[str, Any]) -> Checkpoint | None:
    """The saved state of this configuration's federation (None: nothing saved); another
    configuration's is refused, naming the keys that differ."""
    return load(state_dir, config_fingerprint(cfg_dict), shaping_config(cfg_dict))


def mark_started(state_dir: Path, round_: int) -> None:
    """Persist "round r started" before its first message: sites take part in a round once,
    so a resumed server does not repeat a round it may have started."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STARTED_FILE).write_text(str(round_))


def started_round(state_dir: Path) -> int:
    """The latest round begun (-1: none)."""
    path = state_dir / STARTED_FILE
    return int(path.read_text()) if path.exists() else -1
