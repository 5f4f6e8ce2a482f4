"""bench/load.py runs end to end (a short, small run): the load generator itself stays working.

No timing assertions: the figures are for docs/reliability.md, measured with the full run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "load.py"),
            "--duration", "2", "--warmup", "0.5", "--clients", "8", "--channels", "2", "--rate", "100",
            "--light-models", "4", "--heavy-params", "2e6", "--dir", str(tmp_path / "work"), "--json", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["light_requests"] > 0
    for rpc in ("Kinship[FINGERPRINT]", "ShouldStop"):
        assert set(figures["per_rpc"][rpc]["codes"]) == {"OK"}, figures["per_rpc"][rpc]
    heavy_codes = {code for row in figures["heavy"].values() for code in row["codes"]}
    assert heavy_codes <= {"OK", "RESOURCE_EXHAUSTED", "JOB_SUCCEEDED", "CANCELLED_AT_END"}, figures["heavy"]
    assert figures["server_peak_rss_mib"] > 0
    assert figures["light_calls_per_front_cpu_s"] > 0 and figures["processor"]
    assert "light calls per CPU-second" in done.stdout and "load average before" in done.stdout
    assert "light load" in done.stdout and "server RSS" in done.stdout and "front event loop waited" in done.stdout
    assert figures["heavy_scheduling"] in ("idle", "nice") and figures["front_loop_run_queue_wait_s"] >= 0
