"""`fedlora simulate` user errors: non-zero exit, one `fedlora: error:` line that says what to
change, no traceback, and no results folder that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 120


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
    )


@pytest.fixture
def good_data(tmp_path) -> Path:
    path = tmp_path / "good.jsonl"
    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def bad_data(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n')
    return path


CASES = {
    # name: (extra args, words the error line must contain)
    "unknown strategy": (["--strategy", "fedsgd"], ["strategy.name", "fedavg", "fedprox"]),
    "zero clients": (["--clients", "0"], ["federation.clients", "at least 1"]),
    "lora r zero": (["--set", "lora.r=0"], ["lora.r", "at least 1"]),
    "missing data file": (["--data", "{tmp}/absent.jsonl"], ["absent.jsonl", "does not exist"]),
    "malformed data file": (["--data", "{bad}"], ["bad.jsonl", "line 2"]),
    "unknown target module": (
        ["--data", "{good}", "--partition", "iid", "--set", "lora.targets=nope_proj"],
        ["nope_proj", "q_proj"],
    ),
    "missing privacy unit column": (
        ["--data", "{good}", "--privacy", "sample", "--set", "privacy.unit=patient_id"],
        ["good.jsonl", "row 1", "'patient_id' column", 'privacy.unit = "row"'],
    ),
    "unknown flag": (["--learning-rate", "0.1"], ["--learning-rate", "--help"]),
    "malformed --set": (["--set", "lr=0.1"], ["section.key=value"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error(case, tmp_path, good_data, bad_data):
    extra, words = CASES[case]
    extra = [a.format(tmp=tmp_path, good=good_data, bad=bad_data) for a in extra]
    out = tmp_path / "results"
    args = ["simulate", "--model", "tiny-random", "--rounds", "1", "--out", str(out), *extra]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedlora: error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert not out.exists()  # a folder without .partial would look like a finished result
    assert not list(tmp_path.rglob("summary.json"))


def test_no_command_prints_help(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode != 0
    assert "simulate" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_entry_point_is_installed(tmp_path):
    exe = Path(sys.executable).with_name("fedlora")
    if not exe.exists():
        pytest.skip("no fedlora script next to this Python")
    proc = subprocess.run(
        [str(exe), "simulate", "--clients", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("fedlora: error:") == 1
    assert "federation.clients" in proc.stderr


def test_simulate_happy_path_prints_table_and_results(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "simulate",
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
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train loss" in proc.stdout and "accuracy" in proc.stdout  # the round table
    assert "women's health" in proc.stdout  # the partition summary names the sites' groups
    assert (out / "summary.json").is_file() and (out / "metrics.png").is_file()
    assert not out.with_name("run.partial").exists()
