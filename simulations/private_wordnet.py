"""Do private federations learn when sites hold thousands of rows? WordNet glosses, DP vs not.

Runs the built-in WordNet federation (`--data wordnet`: 10 sites of about 5,700 rows, natural
partition by family of classes, FedAvg, LoRA on every linear layer) once per cell and seed, each
an ordinary `fedlora simulate` results folder under --out/runs/:

- `nonprivate`: the default recipe (AdamW) on every linear layer, the best non-private
  federation found on the reduced version, no privacy;
- `dp-eps8`, `dp-eps4`, `dp-eps1`: sample-level DP-SGD at that epsilon per site with the recipe
  of configs/dp-wordnet.toml (freeze-a, SGD with momentum, lr 2 on a cosine schedule over the
  rounds, clip 1, fp32) and large logical batches (train.batch_size = 256 expected rows, split
  into physical pieces of 32 by opacus's BatchMemoryManager);
- `client-eps8`, `client-eps4`, `client-eps1`: client-level DP at that epsilon with secure
  aggregation and noise split across the sites;
- `centralised`: the ceiling, non-private LoRA (the default recipe) on the pooled training rows
  processing as many rows as the non-private federation, evaluated on the same held-out rows.

Then results.md / results.json (mean ± sample std over seeds of the final accuracy, macro-F1,
eval loss, epsilon and wall time) and accuracy.png (accuracy against epsilon, with the round-0,
non-private and centralised lines). A cell whose folder holds summary.json is finished and
skipped, so the study can be stopped and continued a cell or a seed at a time:

    python simulations/private_wordnet.py --seeds 0,1                # results/private-wordnet
    python simulations/private_wordnet.py --cells dp-eps8 --seeds 2   # one more run
    python simulations/private_wordnet.py --report-only                # tables and plot
    python simulations/private_wordnet.py --reduced --seeds 0        # private-wordnet-reduced

`--reduced` is the version a CPU affords (about 45 minutes a seed for every cell on 2 cores,
measured): the same model, data and 10 sites, 3 rounds, 400 held-out rows, 48 rows per site and
round in every cell (6 steps of 8; DP-SGD runs configs/dp-wordnet.toml with batches of 8 at
lr 0.5, the rate that holds at that batch's noise).
Far fewer rows pass through each site than in the full study, so it shows whether the privacy
levels learn at all at that budget, not the full study's verdict. `--smoke` runs the chosen
cells on the tiny-random model (3 sites, 1 round): minutes, to check the script end to end; its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_strategies import centralised, federation_samples  # noqa: E402

from fedlora.config import load_config, parse_override, write_config  # noqa: E402
from fedlora.simulate import simulate  # noqa: E402
from fedlora.sweep import mean_std  # noqa: E402

#: LoRA on every linear layer: the best non-private federation found on the reduced version
#: (0.792 against 0.574 with the default o_proj), so every cell compares against that one.
BASE = {
    "data": {"path": "wordnet", "eval_rows": 1000},
    "federation": {"clients": 10},
    "lora": {"targets": "all-linear"},
}
#: The DP-SGD recipe measured on the reduced version's base (all-linear, freeze-a, SGD with
#: momentum 0.9, lr 2 on a cosine schedule, clip 1, 6 Poisson batches of 32 expected rows a
#: round): one place, shared with the users' config.
DP_RECIPE = tomllib.loads((Path(__file__).parents[1] / "configs" / "dp-wordnet.toml").read_text())
#: The study's DP-SGD cells take hundreds of rows per logical batch (about 5 times less noise on
#: a step's mean than the recipe's 32), in physical pieces that fit at once, at the recipe's lr.
LARGE_BATCHES = {"train": {"batch_size": 256}, "privacy": {"physical_batch_size": 32}}
#: The reduced version's DP-SGD cells keep its budget of 48 rows per site and round (6 batches
#: of 8, so the CPU runs every cell in under an hour a seed) at lr 0.5: 3.4 times the noise on a
#: step's mean of the recipe's batches needs a smaller step (lr 1 collapsed at epsilon 1).
SMALL_BATCHES = {"train": {"batch_size": 8, "lr": 0.5}}
CLIENT_DP = {
    "privacy": {"level": "client", "client_noise": "distributed", "max_grad_norm": 1.0},
    "secure": {"enabled": True},
}
REDUCED = {"data": {"eval_rows": 400}, "federation": {"rounds": 3}}
OUTS = {
    "full": "simulations/results/private-wordnet",
    "reduced": "simulations/results/private-wordnet-reduced",
    "smoke": "runs/private-wordnet-smoke",
}
CENTRAL = "centralised"
SMOKE = {
    "model": {"name": "tiny-random"},
    "data": {"eval_rows": 200},
    "federation": {"clients": 3, "rounds": 1},
    "train": {"local_steps": 2, "batch_size": 32},
}


def _at(epsilon: float) -> dict:
    return {"privacy": {"target_epsilon": epsilon}}


CELLS: dict[str, list[dict]] = {"nonprivate": []}
CELLS |= {f"dp-eps{e:g}": [DP_RECIPE, _at(e)] for e in (8.0, 4.0, 1.0)}
CELLS |= {f"client-eps{e:g}": [CLIENT_DP, _at(e)] for e in (8.0, 4.0, 1.0)}
CELLS[CENTRAL] = []


def cell_overrides(name: str, size: str) -> list[dict]:
    """The cell's settings over the study's base; a smaller `size` ("reduced", "smoke") shrinks
    the federation last."""
    layers = [BASE, *CELLS[name]]
    if name.startswith("dp-"):
        layers.append({"full": LARGE_BATCHES, "reduced": SMALL_BATCHES, "smoke": {}}[size])
    return [*layers, {"full": {}, "reduced": REDUCED, "smoke": SMOKE}[size]]


#: What a run records of round 0 and of its end: the table's key -> the metric's name.
METRICS = {"accuracy": "eval_accuracy", "macro_f1": "eval_macro_f1", "eval_loss": "eval_loss"}


def run_cell(name: str, seed: int, runs: Path, size: str, extra: list[dict]) -> None:
    folder = runs / f"{name}-seed{seed}"
    if (folder / "summary.json").is_file():
        print(f"{folder.name}: finished before, skipped")
        return
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted run starts again
    layers = [*cell_overrides(name, size), *extra]
    layers.append({"run": {"seed": seed, "out": str(folder)}})
    print(f"\n=== {folder.name}")
    if name == CENTRAL:
        run_centralised(layers, folder)
    else:
        simulate(load_config(None, layers))


def run_centralised(layers: list[dict], folder: Path) -> None:
    """The ceiling on the pooled rows, written as a summary.json that `read_run` reads like a
    federation's (it has no rounds, so no round 0)."""
    cfg = load_config(None, layers)
    samples = federation_samples(cfg)
    steps = samples // cfg.train.batch_size
    print(f"{steps} steps on the pooled rows (no output until done) ...")
    result = centralised(layers, samples)
    folder.mkdir(parents=True)
    write_config(cfg, folder / "config.toml")
    summary = {
        "final": {name: result[f"final_{key}"] for key, name in METRICS.items()},
        "wall_seconds": result["wall_seconds"],
        "steps": steps,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))


def read_run(folder: Path) -> dict:
    """The numbers of one finished run that the table and the plot need."""
    summary = json.loads((folder / "summary.json").read_text())
    epsilon = (summary.get("privacy") or {}).get("max_epsilon")
    run = {key: summary["final"][name] for key, name in METRICS.items()}
    run |= {
        "run": folder.name,
        "epsilon": float("inf") if epsilon is None else float(epsilon),
        "wall_seconds": summary["wall_seconds"],
    }
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():  # a federation's rounds (the centralised ceiling has none)
        first = json.loads(metrics.read_text().splitlines()[0])
        run |= {f"round0_{key}": first[name] for key, name in METRICS.items()}
    return run


def collect(runs: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for name in CELLS:
        for folder in sorted(runs.glob(f"{name}-seed*")):
            seed = folder.name.removeprefix(f"{name}-seed")
            if seed.isdigit() and (folder / "summary.json").is_file():
                found.setdefault(name, []).append(read_run(folder))
    return found


def _stat(values: list[float], fmt: str) -> str:
    if all(np.isinf(values)):
        return "-"  # epsilon without privacy
    mean, std = mean_std(values)
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def _seed(run: dict) -> str:
    return run["run"].rsplit("seed", 1)[1]


def round0(found: dict[str, list[dict]], key: str) -> list[float]:
    """The base model's `key` (a key of METRICS) once per seed: every cell of a seed
    starts from the same model on the same held-out rows."""
    name = f"round0_{key}"
    first = {_seed(r): r[name] for runs in found.values() for r in runs if name in r}
    return list(first.values())


COLUMNS = (
    ("accuracy", "accuracy", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("eval_loss", "eval loss", "{:.3f}"),
    ("epsilon", "epsilon", "{:.2f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
)


def write_report(found: dict[str, list[dict]], out: Path) -> None:
    lines = [
        "| cell | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    if found:
        seeds = ",".join(sorted({_seed(r) for runs in found.values() for r in runs}))
        start = [_stat(round0(found, key), fmt) if key in METRICS else "-"
                 for key, _, fmt in COLUMNS]  # fmt: skip
        lines.append(f"| round 0 (the base model, B = 0) | {seeds} | " + " | ".join(start) + " |")
    for name, runs in found.items():
        seeds = ",".join(_seed(r) for r in runs)
        cells = [_stat([r[key] for r in runs], fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(found, indent=1))
    if found:
        plot(found, out / "accuracy.png")
    print((out / "results.md").read_text())


def plot(found: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against epsilon per privacy level, with the round-0, non-private and
    centralised lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (prefix, label) in enumerate((("dp-", "DP-SGD per site"), ("client-", "client DP"))):
        names = [n for n in found if n.startswith(prefix)]
        points = sorted(
            (
                mean_std([r["epsilon"] for r in found[n]])[0],
                mean_std([r["accuracy"] for r in found[n]]),
            )
            for n in names
        )
        if points:
            ax.errorbar(
                [e for e, _ in points],
                [m for _, (m, _) in points],
                yerr=[s or 0.0 for _, (_, s) in points],
                fmt="o-",
                capsize=3,
                color=f"C{i}",
                label=label,
            )
    for name, style, label in (("nonprivate", "--", "non-private"), (CENTRAL, "-.", CENTRAL)):
        if name in found:
            accuracy = float(np.mean([r["accuracy"] for r in found[name]]))
            ax.axhline(accuracy, color="k", ls=style, label=label)
    ax.axhline(float(np.mean(round0(found, "accuracy"))), color="grey", ls=":", label="round 0")
    ax.set_xscale("log")
    epsilons = sorted({round(r["epsilon"], 1) for runs in found.values() for r in runs})
    ax.set_xticks([e for e in epsilons if np.isfinite(e)], minor=False)
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("epsilon per site (log)")
    ax.set_ylabel("final accuracy (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # off the lines
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results folder (default: one per size, see OUTS)")
    parser.add_argument("--cells", help="comma-separated, run in order (default: every cell)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated; each cell runs per seed")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", help="the CPU version (about 30 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny-random, 3 sites, 1 round")
    parser.add_argument("--set", action="append", default=[], help="applied to every run")
    parser.add_argument("--report-only", action="store_true", help="no runs: tables and plot")
    args = parser.parse_args()
    size = "reduced" if args.reduced else "smoke" if args.smoke else "full"
    out, names = Path(args.out or OUTS[size]), (args.cells or ",".join(CELLS)).split(",")
    unknown = sorted(set(names) - set(CELLS))
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    extra = [parse_override(s) for s in args.set]
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                run_cell(name, seed, runs, size, extra)
                write_report(collect(runs), out)
    write_report(collect(runs), out)


if __name__ == "__main__":
    main()
