"""Adapter lifecycle: export (copy and merge), eval with confidence intervals, compare with a
paired test, multi-adapter generate, and the errors for adapters that do not fit.

Everything runs on tiny-random with small hand-made "runs" (a config.toml and a non-zero LoRA
adapter saved with fedlora.adapter.save_adapter), so no federation has to run here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_cfg
from in_process import run_federation

from fedlora import lifecycle
from fedlora.cli import main
from fedlora.evaluation import (
    RowScores,
    mcnemar_exact,
    paired,
    score_rows,
    summarize,
    verdict,
    wilson_interval,
)

EVAL_ROWS = 40


def make_run(folder: Path, seed: int, scale: float = 0.5, **sections) -> Path:
    """A results folder as `fedlora simulate` leaves it, with LoRA B set to random values."""
    from fedlora.adapter import adapter_arrays, add_lora, save_adapter
    from fedlora.config import write_config
    from fedlora.model import load_base

    cfg = make_tiny_cfg(folder.parent, {"run": {"out": str(folder), "seed": seed}}, **sections)
    base, _ = load_base(cfg.model.name, log=lambda _: None)
    model = add_lora(base, cfg.lora, seed)
    rng = np.random.default_rng(seed)
    arrays = {
        k: (rng.normal(0, scale, v.shape).astype(np.float32) if "lora_B" in k else v)
        for k, v in adapter_arrays(model).items()
    }
    folder.mkdir(parents=True)
    save_adapter(model, arrays, folder / "adapter")
    write_config(cfg, folder / "config.toml")
    (folder / "summary.json").write_text(json.dumps({"strategy": "hand-made", "seed": seed}))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)  # keep CPU use light
    root = tmp_path_factory.mktemp("lifecycle")
    data = {"eval_rows": EVAL_ROWS}
    return {
        "a": make_run(root / "a", seed=1, data=data),
        "b": make_run(root / "b", seed=2, scale=1.0, data=data),
        "root": root,
    }


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str, *words: str) -> str:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fedlora: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- statistics -------------------------------------------------------------------------------


def test_mcnemar_exact_against_hand_computed_binomials():
    # discordant 8 vs 2: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(0.109375, abs=1e-15)
    assert mcnemar_exact(2, 8) == mcnemar_exact(8, 2)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(6, 1) == pytest.approx(2 * (1 + 7) / 128)  # 0.125
    assert mcnemar_exact(5, 5) == 1.0  # capped at 1
    assert mcnemar_exact(0, 0) == 1.0
    from scipy.stats import binomtest

    for b, c in [(3, 17), (40, 25), (120, 95), (1, 0)]:
        expected = binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.959963984540054**2 / (10 + 1.959963984540054**2))
    for k, n in [(3, 10), (30, 100), (300, 1000), (10, 10)]:
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
    width = [np.diff(wilson_interval(3 * m, 10 * m))[0] for m in (1, 10, 100)]
    assert width[0] > width[1] > width[2]


def synthetic(n: int, seed: int, accuracy: float = 0.7) -> RowScores:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    right = rng.random(n) < accuracy
    pred = np.where(right, gold, (gold + rng.integers(1, 3, n)) % 3)
    tokens = rng.integers(1, 4, n)
    return RowScores(
        "classify", ["a", "b", "c"], rng.gamma(2.0, 1.0, n) * tokens, tokens, gold, pred
    )


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_more_rows():
    small, large = summarize(synthetic(60, 0), 400, 0), summarize(synthetic(2000, 0), 400, 0)
    for metric in ("eval_loss", "accuracy", "macro_f1"):
        for s in (small, large):
            lo, hi = s[metric]["ci95"]
            assert lo <= s[metric]["value"] <= hi, metric
        assert np.diff(large[metric]["ci95"])[0] < np.diff(small[metric]["ci95"])[0] / 2
    assert summarize(synthetic(60, 0), 200, 7) == summarize(synthetic(60, 0), 200, 7)  # seeded


def test_macro_f1_matches_training_definition():
    from fedlora.train import macro_f1

    rng = np.random.default_rng(3)
    for n_classes in (2, 3, 5):
        gold, pred = rng.integers(0, n_classes, 50), rng.integers(0, n_classes, 50)
        assert macro_f1(gold, pred, n_classes) == pytest.approx(
            macro_f1(gold.tolist(), pred.tolist(), n_classes)
        )
    # a class absent from gold and predictions does not count
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), 3) == 1.0


def test_paired_test_and_verdicts():
    a = synthetic(300, 1, accuracy=0.55)
    better = a.pred.copy()
    wrong = np.flatnonzero(~a.correct)[:40]  # B fixes 40 of A's errors and breaks 5 right rows
    better[wrong] = a.gold[wrong]
    right = np.flatnonzero(a.correct)[:5]
    better[right] = (a.gold[right] + 1) % 3
    b = RowScores(a.task, a.labels, a.loss_sum * 0.9, a.tokens, a.gold, better)
    pair = paired(a, b, 500, 0)
    assert pair["mcnemar"]["a_wrong_b_right"] == 40 and pair["mcnemar"]["a_right_b_wrong"] == 5
    assert pair["mcnemar"]["p_value"] == pytest.approx(mcnemar_exact(5, 40))
    diff = pair["accuracy_diff"]
    assert diff["value"] == pytest.approx(35 / 300)
    assert diff["ci95"][0] <= diff["value"] <= diff["ci95"][1] and diff["ci95"][0] > 0
    text = verdict(pair)
    assert (
        text.startswith("B is more accurate than A: +11.7 points (95% CI +") and "p < 0.001" in text
    )
    assert verdict(paired(b, a, 200, 0)).startswith("A is more accurate than B: +11.7 points")
    same = verdict(paired(a, a, 100, 0))
    assert "same answer on every row" in same
    nearly = RowScores(a.task, a.labels, a.loss_sum, a.tokens, a.gold, a.pred.copy())
    nearly.pred[wrong[:2]] = a.gold[wrong[:2]]
    text = verdict(paired(a, nearly, 200, 0))
    assert text.startswith("No significant difference in accuracy at the 5% level: B - A = +0.7")
    assert "McNemar p = 0.500" in text


def test_text_verdict_uses_the_paired_loss_interval():
    a = synthetic(200, 4)
    a = RowScores("text", [], a.loss_sum, a.tokens)
    b = RowScores("text", [], a.loss_sum * 0.8, a.tokens)
    pair = paired(a, b, 300, 0)
    assert "mcnemar" not in pair
    assert verdict(pair).startswith("B has lower perplexity than A")
    assert verdict(paired(a, a, 100, 0)).startswith("No significant difference in perplexity")


# --- scoring matches training's evaluation ------------------------------------------------------


def test_score_rows_matches_train_evaluate(runs):
    from fedlora.data import load_dataset
    from fedlora.train import Encoder, evaluate

    source = lifecycle.resolve_source(str(runs["a"]))
    bank = lifecycle.AdapterBank("tiny-random", log=lambda _: None)
    bank.add("a", source)
    dataset = load_dataset(source.cfg.data, 0, log=lambda _: None)
    encoder = Encoder(bank.tokenizer, dataset, 64)
    rows = encoder.encode_all(dataset.test[:30])
    pad = int(bank.tokenizer.pad_token_id)
    with bank.using("a") as model:
        mine, ref = score_rows(model, encoder, rows, pad), evaluate(model, encoder, rows, pad)
    assert mine.loss() == pytest.approx(ref.loss, rel=1e-6)
    assert mine.accuracy() == pytest.approx(ref.accuracy)
    assert mine.macro_f1() == pytest.approx(ref.macro_f1)
    assert mine.correct.tolist() == ref.correct


# --- export -------------------------------------------------------------------------------------


def test_export_copies_adapter_and_provenance(runs, capsys, tmp_path):
    out = tmp_path / "exported"
    code, stdout, err = cli(capsys, "export", runs["a"], "--out", out)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.toml", "summary.json"} <= (
        names
    )
    assert not out.with_name("exported.partial").exists()
    original = runs["a"] / "adapter" / "adapter_model.safetensors"
    assert (out / "adapter_model.safetensors").read_bytes() == original.read_bytes()
    # the exported folder is itself a source: it knows its run's settings
    source = lifecycle.resolve_source(str(out))
    assert source.cfg is not None and source.cfg.model.name == "tiny-random"
    # refuses to overwrite
    code, _, err = cli(capsys, "export", runs["a"], "--out", out)
    one_error(code, err, str(out), "already exists")


def test_export_merge_equals_base_plus_adapter(runs, capsys, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.model import load_base

    out = tmp_path / "merged"
    code, stdout, err = cli(capsys, "export", runs["b"], "--out", out, "--merge")
    assert code == 0, err
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base, tok = load_base("tiny-random", log=lambda _: None)
    peft_model = PeftModel.from_pretrained(base, str(runs["b"] / "adapter")).eval()
    ids = torch.tensor([tok("Condition: pain\nReview: it helped a lot\nSentiment:").input_ids])
    with torch.no_grad():
        expected, got = peft_model(ids).logits, merged(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter is non-zero and folded in


# --- eval and compare -------------------------------------------------------------------------


def test_eval_run_prints_metrics_with_intervals(runs, capsys, tmp_path):
    report_path = tmp_path / "eval.json"
    code, out, err = cli(capsys, "eval", runs["a"], "--json", report_path, "--bootstrap", "200")
    assert code == 0, err
    assert "eval loss" in out and "accuracy" in out and "macro-F1" in out and "Wilson" in out
    report = json.loads(report_path.read_text())
    assert report["rows"] == EVAL_ROWS and report["base_model"] == "tiny-random"
    for m in report["metrics"].values():
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
    # the adapter folder alone (inside the run) finds the same settings and numbers
    code, out2, err = cli(capsys, "eval", runs["a"] / "adapter", "--bootstrap", "200")
    assert code == 0, err
    assert out2.split("Model:")[1].split("\n", 2)[2] == out.split("Model:")[1].split("\n", 2)[2]


def test_eval_text_task_reports_perplexity(capsys, tmp_path, runs):
    data = tmp_path / "notes.jsonl"
    rows = [{"text": f"patient {i} reports {'mild' if i % 2 else 'no'} pain"} for i in range(30)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = cli(
        capsys, "eval", runs["a"], "--data", data, "--task", "text", "--bootstrap", "100"
    )
    assert code == 0, err
    assert "perplexity" in out and "accuracy" not in out


def test_compare_prints_table_test_and_verdict(runs, capsys, tmp_path):
    report_path = tmp_path / "cmp.json"
    code, out, err = cli(
        capsys, "compare", "base", runs["b"], "--json", report_path, "--bootstrap", "200"
    )
    assert code == 0, err
    assert "McNemar exact test" in out and "Verdict:" in out and "B - A" in out
    report = json.loads(report_path.read_text())
    assert report["rows"] == EVAL_ROWS
    mc = report["paired"]["mcnemar"]
    assert mc["p_value"] == pytest.approx(
        mcnemar_exact(mc["a_right_b_wrong"], mc["a_wrong_b_right"])
    )
    a_acc = report["a"]["metrics"]["accuracy"]["value"]
    b_acc = report["b"]["metrics"]["accuracy"]["value"]
    assert report["paired"]["accuracy_diff"]["value"] == pytest.approx(b_acc - a_acc)
    assert report["verdict"] in out
    # B's side equals `fedlora eval B` (same rows: the run's seeded subset)
    code, _, err = cli(
        capsys, "eval", runs["b"], "--json", tmp_path / "b.json", "--bootstrap", "200"
    )
    assert code == 0, err
    alone = json.loads((tmp_path / "b.json").read_text())["metrics"]
    assert alone == report["b"]["metrics"]


# --- generate -----------------------------------------------------------------------------------


@pytest.fixture
def base_loads(monkeypatch) -> list[str]:
    """The names every base-model load is asked for, in order (loads still happen)."""
    from fedlora import model as fm

    calls: list[str] = []
    real = fm.load_base

    def counting(name, log=print, **options):
        calls.append(name)
        return real(name, log=log, **options)

    monkeypatch.setattr(fm, "load_base", counting)
    return calls


def test_generate_loads_the_base_once_and_switches_adapters(runs, capsys, base_loads):
    calls = base_loads
    code, out, err = cli(
        capsys, "generate", "--adapter", f"a={runs['a']}", "--adapter",
        f"b={runs['b'] / 'adapter'}", "--max-new-tokens", "5", "--show-base", "Review: good",
    )  # fmt: skip
    assert code == 0, err
    assert calls == ["tiny-random"]
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[base", "[a   ", "[b   "]

    calls.clear()
    bank = lifecycle.AdapterBank("tiny-random", log=lambda _: None)
    bank.add("a", lifecycle.resolve_source(str(runs["a"])))
    bank.add("b", lifecycle.resolve_source(str(runs["b"])))
    assert calls == ["tiny-random"]
    ids = torch.tensor([bank.tokenizer("Review: it helped").input_ids])
    logits = {}
    with torch.no_grad():
        for name in (None, "a", "b", "a"):
            with bank.using(name) as model:
                logits.setdefault(name, []).append(model(ids).logits)
    assert not torch.allclose(logits["a"][0], logits["b"][0], atol=1e-4)
    assert not torch.allclose(logits["a"][0], logits[None][0], atol=1e-4)
    assert torch.equal(logits["a"][0], logits["a"][1])  # switching back gives the same model


# --- errors ----------------------------------------------------------------------------------


def broken_copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def edit_adapter_config(run: Path, **changes) -> None:
    path = run / "adapter" / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def rewrite_tensors(run: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    save_file(change(load_file(str(path))), str(path))


@pytest.mark.parametrize("command", ["eval", "compare", "export", "generate"])
def test_missing_adapter_folder(command, capsys, tmp_path):
    absent = tmp_path / "absent"
    args = {
        "eval": ["eval", absent],
        "compare": ["compare", "base", absent],
        "export": ["export", absent, "--out", tmp_path / "x"],
        "generate": ["generate", "--adapter", f"x={absent}", "hello"],
    }[command]
    one_error(*cli(capsys, *args)[::2], str(absent), "does not exist")


def test_folder_that_is_not_an_adapter(capsys, tmp_path, runs):
    (tmp_path / "junk").mkdir()
    one_error(*cli(capsys, "eval", tmp_path / "junk")[::2], "neither", "adapter_config.json")
    partial = tmp_path / "r.partial"
    partial.mkdir()
    shutil.copy(runs["a"] / "config.toml", partial)
    one_error(*cli(capsys, "eval", partial)[::2], "no adapter/", "did not finish")
    bad = broken_copy(runs["a"], tmp_path / "noweights")
    (bad / "adapter" / "adapter_model.safetensors").unlink()
    one_error(*cli(capsys, "eval", bad)[::2], "no weights")


def test_adapter_targeting_modules_the_base_lacks(capsys, tmp_path, runs):
    bad = broken_copy(runs["a"], tmp_path / "bad")
    edit_adapter_config(bad, target_modules=["q_proj", "query_key_value"])
    line = one_error(*cli(capsys, "eval", bad)[::2], "query_key_value", "q_proj", "tiny-random")
    assert "linear modules" in line


def test_adapter_rank_inconsistent_with_its_tensors(capsys, tmp_path, runs):
    bad = broken_copy(runs["a"], tmp_path / "bad")
    edit_adapter_config(bad, r=4)
    one_error(*cli(capsys, "eval", bad)[::2], "rank 8", "r = 4")


def test_adapter_shapes_from_another_base(capsys, tmp_path, runs):
    bad = broken_copy(runs["a"], tmp_path / "bad")
    rewrite_tensors(
        bad,
        lambda t: {
            k: np.zeros((v.shape[0], 32), np.float32) if "lora_A" in k else v for k, v in t.items()
        },
    )
    one_error(*cli(capsys, "eval", bad)[::2], "does not fit", "(8, 32)", "64 inputs")
    deeper = broken_copy(runs["a"], tmp_path / "deeper")
    rewrite_tensors(
        deeper, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}
    )
    one_error(*cli(capsys, "export", deeper, "--merge", "--out", tmp_path / "m")[::2], "layers.7")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_adapter_for_another_named_base_is_refused_before_loading(capsys, runs, monkeypatch):
    from fedlora import model as fm

    monkeypatch.setattr(fm, "load_base", lambda *a, **k: pytest.fail("loaded a model"))
    line = one_error(
        *cli(capsys, "eval", runs["a"], "--base", "SmolLM2-135M-Instruct")[::2],
        "tiny-random",
        "SmolLM2-135M-Instruct",
        "--base tiny-random",
    )
    assert "trained on" in line


def test_generate_argument_errors(capsys, runs):
    one_error(*cli(capsys, "generate", "--adapter", str(runs["a"]), "hi")[::2], "NAME=DIR")
    one_error(
        *cli(
            capsys, "generate", "--adapter", f"a={runs['a']}", "--adapter", f"a={runs['b']}", "hi"
        )[::2],
        "'a'",
        "twice",
    )
    one_error(*cli(capsys, "generate", "--adapter", f"base={runs['a']}", "hi")[::2], "name")
    one_error(*cli(capsys, "generate", "hi")[::2], "--adapter")


def test_flag_errors(capsys, runs, tmp_path):
    one_error(*cli(capsys, "eval", runs["a"], "--rows", "0")[::2], "--rows", "at least 1")
    one_error(*cli(capsys, "export", runs["a"])[::2], "--out")
    one_error(*cli(capsys, "eval", runs["a"], "--task", "regress")[::2], "--task")
    one_error(*cli(capsys, "eval", runs["a"], "--data", tmp_path / "no.jsonl")[::2], "no.jsonl")
    one_error(*cli(capsys, "export", "base", "--out", tmp_path / "x")[::2], "no adapter")


def test_user_errors_come_before_heavy_imports(tmp_path):
    code = (
        "import sys; from fedlora.cli import main; "
        f"rc = main(['eval', {str(tmp_path / 'absent')!r}]); "
        "print(rc, 'torch' in sys.modules, 'peft' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert proc.stderr.count("fedlora: error:") == 1 and "Traceback" not in proc.stderr


def test_old_run_configs_are_read_with_a_note(tmp_path, runs):
    folder = broken_copy(runs["a"], tmp_path / "old")
    text = (folder / "config.toml").read_text().replace("[model]", "[model]\nbf16 = false")
    (folder / "config.toml").write_text(text)
    source = lifecycle.resolve_source(str(folder))
    assert source.cfg.model.name == "tiny-random"
    assert any("model.bf16" in n for n in source.notes)
    assert math.isfinite(source.cfg.lora.alpha)


# --- per-site adapters ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def personalised(tmp_path_factory):
    """A real (tiny) federation: 1 round, then 3 personalisation steps at each of 3 sites."""
    root = tmp_path_factory.mktemp("personalised")
    cfg = make_tiny_cfg(root, federation={"rounds": 1, "personalize_steps": 3})
    return run_federation(cfg)


def alone(adapter: Path, rows, encoder) -> RowScores:
    """`adapter` loaded by itself on a fresh base model, as any peft user would."""
    from peft import PeftModel

    from fedlora.model import load_base

    base, tok = load_base("tiny-random", log=lambda _: None)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return score_rows(model, encoder, rows, int(tok.pad_token_id))


def test_personalised_adapters_stay_at_the_sites_as_peft_adapters(personalised):
    found = lifecycle.find_site_adapters(personalised)
    assert list(found) == [0, 1, 2]
    assert found[1] == personalised / "sites" / "site-1" / "adapter"
    for folder in found.values():
        assert lifecycle.resolve_source(str(folder)).rank == 8
    assert not list(personalised.glob("sites/*/*.partial"))
    # only metrics reached the server
    summary = json.loads((personalised / "summary.json").read_text())
    assert all(isinstance(v, int | float) for r in summary["personalization"] for v in r.values())


def test_a_site_daemon_keeps_its_adapter_in_its_own_state_folder(tmp_path):
    state = tmp_path / "site-state" / "federations" / "f1"
    assert lifecycle.personal_adapter_dir(4, "runs/x", str(state)) == state / "personal-adapter"
    assert lifecycle.personal_adapter_dir(4, "runs/x") == Path(
        "runs/x.partial/sites/site-4/adapter"
    )


def test_eval_per_site_switches_adapters_on_one_base(personalised, capsys, base_loads, tmp_path):
    from fedlora import model as fm
    from fedlora.runtime import load_data
    from fedlora.train import Encoder

    calls = base_loads
    path = tmp_path / "sites.json"
    code, out, err = cli(
        capsys, "eval", personalised, "--per-site", "--json", path, "--bootstrap", "100"
    )
    assert code == 0, err
    assert calls == ["tiny-random"]  # one base model for the global and three site adapters
    report = json.loads(path.read_text())
    assert [e["site"] for e in report["sites"]] == [0, 1, 2]
    table = out.split("change (95% CI, paired bootstrap)")[1].splitlines()
    assert [line.split()[0] for line in table[2:6]] == ["0", "1", "2", "all"]

    # each number equals the adapter loaded alone on a fresh base model
    source = lifecycle.resolve_source(str(personalised))
    dataset, _, test_parts = load_data(source.cfg, log=lambda _: None)
    _, tok = fm.load_base("tiny-random", log=lambda _: None)
    encoder = Encoder(tok, dataset, source.cfg.data.max_text_tokens)
    summary = json.loads((personalised / "summary.json").read_text())["personalization"]
    moved = False
    for entry, at_site in zip(report["sites"], summary, strict=True):
        k = entry["site"]
        rows = encoder.encode_all([dataset.test[i] for i in test_parts[k]])
        assert entry["rows"] == len(rows) == at_site["held_out_rows"]
        for side, folder in (
            ("global", personalised / "adapter"),
            ("personal", personalised / "sites" / f"site-{k}" / "adapter"),
        ):
            ref = alone(folder, rows, encoder)
            assert entry[side]["eval_loss"]["value"] == pytest.approx(ref.loss(), rel=1e-6)
            assert entry[side]["accuracy"]["value"] == ref.accuracy()
            # and what the site measured before it kept the adapter
            assert entry[side]["accuracy"]["value"] == pytest.approx(at_site[f"{side}_accuracy"])
            assert entry[side]["eval_loss"]["value"] == pytest.approx(
                at_site[f"{side}_loss"], rel=1e-4
            )
        moved |= entry["personal"]["eval_loss"]["value"] != entry["global"]["eval_loss"]["value"]
    assert moved  # switching really switches: a personalised adapter scores differently


def test_eval_per_site_errors(personalised, capsys, runs, tmp_path):
    one_error(*cli(capsys, "eval", runs["a"], "--per-site")[::2], "no per-site adapters")
    one_error(*cli(capsys, "eval", "base", "--per-site")[::2], "--per-site needs")
    one_error(
        *cli(capsys, "eval", runs["a"], "--site-adapter", f"0={tmp_path / 'x'}")[::2],
        "--per-site",
    )
    one_error(*cli(capsys, "eval", personalised, "--per-site", "--rows", "5")[::2], "--rows")
    one_error(
        *cli(capsys, "eval", personalised, "--per-site", "--site-adapter", "zero=x")[::2],
        "SITE=DIR",
    )
    site1 = personalised / "sites" / "site-1" / "adapter"
    one_error(
        *cli(capsys, "eval", personalised, "--per-site", "--site-adapter", f"7={site1}")[::2],
        "[7]",
        "3 sites",
    )
    absent = tmp_path / "absent"
    one_error(
        *cli(capsys, "eval", personalised, "--per-site", "--site-adapter", f"1={absent}")[::2],
        str(absent),
        "does not exist",
    )
    # a site adapter of another rank than its tensors: the same mismatch check as `eval`
    bad = broken_copy(personalised, tmp_path / "bad")
    path = bad / "sites" / "site-2" / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"r": 4}))
    one_error(*cli(capsys, "eval", bad, "--per-site")[::2], "site-2", "rank 8", "r = 4")


# --- An adapter on another machine -------------------------------------------------------------

#: one step of the scenario below, run as `python -c MACHINE STEP FOLDER` with a machine's caches
MACHINE = """
import json, sys
from pathlib import Path

step, folder = sys.argv[1], Path(sys.argv[2])
quiet = lambda _msg: None
if step == "train":  # an adapter on the built-in, saved as a run saves its adapter
    from fedlora.adapter import adapter_arrays, add_lora, save_adapter
    from fedlora.config import Config
    from fedlora.model import load_base

    model = add_lora(load_base("tiny-random", log=quiet)[0], Config().lora, 0)
    arrays = {k: v + 0.1 if "lora_B" in k else v for k, v in adapter_arrays(model).items()}
    save_adapter(model, arrays, folder)
elif step == "fetch":  # fedlora fetches its built-in on this machine (any command does)
    from fedlora.model import resolve_model

    resolve_model("tiny-random", log=quiet)
else:  # plain peft, then fedlora's own loading of the same adapter
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel

    from fedlora.model import load_base

    ids = torch.tensor([[5, 6, 7, 8]])
    plain = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    ours = PeftModel.from_pretrained(load_base("tiny-random", log=quiet)[0], str(folder)).eval()
    with torch.no_grad():
        print(json.dumps([plain(ids).logits.sum().item(), ours(ids).logits.sum().item()]))
"""


def test_plain_peft_loads_an_adapter_copied_to_another_machine(tmp_path):
    """An adapter names its base portably (the built-in's name and recipe revision, never this
    machine's cache folder). Copied to a machine whose fedlora and Hugging Face caches are
    elsewhere, `AutoPeftModelForCausalLM.from_pretrained` loads it offline once fedlora has
    fetched its built-in there, with the same outputs as fedlora's own loading."""
    from fedlora.assets import builtin_revision

    def machine(name: str):
        env = os.environ | {
            "FEDLORA_CACHE": str(tmp_path / name / "fedlora"),
            "HF_HOME": str(tmp_path / name / "hf"),
            "HF_HUB_OFFLINE": "1",
        }

        def step(what: str, folder: Path) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-c", MACHINE, what, str(folder)]
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

        return step

    on_a, on_b = machine("a"), machine("b")
    made = on_a("train", tmp_path / "adapter")
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert str(tmp_path / "a") not in text  # nothing of machine A's folders
    meta = json.loads(text)
    assert meta["base_model_name_or_path"] == "tiny-random"
    assert meta["revision"] == builtin_revision("tiny-random")
    shutil.copytree(tmp_path / "adapter", tmp_path / "copied")
    shutil.rmtree(tmp_path / "a")  # machine A is gone
    unknown = on_b("load", tmp_path / "copied")
    assert unknown.returncode != 0 and "offline" in unknown.stderr  # B has no base yet
    assert on_b("fetch", tmp_path / "copied").returncode == 0
    loaded = on_b("load", tmp_path / "copied")
    assert loaded.returncode == 0, loaded.stderr
    plain, ours = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert plain == pytest.approx(ours, rel=1e-6)
