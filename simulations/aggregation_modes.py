"""How should the server combine LoRA factors? Aggregation modes and mixed site ranks, measured.

Runs the default federation (10 sites, non-IID by specialty, FedAvg, 5 rounds) once per cell and
seed, each an ordinary `fedlora simulate` results folder under --out/runs/:

- `factors`, `freeze-a`, `svd` without privacy (model.precision pinned to bf16, the precision
  `auto` picks on the reference machine, so that no cell flips precision under load);
- the same three at sample-level DP, epsilon 8 per site (configs/dp.toml: SGD, clip 10, fp32);
- ranks 4, 8 and 16 cycled over the sites (global rank 16) with `zero-pad`, `partitioned` and
  `svd`; the reference is `factors` above (every site at rank 8).

Then results.md / results.json (mean ± sample std over seeds of the final accuracy, macro-F1,
eval loss, the per-round aggregation error and the bytes each round sends) and
aggregation.png. A cell whose folder holds summary.json is finished and skipped, so the study
can be run, stopped and continued a cell or a seed at a time:

    python simulations/aggregation_modes.py --out simulations/results/aggregation --seeds 0,1
    python simulations/aggregation_modes.py --cells freeze-a-dp8 --seeds 0   # one more run
    python simulations/aggregation_modes.py --report-only                     # tables and plot
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from fedlora.config import load_config
from fedlora.simulate import simulate
from fedlora.sweep import mean_std


@dataclass(frozen=True)
class Cell:
    group: str
    config: str | None  # a TOML file every run of the cell starts from
    overrides: dict = field(default_factory=dict)


NO_DP = {"model": {"precision": "bf16"}}
MIXED = {"model": {"precision": "bf16"}, "lora": {"r": 16, "site_ranks": "4,8,16"}}
CELLS = {
    "factors": Cell("modes", None, NO_DP),
    "freeze-a": Cell("modes", None, NO_DP | {"lora": {"aggregation": "freeze-a"}}),
    "svd": Cell("modes", None, NO_DP | {"lora": {"aggregation": "svd"}}),
    "factors-dp8": Cell("modes, DP epsilon 8", "configs/dp.toml"),
    "freeze-a-dp8": Cell(
        "modes, DP epsilon 8", "configs/dp.toml", {"lora": {"aggregation": "freeze-a"}}
    ),
    "svd-dp8": Cell("modes, DP epsilon 8", "configs/dp.toml", {"lora": {"aggregation": "svd"}}),
    "ranks-zero-pad": Cell(
        "ranks 4/8/16", None, MIXED | {"lora": MIXED["lora"] | {"rank_rule": "zero-pad"}}
    ),
    "ranks-partitioned": Cell(
        "ranks 4/8/16", None, MIXED | {"lora": MIXED["lora"] | {"rank_rule": "partitioned"}}
    ),
    "ranks-svd": Cell(
        "ranks 4/8/16", None, MIXED | {"lora": MIXED["lora"] | {"aggregation": "svd"}}
    ),
}


def run_cell(name: str, seed: int, runs: Path) -> None:
    folder = runs / f"{name}-seed{seed}"
    if (folder / "summary.json").is_file():
        print(f"{folder.name}: finished before, skipped")
        return
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted run starts again
    cell = CELLS[name]
    cfg = load_config(cell.config, [cell.overrides, {"run": {"seed": seed, "out": str(folder)}}])
    print(f"\n=== {folder.name}")
    simulate(cfg)


def slot_band_norms(adapter: Path, ranks: list[int]) -> list[float]:
    """Mean over modules of ||B[:, band] A[band, :]||_F for the bands of slots between the site
    ranks (4, 8, 16 -> slots 0-3, 4-7, 8-15): what the federation learned in each band. B starts
    at 0, so this is the band's whole update; zero-padding should leave the high bands smaller."""
    from safetensors.numpy import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    edges = [0, *sorted(set(ranks))]
    norms: list[list[float]] = [[] for _ in edges[1:]]
    for name, a in tensors.items():
        if "lora_A" not in name:
            continue
        b = tensors[name.replace("lora_A", "lora_B")]
        for i, (lo, hi) in enumerate(pairwise(edges)):
            norms[i].append(float(np.linalg.norm(b[:, lo:hi] @ a[lo:hi, :])))
    return [float(np.mean(n)) for n in norms]


def read_run(folder: Path) -> dict:
    """The numbers of one finished run that the table and the plot need."""
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] > 0]
    errors = [r["agg_error_mean"] for r in trained if r.get("agg_error_mean") is not None]
    maxima = [r["agg_error_max"] for r in trained if r.get("agg_error_max") is not None]
    site_ranks = load_config(str(folder / "config.toml")).lora.site_ranks
    # kept beside the run: the adapters themselves are not committed
    saved, bands = folder / "slot_bands.json", None
    if site_ranks and (folder / "adapter").is_dir():
        bands = slot_band_norms(folder / "adapter", [int(r) for r in site_ranks.split(",")])
        saved.write_text(json.dumps(bands))
    elif saved.is_file():
        bands = json.loads(saved.read_text())
    return {
        "run": folder.name,
        "accuracy": summary["final"]["eval_accuracy"],
        "macro_f1": summary["final"]["eval_macro_f1"],
        "eval_loss": summary["final"]["eval_loss"],
        "round0_accuracy": rows[0]["eval_accuracy"],
        "round0_macro_f1": rows[0]["eval_macro_f1"],
        "agg_error_mean": float(np.mean(errors)) if errors else None,
        "agg_error_max": max(maxima) if maxima else None,
        "agg_error_by_round": [r.get("agg_error_mean") for r in trained],
        "mb_up_per_round": float(np.mean([r["bytes_up"] for r in trained])) / 1e6,
        "epsilon": (summary.get("privacy") or {}).get("max_epsilon"),
        "precision": summary.get("precision", ""),
        "wall_seconds": summary["wall_seconds"],
        "slot_band_norms": bands,
    }


def collect(runs: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for name in CELLS:
        for folder in sorted(runs.glob(f"{name}-seed*")):
            if (
                folder.name.removeprefix(f"{name}-seed").isdigit()
                and (folder / "summary.json").is_file()
            ):
                found.setdefault(name, []).append(read_run(folder))
    return found


def seeds_of(runs: list[dict]) -> str:
    return ",".join(r["run"].rsplit("seed", 1)[1] for r in runs)


def _stat(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


COLUMNS = (
    ("accuracy", "accuracy", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("eval_loss", "eval loss", "{:.3f}"),
    ("agg_error_mean", "agg error (mean)", "{:.2e}"),
    ("agg_error_max", "agg error (max)", "{:.2e}"),
    ("mb_up_per_round", "MB up / round", "{:.2f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
)


def write_report(found: dict[str, list[dict]], out: Path) -> None:
    lines = [
        "| group | cell | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, runs in found.items():
        cells = [
            _stat([r[key] for r in runs if r[key] is not None], fmt) for key, _, fmt in COLUMNS
        ]
        lines.append(
            f"| {CELLS[name].group} | {name} | {seeds_of(runs)} | " + " | ".join(cells) + " |"
        )
    banded = {name: runs for name, runs in found.items() if runs[0]["slot_band_norms"]}
    if banded:
        edges = [0, *sorted({int(r) for r in MIXED["lora"]["site_ranks"].split(",")})]
        bands = [f"slots {lo}-{hi - 1}" for lo, hi in pairwise(edges)]
        lines += [
            "\nWhat the global adapter learned per band of rank slots, ||B[:, band] A[band, :]||_F"
            " (mean over modules; B starts at 0):\n",
            "| cell | seeds | " + " | ".join(bands) + " |",
            "|---|---|" + "---|" * len(bands),
        ]
        for name, runs in banded.items():
            cells = [
                _stat([r["slot_band_norms"][i] for r in runs], "{:.3f}") for i in range(len(bands))
            ]
            lines.append(f"| {name} | {seeds_of(runs)} | " + " | ".join(cells) + " |")
    first = next(iter(found.values()))[0] if found else None
    if first:
        lines.append(
            f"\nRound 0 (the base model, B = 0): accuracy {first['round0_accuracy']:.3f}, "
            f"macro-F1 {first['round0_macro_f1']:.3f}."
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(found, indent=1))
    plot(found, out / "aggregation.png")
    print((out / "results.md").read_text())


def plot(found: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(found)
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=(3, 2))
    for i, (offset, key, label) in enumerate(
        ((-0.1, "accuracy", "accuracy"), (0.1, "macro_f1", "macro-F1"))
    ):
        stats = [mean_std([r[key] for r in found[n]]) for n in names]
        left.errorbar(
            x + offset,
            [m for m, _ in stats],
            yerr=[s or 0.0 for _, s in stats],
            fmt="o",
            capsize=3,
            color=f"C{i}",
            label=label,
        )
    if names:
        r0 = found[names[0]][0]
        left.axhline(r0["round0_accuracy"], color="C0", ls=":", label="round-0 accuracy")
        left.axhline(r0["round0_macro_f1"], color="C1", ls=":", label="round-0 macro-F1")
    left.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    left.set_ylabel("final score (mean ± std over seeds)")
    left.grid(axis="y", alpha=0.3)
    left.legend(fontsize=7)
    for i, name in enumerate(names):
        curves = [r["agg_error_by_round"] for r in found[name]]
        if any(v is None for c in curves for v in c):
            continue
        mean = np.mean(np.array(curves, dtype=float), axis=0)
        rounds = np.arange(1, len(mean) + 1)
        right.plot(rounds, np.maximum(mean, 1e-12), marker="o", color=f"C{i}", label=name)
    right.set_yscale("log")
    right.set_xlabel("round")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel("aggregation error (0 drawn at 1e-12)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="simulations/results/aggregation")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated, run in order")
    parser.add_argument("--seeds", default="0", help="comma-separated; each cell runs per seed")
    parser.add_argument("--report-only", action="store_true", help="no runs: tables and plot")
    args = parser.parse_args()
    out, names = Path(args.out), args.cells.split(",")
    unknown = sorted(set(names) - set(CELLS))
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                run_cell(name, seed, runs)
                write_report(collect(runs), out)
    write_report(collect(runs), out)


if __name__ == "__main__":
    main()
