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


def run_queue_wait_seconds(pid: int, tid: int | None = None) -> float:
    """Seconds thread `tid` (default: the process's main thread) has waited runnable for a CPU (/proc/.../schedstat; NaN without it)."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def metric_value(port: int, name: str) -> float | None:
    """One unlabelled sample from the server's /metrics on loopback, or None (no such metric, or no endpoint)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None
