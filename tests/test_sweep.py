"""`fedlora sweep`: grid parsing and its errors, the per-point mean ± std table (hand-computed),
and a real 2-point x 2-repeat sweep on tiny-random that is run again and resumes (the command
and its federations in this process: tests/in_process.py)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_BASE
from in_process import engine_in_process

from fedlora.cli import SIMULATE_FLAGS, main
from fedlora.errors import FedloraError
from fedlora.sweep import (
    aggregate,
    definition_changes,
    epsilon_of,
    epsilon_series,
    expand,
    markdown_table,
    mean_curve,
    mean_std,
    parse_grid,
    plan_sweep,
    plot_utility_vs_epsilon,
    point_slugs,
    run_sweep,
    split_values,
)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`fedlora ARGS` run in `cwd` as the command line would, in this process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), engine_in_process():
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(list(args))
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def grid(*texts: str):
    return parse_grid(texts, SIMULATE_FLAGS)


def quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------- grid parsing


def test_split_values_keeps_lists_and_quotes_whole():
    assert split_values("0, 0.5,1") == ["0", "0.5", "1"]
    assert split_values('qv,["q_proj","o_proj"],\'a,b\'') == ["qv", '["q_proj","o_proj"]', "'a,b'"]


def test_grid_keys_values_and_shortcuts():
    axes = grid(
        "strategy=fedavg,scaffold",
        "local-steps=1,2",
        "lora.r=4,8",
        "train.lr=1e-3,5e-4",
        'lora.targets=qv,["q_proj","o_proj"]',
        "data.path=a.jsonl",
    )
    assert [a.key for a in axes] == [
        "strategy.name",
        "train.local_steps",
        "lora.r",
        "train.lr",
        "lora.targets",
        "data.path",
    ]
    values = {a.key: [v.value for v in a.values] for a in axes}
    assert values["strategy.name"] == ["fedavg", "scaffold"]
    assert values["lora.r"] == [4, 8]
    assert values["train.lr"] == [0.001, 0.0005]
    assert values["lora.targets"] == ["qv", ["q_proj", "o_proj"]]
    assert values["data.path"] == ["a.jsonl"]
    assert [v.text for v in axes[3].values] == ["1e-3", "5e-4"]  # labels keep what was typed
    assert grid("local_steps=3")[0].key == "train.local_steps"


GRID_ERRORS = {
    "no values": (["lora.r"], ["KEY=V1,V2"]),
    "not a key": (["lr=1,2"], ["'lr'", "section.key", "strategy", "local-steps"]),
    "empty value": (["lora.r=4,,8"], ["empty value"]),
    "duplicate value": (["lora.r=4,4"], ["twice"]),
    "duplicate key": (["lora.r=4", "lora.r=8"], ["lora.r", "one --grid"]),
    "seed": (["seed=0,1"], ["run.seed", "--repeats"]),
    "out": (["run.out=a,b"], ["run.out", "folder"]),
    "none": ([], ["at least one --grid"]),
}


@pytest.mark.parametrize("case", list(GRID_ERRORS))
def test_grid_errors(case):
    texts, words = GRID_ERRORS[case]
    with pytest.raises(FedloraError) as err:
        grid(*texts)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_expand_order_and_slugs():
    points = expand(grid("strategy=fedavg,fedprox", "lora.r=4,8"))
    assert [p.label for p in points] == [
        "strategy.name=fedavg lora.r=4",
        "strategy.name=fedavg lora.r=8",
        "strategy.name=fedprox lora.r=4",
        "strategy.name=fedprox lora.r=8",
    ]
    assert point_slugs(points)[1] == "strategy-fedavg_r-8"
    # two keys with the same leaf keep their sections; values that clean up to the same
    # folder name get a hash each, so every point keeps its own folder
    same_leaf = point_slugs(expand(grid("train.max_grad_norm=1", "lora.r=2")))
    assert same_leaf == ["max_grad_norm-1_r-2"]
    clash = point_slugs(expand(grid('data.path="a b",a-b')))
    assert len(set(clash)) == 2 and all(s.startswith("path-a-b-") for s in clash)


def test_plan_validates_every_point_before_anything_runs(tmp_path):
    folder = tmp_path / "sweep"
    fixed = [TINY_BASE, {"run": {"seed": 5}}]
    plan = plan_sweep(folder, grid("lora.r=2,4"), 2, None, fixed)
    assert [(r.point.label, r.seed) for r in plan.runs] == [
        ("lora.r=2", 5),
        ("lora.r=2", 6),
        ("lora.r=4", 5),
        ("lora.r=4", 6),
    ]
    assert plan.runs[3].folder == folder / "runs" / "r-4-seed6"
    assert plan.runs[3].cfg.lora.r == 4 and plan.runs[3].cfg.run.out == str(plan.runs[3].folder)
    with pytest.raises(FedloraError, match=r"sweep point strategy.name=scaffold: .*sgd"):
        adamw = [*fixed, {"train": {"optimizer": "adamw"}}]  # chosen: no scaffold recipe
        plan_sweep(folder, grid("strategy=fedavg,scaffold"), 1, None, adamw)
    with pytest.raises(FedloraError, match=r"lora.r=0: lora.r must be at least 1"):
        plan_sweep(folder, grid("lora.r=2,0"), 1, None, fixed)
    with pytest.raises(FedloraError, match="both fixed"):
        plan_sweep(folder, grid("lora.r=2"), 1, None, [*fixed, {"lora": {"r": 4}}])
    assert not folder.exists()  # planning writes nothing


def test_definition_changes_name_the_keys():
    old = 'repeats = 2\n[grid]\n"lora.r" = [4, 8]\n[base.train]\nlr = 0.001\n'
    new = 'repeats = 2\n[grid]\n"lora.r" = [4, 16]\n[base.train]\nlr = 0.001\n'
    assert definition_changes(old, old) == []
    assert definition_changes(old, new) == ["grid.lora.r: [4, 8] -> [4, 16]"]


# ---------------------------------------------------------------- results and the table


def test_epsilon_of_missing_privacy_is_infinite():
    assert epsilon_of({"final": {}}) == math.inf
    assert epsilon_of({"privacy": {"level": "none", "max_epsilon": None}}) == math.inf
    assert epsilon_of({"privacy": {"level": "sample", "max_epsilon": 3.5}}) == 3.5


def test_mean_std_hand_computed():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt(7.0)))  # (4+1+9)/2
    assert mean_std([0.4]) == (0.4, None)
    assert mean_std([math.inf, math.inf]) == (math.inf, 0.0)


def row(r, seed, acc, eps=math.inf, status="ok"):
    done = status == "ok"
    return {
        "lora.r": r,
        "strategy.name": "fedavg",
        "seed": seed,
        "status": status,
        "eval_accuracy": acc if done else None,
        "eval_macro_f1": acc / 2 if done else None,
        "eval_loss": 1.0 + seed if done else None,
        "epsilon": eps if done else None,
        "bytes": 2_000_000 * (seed + 1) if done else None,
        "wall_seconds": 10.0 * (seed + 1) if done else None,
    }


def test_aggregate_and_markdown_table_hand_computed():
    rows = [
        row("4", 0, 0.5),
        row("4", 1, 0.7),
        row("4", 2, None, status="failed"),
        row("8", 0, 0.9, eps=2.0),
    ]
    points = aggregate(rows, ["lora.r"])
    assert [(p["lora.r"], p["runs"], p["total"]) for p in points] == [("4", 2, 3), ("8", 1, 1)]
    assert points[0]["eval_accuracy"] == pytest.approx((0.6, math.sqrt(0.02)))
    assert points[0]["eval_loss"] == pytest.approx((1.5, math.sqrt(0.5)))
    assert points[0]["bytes"] == pytest.approx((3.0, math.sqrt(2.0)))  # MB: 2 and 4
    assert points[1]["epsilon"] == (2.0, None)
    table = markdown_table(points, ["lora.r"]).splitlines()
    assert table[0] == (
        "| lora.r | runs | accuracy | macro-F1 | eval loss | epsilon | MB sent | seconds |"
    )
    assert table[2] == (
        "| 4 | 2/3 | 0.600 ± 0.141 | 0.300 ± 0.071 | 1.5000 ± 0.7071 | ∞ (no DP) "
        "| 3.00 ± 1.41 | 15.0 ± 7.1 |"
    )
    assert table[3] == "| 8 | 1/1 | 0.900 | 0.450 | 1.0000 | 2 | 2.00 | 10.0 |"
    only_failed = aggregate([row("4", 0, None, status="failed")], ["lora.r"])
    assert markdown_table(only_failed, ["lora.r"]).splitlines()[2] == (
        "| 4 | 0/1 | - | - | - | - | - | - |"
    )


def test_epsilon_series_private_points_and_baselines():
    rows = [
        row("4", 0, 0.6, eps=8.0),
        row("4", 1, 0.8, eps=8.0),
        row("4", 0, 0.5, eps=1.0) | {"privacy.noise_multiplier": "2"},
        row("4", 0, 0.9) | {"privacy.noise_multiplier": "0"},
        row("8", 0, 0.7, eps=1.0) | {"privacy.noise_multiplier": "2"},
    ]
    for r in rows[:2]:
        r["privacy.noise_multiplier"] = "1"
    keys = ["privacy.noise_multiplier", "lora.r"]
    series = epsilon_series(aggregate(rows, keys), keys)
    assert list(series) == ["fedavg lora.r=4", "fedavg lora.r=8"]
    r4 = series["fedavg lora.r=4"]
    assert r4.private == [(1.0, 0.5, 0.0), pytest.approx((8.0, 0.7, math.sqrt(0.02)))]
    assert r4.baselines == [0.9]
    assert series["fedavg lora.r=8"].private == [(1.0, 0.7, 0.0)]


def test_epsilon_plot_draws_round_zero_and_the_non_private_lines(monkeypatch, tmp_path):
    """The utility-vs-epsilon plot carries what a private run must beat (round 0, dotted) and
    what it is measured against (the runs without DP, dashed), each at its accuracy."""
    import fedlora.sweep as sweep

    figures = []
    monkeypatch.setattr(sweep, "_save", lambda plt, fig, path: figures.append(fig))
    rows = [row("4", 0, 0.6, eps=8.0), row("4", 0, 0.9) | {"privacy.noise_multiplier": "0"}]
    rows[0]["privacy.noise_multiplier"] = "1"
    keys = ["privacy.noise_multiplier"]
    points = aggregate(rows, keys)
    plot_utility_vs_epsilon(points, keys, tmp_path / "p.png", ("base", 0.85), round0=0.45)
    plot_utility_vs_epsilon(points, keys, tmp_path / "q.png")
    lines = [{(ln.get_label(), ln.get_linestyle(), ln.get_ydata()[0]) for ln in f.axes[0].lines}
             for f in figures]  # fmt: skip
    assert ("round 0, the base model (0.450)", ":", 0.45) in lines[0]
    assert ("no DP: base (0.850)", "--", 0.85) in lines[0]
    assert ("fedavg, no DP (0.900)", "--", 0.9) in lines[0] & lines[1]
    assert not any(label.startswith("round 0") for label, _, _ in lines[1])


def test_mean_curve_averages_each_round():
    curve = mean_curve([[(0, 0.2), (1, 0.4)], [(0, 0.4), (1, 0.8), (2, 1.0)]])
    assert curve == [pytest.approx((0, 0.3)), pytest.approx((1, 0.6)), (2, 1.0)]


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
    """A user error inside a run (here: a missing data file, found when the run loads its
    data) is a `failed` row; the other runs still run; the exit code says something failed."""
    folder = tmp_path / "sweep"
    missing = [str(tmp_path / "absent-1.jsonl"), str(tmp_path / "absent-2.jsonl")]
    axes = grid(f"data.path={missing[0]},{missing[1]}")
    plan = plan_sweep(folder, axes, 1, None, [TINY_BASE])
    lines: list[str] = []
    assert run_sweep(plan, lines.append) == 1
    with (folder / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("does not exist" in r["error"] for r in rows)
    assert "0/1" in (folder / "results.md").read_text()
    assert sum("failed:" in line for line in lines) == 4  # as they happen, and in the summary
    assert (folder / "utility_vs_epsilon.png").stat().st_size > 0


# ---------------------------------------------------------------- a real sweep, run twice

SWEEP_ARGS = [
    "sweep",
    "--model",
    "tiny-random",
    "--clients",
    "2",
    "--rounds",
    "1",
    "--local-steps",
    "1",
    "--set",
    "data.eval_rows=20",
    "--set",
    "model.precision=fp32",
    "--grid",
    "lora.r=2,4",
    "--repeats",
    "2",
    "--out",
    "sw",
]
PNG = b"\x89PNG\r\n\x1a\n"


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: (p / "summary.json").stat().st_mtime_ns for p in (folder / "runs").iterdir()}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli(*SWEEP_ARGS, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc.stdout


def test_sweep_writes_runs_table_and_plots(sweep_dir):
    cwd, stdout = sweep_dir
    folder = cwd / "sw"
    assert stdout.count("=== run ") == 4 and "run 4/4 (point 2/2): lora.r=4 seed 1" in stdout
    with (folder / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["lora.r"], r["seed"], r["status"]) for r in rows] == [
        ("2", "0", "ok"),
        ("2", "1", "ok"),
        ("4", "0", "ok"),
        ("4", "1", "ok"),
    ]
    for r in rows:
        summary = json.loads((folder / r["run"] / "summary.json").read_text())
        assert summary["seed"] == int(r["seed"]) and summary["strategy"] == r["strategy.name"]
        assert float(r["eval_accuracy"]) == summary["final"]["eval_accuracy"]
        assert float(r["eval_loss"]) == summary["final"]["eval_loss"]
        assert int(r["bytes"]) == summary["bytes_up"] + summary["bytes_down"] > 0
        assert r["epsilon"] == "inf"  # no differential privacy in these runs
    ratio = int(rows[2]["bytes"]) / int(rows[0]["bytes"])
    assert 1.99 < ratio < 2.01  # rank 4 sends twice the factors of rank 2 (plus a few counts)
    table = (folder / "results.md").read_text()
    accs = [float(r["eval_accuracy"]) for r in rows[:2]]
    mean, std = mean_std(accs)
    assert f"| 2 | 2/2 | {mean:.3f} ± {std:.3f} |" in table
    starts = [json.loads((folder / r["run"] / "metrics.jsonl").read_text().splitlines()[0])
              for r in rows]  # fmt: skip
    assert {s["round"] for s in starts} == {0}
    round0 = sum(s["eval_accuracy"] for s in starts) / len(starts)
    assert f"Round 0 (the base model, before any training): accuracy {round0:.3f} " in table
    for plot in ("utility_vs_epsilon.png", "utility_vs_rounds.png"):
        assert (folder / plot).read_bytes().startswith(PNG)
    assert "lora.r" in (folder / "sweep.toml").read_text()


def test_same_sweep_again_skips_finished_runs_and_reruns_unfinished(sweep_dir):
    cwd, _ = sweep_dir
    folder = cwd / "sw"
    before = mtimes(folder)
    again = run_cli(*SWEEP_ARGS, cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == 4
    assert "=== run" not in again.stdout
    assert mtimes(folder) == before
    # an interrupted run leaves `<run>.partial`: it is removed and that run alone runs again
    done = folder / "runs" / "r-4-seed1"
    partial = done.with_name(done.name + ".partial")
    done.rename(partial)
    (partial / "summary.json").unlink()
    third = run_cli(*SWEEP_ARGS, cwd=cwd)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("finished before, skipped") == 3
    assert third.stdout.count("=== run ") == 1 and "Removing the unfinished" in third.stdout
    assert not partial.exists() and (done / "summary.json").is_file()
    after = mtimes(folder)
    assert {k: v for k, v in after.items() if k != done.name} == {
        k: v for k, v in before.items() if k != done.name
    }


def test_another_grid_into_the_same_folder_is_refused(sweep_dir):
    cwd, _ = sweep_dir
    args = [a if a != "lora.r=2,4" else "lora.r=2,8" for a in SWEEP_ARGS]
    proc = run_cli(*args, cwd=cwd)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedlora: error:")]
    assert len(errors) == 1 and "grid.lora.r: [2, 4] -> [2, 8]" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cwd / "sw" / "runs" / "r-8-seed0").exists()


def test_bad_point_is_refused_before_anything_runs(tmp_path):
    args = [a if a != "lora.r=2,4" else "lora.r=2,0" for a in SWEEP_ARGS]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "sweep point lora.r=0: lora.r must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "sw").exists()


def test_baseline_run_is_quoted_and_checked(sweep_dir):
    """--baseline: a finished run without privacy becomes the reference line and is quoted in
    results.md (the same sweep again: nothing reruns); a folder that is not a result is refused."""
    cwd, _ = sweep_dir
    folder = cwd / "sw"
    baseline = folder / "runs" / "r-2-seed0"
    proc = run_cli(*SWEEP_ARGS, "--baseline", str(baseline), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = json.loads((baseline / "summary.json").read_text())["final"]["eval_accuracy"]
    assert (
        f"Baseline without privacy ({baseline}): accuracy {acc:.3f}"
        in (folder / "results.md").read_text()
    )
    bad = run_cli(*SWEEP_ARGS, "--baseline", str(cwd / "nowhere"), cwd=cwd)
    assert bad.returncode == 2 and "not a finished results folder" in bad.stderr
