"""Admission control for heavy work: a bounded executor, a bounded queue, and request coalescing.

Heavy work (exact kinship passes, RegisterCheckpoint, the exact pass of RankCandidates and
ShouldStop) reads gigabytes and keeps cores busy for seconds to minutes. It never runs on a
gRPC handler thread directly; it runs on this module's executor of `KINSHIP_HEAVY_WORKERS`
threads, with at most `KINSHIP_HEAVY_QUEUE` computations waiting for one. The handler thread
of each caller only waits (in short slices, checking its own cancellation and deadline), so
light RPCs (fingerprint queries, ShouldStop over known values, job queries) keep being served
by the remaining handler threads whatever the heavy load.

The model, in one place:

- **Admission.** A new computation is admitted when fewer than `workers + queue` computations
  are admitted (running or queued), and fewer than `max_waiters` callers are already waiting on
  heavy work (so waiting callers can never occupy every gRPC handler thread). Otherwise the call
  fails at once with RESOURCE_EXHAUSTED (reason HEAVY_QUEUE_FULL) and a RetryInfo hint derived
  from the recent duration of heavy computations.
- **Coalescing.** Callers pass a canonical key of their request. A caller whose key is already
  being computed does not start a second computation: it waits for the same result (it still
  counts against `max_waiters`). Every waiter gets the result, or the same error.
- **Cancellation.** Each waiter stops waiting when its own call is cancelled or its deadline
  passes (CANCELLED / DEADLINE_EXCEEDED for that caller only). The computation continues while
  at least one caller still waits for it, and is cancelled (at its next cancellation check)
  once nobody waits; a later identical request then starts afresh.

Heavy threads (this executor's, the merge workers, the fused CPU kernel's and the read pool) run at a
lower scheduling priority (priority.py: nice +10, per thread, and in the heavy-work process SCHED_IDLE
with a starvation guard) so light work wins the CPU when both are runnable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from kinship_service.errors import Cancelled, ResourceExhausted
from kinship_service.server.metrics import REGISTRY
from kinship_service.server.priority import lower_heavy_threads, lower_own_priority

log = logging.getLogger("kinship.admission")

T = TypeVar("T")

WAIT_SLICE_SECONDS = 0.05
"""How often a waiting caller re-checks its own cancellation and deadline."""

ADMITTED = Counter(
    "kinship_heavy_admitted_total", "Heavy computations admitted, by kind.", ["kind"], registry=REGISTRY
)
COALESCED = Counter(
    "kinship_heavy_coalesced_total", "Heavy requests answered by joining an identical computation in flight.", ["kind"], registry=REGISTRY
)
REJECTED = Counter(
    "kinship_heavy_rejected_total", "Heavy requests refused with RESOURCE_EXHAUSTED (queue full).", ["kind"], registry=REGISTRY
)
ABANDONED = Counter(
    "kinship_heavy_abandoned_total", "Heavy computations cancelled because every caller gave up.", ["kind"], registry=REGISTRY
)
ADMITTED_NOW = Gauge("kinship_heavy_in_system", "Heavy computations admitted and not finished (running or queued).", registry=REGISTRY)
RUNNING_NOW = Gauge("kinship_heavy_running", "Heavy computations running on the heavy executor.", registry=REGISTRY)
WAITERS_NOW = Gauge("kinship_heavy_waiters", "Callers waiting for a heavy computation.", registry=REGISTRY)
HEAVY_SECONDS = Histogram(
    "kinship_heavy_seconds",
    "Run time of heavy computations, by kind.",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
    registry=REGISTRY,
)


@dataclass
class _Flight(Generic[T]):
    """One admitted computation and the callers waiting for it."""

    key: Hashable
    kind: str
    waiters: int = 0
    abandoned: threading.Event = field(default_factory=threading.Event)
    future: Future[T] = field(default_factory=Future)


class Admission:
    """Bounded heavy executor with coalescing; one per server (thread-safe). See the module docstring."""

    def __init__(self, workers: int, queue: int, max_waiters: int | None = None, *, name: str = "heavy") -> None:
        if workers < 1 or queue < 0:
            raise ValueError("heavy workers must be >= 1 and the heavy queue >= 0")
        self.workers = workers
        self.queue = queue
        # An explicit cap is honoured even below workers + queue (the server passes half its handler
        # threads): waiting callers must never hold every handler thread, whatever the queue size.
        self.max_waiters = max(1, max_waiters) if max_waiters is not None else 4 * (workers + queue)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=lower_own_priority)
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight[Any]] = {}
        self._admitted = 0
        self._waiters = 0
        self._closed = False
        self._recent: list[float] = []
        lower_heavy_threads()  # merge workers already run

    # -- the one entry point -----------------------------------------------------------------
    def run(
        self,
        key: Hashable,
        work: Callable[[Callable[[], None]], T],
        check_cancelled: Callable[[], None],
        *,
        kind: str = "heavy",
    ) -> T:
        """Run `work(check)` on the heavy executor (or join the identical computation in flight) and return its result.

        `key` is the canonical key of the request: equal keys mean identical requests.
        `work` receives a `check()` that raises Cancelled once nobody waits for the result
        any more; it should call it between chunks. `check_cancelled` is the caller's own
        per-call check (api.cancellation_check): when it raises, this caller stops waiting
        and the exception propagates to it. Raises ResourceExhausted when the heavy queue is
        full, and whatever `work` raised otherwise.
        """
        check_cancelled()
        flight = self._join_or_admit(key, work, kind)
        try:
            while True:
                try:
                    return flight.future.result(timeout=WAIT_SLICE_SECONDS)
                except TimeoutError:
                    if flight.future.done():  # the work itself raised TimeoutError
                        raise
                    check_cancelled()
        finally:
            self._leave(flight)

    def _join_or_admit(self, key: Hashable, work: Callable[[Callable[[], None]], T], kind: str) -> _Flight[T]:
        with self._lock:
            if self._closed:
                raise Cancelled("the server is shutting down; retry on another replica")
            flight = self._flights.get(key)
            if self._waiters >= self.max_waiters:
                REJECTED.labels(kind).inc()
                raise self._full(kind, "callers are already waiting for heavy work")
            if flight is not None:
                flight.waiters += 1
                self._waiters += 1
                WAITERS_NOW.set(self._waiters)
                COALESCED.labels(kind).inc()
                return flight
            if self._admitted >= self.workers + self.queue:
                REJECTED.labels(kind).inc()
                raise self._full(kind, "computations are running or queued")
            flight = _Flight[T](key=key, kind=kind, waiters=1)
            self._flights[key] = flight
            self._admitted += 1
            self._waiters += 1
            ADMITTED_NOW.set(self._admitted)
            WAITERS_NOW.set(self._waiters)
            ADMITTED.labels(kind).inc()
        try:
            self._executor.submit(self._execute, flight, work)
        except RuntimeError:  # executor shut down between the check and the submit
            with self._lock:
                self._flights.pop(key, None)
                self._admitted -= 1
                self._waiters -= 1
            raise Cancelled("the server is shutting down; retry on another replica") from None
        return flight

    def _full(self, kind: str, what: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"the server is at its limit for heavy work ({self._admitted} {what}; limits: "
            f"{self.workers} running, {self.queue} queued, {self.max_waiters} waiting callers); retry after the "
            "suggested delay, or use FINGERPRINT mode (answered without heavy work) where an estimate will do",
            reason="HEAVY_QUEUE_FULL",
            retry_after_seconds=self._retry_hint(),
        )

    def _retry_hint(self) -> float:
        """Seconds until a slot is likely free: the recent median heavy run time, scaled by the queue per worker."""
        if not self._recent:
            return 1.0
        ordered = sorted(self._recent)
        median = ordered[len(ordered) // 2]
        per_worker = max(1.0, self._admitted / self.workers)
        return float(min(300.0, max(0.5, median * per_worker)))

    def _leave(self, flight: _Flight[Any]) -> None:
        with self._lock:
            flight.waiters -= 1
            self._waiters -= 1
            WAITERS_NOW.set(self._waiters)
            if flight.waiters == 0 and not flight.future.done():
                # Nobody waits any more: stop the computation at its next check, and let an
                # identical request that arrives later start afresh.
                flight.abandoned.set()
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]
                ABANDONED.labels(flight.kind).inc()
                log.info("heavy computation abandoned by every caller; cancelling it", extra={"kind": flight.kind})

    def _execute(self, flight: _Flight[T], work: Callable[[Callable[[], None]], T]) -> None:
        lower_heavy_threads()  # the kernel's and the read pool appear on first use
        started = time.perf_counter()
        RUNNING_NOW.inc()
        try:
            if flight.abandoned.is_set():
                raise Cancelled("every caller gave up before the work started")

            def check() -> None:
                if flight.abandoned.is_set():
                    raise Cancelled("every caller cancelled or ran past its deadline; the work was stopped")

            result = work(check)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            flight.future.set_exception(exc)
        else:
            flight.future.set_result(result)
        finally:
            seconds = time.perf_counter() - started
            RUNNING_NOW.dec()
            HEAVY_SECONDS.labels(flight.kind).observe(seconds)
            with self._lock:
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]
                self._admitted -= 1
                ADMITTED_NOW.set(self._admitted)
                if not flight.abandoned.is_set():
                    self._recent = (self._recent + [seconds])[-32:]

    # -- introspection and shutdown ------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """Admitted computations, waiting callers and distinct keys in flight (tests, logs)."""
        with self._lock:
            return {"admitted": self._admitted, "waiters": self._waiters, "keys": len(self._flights)}

    def shutdown(self, wait: bool = False) -> None:
        """Refuse new work; cancel computations nobody needs once their callers are gone."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=False)
