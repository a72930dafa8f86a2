"""The four strategies on the default federation, and the centralised ceiling, in one run.

Each strategy runs with its config from configs/ (fedavg and fedprox: the default; scaffold and
fednova: local SGD, which their corrections assume). The ceiling is centralised LoRA on the
pooled training rows processing the same number of samples as the federation (rounds x sites x
local steps x batch), with the default local optimiser, evaluated on the same held-out rows.
Writes results.md, results.json and accuracy.png into --out.

    python simulations/compare_strategies.py --out simulations/results/strategies
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedlora.apps.contribution import site_local_steps
from fedlora.config import Config, load_config, parse_override
from fedlora.quiet import quiet_libraries
from fedlora.runtime import build_runtime
from fedlora.simulate import simulate
from fedlora.strategies import TrainingTerms
from fedlora.train import evaluate, local_train, make_optimizer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "fedavg": None,
    "fedprox": ROOT / "configs" / "fedprox.toml",
    "scaffold": ROOT / "configs" / "scaffold.toml",
    "fednova": ROOT / "configs" / "fednova.toml",
}


def federation_samples(cfg: Config) -> int:
    """The rows a federation processes in all (rounds x sampled sites x each site's local steps
    x batch): what the centralised ceiling gets, so the two compare at the same samples."""
    fed = cfg.federation
    steps = sum(site_local_steps(cfg.train, s, fed.clients) for s in range(fed.clients))
    return int(fed.rounds * cfg.train.batch_size * steps * min(1.0, fed.fraction))


def centralised(overrides: list[dict], samples: int) -> dict:
    quiet_libraries()
    cfg = load_config(None, overrides)
    cfg.train.threads = 2
    rt = build_runtime(cfg, log=lambda _: None)
    steps = max(1, samples // cfg.train.batch_size)
    optimizer = make_optimizer(rt.model, cfg.train)
    t0 = time.perf_counter()
    local_train(
        rt.model,
        rt.encoder.encode_all(rt.dataset.train),
        steps,
        cfg.train,
        TrainingTerms(),
        np.random.default_rng(cfg.run.seed),
        rt.pad_id,
        bf16=rt.bf16,
        optimizer=optimizer,
    )
    eval_rows, _ = rt.eval_set()
    res = evaluate(rt.model, rt.encoder, eval_rows, rt.pad_id, bf16=rt.bf16)
    return {
        "run": f"centralised, {steps} steps",
        "final_accuracy": res.accuracy,
        "final_macro_f1": res.macro_f1,
        "final_eval_loss": res.loss,
        "wall_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="simulations/results/strategies")
    parser.add_argument("--strategies", default="fedavg,fedprox,scaffold,fednova")
    parser.add_argument("--set", action="append", default=[], help="applied to every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [parse_override(s) for s in args.set]
    results = []
    for name in args.strategies.split(","):
        cfg = load_config(
            CONFIGS[name],
            [{"strategy": {"name": name}}, *common, {"run": {"out": str(out / name)}}],
        )
        t0 = time.perf_counter()
        run = simulate(cfg)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        results.append(
            {
                "run": name,
                "round0_accuracy": rows[0]["eval_accuracy"],
                "round0_macro_f1": rows[0]["eval_macro_f1"],
                "round0_eval_loss": rows[0]["eval_loss"],
                "final_accuracy": rows[-1]["eval_accuracy"],
                "final_macro_f1": rows[-1]["eval_macro_f1"],
                "final_eval_loss": rows[-1]["eval_loss"],
                "wall_seconds": time.perf_counter() - t0,
                "curve": [(r["round"], r["eval_accuracy"], r["eval_macro_f1"]) for r in rows],
            }
        )
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results.append(centralised(common, federation_samples(load_config(None, common))))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out / "results.md")
    plot(results, out / "accuracy.png")
    print((out / "results.md").read_text())


def write_table(results: list[dict], path: Path) -> None:
    def f(v):
        return "" if v is None else f"{v:.3f}"

    lines = [
        "| run | round-0 acc | round-0 macro-F1 | final acc | final macro-F1 | final eval loss "
        "| wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['run']} | {f(r.get('round0_accuracy'))} | "
            f"{f(r.get('round0_macro_f1'))} | {f(r['final_accuracy'])} | "
            f"{f(r['final_macro_f1'])} | {f(r['final_eval_loss'])} | "
            f"{r['wall_seconds']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_f1) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        if "curve" in r:
            rounds, acc, f1 = zip(*r["curve"], strict=True)
            ax_acc.plot(rounds, acc, "o-", label=r["run"])
            ax_f1.plot(rounds, f1, "o-", label=r["run"])
        else:
            ax_acc.axhline(r["final_accuracy"], color="k", ls="--", label=r["run"])
            ax_f1.axhline(r["final_macro_f1"], color="k", ls="--", label=r["run"])
    for ax, name in ((ax_acc, "accuracy"), (ax_f1, "macro-F1")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
