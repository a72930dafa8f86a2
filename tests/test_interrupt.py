"""Ctrl-C and SIGTERM on real `fedlora simulate` processes: the process ends within seconds with
one line that says what is kept and the exact command that continues it, no traceback, no round
saved after that line and no process of the run (Ray's helpers included) left behind; and a
re-run never deletes saved rounds without --restart."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora import checkpoint
from fedlora.errors import FedloraError
from fedlora.interrupt import Interrupted, Stopped, StopSwitch, on_signals, resume_command
from fedlora.results import prepare_out, run_state_dir

#: seconds a signalled run may take to end, and its processes to disappear after that
GRACE = 10.0


def test_resume_command_keeps_the_arguments_and_names_the_folder(tmp_path):
    argv = ["simulate", "--rounds", "5", "--out=x", "--set", "train.lr=0.1", "--restart"]
    command = resume_command(argv, tmp_path / "run")
    assert shlex.split(command) == [
        "fedlora",
        "simulate",
        "--rounds",
        "5",
        "--set",
        "train.lr=0.1",
        "--out",
        str(tmp_path / "run"),
        "--resume",
    ]
    before = Interrupted(signal.SIGTERM, None, None)
    assert before.exit_code == 143 and "nothing to resume" in str(before)


def test_a_signal_in_the_thread_saving_a_round_takes_effect_after_the_save():
    """The deployed server's round loop runs in the main thread, where signal handlers run: a
    Ctrl-C between reporting a round and saving it waits for the save (it once cut the save,
    so `fedlora server` announced one round fewer than metrics.jsonl held)."""
    switch = StopSwitch()
    steps = []
    with pytest.raises(KeyboardInterrupt), on_signals(switch):
        with switch.saving():
            steps.append("reported")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here, in this thread
            steps.append("saved")
    assert steps == ["reported", "saved"] and switch.signum == signal.SIGINT
    with pytest.raises(Stopped), switch.saving():  # nothing is saved after the announcement
        steps.append("a round after the signal")
    assert steps == ["reported", "saved"]


def save_rounds(out: Path, last: int) -> None:
    checkpoint.save(
        run_state_dir(out),
        checkpoint.Checkpoint(last, {"global": {"w": np.zeros(2)}}, [], "f"),
    )


#: a process whose main thread is nearly always inside a `__del__`, where Python drops the
#: KeyboardInterrupt a signal raises ("Exception ignored in ..."), as a fedlora server did once
#: inside a garbage-collection callback while starting
LOSES_INTERRUPTS = """
import signal, sys, time
from fedlora import interrupt
interrupt.STOP_GRACE = float(sys.argv[1])
signal.signal(signal.SIGTERM, interrupt.interrupt_bounded)

class Busy:
    def __del__(self):
        started = time.monotonic()
        while time.monotonic() - started < 0.5:
            pass

print("ready", flush=True)
while True:
    Busy()
"""


def test_a_lost_interrupt_still_ends_the_server_within_its_grace():
    proc = subprocess.Popen(
        [sys.executable, "-c", LOSES_INTERRUPTS, "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()
    stderr = proc.stderr.read()
    assert "Exception ignored" in stderr  # the interrupt was lost, as in the server
    assert "interrupted (SIGTERM); still running 2 s after the signal, so ended now" in stderr


def test_fresh_run_refuses_saved_rounds_unless_restart(tmp_path):
    out = tmp_path / "run"
    save_rounds(out, 3)
    with pytest.raises(FedloraError, match=r"rounds 0-3 saved.*--resume.*--restart"):
        prepare_out(out)
    assert checkpoint.saved_round(run_state_dir(out)) == 3  # untouched
    work = prepare_out(out, restart=True)
    assert work.is_dir() and not any(work.iterdir())
    # a .partial without saved rounds (interrupted before round 0) is simply replaced
    (work / "config.toml").write_text("")
    assert not any(prepare_out(out).iterdir())


def _session_processes(pgid: int) -> list[str]:
    """Live processes of the run's process group (zombies have ended; reaping them is the
    job of whatever adopted them)."""
    ps = subprocess.run(["ps", "-eo", "pgid=,stat=,pid=,args="], capture_output=True, text=True)
    return [
        line
        for line in ps.stdout.splitlines()
        if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")
    ]


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", *args],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _signal_and_check(proc: subprocess.Popen, sig: int, log: Path) -> str:
    """Send `sig`; the process must end within GRACE with 128 + sig, one `fedlora:` line last,
    no traceback, and leave no process behind GRACE later."""
    proc.send_signal(sig)
    proc.wait(GRACE)
    assert proc.returncode == 128 + sig, log.read_text()[-3000:]
    time.sleep(GRACE)
    assert not _session_processes(proc.pid)
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("fedlora: interrupted"), text[-3000:]
    return last


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(GRACE)


def test_sigint_then_sigterm_on_a_real_simulation(tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    rows = partial / "metrics.jsonl"
    args = ["simulate", "--model", "tiny-random", "--clients", "2", "--rounds", "500"]
    args += ["--local-steps", "1", "--set", "data.eval_rows=10", "--out", str(out)]
    args += ["--set", 'model.precision="fp32"']  # "auto" may decide otherwise on resume

    def saved_rows() -> int:
        return len(rows.read_text().splitlines()) if rows.exists() else 0

    log = tmp_path / "first.log"
    proc = _start(args, tmp_path, log)
    try:
        _wait_for(lambda: saved_rows() >= 3, 240, proc, log)
        last = _signal_and_check(proc, signal.SIGINT, log)
    finally:
        _kill(proc)
    saved = checkpoint.saved_round(partial / "state")
    assert saved is not None and saved_rows() == saved + 1  # nothing reported past the save
    assert f"rounds 0-{saved} are saved in {partial}" in last
    command = last.split("resume with: ", 1)[1]
    mine = [a for a in args if a not in ("--out", str(out))]
    assert shlex.split(command) == ["fedlora", *mine, "--out", str(out), "--resume"]

    # the same command without --resume must not delete those rounds
    again = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "--restart" in again.stderr, again.stderr
    assert checkpoint.saved_round(partial / "state") == saved

    # the printed command continues the run; SIGTERM ends it the same way
    log = tmp_path / "resumed.log"
    proc = _start(shlex.split(command)[1:], tmp_path, log)
    try:
        _wait_for(lambda: saved_rows() >= saved + 3, 240, proc, log)
        last = _signal_and_check(proc, signal.SIGTERM, log)
    finally:
        _kill(proc)
    rounds = [json.loads(line)["round"] for line in rows.read_text().splitlines()]
    assert rounds == list(range(len(rounds)))  # no round lost or repeated
    assert f"rounds 0-{rounds[-1]} are saved" in last


def test_sigterm_before_round_0_says_nothing_to_resume(tmp_path):
    log = tmp_path / "run.log"
    args = ["simulate", "--model", "tiny-random", "--rounds", "1", "--out", str(tmp_path / "r")]
    proc = _start(args, tmp_path, log)
    try:
        _wait_for(lambda: "Loading base model" in log.read_text(), 120, proc, log)
        last = _signal_and_check(proc, signal.SIGTERM, log)
    finally:
        _kill(proc)
    assert "nothing to resume" in last
