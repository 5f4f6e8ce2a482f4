"""The benchmarks' server process: start `python -m kinship_service`, and read its children, memory and CPU time from /proc (Linux)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


def start_server(env_overrides: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """Start the server with these KINSHIP_* settings (stderr to `log`); return it and the address it prints."""
    env = dict(os.environ)
    env.update(env_overrides)
    process = subprocess.Popen(
        [sys.executable, "-m", "kinship_service"], env=env, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:
        match = re.search(r"kinship-server listening on (\S+)", line)
        if match:
            return process, match.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"the server did not start; see {log}")


def server_pids(pid: int) -> list[int]:
    """The server process and its children (the heavy-work process of KINSHIP_HEAVY_PROCESS=true)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def proc_status(pid: int, field: str) -> float:
    """A /proc/<pid>/status field in MiB (VmHWM: peak RSS, VmRSS: current)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
