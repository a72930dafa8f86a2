"""Choosing a port to listen on later.

A port found free by binding to port 0 comes from the kernel's ephemeral range, the same pool
from which every outgoing connection and every other port-0 listener takes its local port. A
port chosen now and listened on later (a SuperNode's local API, a server that restarts on the
same address) can then be taken in between: by then a site dialling it may reach another
process's plaintext listener. Ports below the ephemeral range are handed out by no one.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Linux's default ephemeral range starts here (IANA's starts at 49152)
DEFAULT_EPHEMERAL_START = 32768
#: above the ports services reserve below it (Ray's workers take 10002-19999 by default)
LOWEST = 20000
TRIES = 200


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's setting where readable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_START


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, outside the ephemeral range (so it stays free until used)."""
    top = ephemeral_start()
    low = LOWEST if top - LOWEST >= 1000 else 1024  # a kernel set to start its range low
    # the system's randomness: a test or a run may have seeded `random` the same in two processes
    for port in random.SystemRandom().sample(range(low, top), min(TRIES, top - low)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # all taken: any free one
        sock.bind((host, 0))
        return sock.getsockname()[1]
