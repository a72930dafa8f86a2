"""What people read: live progress, the per-round table, metrics.jsonl, summary.json and plots."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: (metrics key, column title, width, number format)
COLUMNS = (
    ("round", "round", 5, "{}"),
    ("lr", "lr", 8, "{:.2e}"),
    ("train_loss", "train loss", 10, "{:.4f}"),
    ("eval_loss", "eval loss", 9, "{:.4f}"),
    ("eval_accuracy", "accuracy", 8, "{:.3f}"),
    ("eval_macro_f1", "macro-F1", 8, "{:.3f}"),
    ("eval_perplexity", "ppl", 8, "{:.2f}"),
    ("agg_error_mean", "agg err", 8, "{:.2e}"),
    ("epsilon", "epsilon", 7, "{:.2f}"),  # the largest so far, or (secure, sample level) the mean
    ("clients", "sites", 5, "{}"),
    ("bytes_up", "up", 9, "{}"),
    ("bytes_down", "down", 9, "{}"),
    ("seconds", "seconds", 7, "{:.1f}"),
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _columns(row: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    """Classification shows accuracy and macro-F1; plain text shows perplexity."""
    text = row.get("eval_accuracy") is None and row.get("eval_perplexity") is not None
    hidden = {"eval_accuracy", "eval_macro_f1"} if text else {"eval_perplexity"}
    if _value("epsilon", row) is None:  # a run without differential privacy
        hidden.add("epsilon")
    if "lr" not in row:  # a constant learning rate (train.lr_schedule)
        hidden.add("lr")
    return [c for c in COLUMNS if c[0] not in hidden]


def _value(key: str, row: dict[str, Any]) -> Any:
    """A column's value: under secure aggregation at sample level the server knows only the
    mean of the sites' epsilons (their sum), so the epsilon column shows it there."""
    if key == "epsilon":
        return row.get("epsilon_max", row.get("epsilon_mean"))
    return row.get(key)


def _cell(key: str, width: int, fmt: str, row: dict[str, Any]) -> str:
    value = _value(key, row)
    if value is None:
        text = "-"
    elif key.startswith("bytes"):
        text = human_bytes(value)
    else:
        text = fmt.format(value)
    return f"{text:>{width}}"


def table_header(row: dict[str, Any]) -> str:
    line = "  ".join(f"{title:>{width}}" for _, title, width, _ in _columns(row))
    return line + "\n" + "-" * len(line)


def table_row(row: dict[str, Any], first: dict[str, Any] | None = None) -> str:
    """`row` in the columns of the table's first row (`first`, default `row`)."""
    columns = _columns(row if first is None else first)
    return "  ".join(_cell(key, width, fmt, row) for key, _, width, fmt in columns)


def time_left(rows: list[dict[str, Any]], total_rounds: int) -> str:
    """Rounds left times the mean duration of the training rounds so far, as h:mm:ss ("" before
    a training round has finished, or when none is left)."""
    done = [r["seconds"] for r in rows if r.get("round", 0) >= 1 and r.get("seconds") is not None]
    left = total_rounds - int(rows[-1].get("round", 0)) if rows else 0
    if not done or left <= 0:
        return ""
    seconds = round(sum(done) / len(done) * left)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class Reporter:
    """Writes one JSON line per round and prints the table; `progress` is a transient line."""

    out_dir: Path
    stream: Any = field(default_factory=lambda: sys.stdout)
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: run.trackers (fedlora.trackers): each round's row is mirrored to them
    trackers: list[Any] = field(default_factory=list)
    #: the federation's rounds: with it, each row after round 1 ends with the time left
    total_rounds: int = 0

    def progress(self, text: str) -> None:
        if self.stream.isatty():
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def clear_progress(self) -> None:
        if self.stream.isatty():
            self.stream.write("\r\033[K")

    def round(self, row: dict[str, Any]) -> None:
        self.clear_progress()
        if not self.rows:
            print(table_header(row), file=self.stream)
        self.rows.append(row)
        with (self.out_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(row)
        eta = time_left(self.rows, self.total_rounds)
        tail = f"  ETA {eta}" if eta else ""
        print(table_row(row, self.rows[0]) + tail, file=self.stream, flush=True)

    def close(self) -> None:
        """Flush and close the trackers (the results folder needs no closing)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Continue a resumed run: metrics.jsonl and the table hold exactly the saved rounds."""
        self.rows = []
        (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        for row in rows:
            self.round(row)

    def note(self, text: str) -> None:
        self.clear_progress()
        print(text, file=self.stream, flush=True)


def plot_metrics(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss (left) and accuracy / macro-F1 (right) per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(rounds, [r.get("eval_loss") for r in rows], "o-", label="eval loss")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train, strict=True), "s--", label="train loss (sites)")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    if any(r.get("eval_accuracy") is not None for r in rows):
        ax_acc.plot(rounds, [r.get("eval_accuracy") for r in rows], "o-", label="accuracy")
        ax_acc.plot(rounds, [r.get("eval_macro_f1") for r in rows], "s-", label="macro-F1")
        ax_acc.set_ylabel("score")
    else:
        ax_acc.plot(rounds, [r.get("eval_perplexity") for r in rows], "o-", label="perplexity")
        ax_acc.set_ylabel("perplexity")
    ax_acc.set_xlabel("round")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xticks(rounds)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
