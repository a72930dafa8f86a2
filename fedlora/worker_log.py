"""Keep the simulation workers' library chatter (deprecation warnings, bitsandbytes' kernel
notices, ...) out of the round table: each Ray worker writes its stdout and stderr to a log file
in the results folder instead. Errors still reach the console: Flower relays a site's
exception to the server, which reports it."""

from __future__ import annotations

import os
from pathlib import Path

#: environment variable naming the folder the workers' logs go to (set for Ray's workers)
LOG_DIR_ENV = "FEDLORA_WORKER_LOG_DIR"


def runtime_env(log_dir: Path, base: dict) -> dict:
    """Ray's runtime_env `base`, extended so that every worker calls `redirect` when it starts."""
    env_vars = {**base.get("env_vars", {}), LOG_DIR_ENV: str(log_dir)}
    return {**base, "env_vars": env_vars, "worker_process_setup_hook": f"{__name__}.redirect"}


def redirect() -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so output written by
    C extensions goes too) at `<log dir>/worker-<pid>.log`."""
    folder = os.environ.get(LOG_DIR_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / f"worker-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for stream in (1, 2):
        os.dup2(fd, stream)
    os.close(fd)
