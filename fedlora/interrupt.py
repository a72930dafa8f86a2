"""Ctrl-C and SIGTERM: end within seconds, keep every saved round, and say how to go on.

The federation's round loop may run in a thread the signal cannot reach (Flower's simulation
runs the ServerApp in one), so a signal throws a `StopSwitch` that the loop checks before every
exchange with the sites and before it reports and saves a round. Reporting and saving happen
inside `StopSwitch.saving()`: a round is either wholly saved before the switch is thrown, or not
at all, so nothing is saved after the interruption is announced, and nothing reported is unsaved.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: how long a server may take to stop after a signal before it is ended hard
STOP_GRACE = 15.0


class Stopped(Exception):
    """Raised in the round loop's thread once the switch is thrown."""


class StopSwitch:
    """Thrown (once) by a signal; checked by the round loop."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # a second signal may arrive inside throw()
        self.event = threading.Event()
        self.signum = 0
        #: this process's child processes when the signal came (Ray's helpers and workers)
        self.children: list = []
        #: the thread inside `saving()`, and whether a signal it handled waits for the save
        self.saver: int | None = None
        self.deferred = False

    def throw(self, signum: int) -> None:
        with self.lock:  # waits for a round being saved: it is saved wholly, or not at all
            self.signum = self.signum or int(signum)
            self.event.set()

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Report and save a round wholly or not at all. A signal handled in another thread
        waits for the lock; one handled in this very thread (the deployed server's round loop
        runs in the main thread, where handlers run, and the lock is re-entrant) is deferred
        by `on_signals` and takes effect once the round is saved."""
        with self.lock:
            self.check()
            self.saver = threading.get_ident()
            try:
                yield
            finally:
                self.saver = None
        if self.deferred:
            self.deferred = False
            raise KeyboardInterrupt

    @property
    def thrown(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.event.is_set():
            raise Stopped(f"stopped by {signal.Signals(self.signum).name}")


def end_hard_after(signum: int, grace: float = STOP_GRACE) -> None:
    """End this process `grace` seconds from now unless it has ended by then.

    Python drops an exception raised inside a garbage-collection callback or a `__del__`
    ("Exception ignored in ..."), and the KeyboardInterrupt of a signal is no exception to
    that: a server that got SIGTERM while starting went on to wait for its sites as if nothing
    had happened. A timer started by the first signal bounds the stop whatever the main thread
    is doing. Nothing is lost by it: every round is saved atomically (a SIGKILL loses nothing
    either), and the normal path ends long before."""

    def end() -> None:
        print(
            f"fedlora: interrupted ({signal.Signals(signum).name}); still running {grace:.0f} s "
            "after the signal, so ended now (saved rounds are kept: --resume continues them).",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    timer = threading.Timer(grace, end)
    timer.daemon = True
    timer.start()


def interrupt_bounded(signum: int, frame: object) -> None:
    """A signal handler: KeyboardInterrupt now, and an end within `STOP_GRACE` seconds."""
    end_hard_after(signum, STOP_GRACE)
    raise KeyboardInterrupt


@contextlib.contextmanager
def on_signals(switch: StopSwitch, grace: float | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM throw `switch` and raise KeyboardInterrupt in the main thread (also
    where the shell started this process with SIGINT ignored); the old handlers come back at
    the end. With `grace`, the first signal also ends the process hard that many seconds later
    (`end_hard_after`). Only in the main thread: elsewhere signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        first = not switch.thrown
        switch.throw(signum)
        if first:
            if grace is not None:
                end_hard_after(signum, grace)
            switch.children = psutil.Process().children(recursive=True)
            if switch.saver == threading.get_ident():  # inside `saving()`: after the save
                switch.deferred = True
                return
            raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def end_children(switch: StopSwitch, grace: float = 3.0) -> None:
    """End the child processes the interrupted process had (a busy Ray worker outlives its
    raylet by minutes): SIGTERM, then SIGKILL for those still there after `grace`."""
    alive = [p for p in switch.children if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def signal_of(exc: BaseException, switch: StopSwitch) -> int:
    """The signal behind `exc` (0: none). Ray replaces the SIGTERM handler with one that
    raises SystemExit(SIGTERM), so that counts too."""
    if switch.thrown:
        return switch.signum
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
        return int(signal.SIGTERM)
    return 0


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal: one line saying what was kept and how to continue. (Not a
    FedloraError: nothing may catch it as a failed run and carry on, as a sweep would.)"""

    def __init__(self, signum: int, work: Path | None, saved_round: int | None) -> None:
        self.signum, self.work, self.saved_round = signum, work, saved_round
        self.exit_code = 128 + signum
        super().__init__(self.describe(None))

    @property
    def out(self) -> Path | None:
        """The results folder the interrupted run was writing (its `.partial` is `work`)."""
        return (
            None if self.work is None else self.work.with_name(self.work.name[: -len(".partial")])
        )

    def describe(self, resume_command: str | None) -> str:
        name = signal.Signals(self.signum).name
        if self.work is None or self.saved_round is None:
            return (
                f"interrupted ({name}) before round 0 finished: nothing to resume; run the same "
                "command again to start afresh."
            )
        how = f"resume with: {resume_command}" if resume_command else "resume it with --resume"
        return f"interrupted ({name}); rounds 0-{self.saved_round} are saved in {self.work}; {how}"


def resume_command(argv: Sequence[str], out: Path) -> str:
    """The exact command that continues the interrupted run: the same arguments, the resolved
    results folder (a default one is named by the time it started) and --resume."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif arg.startswith("--out=") or arg == "--resume" or arg == "--restart":
            continue
        else:
            args.append(arg)
    return shlex.join(["fedlora", *args, "--out", str(out), "--resume"])
