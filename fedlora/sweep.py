"""`fedlora sweep`: one federation per point of a grid over config keys, times a number of seeds,
run one after the other in this process, and the tables and plots that compare them.

A sweep folder holds `sweep.toml` (the grid, the repeats and the settings every point starts
from), `runs/<point>-seed<k>/` (ordinary `fedlora simulate` results folders), `results.csv`,
`results.md` and two plots. Running the same sweep again resumes it: a run whose folder holds a
`summary.json` is finished and skipped, an unfinished `.partial` folder is removed and run again.
A different sweep (another grid, repeats or fixed setting) into the same folder is refused, so a
finished run is only ever reused for exactly the configuration it was run with.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
import shutil
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import Config, load_config
from fedlora.errors import FedloraError

#: keys a grid may not vary, and why
RESERVED = {
    "run.seed": "use --repeats R for seeds run.seed, run.seed+1, ... (and --seed for the first)",
    "run.out": "the sweep chooses each run's folder under its --out",
}
#: the final metrics of a run, as results.csv columns (from summary.json "final")
METRICS = ("eval_accuracy", "eval_macro_f1", "eval_loss")
#: results.csv columns after the grid keys (and strategy.name when the grid does not vary it)
RESULT_COLUMNS = (
    "seed",
    "status",
    *METRICS,
    "epsilon",
    "attack_auc",
    "bytes",
    "wall_seconds",
    "run",
    "error",
)
DEFINITION = "sweep.toml"
CSV_FILE, MD_FILE = "results.csv", "results.md"
EPSILON_PLOT, ROUNDS_PLOT = "utility_vs_epsilon.png", "utility_vs_rounds.png"
#: with --audit: each run's `fedlora audit` report (in its folder) and the plot of its AUCs
AUDIT_FILE, LEAKAGE_PLOT = "audit.json", "utility_vs_leakage.png"


# ---------------------------------------------------------------- grid: parsing and expansion


@dataclass(frozen=True)
class GridValue:
    """One value of a grid key: as typed (labels, folder names, tables) and as parsed (config)."""

    text: str
    value: Any


@dataclass(frozen=True)
class Axis:
    key: str  # "section.key"
    values: tuple[GridValue, ...]


@dataclass(frozen=True)
class Point:
    """One combination of grid values, in grid order."""

    values: tuple[tuple[str, GridValue], ...]

    @property
    def label(self) -> str:
        return " ".join(f"{key}={v.text}" for key, v in self.values)

    def overrides(self) -> list[dict[str, Any]]:
        return [_override(key, v.value) for key, v in self.values]


def _override(key: str, value: Any) -> dict[str, Any]:
    section, _, name = key.partition(".")
    return {section: {name: value}}


def split_values(text: str) -> list[str]:
    """Split `a,b,c` on the commas outside brackets and quotes, so a TOML list or a quoted
    string can be one value: `qv,'["o_proj","down_proj"]'` is two values."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return items


def parse_value(text: str) -> Any:
    """A grid value is TOML (numbers, booleans, lists keep their types); a bare word that is
    not valid TOML is a string, as with `--set`."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_grid(texts: Sequence[str], flags: Mapping[str, tuple[str, str, Any]]) -> list[Axis]:
    """`--grid KEY=V1,V2,...` arguments -> axes. KEY is `section.key` or the name of a
    simulate flag (`flags`: name -> (section, key, type); `strategy`, `local-steps`, ...).
    Raises FedloraError naming the argument at fault."""
    shortcuts = {name.replace("_", "-"): f"{s}.{k}" for name, (s, k, _) in flags.items()}
    shortcuts |= {name: f"{s}.{k}" for name, (s, k, _) in flags.items()}
    axes: list[Axis] = []
    for text in texts:
        raw_key, sep, raw_values = text.partition("=")
        raw_key = raw_key.strip()
        if not sep or not raw_key:
            raise FedloraError(f"--grid {text!r}: expected KEY=V1,V2,..., e.g. lora.r=4,8.")
        key = shortcuts.get(raw_key, raw_key)
        if "." not in key:
            raise FedloraError(
                f"--grid {text!r}: {raw_key!r} is neither section.key (e.g. train.lr) nor a "
                f"flag name ({', '.join(sorted(k for k in shortcuts if '_' not in k))})."
            )
        if key in RESERVED:
            raise FedloraError(f"--grid {text!r}: {key} cannot be a grid key; {RESERVED[key]}.")
        if any(axis.key == key for axis in axes):
            raise FedloraError(f"--grid {key} is given twice; list all its values in one --grid.")
        items = split_values(raw_values)
        if any(not item for item in items):
            raise FedloraError(f"--grid {text!r}: an empty value (check the commas).")
        if len(set(items)) < len(items):
            raise FedloraError(f"--grid {text!r}: a value is listed twice.")
        axes.append(Axis(key, tuple(GridValue(item, parse_value(item)) for item in items)))
    if not axes:
        raise FedloraError("fedlora sweep needs at least one --grid KEY=V1,V2,...")
    return axes


def expand(axes: Sequence[Axis]) -> list[Point]:
    """Every combination, the last axis varying fastest (like nested loops in grid order)."""
    combos = itertools.product(*(axis.values for axis in axes))
    return [Point(tuple(zip((a.key for a in axes), combo, strict=True))) for combo in combos]


def _slug_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+]+", "-", text).strip("-") or "x"


def point_slugs(points: Sequence[Point]) -> list[str]:
    """Folder names for points, made of their values (`strategy-scaffold_r-4`): the leaf of each key
    (its section where the leaf is `name`); readable, and unique (a short hash of the values is
    appended where two would coincide or a name grows long)."""
    if not points:
        return []
    keys = [key for key, _ in points[0].values]
    short = [leaf if (leaf := k.partition(".")[2]) != "name" else k.partition(".")[0] for k in keys]
    names = [s if short.count(s) == 1 else k for s, k in zip(short, keys, strict=True)]
    slugs = [
        "_".join(
            f"{_slug_part(n)}-{_slug_part(v.text)}"
            for n, (_, v) in zip(names, p.values, strict=True)
        )
        for p in points
    ]
    counts = Counter(slugs)
    out = []
    for slug, point in zip(slugs, points, strict=True):
        if counts[slug] > 1 or len(slug) > 100:
            digest = hashlib.sha1(point.label.encode()).hexdigest()[:8]
            slug = f"{slug[:80]}-{digest}"
        out.append(slug)
    return out


# ---------------------------------------------------------------- plan: every run, validated


@dataclass
class PlannedRun:
    number: int  # 1-based position among the points
    point: Point
    seed: int
    folder: Path
    cfg: Config


@dataclass
class Plan:
    folder: Path
    axes: list[Axis]
    repeats: int
    runs: list[PlannedRun]
    definition: str  # the text of sweep.toml
    #: a finished run without privacy, drawn as the reference line (presentation only)
    baseline: Path | None = None
    #: run `fedlora audit` on every finished run (attack_auc column, utility_vs_leakage.png)
    audit: bool = False

    @property
    def keys(self) -> list[str]:
        return [axis.key for axis in self.axes]


def _flat_keys(overrides: Sequence[Mapping[str, Any]]) -> set[str]:
    return {f"{s}.{k}" for item in overrides for s, entries in item.items() for k in entries}


def plan_sweep(
    folder: Path,
    axes: list[Axis],
    repeats: int,
    config_path: str | None,
    fixed: list[dict[str, Any]],
) -> Plan:
    """Build and validate the config of every run before anything runs: a bad key or value is
    one FedloraError naming the point, and nothing has been started."""
    clash = sorted(_flat_keys(fixed) & {axis.key for axis in axes})
    if clash:
        raise FedloraError(
            f"{', '.join(clash)} is both fixed (a flag or --set) and in the grid; give it once."
        )
    if "run.out" in _flat_keys(fixed):
        raise FedloraError(f"--set run.out: {RESERVED['run.out']}; drop it.")
    points = expand(axes)
    runs: list[PlannedRun] = []
    base: Config | None = None
    for number, (point, slug) in enumerate(zip(points, point_slugs(points), strict=True), 1):
        try:
            first = load_config(config_path, [*fixed, *point.overrides()])
            base = base or first
            for k in range(repeats):
                seed = first.run.seed + k
                out = folder / "runs" / f"{slug}-seed{seed}"
                run_override = {"run": {"seed": seed, "out": str(out)}}
                cfg = load_config(config_path, [*fixed, *point.overrides(), run_override])
                runs.append(PlannedRun(number, point, seed, out, cfg))
        except FedloraError as exc:
            raise FedloraError(f"sweep point {point.label}: {exc}") from exc
    assert base is not None  # parse_grid guarantees at least one point
    return Plan(folder, axes, repeats, runs, definition_text(axes, repeats, base))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def definition_text(axes: Sequence[Axis], repeats: int, base: Config) -> str:
    """sweep.toml: the grid, the repeats, and the settings every point starts from (the
    effective config minus the grid keys and run.out), which together identify the sweep."""
    varied = {axis.key for axis in axes} | {"run.out"}
    lines = [
        "# fedlora sweep: the grid, the repeats and the settings every point starts from.",
        "# Running the same sweep into this folder resumes it; a different one is refused.",
        f"repeats = {repeats}",
        "",
        "[grid]",
        *(f"{json.dumps(a.key)} = {toml_value([v.value for v in a.values])}" for a in axes),
    ]
    for section, entries in base.to_dict().items():
        lines += ["", f"[base.{section}]"]
        lines += [
            f"{key} = {toml_value(value)}"
            for key, value in entries.items()
            if f"{section}.{key}" not in varied and value is not None
        ]
    return "\n".join(lines) + "\n"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def definition_changes(old: str, new: str) -> list[str]:
    """What differs between two sweep.toml texts, one `key: old -> new` per difference."""
    a, b = _flatten(tomllib.loads(old)), _flatten(tomllib.loads(new))
    return [
        f"{key}: {a.get(key, '(absent)')} -> {b.get(key, '(absent)')}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key) != b.get(key)
    ]


def claim_folder(plan: Plan) -> bool:
    """Make `plan.folder` this sweep's folder; True when it already was (a resumed sweep).
    Refuses a folder that holds something else or another sweep."""
    folder, path = plan.folder, plan.folder / DEFINITION
    if folder.exists() and not folder.is_dir():
        raise FedloraError(f"--out {folder} is a file; give a folder for the sweep.")
    if path.is_file():
        changes = definition_changes(path.read_text(), plan.definition)
        if changes:
            shown = "; ".join(changes[:5]) + ("; ..." if len(changes) > 5 else "")
            raise FedloraError(
                f"{folder} holds another sweep ({shown}). Run the same grid, --repeats and "
                "settings to resume it, or choose another --out."
            )
        return True
    if folder.exists() and any(folder.iterdir()):
        raise FedloraError(
            f"--out {folder} exists and is not a fedlora sweep folder (no {DEFINITION}); "
            "choose another --out."
        )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.definition)
    return False


# ---------------------------------------------------------------- results of one run


def epsilon_of(summary: Mapping[str, Any]) -> float:
    """The largest epsilon any site spent; inf for a run without differential privacy (no
    `privacy` entry, or `max_epsilon` null)."""
    spent = (summary.get("privacy") or {}).get("max_epsilon")
    return math.inf if spent is None else float(spent)


def attack_auc_of(report: Mapping[str, Any]) -> float:
    """The figure a sweep quotes from an audit: the likelihood-ratio (reference) attack's AUC
    against the global adapter over all sites, the stronger of its two attacks."""
    return float(report["all_sites"]["reference"]["auc"]["value"])


def read_run(folder: Path) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """(the CSV fields of a finished run folder, its accuracy per round)."""
    summary = json.loads((folder / "summary.json").read_text())
    final = summary.get("final") or {}
    fields = {name: final.get(name) for name in METRICS}
    audit = folder / AUDIT_FILE
    fields |= {
        "epsilon": epsilon_of(summary),
        "attack_auc": attack_auc_of(json.loads(audit.read_text())) if audit.is_file() else None,
        "bytes": summary.get("bytes_up", 0) + summary.get("bytes_down", 0),
        "wall_seconds": summary.get("wall_seconds"),
    }
    curve = []
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if row.get("eval_accuracy") is not None:
                curve.append((int(row["round"]), float(row["eval_accuracy"])))
    return fields, curve


@dataclass
class RunResult:
    """One row of results.csv (`row`) and the run's accuracy per round (`curve`)."""

    row: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)


def result_row(plan: Plan, run: PlannedRun, status: str, error: str = "") -> RunResult:
    row: dict[str, Any] = {key: v.text for key, v in run.point.values}
    row["strategy.name"] = run.cfg.strategy.name
    row |= {"seed": run.seed, "status": status, "error": error}
    row["run"] = run.folder.relative_to(plan.folder).as_posix()
    curve: list[tuple[int, float]] = []
    if status == "ok":
        fields, curve = read_run(run.folder)
        row |= fields
    return RunResult(row, curve)


# ---------------------------------------------------------------- tables


def csv_columns(keys: Sequence[str]) -> list[str]:
    extra = [] if "strategy.name" in keys else ["strategy.name"]
    return [*keys, *extra, *RESULT_COLUMNS]


def write_csv(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, csv_columns(keys), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for one value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    if all(v == values[0] for v in values):  # inf or equal values: no spread, no inf - inf
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


#: the per-point summary columns of results.md: (row field, title, format)
SUMMARY_COLUMNS = (
    ("eval_accuracy", "accuracy", "{:.3f}"),
    ("eval_macro_f1", "macro-F1", "{:.3f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("epsilon", "epsilon", "{:.3g}"),
    ("bytes", "MB sent", "{:.2f}"),
    ("wall_seconds", "seconds", "{:.1f}"),
)


def aggregate(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per point (first-seen order): its grid values, strategy, `runs` (finished),
    `total`, and (mean, std) of each summary field over the point's finished runs."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    points = []
    for values, members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        entry: dict[str, Any] = dict(zip(keys, values, strict=True))
        entry |= {"strategy.name": members[0]["strategy.name"], "runs": len(ok)}
        entry["total"] = len(members)
        for name, _, _ in SUMMARY_COLUMNS:
            found = [float(r[name]) for r in ok if r.get(name) is not None]
            if name == "bytes":
                found = [b / 1e6 for b in found]
            entry[name] = mean_std(found) if found else None
        points.append(entry)
    return points


def _cell(stat: tuple[float, float | None] | None, fmt: str) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    if math.isinf(mean):
        return "∞ (no DP)" if mean > 0 else "-∞"
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def markdown_table(points: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """A markdown table, one line per point: mean ± sample std over its finished repeats."""
    titles = [*keys, "runs", *(title for _, title, _ in SUMMARY_COLUMNS)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for p in points:
        cells = [str(p[k]) for k in keys] + [f"{p['runs']}/{p['total']}"]
        cells += [_cell(p[name], fmt) for name, _, fmt in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(points: Sequence[Mapping[str, Any]], plan: Plan) -> str:
    first = plan.runs[0].seed
    seeds = f"seed {first}" if plan.repeats == 1 else f"seeds {first}..{first + plan.repeats - 1}"
    repeats = _plural(plan.repeats, "repeat")
    return (
        "# Sweep results\n\n"
        f"{_plural(len(points), 'point')} x {repeats} ({seeds}). Each cell is the mean ± sample "
        "standard deviation over the point's finished runs (`runs`: finished / planned) of the "
        "final global adapter's held-out metrics; epsilon is the largest any site spent (∞: no "
        "differential privacy); MB sent is up + down over all rounds. One row per run: "
        f"{CSV_FILE}.\n\n" + markdown_table(points, plan.keys)
    )


# ---------------------------------------------------------------- plots


def series_label(point: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A point's curve in the epsilon plot: its strategy and every grid value that is not a
    privacy setting (so points differing only in privacy lie on one curve)."""
    rest = [
        f"{k}={point[k]}" for k in keys if k != "strategy.name" and not k.startswith("privacy.")
    ]
    return " ".join([str(point["strategy.name"]), *rest])


@dataclass
class EpsilonSeries:
    """One curve of the epsilon plot: (epsilon, mean accuracy, std) of its private points in
    epsilon order, and the mean accuracy of its points without DP (epsilon infinite)."""

    private: list[tuple[float, float, float]] = field(default_factory=list)
    baselines: list[float] = field(default_factory=list)


def epsilon_series(
    points: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> dict[str, EpsilonSeries]:
    """Group aggregated points (see `aggregate`) into the curves of the epsilon plot; points
    without a finished run are left out."""
    series: dict[str, EpsilonSeries] = {}
    for p in points:
        if p["eval_accuracy"] is None or p["epsilon"] is None:
            continue
        entry = series.setdefault(series_label(p, keys), EpsilonSeries())
        (acc, std), eps = p["eval_accuracy"], p["epsilon"][0]
        if math.isfinite(eps):
            entry.private.append((eps, acc, std or 0.0))
        else:
            entry.baselines.append(acc)
    for entry in series.values():
        entry.private.sort()
    return series


def plot_utility_vs_epsilon(
    points: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    path: Path,
    baseline: tuple[str, float] | None = None,
    round0: float | None = None,
) -> None:
    """Accuracy (mean ± std over repeats) against the epsilon spent, log axis, one curve per
    strategy (and non-privacy grid values); runs without DP are horizontal dashed lines, and
    `round0` (the base model's accuracy) a dotted one: what a private run must beat to have
    learnt anything."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    series = epsilon_series(points, keys)
    for i, (label, curve) in enumerate(series.items()):
        color = f"C{i % 10}"
        if curve.private:
            eps, acc, std = zip(*curve.private, strict=True)
            ax.errorbar(eps, acc, yerr=std, fmt="o-", color=color, capsize=3, label=label)
        for acc in curve.baselines:
            ax.axhline(acc, color=color, ls="--", label=f"{label}, no DP ({acc:.3f})")
    if baseline is not None:
        name, acc = baseline
        ax.axhline(acc, color="black", ls="--", label=f"no DP: {name} ({acc:.3f})")
    if round0 is not None:
        ax.axhline(round0, color="grey", ls=":", label=f"round 0, the base model ({round0:.3f})")
    finite = [eps for curve in series.values() for eps, _, _ in curve.private]
    ax.set_xscale("log")
    if finite:
        ax.set_xlim(min(finite) / 2, max(finite) * 2)
    else:
        ax.set_xlim(0.1, 100)
        ax.text(0.5, 0.5, "no private runs", transform=ax.transAxes, ha="center", color="gray")
    ax.set_xlabel("epsilon spent (largest over sites, log scale)")
    ax.set_ylabel("final accuracy")
    ax.set_title("Utility vs privacy")
    ax.grid(alpha=0.3, which="both")
    if series or baseline is not None or round0 is not None:
        ax.legend(fontsize="small")
    _save(plt, fig, path)


def leakage_points(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> list[tuple[str, float, float]]:
    """(point label, mean attack AUC, mean accuracy) over each point's audited finished runs
    (rows as run_sweep makes them or as results.csv reads back)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        measured = all(row.get(k) not in (None, "") for k in ("attack_auc", "eval_accuracy"))
        if row["status"] == "ok" and measured:
            label = " ".join(f"{k}={row[k]}" for k in keys)
            pair = (float(row["attack_auc"]), float(row["eval_accuracy"]))
            groups.setdefault(label, []).append(pair)
    return [
        (label, sum(a for a, _ in v) / len(v), sum(u for _, u in v) / len(v))
        for label, v in groups.items()
    ]


def plot_utility_vs_leakage(points: Sequence[tuple[str, float, float]], path: Path) -> None:
    """Accuracy against the measured membership-inference AUC, one marker per point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, auc, acc) in enumerate(points):
        ax.plot([auc], [acc], "o", color=f"C{i % 10}", label=label)
    ax.axvline(0.5, color="gray", ls="--", label="AUC 0.5: no measurable leakage")
    aucs = [auc for _, auc, _ in points]
    ax.set_xlim(min([0.45, *aucs]) - 0.01, max([0.6, *aucs]) + 0.02)
    ax.set_xlabel("membership-inference AUC (likelihood-ratio attack, all sites)")
    ax.set_ylabel("final accuracy")
    ax.set_title("Utility vs measured leakage (fedlora audit)")
    ax.grid(alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, "no audited runs", transform=ax.transAxes, ha="center", color="gray")
    ax.legend(fontsize="small")
    _save(plt, fig, path)


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean accuracy per round over the runs that reached that round."""
    by_round: dict[int, list[float]] = {}
    for curve in curves:
        for rnd, acc in curve:
            by_round.setdefault(rnd, []).append(acc)
    return [(rnd, sum(v) / len(v)) for rnd, v in sorted(by_round.items())]


def plot_utility_vs_rounds(
    curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]], path: Path
) -> None:
    """Accuracy per round, mean over each point's repeats; `curves` maps a point's label to
    its runs' curves."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for label, runs in curves.items():
        mean = mean_curve(runs)
        if mean:
            ax.plot(*zip(*mean, strict=True), "o-", label=label)
            drawn = True
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy (held out, mean over repeats)")
    ax.set_title("Utility vs rounds")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no finished runs", transform=ax.transAxes, ha="center", color="gray")
    _save(plt, fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- running


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def write_outputs(plan: Plan, results: Sequence[RunResult], plots: bool) -> None:
    rows = [r.row for r in results]
    write_csv(rows, plan.keys, plan.folder / CSV_FILE)
    points = aggregate(rows, plan.keys)
    markdown = results_markdown(points, plan)
    reference = None
    if plan.baseline is not None:
        fields, _ = read_run(plan.baseline)
        reference = (plan.baseline.name, float(fields["eval_accuracy"]))
        markdown += (
            f"\nBaseline without privacy ({plan.baseline}): accuracy "
            f"{fields['eval_accuracy']:.3f}, macro-F1 {fields['eval_macro_f1']:.3f}.\n"
        )
    starts = [acc for r in results for rnd, acc in r.curve if rnd == 0]
    round0 = sum(starts) / len(starts) if starts else None
    if round0 is not None:
        markdown += (
            f"\nRound 0 (the base model, before any training): accuracy {round0:.3f} "
            f"(mean over {_plural(len(starts), 'run')}).\n"
        )
    (plan.folder / MD_FILE).write_text(markdown)
    if plots:
        plot_utility_vs_epsilon(points, plan.keys, plan.folder / EPSILON_PLOT, reference, round0)
        curves: dict[str, list[list[tuple[int, float]]]] = {}
        for r in results:
            label = " ".join(f"{k}={r.row[k]}" for k in plan.keys)
            curves.setdefault(label, []).append(r.curve)
        plot_utility_vs_rounds(curves, plan.folder / ROUNDS_PLOT)
        if plan.audit:
            plot_utility_vs_leakage(leakage_points(rows, plan.keys), plan.folder / LEAKAGE_PLOT)


def audit_run(folder: Path, log: Callable[[str], None] = print) -> None:
    """`fedlora audit` of one finished run into its folder (once: a resumed sweep keeps it)."""
    if (folder / AUDIT_FILE).is_file():
        return
    from fedlora.audit import run_audit, write_json

    try:
        write_json(run_audit(str(folder), log=log), folder / AUDIT_FILE)
    except FedloraError as exc:
        log(f"audit of {folder.name} failed: {exc}")


def run_sweep(plan: Plan, log: Callable[[str], None] = print) -> int:
    """Run every unfinished run of the plan in order; write the tables after each run and the
    plots at the end. Returns 0, or 1 when a run failed with a user error (recorded, not fatal)."""
    from fedlora.results import work_dir
    from fedlora.simulate import simulate

    resumed = claim_folder(plan)
    n, points = len(plan.runs), len(plan.runs) // plan.repeats
    pending = {run.folder for run in plan.runs if not (run.folder / "summary.json").is_file()}
    log(
        f"Sweep {plan.folder}: {points} points x {_plural(plan.repeats, 'repeat')} = {n} runs"
        + (f", {n - len(pending)} finished before (resumed)" if resumed else "")
        + "."
    )
    started, durations = time.monotonic(), []
    results: list[RunResult] = []
    failed: list[tuple[PlannedRun, str]] = []
    for i, run in enumerate(plan.runs, 1):
        head = f"run {i}/{n} (point {run.number}/{points}): {run.point.label} seed {run.seed}"
        if run.folder not in pending:
            log(f"{head}: finished before, skipped")
            if plan.audit:
                audit_run(run.folder, log)
            results.append(result_row(plan, run, "ok"))
            continue
        left = len(pending) - len(durations)
        eta = _clock(sum(durations) / len(durations) * left) if durations else "?"
        log(f"\n=== {head} (elapsed {_clock(time.monotonic() - started)}, ETA {eta})")
        partial = work_dir(run.folder)
        if partial.exists():
            log(f"Removing the unfinished {partial} and running it again.")
            shutil.rmtree(partial)
        t0 = time.monotonic()
        try:
            simulate(run.cfg, log)
            if plan.audit:
                audit_run(run.folder, log)
            results.append(result_row(plan, run, "ok"))
        except FedloraError as exc:
            log(f"{head}: failed: {exc}")
            failed.append((run, str(exc)))
            results.append(result_row(plan, run, "failed", str(exc)))
        durations.append(time.monotonic() - t0)
        write_outputs(plan, results, plots=False)  # an interrupted sweep keeps its table so far
    write_outputs(plan, results, plots=True)
    log(
        f"\nSweep done in {_clock(time.monotonic() - started)}: {n} runs, {len(durations)} ran, "
        f"{n - len(durations)} finished before, {len(failed)} failed."
    )
    for run, error in failed:
        log(f"  failed: {run.point.label} seed {run.seed}: {error}")
    names = ", ".join((CSV_FILE, MD_FILE, EPSILON_PLOT, ROUNDS_PLOT))
    names += f", {LEAKAGE_PLOT}" if plan.audit else ""
    log(f"Results: {plan.folder}/ ({names}, runs/)")
    return 1 if failed else 0
