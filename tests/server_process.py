"""Start `python -m kinship_service` as a real subprocess and read the address it prints."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def launch(
    env: dict[str, str], log: Path, *, preexec_fn: Callable[[], None] | None = None, timeout: float = 120
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server with `env` (stderr appended to `log`); return it and its `host:port`.

    The server prints `kinship-server listening on HOST:PORT` once it serves; with
    KINSHIP_PORT=0 that line is the only way to learn the port.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "kinship_service"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),
        preexec_fn=preexec_fn,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and b"\n" not in line:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line += os.read(proc.stdout.fileno(), 4096)
        elif proc.poll() is not None:
            break
    text = line.decode()
    assert "kinship-server listening on " in text, f"server did not start: {text!r}\n{log.read_text()}"
    return proc, text.split("listening on ", 1)[1].split()[0]
