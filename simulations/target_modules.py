"""Which modules should carry the adapter? LoRA target presets on the default federation.

For each preset: one `fedlora simulate` run with the default config and `lora.targets` set,
then the trainable parameters, bytes per round, and the median time of a local training step
(measured in this process, the variants one after another). Writes results.md, results.json
and targets.png into --out.

    python simulations/target_modules.py --out simulations/results/targets
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from fedlora.config import load_config, parse_override
from fedlora.runtime import build_runtime
from fedlora.simulate import simulate
from fedlora.strategies import TrainingTerms
from fedlora.train import local_train

PRESETS = ("qv", "qkv", "o_proj", "o_proj+down_proj", "all-linear")


def step_seconds_and_size(cfg, repeats: int = 3) -> tuple[float, int]:
    """Median seconds of one local step (2 threads) and the adapter's trainable parameters."""
    rt = build_runtime(cfg, log=lambda _: None, threads=2)
    size = sum(p.numel() for p in rt.model.parameters() if p.requires_grad)
    rows = rt.site_rows(0)
    times = []
    for i in range(repeats + 1):  # the first step warms up
        t = time.perf_counter()
        local_train(
            rt.model,
            rows,
            1,
            cfg.train,
            TrainingTerms(),
            np.random.default_rng(i),
            rt.pad_id,
            bf16=rt.bf16,
        )
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="simulations/results/targets")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--set", action="append", default=[], help="applied to every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [parse_override(s) for s in args.set]
    results = []
    for preset in args.presets.split(","):
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
        step, size = step_seconds_and_size(cfg)
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
            }
        )
        (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        "| targets | final acc | final macro-F1 | final eval loss | trainable params | "
        "bytes up / round | step s | run wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['targets']} | {r['final_accuracy']:.3f} | {r['final_macro_f1']:.3f} | "
            f"{r['final_eval_loss']:.3f} | {r['trainable_parameters']:,} | "
            f"{r['bytes_up_per_round'] / 1e6:.1f} MB | {r['step_seconds']:.2f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    r0 = results[0]
    lines.append(
        f"\nRound 0 (no adapter training): accuracy {r0['round0_accuracy']:.3f}, "
        f"macro-F1 {r0['round0_macro_f1']:.3f}."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "targets.png")
    print((out / "results.md").read_text())


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
