"""Heavy threads in SCHED_IDLE with a starvation guard (service/server/priority.py), on a real server.

What must hold: heavy work finishes next to busy loops that keep every core it may use busy (the
guard moves its starved threads to their nice value for a while); the front and the heavy-work
process's own handler threads never run SCHED_IDLE. No timing assertions: only that the work
completes, within the test's generous timeout, with the right answer.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from kinship_client import KinshipClient
from kinship_service.checkpoints.synthetic import LlamaShape, make_base, make_family, save_checkpoint
from kinship_service.config import ConfigError, Settings
from kinship_service.server.priority import configure, starved

from .test_front import Split

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux scheduling")

# About 4M parameters: an exact pass over base + 2 models takes a few hundred ms of CPU, far more
# than SCHED_IDLE threads get next to busy loops before the guard steps in.
MEDIUM = LlamaShape(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=2)


def test_starved_means_wanting_the_cpu_and_not_getting_it() -> None:
    assert starved(cpu_seconds=0.001, wait_seconds=0.9, window_seconds=1.0)
    assert not starved(cpu_seconds=0.3, wait_seconds=0.9, window_seconds=1.0)  # it ran: not starved
    assert not starved(cpu_seconds=0.0, wait_seconds=0.1, window_seconds=1.0)  # it slept: nothing to do


def test_the_setting_takes_idle_or_nice_only() -> None:
    assert Settings.from_env({"KINSHIP_HEAVY_SCHEDULING": " Nice "}).heavy_scheduling == "nice"
    assert Settings.from_env({}).heavy_scheduling == "idle"
    with pytest.raises(ConfigError, match="KINSHIP_HEAVY_SCHEDULING='fifo': use idle or nice"):
        Settings.from_env({"KINSHIP_HEAVY_SCHEDULING": "fifo"})
    with pytest.raises(ValueError, match="one of idle, nice"):
        configure("fifo")  # type: ignore[arg-type]


def _can_leave_idle_class() -> bool:
    """The test's own probe: may a thread at nice 15 go SCHED_IDLE -> SCHED_OTHER here (root, CAP_SYS_NICE)?"""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return outcome[0]


def _policies(pid: int) -> dict[int, tuple[int, int]]:
    """{tid: (scheduling policy, nice)} of a process's threads, from /proc."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(task.name)] = (int(fields[38]), int(fields[16]))
    return found


def reference_pcc(root: Path, a: str, b: str) -> float:
    base = load_file(str(root / "base" / "model.safetensors"))
    first = load_file(str(root / a / "model.safetensors"))
    second = load_file(str(root / b / "model.safetensors"))
    names = sorted(base)
    x = np.concatenate([(first[n].astype(np.float64) - base[n].astype(np.float64)).ravel() for n in names])
    y = np.concatenate([(second[n].astype(np.float64) - base[n].astype(np.float64)).ravel() for n in names])
    return float(np.corrcoef(x, y)[0, 1])


@pytest.fixture(scope="module")
def medium_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("priority-models")
    base = make_base(MEDIUM, seed=0)
    save_checkpoint(base, root / "base")
    for i, model in enumerate(make_family(base, 2, rho=0.5, seed=1)):
        save_checkpoint(model, root / f"m{i}")
    return root


@pytest.fixture
def two_cores() -> Iterator[set[int]]:
    """At most two of the CPUs this process may use: the server and the busy loops share them (a 2-core machine anywhere)."""
    allowed = sorted(os.sched_getaffinity(0))
    yield set(allowed[:2])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_heavy_work_completes_next_to_busy_loops(medium_root: Path, tmp_path: Path, two_cores: set[int]) -> None:
    # The same session as the server (no setsid): with scheduler autogroups, that is where SCHED_IDLE starves.
    loops = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, two_cores)
        )
        for _ in two_cores
    ]
    split = None
    try:
        split = Split(medium_root, tmp_path, preexec_fn=lambda: os.sched_setaffinity(0, two_cores))
        idle_expected = _can_leave_idle_class()
        with KinshipClient(split.address, timeout=1100) as client:
            started = time.monotonic()
            result = client.kinship(str(medium_root / "base"), [str(medium_root / "m0"), str(medium_root / "m1")], mode="exact")
            print(f"exact pass next to {len(loops)} busy loops: {time.monotonic() - started:.1f} s")  # for the record, not asserted
            threads = _policies(split.heavy_pid)
            front_threads = _policies(split.process.pid)
        (pair,) = result.pairs
        assert math.isclose(pair.values.pcc, reference_pcc(medium_root, "m0", "m1"), rel_tol=1e-9, abs_tol=1e-12)
        assert all(policy != os.SCHED_IDLE for policy, _ in front_threads.values())
        assert _policies(split.heavy_pid)[split.heavy_pid][0] == os.SCHED_OTHER  # its main and handler threads stay normal
        heavy_nice = min(19, threads[split.heavy_pid][1] + 10)
        assert any(nice >= heavy_nice for _, nice in threads.values()), threads  # the heavy executor's thread, at least
        idle = [tid for tid, (policy, _) in threads.items() if policy == os.SCHED_IDLE]
        assert all(threads[tid][1] >= heavy_nice for tid in idle), threads  # only heavy threads run in idle time
        if idle_expected:
            assert split.metric("kinship_heavy_idle_class") == 1
            # the pass could not have finished in idle time alone next to the loops: the guard moved its threads
            assert split.metric("kinship_heavy_priority_boosts_total") >= 1, split.log.read_text()[-4000:]
        else:  # no CAP_SYS_NICE: nice values only, never an idle class the threads could not leave
            assert not idle and split.metric("kinship_heavy_idle_class") == 0
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
        if split is not None:
            split.stop()
