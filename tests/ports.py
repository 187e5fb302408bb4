"""Free loopback ports for the processes the tests start.

A port is chosen at random BELOW the kernel's ephemeral range and checked by binding it. Ports
the kernel hands out by itself (bind to port 0, every outgoing connection, the Temporal dev
server's own metrics and membership ports) come from the ephemeral range, so they can never take
a port we chose and handed to a process that has not bound it yet. Two stacks starting side by
side (make test runs two xdist workers) made that race real.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOW = 10_000


def _ephemeral_start() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    high = _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(LOW, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LOW}..{high}")
