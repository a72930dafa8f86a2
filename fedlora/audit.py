"""`fedlora audit`: measured leakage. A membership-inference attack asks, row by row, "was this
row in a site's training data?" and is scored against rows that were not (held-out rows of the
same site, the same distribution). What it reports is what a privacy officer can compare across
settings beside epsilon: the attack's AUC (0.5: no better than a coin) and its true-positive rate
at a low false-positive rate (1% and 0.1%: how many members it exposes while rarely accusing a
non-member), each with a seeded bootstrap 95% interval.

Two scores per row, higher meaning "more likely a member":
- loss: minus the row's mean answer-token loss under the target adapter (a loss threshold);
- reference: the row's loss under a reference model minus its loss under the target (a
  likelihood-ratio test against a reference: the bare base model for the global adapter, the
  global adapter for one site's update). It removes how hard a row is in itself, which is most
  of what a raw loss threshold measures, so it is cheap and much stronger.

Targets: the global adapter of a results folder (what anyone who receives the model holds), and
with `--site-update K` the plaintext update of site K as the server would see it without secure
aggregation. A run keeps the global adapter its last round began from (`last_round_start.
safetensors`), and a simulated site's randomness comes from the run seed, so site K's update of
that round is replayed exactly: the same rows, batches, dropout and DP-SGD noise from the same
start (`tests/test_audit.py` checks that the replayed updates aggregate to the run's final
adapter). A folder without that file (an older run) gets a recomputed update instead, labelled
so: `train.local_steps` steps from the final adapter (the update of one more round). Members
are the rows the update was trained on (its batches), since an update depends on no other row;
non-members are site K's held-out rows.

The statistics are pure functions (`auc`, `tpr_at_fpr`, `attack_metrics`); `run_audit` is the
glue that scores a run's rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import FedloraError

Log = Callable[[str], None]
#: the false-positive rates the true-positive rate is reported at
FPRS = (0.01, 0.001)
DRAWS = 1000
#: at most this many member and as many non-member rows per site (a seeded subset)
ROWS = 500
ATTACKS = {
    "loss": "minus the row's mean answer-token loss under the target",
    "reference": "the row's loss under the reference model minus its loss under the target",
}


# --- Statistics ------------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=float)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based start of each tie group
    return (first + (counts + 1) / 2.0)[inverse]


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(score of a random member > that of a random non-member) + P(tie) / 2: the area under
    the ROC curve, from ranks (Mann-Whitney U), exact with ties."""
    m, n = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("AUC needs at least one member and one non-member score")
    ranks = average_ranks(np.concatenate([m, n]))
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2.0
    return float(u / (len(m) * len(n)))


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], fpr: float) -> float:
    """The largest fraction of members flagged ("score > t") by a threshold t that flags at most
    `fpr` of the non-members. With n non-members at most floor(fpr * n) may be flagged, so t is
    the (floor(fpr * n) + 1)-th highest non-member score; below 1/n this is a rate at zero false
    positives."""
    m, n = np.asarray(members, dtype=float), np.sort(np.asarray(nonmembers, dtype=float))[::-1]
    if len(m) == 0 or len(n) == 0:
        raise ValueError("TPR needs at least one member and one non-member score")
    allowed = int(np.floor(fpr * len(n) + 1e-9))
    if allowed >= len(n):
        return 1.0
    return float(np.mean(m > n[allowed]))


def balanced(n_members: int, n_nonmembers: int, limit: int, seed: int) -> tuple[list, list]:
    """Indices of equally many members and non-members (at most `limit` each), a seeded subset
    of the larger side: with equal sets AUC and TPR weigh both kinds of error alike."""
    k = min(n_members, n_nonmembers, limit)
    rng = np.random.default_rng(seed)

    def pick(n: int) -> list[int]:
        return (
            sorted(int(i) for i in rng.choice(n, size=k, replace=False))
            if k < n
            else list(range(n))
        )

    return pick(n_members), pick(n_nonmembers)


def _metric(value: float, draws: list[float]) -> dict[str, Any]:
    lo, hi = np.percentile(np.asarray(draws, dtype=float), [2.5, 97.5])
    return {"value": value, "ci95": [float(lo), float(hi)]}


def fpr_key(fpr: float) -> str:
    return f"tpr_at_fpr_{fpr:g}"


def attack_metrics(
    members: Sequence[float],
    nonmembers: Sequence[float],
    draws: int = DRAWS,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC and TPR at each of FPRS with percentile 95% intervals from a seeded bootstrap that
    resamples members and non-members separately (each side keeps its size)."""
    m, n = np.asarray(members, dtype=float), np.asarray(nonmembers, dtype=float)
    rng = np.random.default_rng(seed)
    boot: dict[str, list[float]] = {"auc": [], **{fpr_key(f): [] for f in FPRS}}
    for _ in range(draws):
        bm, bn = m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))]
        boot["auc"].append(auc(bm, bn))
        for f in FPRS:
            boot[fpr_key(f)].append(tpr_at_fpr(bm, bn, f))
    out: dict[str, Any] = {"auc": _metric(auc(m, n), boot["auc"])}
    for f in FPRS:
        out[fpr_key(f)] = _metric(tpr_at_fpr(m, n, f), boot[fpr_key(f)])
    return out


def attack_report(
    scores: dict[str, tuple[np.ndarray, np.ndarray]], draws: int, seed: int
) -> dict[str, Any]:
    """{attack: metrics} for (member, non-member) scores of each attack, plus the set sizes and
    the smallest false-positive rate these sizes can resolve."""
    first_m, first_n = next(iter(scores.values()))
    out: dict[str, Any] = {
        "members": len(first_m),
        "nonmembers": len(first_n),
        "min_fpr": 1.0 / len(first_n) if len(first_n) else None,
    }
    for name, (m, n) in scores.items():
        out[name] = attack_metrics(m, n, draws, seed) if len(m) and len(n) else None
    return out


# --- Scoring a run's rows --------------------------------------------------------------------


def drawn_rows(rows: Sequence, steps: int, dp_args: dict[str, Any]) -> set[int]:
    """The rows of the units DP-SGD's Poisson batches drew (the same stream, replayed)."""
    from fedlora.privacy.dpsgd import DPSGD, PoissonBatches, cap_units, privacy_units

    dp = DPSGD.for_round(**dp_args)
    units, _ = cap_units(privacy_units(rows), dp.max_rows_per_unit)
    batches = PoissonBatches(len(units), dp.sample_rate, steps, dp.batches)
    return {i for batch in batches for unit in batch for i in units[unit]}


class _Seen(Sequence):
    """A site's rows that records which ones local training reads (the update's members)."""

    def __init__(self, rows: Sequence) -> None:
        self.rows, self.seen = rows, set()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        self.seen.add(int(i))
        return self.rows[i]


@dataclass
class _Scorer:
    """Per-row mean answer-token loss under whatever adapter the runtime's model holds."""

    rt: Any  # fedlora.runtime.Runtime

    def losses(self, rows: Sequence, adapter: bool = True) -> np.ndarray:
        from contextlib import nullcontext

        from fedlora.train import score_rows

        if not rows:
            return np.zeros(0)
        ctx = nullcontext() if adapter else self.rt.model.disable_adapter()
        with ctx:
            loss_sum, tokens, _ = score_rows(
                self.rt.model, self.rt.encoder, rows, self.rt.pad_id, bf16=self.rt.bf16
            )
        return loss_sum / np.maximum(tokens, 1)


def load_run(run_dir: str):
    """The run's source (results folder or exported adapter with its config.toml)."""
    from fedlora.lifecycle import resolve_source

    source = resolve_source(run_dir)
    if source.is_base or source.cfg is None:
        raise FedloraError(
            f"{run_dir} has no run config (config.toml): the audit needs the run's data and "
            "partition to know each site's training rows. Give a `fedlora simulate` results "
            "folder or an exported adapter that kept its config.toml."
        )
    return source


def check_site_update(cfg, site: int | None) -> None:
    """Refuse a --site-update the recomputation cannot reproduce honestly (before any work)."""
    if site is None:
        return
    n = cfg.federation.clients
    if not 0 <= site < n:
        raise FedloraError(f"--site-update {site}: the run has {n} sites (0 to {n - 1}).")
    if cfg.privacy.level == "client":
        raise FedloraError(
            "--site-update is not implemented for privacy.level = 'client' yet (the site's "
            "clipping and its noise share would have to be replayed); audit the global adapter "
            "alone (drop --site-update)."
        )
    if cfg.strategy.name == "scaffold":
        raise FedloraError(
            "--site-update cannot recompute a SCAFFOLD update: a finished run keeps no control "
            "variates. Audit the global adapter alone (drop --site-update)."
        )
    if cfg.lora.site_rank(site) < cfg.lora.r:
        raise FedloraError(
            f"--site-update {site}: site {site} trains a lower rank; recomputing such an update "
            "is not implemented yet."
        )


def run_audit(
    run_dir: str,
    rows: int = ROWS,
    draws: int = DRAWS,
    seed: int = 0,
    site_update: int | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Attack the run's global adapter (and with `site_update`, that site's recomputed
    update); returns the report `format_audit` prints and `--json` writes."""
    source = load_run(run_dir)
    cfg = source.cfg
    check_site_update(cfg, site_update)
    for note in source.notes:
        log(f"note: {note}")
    from fedlora.runtime import build_runtime

    log(f"Loading base model {cfg.model.name} ...")
    runtime = build_runtime(cfg, log, threads=os.cpu_count() or 1)
    _load_adapter(runtime.model, source.adapter_dir)
    scorer = _Scorer(runtime)
    global_arrays = _adapter_arrays(runtime.model)

    sites: list[dict[str, Any]] = []
    pooled: dict[str, list[list[np.ndarray]]] = {a: [[], []] for a in ATTACKS}
    for k in range(cfg.federation.clients):
        train_idx, test_idx = runtime.train_parts[k], runtime.test_parts[k]
        mi, ni = balanced(len(train_idx), len(test_idx), rows, seed + k)
        members = runtime.encoder.encode_all([runtime.dataset.train[train_idx[i]] for i in mi])
        nonmembers = runtime.encoder.encode_all([runtime.dataset.test[test_idx[i]] for i in ni])
        log(f"Site {k}: scoring {len(members)} training and {len(nonmembers)} held-out rows ...")
        target = (scorer.losses(members), scorer.losses(nonmembers))
        base = (scorer.losses(members, False), scorer.losses(nonmembers, False))
        scores = _scores(target, base)
        for a, (m, n) in scores.items():
            pooled[a][0].append(m)
            pooled[a][1].append(n)
        sites.append({"site": k, **attack_report(scores, draws, seed)})
    all_scores = {a: (np.concatenate(m), np.concatenate(n)) for a, (m, n) in pooled.items()}
    report: dict[str, Any] = {
        "run": str(run_dir),
        "base_model": cfg.model.name,
        "data": runtime.dataset.name,
        "target": "global adapter",
        "reference_model": "the bare base model",
        "attacks": ATTACKS,
        "members": "each site's training rows",
        "nonmembers": "the same site's held-out rows (never trained on), as many as members",
        "rows_per_site": rows,
        "bootstrap": {"draws": draws, "seed": seed, "interval": "percentile 95%"},
        "sites": sites,
        "all_sites": attack_report(all_scores, draws, seed),
    }
    if site_update is not None:
        start = _round_start(source, site_update)
        report["site_update"] = _site_update(
            runtime, scorer, global_arrays, site_update, start, rows, draws, seed, log
        )
    return report


def _round_start(source, site: int) -> tuple[int, dict[str, np.ndarray]] | None:
    """(round, global adapter) of the run's last round when the results folder kept it and
    site `site` took part in that round; refuses a site that did not."""
    from fedlora.results import load_round_start

    folder = source.cfg_path.parent
    kept = load_round_start(folder)
    if kept is None:
        return None
    round_ = kept[0]
    rows = (folder / "metrics.jsonl").read_text().splitlines()
    took_part = next(
        json.loads(r).get("sites", []) for r in reversed(rows) if json.loads(r)["round"] == round_
    )
    if site not in took_part:
        raise FedloraError(
            f"--site-update {site}: site {site} did not take part in round {round_}, the last "
            f"round, whose update the audit replays; its sites were {took_part}."
        )
    return kept


def _scores(target: tuple, reference: tuple) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each attack's (member, non-member) scores from the losses under target and reference."""
    return {
        "loss": (-target[0], -target[1]),
        "reference": (reference[0] - target[0], reference[1] - target[1]),
    }


def _site_update(
    runtime, scorer, global_arrays, site, start, rows, draws, seed, log
) -> dict[str, Any]:
    """Site `site`'s plaintext update, attacked with the global adapter before it (which the
    server holds) as the reference: replayed exactly from `start` = (round, the adapter that
    round began from), or, without it, recomputed from the final adapter."""
    from fedlora.adapter import load_adapter_arrays

    cfg = runtime.cfg
    test_idx = runtime.test_parts[site]
    site_rows = _Seen(runtime.site_rows(site))
    if start is not None:
        round_, reference_arrays = start
        run_seed = cfg.run.seed
        target = f"replayed: the update site {site} sent in round {round_}"
        log(f"Site {site}: replaying its update of round {round_} ...")
    else:  # one more round from the final adapter, seeded apart from every past round
        round_, reference_arrays = cfg.federation.rounds + 1, global_arrays
        run_seed = int(
            np.random.SeedSequence([cfg.run.seed, cfg.federation.rounds, site, seed])
            .generate_state(1)[0]
        )  # fmt: skip
        target = "recomputed: local steps from the final global adapter (one more round)"
        log(f"Site {site}: recomputing its update from the final global adapter ...")
    load_adapter_arrays(runtime.model, reference_arrays)
    steps, dp_args = replay_site_round(runtime, site_rows, site, round_, run_seed)
    dp = dp_args is not None
    seen = sorted(site_rows.seen)
    if dp:  # DP-SGD reads every row to group units: its members are its draws
        seen = sorted(drawn_rows(site_rows.rows, steps, dp_args))
    mi, ni = balanced(len(seen), len(test_idx), rows, seed + site)
    members = [site_rows.rows[seen[i]] for i in mi]
    nonmembers = runtime.encoder.encode_all([runtime.dataset.test[test_idx[i]] for i in ni])
    log(f"Site {site}: scoring {len(members)} trained-on and {len(nonmembers)} held-out rows ...")
    updated = (scorer.losses(members), scorer.losses(nonmembers))
    load_adapter_arrays(runtime.model, reference_arrays)
    reference = (scorer.losses(members), scorer.losses(nonmembers))
    return {
        "site": site,
        "target": f"{target}, {steps} local steps with the run's settings"
        + (" (DP-SGD)" if dp else ""),
        "reference_model": "the global adapter the update started from",
        "members": "the rows of the site that the update was trained on (its batches)",
        "trained_rows": len(seen),
        "site_rows": len(runtime.train_parts[site]),
        **attack_report(_scores(updated, reference), draws, seed),
    }


def replay_site_round(
    runtime, rows: Sequence, site: int, round_: int, run_seed: int
) -> tuple[int, dict[str, Any] | None]:
    """Train site `site`'s round `round_` as a simulated site does (fedlora.apps.contribution):
    its local steps, its dropout and batch seed, and under DP-SGD its Poisson batches and noise
    from its secret, all derived from `run_seed`, from the adapter now in the model. Returns the
    steps and the DP-SGD arguments (None without DP-SGD). SCAFFOLD, which needs saved control
    variates, and lower-rank sites are refused before (check_site_update)."""
    from fedlora.apps.contribution import seed_training, site_local_steps
    from fedlora.privacy.dpsgd import DPSGD, count_units
    from fedlora.privacy.policy import sample_mechanism
    from fedlora.privacy.secrets import simulated_secret
    from fedlora.strategies import strategy_for
    from fedlora.train import for_round, local_train

    cfg = runtime.cfg
    steps = site_local_steps(cfg.train, site, cfg.federation.clients)
    secret = simulated_secret(run_seed, site)
    batches = seed_training(secret, round_, site)
    start = _adapter_arrays(runtime.model)
    terms = strategy_for(cfg).training_terms({}, {}, start)  # no client state: not SCAFFOLD
    dp_args = None
    if cfg.privacy.level == "sample":
        mechanism = sample_mechanism(cfg, count_units(rows), steps)
        dp_args = {
            "noise_multiplier": mechanism.noise_multiplier,
            "max_grad_norm": mechanism.max_grad_norm,
            "sample_rate": mechanism.sample_rate,
            "secret": secret,
            "round_": round_,
            "site": site,
            "physical_batch_size": cfg.privacy.physical_batch_size,
            "max_rows_per_unit": cfg.privacy.max_rows_per_unit,
        }
    local_train(
        runtime.model, rows, steps, for_round(cfg.train, round_, cfg.federation.rounds), terms,
        batches,
        runtime.pad_id, bf16=runtime.bf16, dp=DPSGD.for_round(**dp_args) if dp_args else None,
    )  # fmt: skip
    return steps, dp_args


def _load_adapter(model, folder: Path) -> None:
    """Put a saved peft adapter's LoRA tensors into the runtime's (trainable) LoRA model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise FedloraError(f"{folder} has no adapter_model.safetensors.")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise FedloraError(
            f"The adapter in {folder} does not match the run's LoRA layout ({len(missing)} "
            "tensors missing); was config.toml changed?"
        )


def _adapter_arrays(model) -> dict[str, np.ndarray]:
    from fedlora.adapter import adapter_arrays

    return adapter_arrays(model)


# --- Output ----------------------------------------------------------------------------------


def _fmt(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} ({lo:.3f}-{hi:.3f})"


def _table(entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    cols = ["auc", *(fpr_key(f) for f in FPRS)]
    titles = ["AUC", *(f"TPR@{100 * f:g}%FPR" for f in FPRS)]
    head = f"{'':>6} {'rows':>9}  {'attack':<10}" + "".join(
        f"{t + ' (95% CI)':<24}" for t in titles
    )
    lines = [head, "-" * len(head)]
    for label, e in entries:
        for i, attack in enumerate(ATTACKS):
            metrics = e.get(attack)
            cells = "".join(f"{_fmt(metrics and metrics[c]):<24}" for c in cols)
            rows = f"{e['members']}+{e['nonmembers']}" if i == 0 else ""
            lines.append(f"{label if i == 0 else '':>6} {rows:>9}  {attack:<10}{cells}")
    return lines


def format_audit(report: dict[str, Any]) -> str:
    lines = [
        f"Membership inference against the {report['target']} of {report['run']} "
        f"({report['base_model']}, {report['data']})",
        f"Members: {report['members']}; non-members: {report['nonmembers']}.",
        f"Scores: loss = {ATTACKS['loss']}; reference = {ATTACKS['reference']} "
        f"({report['reference_model']}).",
        "",
        *_table(
            [(f"site {e['site']}", e) for e in report["sites"]] + [("all", report["all_sites"])]
        ),
    ]
    upd = report.get("site_update")
    if upd is not None:
        lines += [
            "",
            f"Site {upd['site']}'s plaintext update (global + delta), as the server would see it "
            f"without secure aggregation ({upd['target']}; reference: {upd['reference_model']}; "
            "members: "
            f"{upd['trained_rows']} of the site's {upd['site_rows']} rows were trained on):",
            *_table([(f"site {upd['site']}", upd)]),
        ]
    smallest = report["all_sites"]["min_fpr"]
    lines += [
        "",
        "AUC 0.5 is a coin toss, 1.0 a perfect attack. TPR@x%FPR: the share of training rows the "
        "attack exposes while wrongly flagging at most x% of rows that were never trained on. "
        f"Per site a rate below 1/non-members is a rate at zero false positives (all sites: "
        f"1/{round(1 / smallest) if smallest else 0}).",
    ]
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
