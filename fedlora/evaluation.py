"""`fedlora eval` and `fedlora compare`: held-out metrics with 95% confidence intervals, and a
paired comparison of two adapters (or an adapter and the bare base) on the same rows.

Intervals: Wilson score for accuracy; a seeded bootstrap over rows for the eval loss (a ratio of
token-loss sums, as in training's evaluation), perplexity (exp of the loss interval) and
macro-F1. Comparison: the exact McNemar test on the rows where exactly one side is right, and a
paired bootstrap (the same resampled rows for both sides) on the differences.

The statistics need per-row numbers (loss sum, loss tokens, predicted class); `score_rows`
computes them in one pass exactly as `fedlora.train.evaluate` does (same batches, same candidate
scoring), so the headline numbers match the round table of `fedlora simulate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import Config, load_config
from fedlora.errors import FedloraError
from fedlora.lifecycle import (
    BASE_WORD,
    SITES_DIR,
    AdapterBank,
    Source,
    check_base_name,
    choose_base,
)
from fedlora.metrics import macro_f1

Log = Callable[[str], None]
Z95 = 1.959963984540054  # two-sided 95% normal quantile
DRAWS = 1000
ALPHA = 0.05


# --- Statistics ------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (sensible at 0, 1 and small n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 or k = n the bound is exactly p; keep rounding from putting p outside
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each of the b + c discordant pairs
    goes either way with probability 1/2, so p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))).
    Exact integer arithmetic (Python ints; the final division is correctly rounded)."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def resamples(n: int, draws: int, seed: int) -> Iterator[np.ndarray]:
    """`draws` bootstrap resamples of row indices (with replacement), seeded."""
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        yield rng.integers(0, n, size=n)


def percentile_ci(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values, dtype=float), [2.5, 97.5])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class RowScores:
    """Per held-out row: the summed token loss and its number of loss tokens; for
    classification the gold and predicted class index."""

    task: str
    labels: list[str]
    loss_sum: np.ndarray
    tokens: np.ndarray
    gold: np.ndarray | None = None
    pred: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.loss_sum)

    @property
    def correct(self) -> np.ndarray:
        return self.gold == self.pred

    def loss(self, idx: np.ndarray | None = None) -> float:
        s = self.loss_sum if idx is None else self.loss_sum[idx]
        t = self.tokens if idx is None else self.tokens[idx]
        return float(s.sum() / max(1, t.sum()))

    def accuracy(self, idx: np.ndarray | None = None) -> float:
        c = self.correct if idx is None else self.correct[idx]
        return float(c.mean()) if len(c) else 0.0

    def macro_f1(self, idx: np.ndarray | None = None) -> float:
        g = self.gold if idx is None else self.gold[idx]
        p = self.pred if idx is None else self.pred[idx]
        return macro_f1(g, p, len(self.labels))


def _metric(value: float, ci: tuple[float, float], method: str, **extra: Any) -> dict[str, Any]:
    return {"value": value, "ci95": [ci[0], ci[1]], "method": method, **extra}


def summarize(s: RowScores, draws: int = DRAWS, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Point estimates with 95% intervals."""
    if s.n == 0:
        raise FedloraError("There are no held-out rows to evaluate.")
    classify = s.task == "classify"
    losses, f1s = [], []
    for idx in resamples(s.n, draws, seed):
        losses.append(s.loss(idx))
        if classify:
            f1s.append(s.macro_f1(idx))
    boot = f"bootstrap over rows ({draws} draws, seed {seed})"
    loss_ci = percentile_ci(losses)
    out = {"eval_loss": _metric(s.loss(), loss_ci, boot)}
    if classify:
        k = int(s.correct.sum())
        out["accuracy"] = _metric(
            s.accuracy(), wilson_interval(k, s.n), "Wilson score", correct=k, rows=s.n
        )
        out["macro_f1"] = _metric(s.macro_f1(), percentile_ci(f1s), boot)
    else:
        ppl = (_exp(s.loss()), (_exp(loss_ci[0]), _exp(loss_ci[1])))
        out["perplexity"] = _metric(ppl[0], ppl[1], "exp of the eval-loss interval")
    return out


def _exp(x: float) -> float:
    return math.exp(min(x, 50.0))  # as fedlora.train.evaluate caps it


def paired(a: RowScores, b: RowScores, draws: int = DRAWS, seed: int = 0) -> dict[str, Any]:
    """B - A on the same rows: paired bootstrap intervals (both sides resampled with the same
    rows) and, for classification, the exact McNemar test on per-row correctness."""
    if a.n != b.n or a.task != b.task:
        raise FedloraError("A and B were not evaluated on the same held-out rows.")
    if a.task == "classify" and not np.array_equal(a.gold, b.gold):
        raise FedloraError("A and B were evaluated with different gold labels.")
    classify = a.task == "classify"
    d_loss, d_acc, d_f1 = [], [], []
    for idx in resamples(a.n, draws, seed):
        d_loss.append(b.loss(idx) - a.loss(idx))
        if classify:
            d_acc.append(b.accuracy(idx) - a.accuracy(idx))
            d_f1.append(b.macro_f1(idx) - a.macro_f1(idx))
    method = f"paired bootstrap over rows ({draws} draws, seed {seed})"
    out: dict[str, Any] = {
        "eval_loss_diff": _metric(b.loss() - a.loss(), percentile_ci(d_loss), method)
    }
    if classify:
        a_only = int((a.correct & ~b.correct).sum())
        b_only = int((~a.correct & b.correct).sum())
        out["accuracy_diff"] = _metric(b.accuracy() - a.accuracy(), percentile_ci(d_acc), method)
        out["macro_f1_diff"] = _metric(b.macro_f1() - a.macro_f1(), percentile_ci(d_f1), method)
        out["mcnemar"] = {
            "a_right_b_wrong": a_only,
            "a_wrong_b_right": b_only,
            "p_value": mcnemar_exact(a_only, b_only),
            "method": "exact (binomial on the discordant rows), two-sided",
        }
    return out


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def verdict(pair: dict[str, Any], a: str = "A", b: str = "B", level: float = ALPHA) -> str:
    """One sentence a person can act on."""
    pct = f"{100 * (1 - level):.0f}%"
    if "mcnemar" in pair:
        mc, acc = pair["mcnemar"], pair["accuracy_diff"]
        p = mc["p_value"]
        if mc["a_right_b_wrong"] + mc["a_wrong_b_right"] == 0:
            return f"{a} and {b} give the same answer on every row: no difference in accuracy."
        if p < level:
            sign = 1 if acc["value"] > 0 else -1
            better, worse = (b, a) if sign > 0 else (a, b)
            lo, hi = sorted(sign * x for x in acc["ci95"])
            return (
                f"{better} is more accurate than {worse}: {_points(sign * acc['value'])} points "
                f"({pct} CI {_points(lo)} to {_points(hi)}), McNemar {format_p(p)}."
            )
        lo, hi = acc["ci95"]
        return (
            f"No significant difference in accuracy at the {100 * level:.0f}% level: {b} - {a} = "
            f"{_points(acc['value'])} points ({pct} CI {_points(lo)} to {_points(hi)}), "
            f"McNemar {format_p(p)}."
        )
    d = pair["eval_loss_diff"]
    lo, hi = d["ci95"]
    if lo > 0 or hi < 0:
        better, worse = (b, a) if d["value"] < 0 else (a, b)
        return (
            f"{better} has lower perplexity than {worse}: eval loss {b} - {a} = "
            f"{d['value']:+.4f} ({pct} CI {lo:+.4f} to {hi:+.4f}, paired bootstrap)."
        )
    return (
        f"No significant difference in perplexity at the {100 * level:.0f}% level: eval loss "
        f"{b} - {a} = {d['value']:+.4f} ({pct} CI {lo:+.4f} to {hi:+.4f}, paired bootstrap)."
    )


# --- Scoring held-out rows -------------------------------------------------------------------


def score_rows(model, encoder, rows, pad_id: int, batch_size: int = 16, bf16: bool = False):
    """Per-row scores of `rows`, exactly as `fedlora.train.evaluate` computes them."""
    from fedlora import train

    loss_sum, tokens, pred = train.score_rows(model, encoder, rows, pad_id, batch_size, bf16)
    gold = np.array([r.label for r in rows], dtype=np.int64) if pred is not None else None
    return RowScores(encoder.task, list(encoder.labels), loss_sum, tokens, gold, pred)


# --- Planning: which base, which data, which rows --------------------------------------------


def data_config(
    sources: list[Source],
    data: str | None = None,
    task: str | None = None,
    rows: int | None = None,
) -> tuple[Config, list[str]]:
    """The evaluation settings: the first run's config (data, seed, precision) or the defaults,
    then --data / --task / --rows. Notes say when another run used other data settings."""
    runs = [s for s in sources if s.cfg is not None]
    base = runs[0].cfg.to_dict() if runs else Config().to_dict()
    over: dict[str, Any] = {}
    if data is not None:
        over |= {"path": data, "test_path": ""}
    if task is not None:
        over["task"] = task
    if rows is not None:
        over["eval_rows"] = rows
    cfg = load_config(None, [base, {"data": over}] if over else [base])
    notes = []
    if data is None and len(runs) > 1:
        keys = ("path", "test_path", "task", "test_fraction")

        def split(c: Config) -> tuple:
            own_split = c.data.path and not c.data.test_path  # held out by seed
            return (*(getattr(c.data, k) for k in keys), c.run.seed if own_split else None)

        for other in runs[1:]:
            if split(other.cfg) != split(runs[0].cfg):
                notes.append(
                    f"{other.label} was trained with other data settings than {runs[0].label}; "
                    f"both are evaluated on the held-out rows of {runs[0].label}'s settings "
                    "(pass --data to choose)."
                )
    return cfg, notes


def heldout_indices(n_test: int, eval_rows: int, seed: int) -> list[int]:
    """At most `eval_rows` held-out rows, the seeded subset `fedlora simulate` evaluates on."""
    idx = list(range(n_test))
    if eval_rows and eval_rows < n_test:
        rng = np.random.default_rng(seed)
        idx = sorted(int(i) for i in rng.choice(n_test, size=eval_rows, replace=False))
    return idx


def base_names(sources: list[Source], override: str | None) -> list[str]:
    """Each source's base model: --base, else the one its run used; `base` takes the first
    adapter's (or the default model)."""
    if override:
        return [override] * len(sources)
    own = {i: choose_base([s], None) for i, s in enumerate(sources) if not s.is_base}
    shared = next(iter(own.values()), Config().model.name)
    return [own.get(i, shared) for i in range(len(sources))]


def score_sources(
    sources: list[Source],
    base: str | None = None,
    data: str | None = None,
    task: str | None = None,
    rows: int | None = None,
    allow_other_base: bool = False,
    log: Log = print,
) -> tuple[Config, Any, list[RowScores], list[str]]:
    """Score every source on the same held-out rows; each base model is loaded once."""
    from fedlora.data import load_dataset

    cfg, notes = data_config(sources, data, task, rows)
    for s in sources:
        notes += s.notes
    names = base_names(sources, base)
    for s, name in zip(sources, names, strict=True):
        check_base_name(s, name, allow_other_base)
    dataset = load_dataset(cfg.data, cfg.run.seed, log=log)  # data errors before any model
    if cfg.data.task == "classify" and not dataset.labels:
        raise FedloraError("Classification needs labels; the data set has none.")
    for note in notes:
        log(f"note: {note}")

    from fedlora.model import use_bf16
    from fedlora.train import Encoder

    banks: dict[str, AdapterBank] = {}
    scores: list[RowScores] = []
    idx = heldout_indices(len(dataset.test), cfg.data.eval_rows, cfg.run.seed)
    test = [dataset.test[i] for i in idx]
    for i, (source, name) in enumerate(zip(sources, names, strict=True)):
        if name not in banks:
            log(f"Loading base model {name} ...")
            banks[name] = AdapterBank(name, log)
        bank = banks[name]
        bf16 = use_bf16(cfg.model.precision, bank.device)
        adapter = None
        if not source.is_base:
            adapter = f"s{i}"
            bank.add(adapter, source, allow_other_base)
        encoder = Encoder(bank.tokenizer, dataset, cfg.data.max_text_tokens)
        encoded = encoder.encode_all(test)
        log(f"Evaluating {source.label} on {len(encoded)} held-out rows ...")
        with bank.using(adapter) as model:
            scores.append(
                score_rows(model, encoder, encoded, int(bank.tokenizer.pad_token_id), bf16=bf16)
            )
    return cfg, dataset, scores, names


# --- Commands --------------------------------------------------------------------------------


def _describe(cfg: Config, dataset, n_rows: int) -> dict[str, Any]:
    return {
        "data": dataset.name,
        "data_path": cfg.data.path or "built-in",
        "task": dataset.task,
        "labels": list(dataset.labels),
        "rows": n_rows,
        "heldout_rows": len(dataset.test),
        "split_seed": cfg.run.seed,
    }


def run_eval(
    source: Source,
    base: str | None = None,
    data: str | None = None,
    task: str | None = None,
    rows: int | None = None,
    draws: int = DRAWS,
    seed: int = 0,
    allow_other_base: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    cfg, dataset, (scores,), (name,) = score_sources(
        [source], base, data, task, rows, allow_other_base, log
    )
    return {
        "adapter": source.label,
        "base_model": name,
        **_describe(cfg, dataset, scores.n),
        "metrics": summarize(scores, draws, seed),
    }


def run_compare(
    a: Source,
    b: Source,
    base: str | None = None,
    data: str | None = None,
    task: str | None = None,
    rows: int | None = None,
    draws: int = DRAWS,
    seed: int = 0,
    allow_other_base: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    cfg, dataset, (sa, sb), (na, nb) = score_sources(
        [a, b], base, data, task, rows, allow_other_base, log
    )
    pair = paired(sa, sb, draws, seed)
    return {
        **_describe(cfg, dataset, sa.n),
        "a": {"adapter": a.label, "base_model": na, "metrics": summarize(sa, draws, seed)},
        "b": {"adapter": b.label, "base_model": nb, "metrics": summarize(sb, draws, seed)},
        "paired": pair,
        "verdict": verdict(pair),
    }


def site_sources(
    source: Source, given: list[tuple[int, Source]] | None = None
) -> list[tuple[int, Source]]:
    """The personalised adapters to evaluate: those given (--site-adapter), else every
    sites/site-<k>/adapter of the run's results folder."""
    from fedlora.lifecycle import find_site_adapters, resolve_source

    if source.is_base or source.cfg is None:
        raise FedloraError(
            f"--per-site needs a results folder (or an adapter with the run's config.toml): the "
            f"run's config says which held-out rows belong to which site; {source.label} has none."
        )
    if given:
        return sorted(given, key=lambda kv: kv[0])
    run = source.cfg_path.parent
    found = find_site_adapters(run)
    if not found:
        raise FedloraError(
            f"{run} has no per-site adapters ({SITES_DIR}/site-<k>/adapter): run `fedlora "
            "simulate` with --personalize-steps N, or name them with --site-adapter K=DIR."
        )
    return [(k, resolve_source(str(path))) for k, path in found.items()]


def run_eval_per_site(
    source: Source,
    sites: list[tuple[int, Source]] | None = None,
    base: str | None = None,
    data: str | None = None,
    task: str | None = None,
    draws: int = DRAWS,
    seed: int = 0,
    allow_other_base: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Each site's own held-out rows, scored with the global adapter and with the site's
    personalised adapter. One base model carries all of them as named peft adapters and
    switches between them, so N sites cost one model load, not N + 1."""
    from fedlora.runtime import load_data

    sites = site_sources(source, sites)
    cfg, notes = data_config([source], data, task, None)
    for s in [source, *(s for _, s in sites)]:
        notes += s.notes
    n_sites = cfg.federation.clients
    beyond = [k for k, _ in sites if k >= n_sites]
    if beyond:
        raise FedloraError(
            f"Site(s) {beyond} do not exist: the run has {n_sites} sites (0 to {n_sites - 1})."
        )
    name = choose_base([source, *(s for _, s in sites)], base)
    for s in [source, *(s for _, s in sites)]:
        check_base_name(s, name, allow_other_base)
    dataset, _, test_parts = load_data(cfg, log=log)  # data errors before any model
    if cfg.data.task == "classify" and not dataset.labels:
        raise FedloraError("Classification needs labels; the data set has none.")
    missing = sorted(set(range(n_sites)) - {k for k, _ in sites})
    if missing:
        notes.append(f"no personalised adapter for site(s) {missing}; they are left out.")
    for note in notes:
        log(f"note: {note}")

    from fedlora.model import use_bf16
    from fedlora.train import Encoder

    log(f"Loading base model {name} ...")
    bank = AdapterBank(name, log)
    bank.add("global", source, allow_other_base)
    for k, s in sites:
        bank.add(f"site-{k}", s, allow_other_base)
    encoder = Encoder(bank.tokenizer, dataset, cfg.data.max_text_tokens)
    pad, bf16 = int(bank.tokenizer.pad_token_id), use_bf16(cfg.model.precision, bank.device)
    per_site: list[dict[str, Any]] = []
    pooled: dict[str, list[RowScores]] = {"global": [], "personal": []}
    for k, s in sites:
        rows = encoder.encode_all([dataset.test[i] for i in test_parts[k]])
        entry: dict[str, Any] = {"site": k, "adapter": s.label, "rows": len(rows)}
        if rows:
            log(f"Evaluating site {k}: {len(rows)} held-out rows, global and personalised ...")
            scored = {}
            for side, adapter in (("global", "global"), ("personal", f"site-{k}")):
                with bank.using(adapter) as model:
                    scored[side] = score_rows(model, encoder, rows, pad, bf16=bf16)
                pooled[side].append(scored[side])
                entry[side] = summarize(scored[side], draws, seed)
            entry["paired"] = paired(scored["global"], scored["personal"], draws, seed)
        per_site.append(entry)
    report: dict[str, Any] = {
        "adapter": source.label,
        "base_model": name,
        **_describe(cfg, dataset, sum(e["rows"] for e in per_site)),
        "partition": cfg.data.partition,
        "sites": per_site,
    }
    if pooled["global"]:
        g, p = (_concat(pooled[side]) for side in ("global", "personal"))
        report["all_sites"] = {
            "rows": g.n,
            "global": summarize(g, draws, seed),
            "personal": summarize(p, draws, seed),
            "paired": paired(g, p, draws, seed),
        }
    return report


def _concat(parts: list[RowScores]) -> RowScores:
    """Rows of several sites as one set (each row scored by its own site's adapter)."""
    first = parts[0]
    classify = first.gold is not None

    def joined(attr: str) -> np.ndarray | None:
        return np.concatenate([getattr(x, attr) for x in parts]) if classify else None

    return RowScores(
        first.task,
        first.labels,
        np.concatenate([x.loss_sum for x in parts]),
        np.concatenate([x.tokens for x in parts]),
        joined("gold"),
        joined("pred"),
    )


_NAMES = {
    "eval_loss": "eval loss",
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "perplexity": "perplexity",
}


def _fmt(key: str, x: float) -> str:
    return f"{x:.4f}" if key in ("eval_loss", "eval_loss_diff") else f"{x:.3f}"


def _with_ci(key: str, m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{_fmt(key, m['value'])} ({_fmt(key, lo)} to {_fmt(key, hi)})"


def _data_line(report: dict[str, Any]) -> str:
    task = report["task"]
    what = f"classify: {', '.join(report['labels'])}" if task == "classify" else "text"
    return (
        f"Data: {report['data']} ({report['data_path']}), {report['rows']} of "
        f"{report['heldout_rows']} held-out rows ({what})"
    )


def format_eval(report: dict[str, Any]) -> str:
    base = report["base_model"]
    who = f"base model {base}" if report["adapter"] == BASE_WORD else report["adapter"]
    lines = [f"Model: {who}" + ("" if report["adapter"] == BASE_WORD else f" on {base}")]
    lines.append(_data_line(report))
    head = f"{'metric':<12}{'value':>10}  {'95% CI':<22}method"
    lines += ["", head, "-" * (len(head) + 30)]
    for key, m in report["metrics"].items():
        lo, hi = m["ci95"]
        ci = f"{_fmt(key, lo)} to {_fmt(key, hi)}"
        lines.append(f"{_NAMES[key]:<12}{_fmt(key, m['value']):>10}  {ci:<22}{m['method']}")
    return "\n".join(lines)


def format_compare(report: dict[str, Any]) -> str:
    a, b, pair = report["a"], report["b"], report["paired"]
    lines = [
        f"A: {a['adapter']} (base {a['base_model']})",
        f"B: {b['adapter']} (base {b['base_model']})",
        _data_line(report) + ", the same rows for both",
        "",
    ]
    head = f"{'metric':<12}{'A (95% CI)':<28}{'B (95% CI)':<28}B - A (95% CI, paired bootstrap)"
    lines += [head, "-" * len(head)]
    diffs = {
        "eval_loss": "eval_loss_diff",
        "accuracy": "accuracy_diff",
        "macro_f1": "macro_f1_diff",
    }
    for key in a["metrics"]:
        d = pair.get(diffs.get(key, ""))
        if d is None:
            diff = ""
        elif key == "accuracy":
            lo, hi = d["ci95"]
            diff = f"{_points(d['value'])} points ({_points(lo)} to {_points(hi)})"
        else:
            lo, hi = d["ci95"]
            f = "+.4f" if key == "eval_loss" else "+.3f"
            diff = f"{d['value']:{f}} ({lo:{f}} to {hi:{f}})"
        lines.append(
            f"{_NAMES[key]:<12}{_with_ci(key, a['metrics'][key]):<28}"
            f"{_with_ci(key, b['metrics'][key]):<28}{diff}"
        )
    lines.append("")
    if "mcnemar" in pair:
        mc = pair["mcnemar"]
        lines.append(
            f"McNemar exact test on {report['rows']} paired rows: A right & B wrong "
            f"{mc['a_right_b_wrong']}, A wrong & B right {mc['a_wrong_b_right']}, "
            f"{format_p(mc['p_value'])}"
        )
    lines.append(f"Verdict: {report['verdict']}")
    return "\n".join(lines)


def format_per_site(report: dict[str, Any]) -> str:
    """One line per site: rows, the global and the personalised adapter (95% CIs) and the
    change with its paired interval; accuracy for classification, eval loss for text."""
    key = "accuracy" if report["task"] == "classify" else "eval_loss"
    what = _NAMES[key]
    lines = [
        f"Global adapter: {report['adapter']} on {report['base_model']}",
        _data_line(report) + f"; each site's own held-out rows (partition {report['partition']})",
        "",
    ]
    head = (
        f"{'site':>4}  {'rows':>5}  {'global ' + what + ' (95% CI)':<28}"
        f"{'personal ' + what + ' (95% CI)':<30}change (95% CI, paired bootstrap)"
    )
    lines += [head, "-" * len(head)]
    entries = [(str(e["site"]), e) for e in report["sites"]]
    if "all_sites" in report:
        entries.append(("all", report["all_sites"]))
    for label, e in entries:
        if not e["rows"]:
            lines.append(f"{label:>4}  {0:>5}  (no held-out rows)")
            continue
        d = e["paired"][f"{key}_diff"]
        lo, hi = d["ci95"]
        if key == "accuracy":
            change = f"{_points(d['value'])} points ({_points(lo)} to {_points(hi)})"
        else:
            change = f"{d['value']:+.4f} ({lo:+.4f} to {hi:+.4f})"
        lines.append(
            f"{label:>4}  {e['rows']:>5}  {_with_ci(key, e['global'][key]):<28}"
            f"{_with_ci(key, e['personal'][key]):<30}{change}"
        )
    lines.append("")
    standard = all(
        Path(e["adapter"]).parts[-3:] == (SITES_DIR, f"site-{e['site']}", "adapter")
        for e in report["sites"]
    )
    if standard:
        lines.append(f"Personalised adapters: {SITES_DIR}/site-<k>/adapter of the results folder")
    else:
        lines += [f"Site {e['site']}'s adapter: {e['adapter']}" for e in report["sites"]]
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
