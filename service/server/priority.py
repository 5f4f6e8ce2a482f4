"""Scheduling of heavy threads: `SCHED_IDLE` with a starvation guard, or nice values alone.

Heavy threads (the heavy executor's, the merge workers, the fused CPU kernel's pool and the
checkpoint read pool) run at nice +HEAVY_NICE over their process, and in the heavy-work process
with `KINSHIP_HEAVY_SCHEDULING=idle` (the default) also in `SCHED_IDLE`:

- why `SCHED_IDLE`: with nice values alone a core running a nice-15 heavy thread is busy to the
  scheduler, so each wake-up of the front's event loop was placed next to the load's other work
  (wake-affine) and waited behind it, and the front's p99 went from 10-14 ms to 555 ms on a quiet
  2-core machine (docs/reliability.md). A core running only `SCHED_IDLE` threads counts as idle:
  the front is woken there and runs at once.
- why a guard: `SCHED_IDLE` gets a core only when nothing else in its group wants it, so busy
  neighbours starved heavy work for minutes. `StarvationGuard` samples the heavy threads'
  CPU time and run-queue wait (`/proc/self/task/TID/schedstat`) every GUARD_WINDOW_SECONDS; when
  they wanted to run but got almost no CPU (`starved`), it moves them to `SCHED_OTHER` at their
  nice value for BOOST_SECONDS, then back. Heavy work thus always gets at least a nice-15 share
  about two thirds of the time, and the idle class whenever the machine has room.
- leaving `SCHED_IDLE` needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 - nice (Linux, sched(7)).
  Where that is refused (probed at start-up) or `/proc/self/task/*/schedstat` is missing, the
  process uses nice values alone and says so in one log line: never an idle class it cannot leave.

Everything is best effort (not Linux, not allowed): a failure leaves normal scheduling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import Counter, Gauge

from kinship_service.server.metrics import REGISTRY

log = logging.getLogger("kinship.priority")

HeavyScheduling = Literal["idle", "nice"]
HEAVY_SCHEDULING_CHOICES: tuple[HeavyScheduling, ...] = ("idle", "nice")

HEAVY_NICE = 10
"""Niceness added to heavy threads (Linux: per thread), so light work wins the CPU."""
HEAVY_THREAD_PREFIXES = ("heavy", "merge-", "kinship-kernel", "kinship-read")
"""Threads that do heavy work: the heavy executor (admission.py), merge workers and their math pool
(jobs/, merge/runner.py), the fused CPU kernel's pool (cpu_kernel.py), the checkpoint read pool (streaming.py)."""
NOT_HEAVY = ("merge-heartbeat", "merge-lease", "heavy-process")
"""Bookkeeping threads named like heavy ones (a starved lease renewal would hand a healthy job away; the front's watchers)."""

GUARD_WINDOW_SECONDS = 1.0
"""How often the guard looks at the heavy threads' CPU time and run-queue wait."""
BOOST_SECONDS = 2.0
"""How long starved heavy threads run in SCHED_OTHER (at their nice value) before going back to SCHED_IDLE."""
FULL_SCAN_EVERY = 10
"""Every this many windows the guard looks at every thread again, not only those it knows as heavy."""
STARVED_CPU_SHARE = 0.05
STARVED_WAIT_SHARE = 0.5
"""Starved: over a window the heavy threads ran less than 5% of it and waited in the run queue more than half of it."""

_SCHED_IDLE = getattr(os, "SCHED_IDLE", 5)
_SCHED_OTHER = getattr(os, "SCHED_OTHER", 0)

BOOSTS = Counter(
    "kinship_heavy_priority_boosts_total",
    "Times the starvation guard moved starved heavy threads from SCHED_IDLE to SCHED_OTHER for a while.",
    registry=REGISTRY,
)
BOOSTED = Gauge("kinship_heavy_priority_boosted", "1 while heavy threads run boosted out of SCHED_IDLE.", registry=REGISTRY)
IDLE_CLASS = Gauge("kinship_heavy_idle_class", "1 when heavy threads run in SCHED_IDLE with the starvation guard.", registry=REGISTRY)


def starved(cpu_seconds: float, wait_seconds: float, window_seconds: float) -> bool:
    """Whether heavy threads that ran `cpu_seconds` and waited `wait_seconds` runnable over a window were starved."""
    return cpu_seconds < STARVED_CPU_SHARE * window_seconds and wait_seconds > STARVED_WAIT_SHARE * window_seconds


@dataclass
class _Mode:
    idle: bool = False
    guard: StarvationGuard | None = None


_mode = _Mode()
_reniced: set[int] = set()
_lock = threading.Lock()


def heavy_nice_level() -> int:
    """The nice value heavy threads run at: their process's plus HEAVY_NICE, at most 19."""
    try:
        return min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + HEAVY_NICE)
    except (OSError, AttributeError):
        return 19


def _set_policy(tid: int, policy: int) -> bool:
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(0))
        return True
    except (OSError, AttributeError):  # gone, not allowed, not Linux
        return False


def can_leave_idle_class() -> bool:
    """Whether a thread at the heavy nice value may move from SCHED_IDLE back to SCHED_OTHER here (probed on a scratch thread)."""
    if not Path("/proc/self/task").is_dir() or not hasattr(os, "sched_setscheduler"):
        return False
    try:  # an unprivileged thread may leave SCHED_IDLE when RLIMIT_NICE allows its nice value: raise the soft limit
        import resource  # POSIX only

        soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
        wanted = 20 - heavy_nice_level()
        if soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
            resource.setrlimit(resource.RLIMIT_NICE, (wanted, hard))
    except (OSError, ValueError, AttributeError, ImportError):
        pass
    result: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, heavy_nice_level())
        except OSError:
            result.append(False)
            return
        left = _set_policy(tid, _SCHED_IDLE) and _set_policy(tid, _SCHED_OTHER)
        result.append(left and Path(f"/proc/self/task/{tid}/schedstat").exists())

    thread = threading.Thread(target=probe, name="priority-probe")
    thread.start()
    thread.join()
    return bool(result and result[0])


def configure(scheduling: HeavyScheduling) -> bool:
    """Choose this process's heavy-thread scheduling (call once, before heavy threads start); True if SCHED_IDLE is on.

    `idle` falls back to nice values where SCHED_IDLE could not be left again (see the module docstring).
    """
    if scheduling not in HEAVY_SCHEDULING_CHOICES:
        raise ValueError(f"heavy scheduling must be one of {', '.join(HEAVY_SCHEDULING_CHOICES)}, not {scheduling!r}")
    if scheduling == "idle" and not can_leave_idle_class():
        log.warning(
            "heavy threads use nice values only: leaving SCHED_IDLE needs CAP_SYS_NICE (or RLIMIT_NICE >= %d) and "
            "/proc/self/task/*/schedstat; grant the capability for a lower light-call tail, or set KINSHIP_HEAVY_SCHEDULING=nice",
            20 - heavy_nice_level(),
        )
        scheduling = "nice"
    with _lock:
        _mode.idle = scheduling == "idle"
        if _mode.idle and _mode.guard is None:
            _mode.guard = StarvationGuard()
            _mode.guard.start()
    IDLE_CLASS.set(1 if _mode.idle else 0)
    return _mode.idle


def lower_priority(tid: int) -> None:
    """Make thread `tid` a heavy thread, once: nice +HEAVY_NICE, and SCHED_IDLE when configured."""
    with _lock:
        if tid in _reniced:
            return
        _reniced.add(tid)
        idle = _mode.idle
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + HEAVY_NICE))
    except (OSError, AttributeError):  # not Linux, or not allowed: run at normal priority
        return
    if idle:
        _set_policy(tid, _SCHED_IDLE)


def lower_own_priority() -> None:
    """The calling thread becomes a heavy thread (a ThreadPoolExecutor initializer)."""
    lower_priority(threading.get_native_id())


def is_heavy_thread_name(name: str) -> bool:
    return name.startswith(HEAVY_THREAD_PREFIXES) and not name.startswith(NOT_HEAVY)


def lower_heavy_threads() -> None:
    """Give every heavy thread of the process (HEAVY_THREAD_PREFIXES) the lower priority, once each."""
    for thread in threading.enumerate():
        if thread.native_id is not None and is_heavy_thread_name(thread.name):
            lower_priority(thread.native_id)


def _read_task(task: Path) -> tuple[int, int, int, int] | None:
    """(policy, nice, cpu ns, run-queue wait ns) of one thread, or None if it is gone."""
    try:
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        cpu, wait, _ = (task / "schedstat").read_text().split()
        return int(fields[38]), int(fields[16]), int(cpu), int(wait)
    except (OSError, ValueError, IndexError):
        return None


class StarvationGuard:
    """Moves starved SCHED_IDLE heavy threads to SCHED_OTHER for BOOST_SECONDS at a time (see the module docstring).

    Heavy threads are those in SCHED_IDLE (threads they start, OpenMP's or numba's, inherit it),
    those made heavy by `lower_priority`, and those the guard boosted; never a thread by its nice
    value alone (under `nice -n 19` every thread has the heavy nice value).
    """

    def __init__(self, window_seconds: float = GUARD_WINDOW_SECONDS, boost_seconds: float = BOOST_SECONDS) -> None:
        self.window_seconds = window_seconds
        self.boost_seconds = boost_seconds
        self.boosts = 0
        self._scans = 0
        self._not_heavy: set[int] = set()
        self._boosted: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="priority-guard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _heavy_threads(self) -> dict[int, tuple[int, int, int]]:
        """{tid: (policy, cpu ns, wait ns)} of the process's heavy threads now.

        Threads found not heavy are skipped afterwards (2 ms of CPU a window with 40 threads otherwise),
        except every FULL_SCAN_EVERY windows: a thread id can be reused by a new, heavy thread.
        """
        self._scans += 1
        if self._scans % FULL_SCAN_EVERY == 0:
            self._not_heavy.clear()
        found: dict[int, tuple[int, int, int]] = {}
        with _lock:
            registered = _reniced | self._boosted
        for task in Path("/proc/self/task").iterdir():
            tid = int(task.name)
            if tid in self._not_heavy and tid not in registered:
                continue
            sample = _read_task(task)
            if sample is None:
                continue
            if sample[0] == _SCHED_IDLE or tid in registered:
                found[tid] = (sample[0], sample[2], sample[3])
            else:
                self._not_heavy.add(tid)
        return found

    def _move(self, tids: list[int], policy: int) -> None:
        for tid in tids:
            if _set_policy(tid, policy) and policy == _SCHED_OTHER:
                self._boosted.add(tid)
        if policy == _SCHED_IDLE:
            self._boosted.clear()

    def _watch(self) -> None:
        before, at = self._heavy_threads(), time.monotonic()
        boost_ends: float | None = None
        while not self._stop.wait(self.window_seconds):
            now, now_at = self._heavy_threads(), time.monotonic()
            if boost_ends is not None:
                if now_at >= boost_ends:
                    self._move([t for t in now if t in self._boosted], _SCHED_IDLE)
                    boost_ends = None
                    BOOSTED.set(0)
                else:  # threads started during the boost join it
                    self._move([t for t, s in now.items() if s[0] == _SCHED_IDLE], _SCHED_OTHER)
            else:
                common = [t for t in now if t in before]
                cpu = sum(now[t][1] - before[t][1] for t in common) / 1e9
                wait = sum(now[t][2] - before[t][2] for t in common) / 1e9
                if starved(cpu, wait, now_at - at):
                    self._move([t for t, sample in now.items() if sample[0] == _SCHED_IDLE], _SCHED_OTHER)
                    boost_ends = now_at + self.boost_seconds
                    self.boosts += 1
                    BOOSTS.inc()
                    BOOSTED.set(1)
                    if self.boosts == 1:
                        log.warning(
                            "heavy threads were starved in SCHED_IDLE (%.3f s of CPU, %.2f s waiting in %.1f s); they run at "
                            "nice %d for %.0f s whenever that happens (kinship_heavy_priority_boosts_total counts it)",
                            cpu, wait, now_at - at, heavy_nice_level(), self.boost_seconds,
                        )
            before, at = now, now_at
