"""A loopback port for a server a test starts, that no other socket is handed meanwhile.

Binding port 0 and closing it (the usual trick) returns a port from the kernel's ephemeral range,
which the kernel may hand to the next port-0 bind or outgoing connection before the server under
test binds it: under load one such restart failed with EADDRINUSE. Ports below that range are never
handed out by the kernel, so a bindable one stays free unless something binds it by number; each
port is handed out once per test process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_given: set[int] = set()
_lock = threading.Lock()
_FLOOR = 10_000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A port on 127.0.0.1 that binds now, outside the ephemeral range, not returned before."""
    top = _ephemeral_start()
    candidates = list(range(_FLOOR, top)) if top > _FLOOR + 100 else []
    random.shuffle(candidates)
    with _lock:
        for port in candidates:
            if port in _given:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    with socket.socket() as sock:  # no room below the ephemeral range: the usual trick
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
