"""Merge jobs across replicas (`KINSHIP_STATE_URL`): the job pool of manager.py over the PostgreSQL registry.

Any replica accepts StartMerge (idempotent by request_id cluster-wide: a unique index) and
answers Get, List, Watch and Cancel for every job. Jobs are not run by the replica that accepted
them but by whichever replica claims them first (pg_store.PgJobStore.claim, `FOR UPDATE SKIP
LOCKED`) with a lease of `KINSHIP_JOB_LEASE_SECONDS`, renewed every third of it:

- the lease renewal reports a cancel requested on any replica; the runner stops at its next
  check, removes its temporary directory and ends the job CANCELLED;
- a replica that dies (SIGKILL, OOM, a lost node) stops renewing; once its lease expired another
  replica claims the job again, removes the dead attempt's temporary directory and runs it from
  the start in a directory of its own; after `KINSHIP_JOB_MAX_ATTEMPTS` attempts it ends FAILED
  (JOB_ATTEMPTS_EXHAUSTED). Outputs appear only by the runner's final rename, so nothing
  half-written is ever published;
- a replica shutting down (SIGTERM) gives its running jobs the grace period, then hands them back
  to the queue for another replica, without counting the attempt;
- a replica whose lease was taken over (it stalled past the lease) stops its run, and its writes
  no longer reach the job (every runner write is guarded by its owner);
- a runner that loses the database after publishing its output keeps trying to record
  SUCCEEDED until the database is back; if it dies first, the next claim finds the published
  output naming the job (the model card's `kinship_job`) and records SUCCEEDED without running
  it again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from kinship_service.config import Settings
from kinship_service.errors import InvalidArgument, KinshipError, ResourceExhausted, Unavailable
from kinship_service.jobs.manager import _LIVE_OWNERS, MergeJobManager, _Live
from kinship_service.jobs.pg_store import Abandoned, PgJobStore
from kinship_service.jobs.records import FINAL, JobRecord, MergeRequest
from kinship_service.merge.output import remove_tree
from kinship_service.state.database import Database

log = logging.getLogger("kinship.jobs")

POLL_SECONDS = 1.0
"""How often an idle replica looks for queued jobs (a StartMerge on this replica wakes it at once)."""
FINAL_SAVE_MAX_DELAY_SECONDS = 5.0
"""The longest wait between tries to record a job's final state while the database is away."""
WATCH_POLL_SECONDS = 0.5
"""How often WatchMergeJob reads a job that another replica runs."""


def _normal_priority() -> None:
    """Give the calling thread normal scheduling, where allowed (root, CAP_SYS_NICE; best effort).

    Heavy threads of the heavy-work process may run SCHED_IDLE (server/priority.py), which a node
    kept busy by other processes starves, and this thread may have been started by one: a starved
    lease renewal would hand a healthy job to another replica. Linux schedules threads one by one,
    so this thread alone leaves SCHED_IDLE.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass


class ClusterJobManager(MergeJobManager):
    """Merge jobs in PostgreSQL, run by whichever replica claims them; see the module docstring."""

    def __init__(self, settings: Settings, database: Database) -> None:
        super().__init__(settings)
        self.database = database
        self.jobs = PgJobStore(database)
        self._wake = threading.Event()
        self._claim_failing = False
        self._lost: set[str] = set()
        """Jobs whose lease another replica took over: stopped here without writing."""

    def start(self) -> None:
        """Start the claiming workers and the lease renewal (the database was migrated at start-up)."""
        if self._store is not None:
            return
        self._store = self.jobs
        _LIVE_OWNERS.add(self.owner)
        for i in range(self.settings.max_merge_jobs):
            thread = threading.Thread(target=self._claim_loop, name=f"merge-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        renew = threading.Thread(target=self._lease_loop, name="merge-lease", daemon=True)
        renew.start()
        self._threads.append(renew)

    def shutdown(self, grace: float = 0.0) -> None:
        self._wake.set()
        super().shutdown(grace)

    # -- requests ------------------------------------------------------------------------------
    def submit(self, request: MergeRequest) -> JobRecord:
        """Queue a merge for any replica; the same request_id on any replica returns the existing job."""
        existing, record = self._new_record(request)
        if existing is not None:
            return existing
        if self._closing:
            raise Unavailable("the server is shutting down; retry on another replica", reason="SHUTTING_DOWN")
        queued = self.jobs.queued()
        if queued >= self.settings.max_queued_merge_jobs + self.settings.max_merge_jobs:
            raise ResourceExhausted(
                f"{queued} merge jobs wait for a replica (KINSHIP_MAX_QUEUED_MERGE_JOBS + KINSHIP_MAX_MERGE_JOBS, "
                "cluster-wide); retry later",
                reason="MERGE_QUEUE_FULL",
                retry_after_seconds=self._retry_hint(),
            )
        clash = self.jobs.insert(record)  # OUTPUT_BUSY when any replica's active job writes that output
        if clash is not None:
            return self._same_request(clash, request)
        self._wake.set()
        log.info("merge job queued", extra={"job_id": record.job_id, "output": record.output_dir})
        return record

    def cancel(self, job_id: str, wait_seconds: float = 30.0) -> JobRecord:
        """Cancel a job on any replica; returns it CANCELLED, or in its final state when it ended first."""
        if not job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        record = self.jobs.request_cancel(job_id)  # NOT_FOUND when there is none
        with self._cond:
            live = self._live.get(job_id)
        if live is not None:
            live.cancel.set()
        if record.state in FINAL:
            return record
        # Running somewhere: its runner sees the flag within a third of the lease, then stops and cleans up.
        waited = 0.0
        while waited < wait_seconds:
            current = self.get(job_id)
            if current.state in FINAL:
                return current
            self._stop.wait(WATCH_POLL_SECONDS)
            waited += WATCH_POLL_SECONDS
        return self.get(job_id)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True) -> Iterator[JobRecord]:
        """Yield the job now and after every change, ending after its final state (polls jobs other replicas run)."""
        last: JobRecord | None = None
        while True:
            current = self.get(job_id)
            same = last is not None and replace(current, version=0) == replace(last, version=0)
            if not same:
                last = current
                yield current
                if current.state in FINAL:
                    return
            if not is_active() or self._stop.is_set():
                return
            with self._cond:
                local = job_id in self._live
                if local:
                    self._cond.wait(timeout=WATCH_POLL_SECONDS)  # woken by this replica's progress
            if not local:
                self._stop.wait(WATCH_POLL_SECONDS)  # another replica runs it: read it again soon

    # -- running -------------------------------------------------------------------------------
    def _claim_loop(self) -> None:
        while not self._stop.is_set():
            if self._closing:
                return
            try:
                claimed = self.jobs.claim(self.owner, self.settings.job_lease_seconds, self.settings.job_max_attempts)
                if self._claim_failing:
                    self._claim_failing = False
                    log.info("claiming merge jobs again")
            except KinshipError as exc:  # the database is unreachable: try again later (logged once per outage)
                if not self._claim_failing:
                    self._claim_failing = True
                    log.warning("cannot claim merge jobs until the database is back", extra={"error": exc.message})
                claimed = None
            except Exception:  # a bug: keep the worker alive
                log.exception("claiming merge jobs failed")
                claimed = None
            if claimed is None:
                self._wake.wait(POLL_SECONDS)
                self._wake.clear()
                continue
            if claimed.stale_tmp_dir is not None:
                remove_tree(claimed.stale_tmp_dir)  # the dead runner's partial output
            if isinstance(claimed, Abandoned):
                log.warning(
                    "merge job of a stopped replica ended",
                    extra={"job_id": claimed.record.job_id, "state": claimed.record.state},
                )
                continue
            log.info("merge job claimed", extra={"job_id": claimed.record.job_id, "attempt": claimed.attempt})
            live = _Live(claimed.record)
            with self._cond:
                if self._closing:  # claimed while shutting down: hand it straight back
                    self._release(live.record)
                    return
                self._live[live.record.job_id] = live
                self._running += 1
                self._cond.notify_all()
            try:
                self._run(live)
            finally:
                with self._cond:
                    self._running -= 1
                    self._lost.discard(live.record.job_id)

    def _lease_loop(self) -> None:
        _normal_priority()
        interval = self.settings.job_lease_seconds / 3
        while not self._stop.wait(interval):
            with self._cond:
                running = dict(self._live)
            if not running:
                continue
            try:
                held = self.jobs.renew(self.owner, self.settings.job_lease_seconds)
            except KinshipError as exc:
                log.warning("cannot renew merge job leases", extra={"error": exc.message})
                continue
            except Exception:
                log.exception("renewing merge job leases failed")
                continue
            for job_id, live in running.items():
                if job_id not in held:
                    # Another replica took the job over (this one stalled past its lease): stop, write nothing.
                    with self._cond:
                        if job_id in self._live:
                            self._lost.add(job_id)
                            live.shutdown.set()
                elif held[job_id]:
                    live.cancel.set()

    def _save(self, record: JobRecord) -> None:
        if record.job_id in self._lost:
            return
        if record.state not in FINAL:
            super()._save(record)  # a progress snapshot: the next one supersedes a lost one
            return
        # A final state must land: lost, it would leave the job RUNNING under a lease nobody renews.
        # Retry while the database is away; the job stays live meanwhile, so its lease is renewed
        # as soon as the database is back. If this replica stops first, the next claim finds the
        # published output naming the job and records SUCCEEDED (pg_store.PgJobStore.claim).
        delay, warned = POLL_SECONDS, False
        while True:
            try:
                self.store.save(record)
            except KinshipError as exc:
                if not warned:
                    warned = True
                    log.warning(
                        "cannot record the end of a merge job until the database is back",
                        extra={"job_id": record.job_id, "state": record.state, "error": exc.message},
                    )
                if self._closing or self._stop.wait(delay) or record.job_id in self._lost:
                    return
                delay = min(2 * delay, FINAL_SAVE_MAX_DELAY_SECONDS)
                continue
            except Exception:  # a bug: logged, the worker stays alive
                log.exception("cannot persist merge job %s (state %s)", record.job_id, record.state)
                return
            if warned:
                log.info("recorded the end of a merge job", extra={"job_id": record.job_id, "state": record.state})
            return

    def _finish(self, live: _Live, state: str, error: Any) -> None:
        if live.record.job_id in self._lost:
            with self._cond:
                self._live.pop(live.record.job_id, None)
                self._cond.notify_all()
            live.done.set()
            log.warning("merge job taken over by another replica; stopped here", extra={"job_id": live.record.job_id})
            return
        super()._finish(live, state, error)

    def _release(self, record: JobRecord) -> None:
        try:
            self.jobs.release(record)
        except KinshipError as exc:  # its lease expires and another replica takes it then
            log.warning("cannot hand a merge job back", extra={"job_id": record.job_id, "error": exc.message})

    def _interrupted(self, live: _Live) -> None:
        """This replica shuts down: the job goes back to the queue for another replica (or this one, restarted)."""
        if live.record.job_id not in self._lost:
            self._release(live.record)
            log.info("merge job handed back to the queue", extra={"job_id": live.record.job_id})
        with self._cond:
            self._live.pop(live.record.job_id, None)
            self._cond.notify_all()
        live.done.set()
