"""`fedlora audit`: the attack statistics on hand-computed and constructed cases, then one
tiny-random federation (3 sites, 2 rounds) audited through the CLI, which the sweep's audit
column and leakage plot reuse."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_cfg
from in_process import run_federation

from fedlora.audit import (
    FPRS,
    attack_metrics,
    auc,
    average_ranks,
    balanced,
    fpr_key,
    tpr_at_fpr,
)

# ---------------------------------------------------------------- statistics


def test_average_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auc_hand_computed_with_ties():
    # pairs (member, non-member): (3,2) 1, (3,1) 1, (2,2) 1/2, (2,1) 1, twice for the two 2s
    assert auc([3, 2, 2], [2, 1]) == pytest.approx(5 / 6)
    assert auc([1, 1], [1, 1, 1]) == 0.5  # all tied: no information
    assert auc([0.0], [1.0]) == 0.0


def test_auc_perfect_when_member_losses_are_far_below():
    rng = np.random.default_rng(0)
    member_loss, nonmember_loss = rng.normal(1.0, 0.1, 300), rng.normal(5.0, 0.1, 300)
    assert auc(-member_loss, -nonmember_loss) == 1.0
    m = attack_metrics(-member_loss, -nonmember_loss, draws=200, seed=1)
    assert m["auc"]["value"] == 1.0 and m["auc"]["ci95"] == [1.0, 1.0]
    assert all(m[fpr_key(f)]["value"] == 1.0 for f in FPRS)


def test_auc_about_half_on_shuffled_labels_and_random_scores():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 2000), rng.normal(3, 1, 2000)])
    is_member = rng.permutation(np.repeat([True, False], 2000))  # labels unrelated to scores
    assert abs(auc(scores[is_member], scores[~is_member]) - 0.5) < 0.03
    noise = attack_metrics(rng.random(1000), rng.random(1000), draws=200, seed=2)
    lo, hi = noise["auc"]["ci95"]
    assert lo < 0.5 < hi and hi - lo < 0.1
    assert noise[fpr_key(0.01)]["value"] < 0.05


def test_tpr_at_fpr_hand_case():
    non = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3]
    mem = [1.0, 0.8, 0.6, 0.45, 0.0]
    assert tpr_at_fpr(mem, non, 0.1) == pytest.approx(3 / 5)  # t = 0.5: one false positive
    assert tpr_at_fpr(mem, non, 0.2) == pytest.approx(4 / 5)  # t = 0.4: two
    assert tpr_at_fpr(mem, non, 0.05) == pytest.approx(1 / 5)  # below 1/10: no false positive
    # a tie at the threshold: letting one of the two 0.5s in would let both in (FPR 1/2)
    assert tpr_at_fpr([0.5, 0.6], [0.5, 0.5, 0.1, 0.0], 0.25) == 0.5
    assert tpr_at_fpr([0.0], [1.0], 1.0) == 1.0


def test_bootstrap_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(3)
    mem, non = rng.normal(0.5, 1, 200), rng.normal(0, 1, 200)
    a, b = attack_metrics(mem, non, 300, seed=7), attack_metrics(mem, non, 300, seed=7)
    assert a == b
    for key in ("auc", *(fpr_key(f) for f in FPRS)):
        lo, hi = a[key]["ci95"]
        assert 0.0 <= lo <= a[key]["value"] <= hi <= 1.0, key
    assert a["auc"]["ci95"] != attack_metrics(mem, non, 300, seed=8)["auc"]["ci95"]


def test_balanced_subsamples_the_larger_side():
    mem, non = balanced(10, 4, 100, seed=0)
    assert len(mem) == len(non) == 4 and non == [0, 1, 2, 3]
    assert set(mem) <= set(range(10)) and mem == sorted(mem)
    assert balanced(10, 4, 100, seed=0) == (mem, non)
    assert [len(x) for x in balanced(10, 40, 3, seed=1)] == [3, 3]


# ---------------------------------------------------------------- a real run, audited


def small_run(folder: Path, **sections) -> Path:
    """3 sites, 2 rounds on 120 rows of a small data file (32 training, 8 held-out per site),
    so that the audits below score few rows."""
    words = ["fever", "rash", "cough", "pain", "nausea", "fatigue"]
    rows = [
        {"text": f"note {i}: {words[i % 6]} for {i % 7} days", "label": ["mild", "severe"][i % 2]}
        for i in range(120)
    ]
    data = folder / "notes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_tiny_cfg(folder, data={"path": str(data), "eval_rows": 0}, **sections)
    return run_federation(cfg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return small_run(tmp_path_factory.mktemp("audit"))


def in_unit(metric: dict) -> bool:
    lo, hi = metric["ci95"]
    return 0.0 <= lo <= metric["value"] <= hi <= 1.0


def test_audit_scores_the_saved_global_adapter(run_dir):
    """The attacked model holds exactly the run's saved adapter (not the LoRA initialisation)."""
    from safetensors.numpy import load_file

    from fedlora.adapter import lora_arrays
    from fedlora.audit import _load_adapter, load_run
    from fedlora.runtime import build_runtime

    source = load_run(str(run_dir))
    rt = build_runtime(source.cfg, log=lambda _msg: None)
    _load_adapter(rt.model, source.adapter_dir)
    held = lora_arrays(rt.model)
    saved = load_file(str(source.adapter_dir / "adapter_model.safetensors"))
    assert len(saved) == len(held) > 0
    for key, value in saved.items():
        assert np.array_equal(held[key.replace(".weight", ".default.weight")], value), key


def test_audit_command_reports_every_site(run_dir, tmp_path, capsys):
    from fedlora.cli import main

    out = tmp_path / "audit.json"
    args = ["audit", str(run_dir), "--rows", "30", "--bootstrap", "50", "--json", str(out)]
    assert main([*args, "--site-update", "1"]) == 0
    printed = capsys.readouterr().out
    assert "TPR@1%FPR" in printed and "plaintext update" in printed
    report = json.loads(out.read_text())
    assert [s["site"] for s in report["sites"]] == [0, 1, 2]
    for entry in [*report["sites"], report["all_sites"], report["site_update"]]:
        assert entry["members"] == entry["nonmembers"] > 0
        for attack in ("loss", "reference"):
            for key in ("auc", *(fpr_key(f) for f in FPRS)):
                assert in_unit(entry[attack][key]), (entry.get("site"), attack, key)
    assert report["all_sites"]["members"] == sum(s["members"] for s in report["sites"])
    upd = report["site_update"]
    assert upd["site"] == 1 and 0 < upd["trained_rows"] <= upd["site_rows"]
    assert upd["members"] <= upd["trained_rows"]


def replayed_aggregate(run_dir: Path, round_: int, **train) -> tuple[dict, dict]:
    """The kept start of the run's last round plus the FedAvg average (weights = rows) of every
    site's update replayed as round `round_` (with `train` keys changed in the run's config);
    and the run's final adapter."""
    from fedlora.adapter import adapter_arrays, load_adapter_arrays
    from fedlora.audit import _load_adapter, load_run, replay_site_round
    from fedlora.results import load_round_start
    from fedlora.runtime import build_runtime

    source = load_run(str(run_dir))
    for key, value in train.items():
        setattr(source.cfg.train, key, value)
    rt = build_runtime(source.cfg, log=lambda _msg: None)
    _, start = load_round_start(run_dir)
    total = {k: np.zeros_like(v, dtype=np.float64) for k, v in start.items()}
    weight = 0
    for site in range(source.cfg.federation.clients):
        load_adapter_arrays(rt.model, start)
        replay_site_round(rt, rt.site_rows(site), site, round_, source.cfg.run.seed)
        n = len(rt.site_rows(site))
        for k, v in adapter_arrays(rt.model).items():
            total[k] += n * (v.astype(np.float64) - start[k])
        weight += n
    _load_adapter(rt.model, source.adapter_dir)
    final = adapter_arrays(rt.model)
    return {k: start[k] + total[k] / weight for k in start}, final


@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_replayed_updates_aggregate_to_the_runs_final_adapter(run_dir, tmp_path, privacy):
    """--site-update replays exactly what each site sent in the last round: the replayed
    updates, averaged as FedAvg does, added to the kept start of that round give the run's
    final adapter (to float rounding: the audit trains with more threads than a worker), with
    DP-SGD's batches and noise too. The same replay seeded as another round does not."""
    from fedlora.results import load_round_start

    if privacy != "none":
        run_dir = small_run(tmp_path, privacy={"level": privacy, "noise_multiplier": 1.0})
    last = load_round_start(run_dir)[0]
    assert last == 2
    replayed, final = replayed_aggregate(run_dir, last)
    assert replayed.keys() == final.keys()
    for k in final:
        np.testing.assert_allclose(replayed[k], final[k], rtol=1e-4, atol=1e-6, err_msg=k)
    other, _ = replayed_aggregate(run_dir, last + 1)
    assert any(not np.allclose(other[k], final[k], rtol=1e-4, atol=1e-6) for k in final)


def test_sites_train_each_round_at_the_scheduled_rate(tmp_path):
    """train.lr_schedule: the rows name each round's rate, and the sites trained the last round
    at train.lr * lr_final (its replay at that rate gives the final adapter; the same replay at
    train.lr does not), with SGD so that the rate scales the step."""
    from fedlora.results import load_round_start

    train = {"optimizer": "sgd", "lr": 0.5, "lr_schedule": "linear", "lr_final": 0.2}
    run_dir = small_run(tmp_path, train=train)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [None, 0.5, pytest.approx(0.1)]
    last = load_round_start(run_dir)[0]
    replayed, final = replayed_aggregate(run_dir, last)
    for k in final:
        np.testing.assert_allclose(replayed[k], final[k], rtol=1e-4, atol=1e-6, err_msg=k)
    unscheduled, _ = replayed_aggregate(run_dir, last, lr_schedule="constant")
    assert any(not np.allclose(unscheduled[k], final[k], rtol=1e-4, atol=1e-6) for k in final)


def test_site_update_under_dp_sgd(run_dir, tmp_path):
    """With privacy.level = "sample" the recomputed update is a DP-SGD one (Poisson batches:
    its members are the rows those batches drew). The run's config is switched to sample level
    in a copy: the global adapter does not matter for this path."""
    import shutil

    from fedlora.audit import run_audit
    from fedlora.config import write_config
    from fedlora.lifecycle import read_run_config

    folder = tmp_path / "dp-run"
    shutil.copytree(run_dir, folder)
    cfg, _ = read_run_config(folder / "config.toml")
    cfg.privacy.level, cfg.privacy.noise_multiplier = "sample", 1.0
    write_config(cfg, folder / "config.toml")
    report = run_audit(str(folder), draws=20, site_update=2, log=lambda _msg: None)
    upd = report["site_update"]
    assert "DP-SGD" in upd["target"] and 0 < upd["trained_rows"] <= upd["site_rows"]
    assert in_unit(upd["reference"]["auc"])


def test_audit_refuses_bad_input(run_dir, tmp_path, capsys):
    import shutil

    from fedlora.cli import main

    assert main(["audit", str(run_dir), "--site-update", "7"]) == 2
    assert "the run has 3 sites (0 to 2)" in capsys.readouterr().err
    scaffold = tmp_path / "scaffold-run"
    shutil.copytree(run_dir, scaffold)
    text = (scaffold / "config.toml").read_text()
    text = text.replace('name = "fedavg"', 'name = "scaffold"')
    (scaffold / "config.toml").write_text(text.replace('"adamw"', '"sgd"'))  # as SCAFFOLD needs
    assert main(["audit", str(scaffold), "--site-update", "0"]) == 2
    assert "no control variates" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["audit", str(tmp_path)]) == 2
    assert "neither a fedlora results folder" in capsys.readouterr().err


def test_sweep_audit_column_and_leakage_plot(run_dir, tmp_path):
    """`sweep --audit` on a sweep whose one run is finished (the fixture's run, put in its
    place): the run is skipped, audited into its folder, its AUC is the attack_auc column, and
    the leakage plot is drawn."""
    import shutil

    from conftest import TINY_BASE

    from fedlora import sweep
    from fedlora.cli import SIMULATE_FLAGS

    folder = tmp_path / "sw"
    plan = sweep.plan_sweep(
        folder, sweep.parse_grid(["lora.r=8"], SIMULATE_FLAGS), 1, None, [TINY_BASE]
    )
    folder.mkdir()
    (folder / sweep.DEFINITION).write_text(plan.definition)
    run = plan.runs[0].folder
    shutil.copytree(run_dir, run)
    plan.audit = True
    lines: list[str] = []
    assert sweep.run_sweep(plan, lines.append) == 0
    assert any("finished before, skipped" in line for line in lines)
    report = json.loads((run / sweep.AUDIT_FILE).read_text())
    with (folder / sweep.CSV_FILE).open() as fh:
        row = next(csv.DictReader(fh))
    auc_value = report["all_sites"]["reference"]["auc"]["value"]
    assert float(row["attack_auc"]) == pytest.approx(auc_value) and 0.0 <= auc_value <= 1.0
    unaudited = row | {"attack_auc": ""}
    points = sweep.leakage_points([row, row | {"status": "failed"}, unaudited], ["lora.r"])
    assert points == [("lora.r=8", float(row["attack_auc"]), float(row["eval_accuracy"]))]
    assert (folder / sweep.LEAKAGE_PLOT).read_bytes().startswith(b"\x89PNG")
