"""Which modules should carry the adapter? LoRA target presets on the default federation.

For each preset: one `fedlora simulate` run with the default config and `lora.targets` set,
then the trainable parameters, bytes per round, and the median time of a local training step
(measured in this process, the variants one after another). Writes results.md, results.json
and targets.png into --out, keeping the rows of presets measured there earlier.

    python simulations/target_modules.py --out simulations/results/targets

With --step-times no federation runs: the presets' step times are measured here, taking turns,
into step_times_<threads>threads.md / .json, so that presets whose federations ran on different
machines (or at another precision, or under another load) can still be compared for cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from fedlora.config import load_config, parse_override
from fedlora.quiet import quiet_libraries
from fedlora.runtime import build_runtime
from fedlora.simulate import simulate
from fedlora.strategies import TrainingTerms
from fedlora.train import local_train

PRESETS = ("qv", "qkv", "o_proj", "o_proj+down_proj", "all-linear")


def timed_step(rt, cfg, seed: int) -> float:
    """Seconds of one local training step on site 0's rows."""
    t = time.perf_counter()
    local_train(
        rt.model,
        rt.site_rows(0),
        1,
        cfg.train,
        TrainingTerms(),
        np.random.default_rng(seed),
        rt.pad_id,
        bf16=rt.bf16,
    )
    return time.perf_counter() - t


def trainable(rt) -> int:
    return sum(p.numel() for p in rt.model.parameters() if p.requires_grad)


def step_seconds_and_size(cfg, repeats: int = 3) -> tuple[float, int, str]:
    """Median seconds of one local step (2 threads), the adapter's trainable parameters and the
    precision the step ran at."""
    rt = build_runtime(cfg, log=lambda _: None, threads=2)
    times = [timed_step(rt, cfg, i) for i in range(repeats + 1)]  # the first step warms up
    return statistics.median(times[1:]), trainable(rt), "bf16" if rt.bf16 else "fp32"


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="simulations/results/targets")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--set", action="append", default=[], help="applied to every run")
    parser.add_argument(
        "--step-times",
        action="store_true",
        help="no federations: each preset's step time and size, all measured on this machine",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads for --step-times (1 resists a machine that is busy with other work)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [parse_override(s) for s in args.set]
    presets = args.presets.split(",")
    if args.step_times:
        step_times(presets, common, out, args.threads)
        return
    # Rows of presets measured earlier into the same --out stay in the table, so a study that
    # was stopped can be finished one preset at a time; a preset run again replaces its row.
    earlier = out / "results.json"
    results = [
        r
        for r in (json.loads(earlier.read_text()) if earlier.exists() else [])
        if r["targets"] not in presets
    ]
    for preset in presets:
        cfg = load_config(
            None,
            [
                *common,
                {"lora": {"targets": preset}},
                {"run": {"out": str(out / preset.replace("+", "_"))}},
            ],
        )
        run = simulate(cfg)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run / "summary.json").read_text())
        step, size, _ = step_seconds_and_size(cfg)
        results.append(
            {
                "targets": preset,
                "round0_accuracy": rows[0]["eval_accuracy"],
                "round0_macro_f1": rows[0]["eval_macro_f1"],
                "final_accuracy": rows[-1]["eval_accuracy"],
                "final_macro_f1": rows[-1]["eval_macro_f1"],
                "final_eval_loss": rows[-1]["eval_loss"],
                "trainable_parameters": size,
                "bytes_up_per_round": rows[-1]["bytes_up"],
                "wall_seconds": summary["wall_seconds"],
                "step_seconds": step,
                "precision": summary.get("precision", ""),
            }
        )
        (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)


def write_report(results: list[dict], out: Path) -> None:
    """results.md and targets.png from the rows of results.json."""
    lines = [
        "| targets | final acc | final macro-F1 | final eval loss | trainable params | "
        "bytes up / round | step s | run wall s | precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['targets']} | {r['final_accuracy']:.3f} | {r['final_macro_f1']:.3f} | "
            f"{r['final_eval_loss']:.3f} | {r['trainable_parameters']:,} | "
            f"{r['bytes_up_per_round'] / 1e6:.1f} MB | {r['step_seconds']:.2f} | "
            f"{r['wall_seconds']:.0f} | {r.get('precision', '')} |"
        )
    # round 0 is the base model (B = 0): it differs only with the precision the run used
    round0 = {r.get("precision", ""): r for r in results}
    lines.append(
        "\nRound 0 (no adapter training): "
        + "; ".join(
            f"accuracy {r['round0_accuracy']:.3f}, macro-F1 {r['round0_macro_f1']:.3f}"
            + (f" ({precision})" if precision else "")
            for precision, r in round0.items()
        )
        + "."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "targets.png")
    print((out / "results.md").read_text())


def step_times(
    presets: list[str], common: list[dict], out: Path, threads: int = 2, repeats: int = 5
) -> None:
    """Every preset's local step time on this machine, with the ratio to the first preset. The
    presets take turns (one step each, `repeats` times, after a warm-up pass), so a load that
    changes while they are measured falls on all of them alike."""
    runtimes = {}
    for preset in presets:
        cfg = load_config(None, [*common, {"lora": {"targets": preset}}])
        runtimes[preset] = (cfg, build_runtime(cfg, log=lambda _: None, threads=threads))
    times: dict[str, list[float]] = {preset: [] for preset in presets}
    for i in range(repeats + 1):
        for preset, (cfg, rt) in runtimes.items():
            seconds = timed_step(rt, cfg, i)
            if i:  # pass 0 warms up
                times[preset].append(seconds)
    rows = [
        {
            "targets": preset,
            "trainable_parameters": trainable(rt),
            "step_seconds": statistics.median(times[preset]),
            "step_seconds_all": times[preset],
            "precision": "bf16" if rt.bf16 else "fp32",
        }
        for preset, (_, rt) in runtimes.items()
    ]
    name = f"step_times_{threads}threads"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    first = rows[0]
    lines = [
        f"| targets | trainable params | step s (median of {repeats}) | step / "
        f"{first['targets']} | precision |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['targets']} | {r['trainable_parameters']:,} | {r['step_seconds']:.2f} | "
            f"{r['step_seconds'] / first['step_seconds']:.2f} | {r['precision']} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print((out / f"{name}.md").read_text())


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["targets"] for r in results]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, [r["final_accuracy"] for r in results], 0.4, label="accuracy")
    ax.bar(x + 0.2, [r["final_macro_f1"] for r in results], 0.4, label="macro-F1")
    ax.axhline(results[0]["round0_accuracy"], color="C0", ls=":", label="round-0 accuracy")
    ax.axhline(results[0]["round0_macro_f1"], color="C1", ls=":", label="round-0 macro-F1")
    ax.set_xticks(x, names)
    ax.set_ylabel("score after the default federation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
