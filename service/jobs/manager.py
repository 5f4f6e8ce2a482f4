"""Merge jobs: a bounded worker pool over the persistent registry.

`MergeJobManager` accepts merge requests (idempotent by request id), runs at most
`KINSHIP_MAX_MERGE_JOBS` at once with at most `KINSHIP_MAX_QUEUED_MERGE_JOBS` waiting (beyond that
RESOURCE_EXHAUSTED with a retry hint), and lets callers get, list (paginated, newest first),
cancel and watch them. The registry is `store.JobStore` (SQLite under `KINSHIP_CACHE_DIR/jobs`);
the records are `records`. With `KINSHIP_STATE_URL`, `cluster.ClusterJobManager` runs this pool
over the PostgreSQL registry shared by every replica (state/backend.py chooses).

Each job row records its owner (host, pid and a per-start nonce) and a heartbeat. On start-up, and
periodically, jobs still QUEUED or RUNNING whose owner is gone (same host and the process is dead,
or no heartbeat for `STALE_SECONDS`) become FAILED with reason SERVER_RESTARTED and their temporary
directories are removed: a job is never silently lost, and never looks finished when it is not.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from kinship_service.checkpoints.safetensors_header import read_checkpoint_headers
from kinship_service.checkpoints.sources import CheckpointSpec, LocalPath, describe, resolve
from kinship_service.config import Settings
from kinship_service.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    KinshipError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    status_code_number,
)
from kinship_service.jobs.executor import MergeExecutor, PlannedMerge, default_executor
from kinship_service.jobs.records import (
    ACTIVE,
    CANCELLED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobError,
    JobRecord,
    MergeRequest,
    input_fields,
    job_error_from_os,
)
from kinship_service.jobs.store import JobRegistry, JobStore
from kinship_service.merge.model_card import ModelCard, published_job_id
from kinship_service.merge.output import remove_tree, resolve_output_dir, temp_dir_for
from kinship_service.merge.plan import MergeSettings
from kinship_service.merge.runner import Progress
from kinship_service.merge.slerp import InterpolationSpec
from kinship_service.server import metrics

log = logging.getLogger("kinship.jobs")

STALE_SECONDS = 120.0
"""A job whose owner has not written a heartbeat for this long is considered abandoned."""
HEARTBEAT_SECONDS = 10.0
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_NOTIFY_SECONDS = 0.2
_PERSIST_SECONDS = 2.0

_LIVE_OWNERS: set[str] = set()
"""Owners (managers) alive in this process, so a second manager on one directory spares them."""


@dataclass
class _Live:
    """A job this process owns and has not finished."""

    record: JobRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    last_notify: float = 0.0
    last_persist: float = 0.0


def _owner_alive(owner: str, me: str) -> bool:
    """Whether the process that owns a job row may still be working on it."""
    if owner in _LIVE_OWNERS:
        return True
    try:
        host, pid_text, _nonce = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    my_host, my_pid, _ = me.rsplit(":", 2)
    if host != my_host:
        return True  # another machine: only the heartbeat can tell
    if pid == int(my_pid):
        return False  # our pid, but not a live manager here: an earlier incarnation
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MergeJobManager:
    """Runs merge jobs; see the module docstring."""

    def __init__(self, settings: Settings, executor: MergeExecutor | None = None) -> None:
        self.settings = settings
        self.executor = executor if executor is not None else default_executor(settings)
        """Where merges run (`jobs.executor`): here, or on the Ray cluster (KINSHIP_RAY_ADDRESS)."""
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.output_registrar: Callable[[CheckpointSpec, CheckpointSpec], None] | None = None
        """Set by the server wiring: `registrar(output, base)` caches a finished output's fingerprint and delta."""
        self._store: JobRegistry | None = None
        self._cond = threading.Condition()
        self._live: dict[str, _Live] = {}
        self._queue: deque[str] = deque()
        self._running = 0
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def _register_output(self, live: _Live, base: CheckpointSpec) -> None:
        """Cache the finished output's fingerprint and delta; a failure here does not fail the merge.

        The output was just written, so this pass reads it from the page cache, not the disk.
        """
        assert self.output_registrar is not None
        try:
            self.output_registrar(LocalPath(live.record.output_dir), base)
        except Exception as exc:  # any failure: the merged model is complete and valid either way
            log.warning(
                "merged model not registered in the cache",
                extra={"job_id": live.record.job_id, "error": str(exc)},
            )

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def store(self) -> JobRegistry:
        """The open registry; UNAVAILABLE saying why when it could not be opened."""
        if self._store is None:
            raise Unavailable(
                f"merge jobs are unavailable: the job registry under {self.settings.cache_dir}/jobs could not be "
                "opened (see the server log); fix KINSHIP_CACHE_DIR and restart",
                reason="JOBS_UNAVAILABLE",
            )
        return self._store

    def start(self) -> None:
        """Open the registry, fail jobs abandoned by a dead server, start the workers."""
        if self._store is not None:
            return
        path = Path(self.settings.cache_dir) / "jobs" / "jobs.sqlite3"
        try:
            self._store = JobStore(path)
        except (OSError, sqlite3.Error) as exc:
            # The rest of the service still works; merge RPCs answer UNAVAILABLE saying why.
            log.error("merge jobs disabled: cannot open the job registry %s: %s", path, exc)
            return
        _LIVE_OWNERS.add(self.owner)
        self._recover(startup=True)
        for i in range(self.settings.max_merge_jobs):
            thread = threading.Thread(target=self._worker, name=f"merge-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        beat = threading.Thread(target=self._heartbeat_loop, name="merge-heartbeat", daemon=True)
        beat.start()
        self._threads.append(beat)

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop: queued jobs fail now, running ones get `grace` seconds to finish, then are stopped."""
        with self._cond:
            if self._closing or self._store is None:
                return
            self._closing = True
            queued = [self._live[j] for j in self._queue if j in self._live]
            self._queue.clear()
        error = JobError(
            status_code_number(grpc.StatusCode.UNAVAILABLE),
            "the server shut down before this job ran; start it again",
            "SERVER_SHUTDOWN",
        )
        for live in queued:
            self._finish(live, FAILED, error)
        deadline = time.monotonic() + grace
        running = [live for live in list(self._live.values()) if live.record.state == RUNNING]
        for live in running:
            live.done.wait(max(0.0, deadline - time.monotonic()))
        for live in running:
            live.shutdown.set()
        for live in running:
            live.done.wait(60.0)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5.0)
        _LIVE_OWNERS.discard(self.owner)
        self.store.close()
        self._store = None

    def _recover(self, startup: bool) -> None:
        store = self.store
        assert isinstance(store, JobStore)  # the SQLite registry; across replicas leases do this (cluster.py)
        now = time.time()
        for owner, heartbeat, record in store.active_rows():
            if owner == self.owner:
                continue
            stale = now - heartbeat > STALE_SECONDS
            if _owner_alive(owner, self.owner) and not stale:
                continue
            remove_tree(Path(record.tmp_dir))
            if published_job_id(Path(record.output_dir)) == record.job_id:
                # It published its whole output, then stopped before recording SUCCEEDED.
                done = record.published(now)
                self.store.save(done)
                log.warning("merge job of a stopped server had published its output: succeeded", extra={"job_id": record.job_id})
                continue
            failed = replace(
                record,
                state=FAILED,
                end_time=now,
                eta_seconds=0.0,
                error=JobError(
                    status_code_number(grpc.StatusCode.ABORTED),
                    f"the server stopped (crash, kill or restart) while this job was {record.state.lower()}; "
                    "its partial output was removed; start the merge again",
                    "SERVER_RESTARTED",
                ),
            )
            self.store.save(failed)
            log.warning("merge job abandoned by a stopped server marked failed", extra={"job_id": record.job_id, "owner": owner})

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                store = self.store
                assert isinstance(store, JobStore)
                store.heartbeat(self.owner)
                self._recover(startup=False)
            except Exception:  # any failure: keep beating; the next round retries
                log.exception("merge job heartbeat failed")

    # -- requests ------------------------------------------------------------------------------
    def submit(self, request: MergeRequest) -> JobRecord:
        """Queue a merge; the same request_id returns the existing job (ALREADY_EXISTS if the request differs)."""
        existing, record = self._new_record(request)
        if existing is not None:
            return existing
        job_id = record.job_id
        with self._cond:
            if self._closing:
                raise Unavailable("the server is shutting down; retry on another replica", reason="SHUTTING_DOWN")
            for live in self._live.values():
                if live.record.output_dir == record.output_dir:
                    raise FailedPrecondition(
                        f"job {live.record.job_id} is already writing {request.output_path}; wait for it or choose another path",
                        reason="OUTPUT_BUSY",
                        field="output_path",
                    )
            capacity = self.settings.max_merge_jobs + self.settings.max_queued_merge_jobs
            if len(self._queue) + self._running >= capacity:
                raise ResourceExhausted(
                    f"{self._running} merge jobs are running and {len(self._queue)} are queued (the limit); retry later",
                    reason="MERGE_QUEUE_FULL",
                    retry_after_seconds=self._retry_hint(),
                )
            clash = self.store.insert(record)
            if clash is not None:
                return self._same_request(clash, request)
            self._live[job_id] = _Live(record)
            self._queue.append(job_id)
            self._cond.notify_all()
        log.info("merge job queued", extra={"job_id": job_id, "output": record.output_dir})
        return record

    def _new_record(self, request: MergeRequest) -> tuple[JobRecord | None, JobRecord]:
        """(the job already started with this request id, or None; else the new QUEUED record, validated).

        Checks what can be checked now, so a bad request fails the call, not later as the job's
        failure: the inputs' headers (NOT_FOUND, PERMISSION_DENIED, CORRUPT_SAFETENSORS), the output path.
        """
        roots = self.settings.allowed_roots
        if request.request_id:
            existing = self.store.by_request_id(request.request_id)
            if existing is not None:
                return self._same_request(existing, request), existing
        for spec, name in zip(request.inputs, input_fields(request), strict=True):
            if isinstance(spec, LocalPath):
                read_checkpoint_headers(resolve(spec, roots, name))
        root = Path(self.settings.output_root)
        root.mkdir(parents=True, exist_ok=True)
        final_dir = resolve_output_dir(root, request.output_path)
        if final_dir.exists() and not request.overwrite:
            raise AlreadyExists(
                f"output {request.output_path} already exists under the output root; choose another path or set overwrite",
                reason="OUTPUT_EXISTS",
                field="output_path",
            )
        job_id = uuid.uuid4().hex
        record = JobRecord(
            job_id=job_id,
            request=request,
            state=QUEUED,
            output_dir=str(final_dir),
            tmp_dir=str(temp_dir_for(final_dir, job_id)),
            create_time=time.time(),
            owner=self.owner,
        )
        return None, record

    @staticmethod
    def _same_request(existing: JobRecord, request: MergeRequest) -> JobRecord:
        if existing.request.to_json() != request.to_json():
            raise AlreadyExists(
                f"request_id {request.request_id!r} was already used for a different merge (job {existing.job_id}); "
                "use a new request_id",
                reason="REQUEST_ID_REUSED",
                field="request_id",
            )
        return existing

    def _retry_hint(self) -> float:
        etas = [l.record.eta_seconds for l in self._live.values() if l.record.state == RUNNING and l.record.eta_seconds > 0]
        return float(min(etas)) if etas else 30.0

    def get(self, job_id: str) -> JobRecord:
        """A job's current snapshot (live when this process runs it); NOT_FOUND otherwise."""
        if not job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        with self._cond:
            live = self._live.get(job_id)
            if live is not None:
                return live.record
        record = self.store.get(job_id)
        if record is None:
            raise NotFound(f"no merge job {job_id}", reason="JOB_NOT_FOUND", field="job_id")
        return record

    def list(self, page_size: int, page_token: str, state: str | None) -> tuple[list[JobRecord], str]:
        """Jobs newest first; `page_token` from a previous call continues after its last job."""
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before: int | None = None
        if page_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                before = int(token["before"])
                token_state = token.get("state")
                if not 0 <= before < 2**63:  # SQLite integers; a forged token must not reach the query
                    raise ValueError("before out of range")
            except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
                raise InvalidArgument("page_token is not a token from ListMergeJobs", field="page_token") from None
            if token_state != state:
                raise InvalidArgument("page_token belongs to a listing with another state filter", field="page_token")
        rows = self.store.page(before, state, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        with self._cond:
            records = [self._live[r.job_id].record if r.job_id in self._live else r for _, r in rows]
        next_token = ""
        if more and rows:
            next_token = base64.urlsafe_b64encode(json.dumps({"before": rows[-1][0], "state": state}).encode()).decode()
        return records, next_token

    def cancel(self, job_id: str, wait_seconds: float = 30.0) -> JobRecord:
        """Cancel a job; returns it CANCELLED, or in its final state when it had already ended."""
        record = self.get(job_id)
        with self._cond:
            live = self._live.get(job_id)
            if live is None:
                if record.state in ACTIVE:
                    raise FailedPrecondition(
                        f"job {job_id} runs on another server process ({record.owner}); cancel it there",
                        reason="JOB_NOT_OWNED",
                    )
                return record
            live.cancel.set()
            queued = live.record.state == QUEUED
            if queued and job_id in self._queue:
                self._queue.remove(job_id)
        if queued:
            self._finish(live, CANCELLED, None)
        else:
            live.done.wait(wait_seconds)
        return self.get(job_id)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True) -> Iterator[JobRecord]:
        """Yield the job now and after every change, ending after its final state."""
        record = self.get(job_id)
        last_version = -1
        while True:
            with self._cond:
                while True:
                    live = self._live.get(job_id)
                    record = live.record if live is not None else (self.store.get(job_id) or record)
                    if record.version != last_version or record.state in FINAL:
                        break
                    self._cond.wait(timeout=1.0)
                    if not is_active():
                        return
            last_version = record.version
            yield record
            if record.state in FINAL:
                return
            if not is_active():
                return

    # -- workers -------------------------------------------------------------------------------
    def _update(self, live: _Live, persist: bool, **changes: Any) -> None:
        with self._cond:
            live.record = replace(live.record, version=live.record.version + 1, **changes)
            record = live.record
            now = time.monotonic()
            notify = persist or now - live.last_notify >= _NOTIFY_SECONDS
            if notify:
                live.last_notify = now
                self._cond.notify_all()
            save = persist or now - live.last_persist >= _PERSIST_SECONDS
            if save:
                live.last_persist = now
        if save:
            self._save(record)

    def _save(self, record: JobRecord) -> None:
        """Persist a record; a registry failure is logged, never allowed to kill a worker."""
        try:
            self.store.save(record)
        except Exception:  # any failure is logged: the docstring says why
            log.exception("cannot persist merge job %s (state %s)", record.job_id, record.state)

    def _finish(self, live: _Live, state: str, error: JobError | None) -> None:
        # Persist first, then publish: whoever sees the final state (and may immediately reuse the
        # output path) finds the job neither live nor stale in the store.
        with self._cond:
            record = replace(
                live.record, version=live.record.version + 1, state=state, error=error, end_time=time.time(), eta_seconds=0.0
            )
        self._save(record)
        with self._cond:
            live.record = record
            self._live.pop(record.job_id, None)
            self._cond.notify_all()
        live.done.set()
        log.info(
            "merge job finished",
            extra={"job_id": live.record.job_id, "state": state, "reason": error.reason if error else ""},
        )

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(timeout=1.0)
                if self._stop.is_set():
                    return
                job_id = self._queue.popleft()
                live = self._live.get(job_id)
                if live is None or live.record.state != QUEUED or live.cancel.is_set():
                    continue
                self._running += 1
                # RUNNING under the same lock as the pop, so a concurrent cancel never sees it queued.
                live.record = replace(live.record, version=live.record.version + 1, state=RUNNING, start_time=time.time())
                self._cond.notify_all()
            try:
                self._run(live)
            finally:
                with self._cond:
                    self._running -= 1

    def _run(self, live: _Live) -> None:
        request = live.record.request
        started = time.monotonic()

        def check_cancelled() -> None:
            if live.cancel.is_set() or live.shutdown.is_set():
                raise Cancelled("the merge job was cancelled")

        def progress(p: Progress) -> None:
            elapsed = time.monotonic() - started
            eta = elapsed * (p.bytes_total - p.bytes_done) / p.bytes_done if p.bytes_done > 0 else 0.0
            final_tensor = p.tensors_done == p.tensors_total
            self._update(
                live,
                final_tensor,
                tensors_done=p.tensors_done,
                tensors_total=p.tensors_total,
                bytes_done=p.bytes_done,
                bytes_total=p.bytes_total,
                eta_seconds=eta,
            )

        try:
            self._save(live.record)  # RUNNING, with its start time
            roots = self.settings.allowed_roots
            checkpoints = [resolve(spec, roots, name) for spec, name in zip(request.inputs, input_fields(request), strict=True)]
            checkpoint_a, checkpoint_b = checkpoints[0], checkpoints[1]
            check_cancelled()
            described = [(describe(spec), c.revision) for spec, c in zip(request.inputs, checkpoints, strict=True)]
            first_model = len(described) - request.model_count
            card = ModelCard(
                describe(request.model_a),
                describe(request.model_b),
                checkpoint_a.revision,
                checkpoint_b.revision,
                request.t or InterpolationSpec.constant(0.0),
                job_id=live.record.job_id,
                method=request.method,
                models=tuple(described[first_model:]),
                base=described[0] if first_model else None,
                method_parameters=request.method_parameters,
            )
            merge = PlannedMerge(
                checkpoint_a,
                checkpoint_b,
                MergeSettings(
                    t=request.t,
                    out_dtype=request.out_dtype,
                    compute_cast=request.compute_cast,
                    max_shard_bytes=request.max_shard_bytes,
                    leading_slice=request.leading_slice,
                    num_layers=request.num_layers,
                    method=request.method,
                    method_parameters=request.method_parameters,
                    model_count=request.model_count,
                ),
                more_checkpoints=tuple(checkpoints[2:]),
                chunk_elements=min(1 << 18, max(1 << 12, self.settings.chunk_bytes // 64)),
                allowed_roots=tuple(roots),
                use_cpu_kernel=self.settings.cpu_kernel,
                device=self.settings.device,
                tmp_dir=Path(live.record.tmp_dir),
                final_dir=Path(live.record.output_dir),
                overwrite=request.overwrite,
                card=card,
            )
            summary = self.executor.run(merge, progress, check_cancelled)
            metrics.MERGE_SECONDS.labels(request.method, summary.device).observe(summary.seconds)
            self._update(live, True, bytes_done=summary.bytes_written, tensors_done=summary.tensors)
            if request.base is not None and self.output_registrar is not None:
                self._register_output(live, request.base)
            self._finish(live, SUCCEEDED, None)
        except Cancelled:
            remove_tree(Path(live.record.tmp_dir))
            if live.cancel.is_set():
                self._finish(live, CANCELLED, None)
            else:
                self._interrupted(live)
        except KinshipError as exc:
            remove_tree(Path(live.record.tmp_dir))
            self._finish(live, FAILED, JobError(status_code_number(exc.code), exc.message, exc.reason))
        except OSError as exc:
            remove_tree(Path(live.record.tmp_dir))
            self._finish(live, FAILED, job_error_from_os(exc))
        except Exception:  # a bug: record it, keep the worker alive
            incident = uuid.uuid4().hex[:12]
            log.exception("merge job crashed", extra={"job_id": live.record.job_id, "incident": incident})
            remove_tree(Path(live.record.tmp_dir))
            self._finish(
                live,
                FAILED,
                JobError(
                    status_code_number(grpc.StatusCode.INTERNAL),
                    f"internal error (incident {incident}); the server log has the details",
                    "INTERNAL",
                ),
            )

    def _interrupted(self, live: _Live) -> None:
        """A running job stopped because this server shuts down: it fails (the cluster manager requeues it)."""
        self._finish(
            live,
            FAILED,
            JobError(
                status_code_number(grpc.StatusCode.UNAVAILABLE),
                "the server shut down while this job was running; its partial output was removed; start it again",
                "SERVER_SHUTDOWN",
            ),
        )
