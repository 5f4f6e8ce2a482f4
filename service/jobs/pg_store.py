"""The merge-job registry in PostgreSQL (`KINSHIP_STATE_URL`): one table every replica reads and claims from.

The same records as the SQLite registry (store.py), plus what running across replicas needs:
an execution lease (`owner`, `lease_until`, renewed by the running replica), an attempt count,
and a cancel-requested flag the running replica's lease renewal sees. Claiming uses
`FOR UPDATE SKIP LOCKED`, so replicas polling together never take the same job; lease times are
the database's clock (`now()`), so replicas' clocks do not matter. Every write by a runner is
guarded by its owner: a replica that lost its lease can no longer change the job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import psycopg
from psycopg import errors as pg_errors

from kinship_service.errors import FailedPrecondition, NotFound, status_code_number
from kinship_service.jobs.records import CANCELLED, FAILED, QUEUED, RUNNING, JobError, JobRecord, page_query
from kinship_service.merge.model_card import published_job_id
from kinship_service.merge.output import temp_dir_for
from kinship_service.state.database import Database

Connection = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True)
class Claimed:
    """A job a replica now runs, and the temporary directory of an earlier attempt to remove (or None)."""

    record: JobRecord
    attempt: int
    stale_tmp_dir: Path | None


@dataclass(frozen=True)
class Abandoned:
    """A job whose earlier runner died and that ended without running again.

    CANCELLED (a cancel was requested), FAILED (attempts exhausted) or SUCCEEDED (the runner had
    published its output, which names the job, before it died).
    """

    record: JobRecord
    stale_tmp_dir: Path


def _record(value: object) -> JobRecord:
    assert isinstance(value, str)
    return JobRecord.from_json(value)


class PgJobStore:
    """Merge jobs in the `merge_jobs` table (thread-safe: every call is one transaction of `Database.run`)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def close(self) -> None:
        """Nothing to close: the connections belong to the process's Database."""

    # -- the JobStore interface (store.py) -----------------------------------------------------
    def insert(self, record: JobRecord) -> JobRecord | None:
        """Insert a QUEUED job; on a request-id clash the existing record; OUTPUT_BUSY when its output is being written."""

        def work(conn: Connection) -> JobRecord | None:
            try:
                with conn.transaction():  # a savepoint: the clash must not abort the whole transaction
                    conn.execute(
                        "INSERT INTO merge_jobs (job_id, request_id, state, owner, output_dir, record) VALUES (%s, %s, %s, '', %s, %s)",
                        (record.job_id, record.request_id, record.state, record.output_dir, record.to_json()),
                    )
                return None
            except pg_errors.UniqueViolation:
                pass  # which index reported it depends on the order PostgreSQL checks them: look at both
            if record.request_id:
                row = conn.execute("SELECT record FROM merge_jobs WHERE request_id = %s", (record.request_id,)).fetchone()
                if row is not None:
                    return _record(row[0])
            busy = conn.execute(
                "SELECT job_id FROM merge_jobs WHERE output_dir = %s AND state IN (%s, %s)", (record.output_dir, QUEUED, RUNNING)
            ).fetchone()
            raise FailedPrecondition(
                f"job {busy[0] if busy else 'another job'} is already writing {record.request.output_path}; "
                "wait for it or choose another path",
                reason="OUTPUT_BUSY",
                field="output_path",
            )

        return self.database.run(work)

    def save(self, record: JobRecord) -> None:
        """Write a runner's snapshot of its job; a no-op when `record.owner` no longer holds the job."""
        self.database.run(
            lambda conn: conn.execute(
                "UPDATE merge_jobs SET state = %s, record = %s WHERE job_id = %s AND owner = %s",
                (record.state, record.to_json(), record.job_id, record.owner),
            )
        )

    def get(self, job_id: str) -> JobRecord | None:
        """The stored snapshot of a job, or None."""
        row = self.database.run(lambda conn: conn.execute("SELECT record FROM merge_jobs WHERE job_id = %s", (job_id,)).fetchone())
        return _record(row[0]) if row else None

    def by_request_id(self, request_id: str) -> JobRecord | None:
        """The job started with this request id, or None."""
        row = self.database.run(
            lambda conn: conn.execute("SELECT record FROM merge_jobs WHERE request_id = %s", (request_id,)).fetchone()
        )
        return _record(row[0]) if row else None

    def page(self, before_seq: int | None, state: str | None, limit: int) -> list[tuple[int, JobRecord]]:
        """Up to `limit` jobs newest first, older than `before_seq`, optionally in one state, with their sequence numbers."""
        query, args = page_query("merge_jobs", "%s", before_seq, state, limit)
        rows = self.database.run(lambda conn: conn.execute(query.encode(), args).fetchall())
        return [(int(seq), _record(text)) for seq, text in rows]  # type: ignore[call-overload]  # a bigint column

    # -- across replicas -----------------------------------------------------------------------
    def queued(self) -> int:
        """How many jobs wait for a replica, cluster-wide."""
        row = self.database.run(lambda conn: conn.execute("SELECT count(*) FROM merge_jobs WHERE state = %s", (QUEUED,)).fetchone())
        return int(row[0]) if row else 0  # type: ignore[call-overload]  # a count

    def claim(self, owner: str, lease_seconds: float, max_attempts: int) -> Claimed | Abandoned | None:
        """Take the oldest job that is QUEUED or RUNNING with an expired lease, or None when there is none.

        A job whose runner died is run again (a new attempt, in a temporary directory of its own),
        unless its output is already published and names it (it ends SUCCEEDED), a cancel was
        requested (it ends CANCELLED) or it had `max_attempts` already (it ends FAILED,
        JOB_ATTEMPTS_EXHAUSTED): those come back as Abandoned, for the caller to clean up.
        """

        def work(conn: Connection) -> Claimed | Abandoned | None:
            row = conn.execute(
                "SELECT state, attempts, cancel_requested, record FROM merge_jobs"
                # Never our own running jobs: their leases lapse only while the database was away, and our
                # renewal picks them up again (another replica may take them over meanwhile).
                " WHERE state = %s OR (state = %s AND lease_until < now() AND owner <> %s)"
                " ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
                (QUEUED, RUNNING, owner),
            ).fetchone()
            if row is None:
                return None
            state, attempts, cancel_requested, text = row
            assert isinstance(attempts, int)
            record = _record(text)
            now = time.time()
            stale = Path(record.tmp_dir) if state == RUNNING else None
            if stale is not None and published_job_id(Path(record.output_dir)) == record.job_id:
                # The runner published the whole output, then died or lost the database before it
                # could record SUCCEEDED: record it now rather than fail on OUTPUT_EXISTS.
                done = record.published(now)
                conn.execute(
                    "UPDATE merge_jobs SET state = %s, record = %s, lease_until = NULL WHERE job_id = %s",
                    (done.state, done.to_json(), record.job_id),
                )
                return Abandoned(done, stale)
            if stale is not None and (cancel_requested or attempts >= max_attempts):
                error = None
                if not cancel_requested:
                    error = JobError(
                        status_code_number(grpc.StatusCode.ABORTED),
                        f"the replicas running this job stopped {attempts} times (crash, kill or lost database) before it "
                        f"finished (KINSHIP_JOB_MAX_ATTEMPTS={max_attempts}); its partial output was removed; start the merge again",
                        "JOB_ATTEMPTS_EXHAUSTED",
                    )
                ended = replace(record, state=CANCELLED if cancel_requested else FAILED, end_time=now, eta_seconds=0.0, error=error)
                conn.execute(
                    "UPDATE merge_jobs SET state = %s, record = %s, lease_until = NULL WHERE job_id = %s",
                    (ended.state, ended.to_json(), record.job_id),
                )
                return Abandoned(ended, stale)
            attempt = attempts + 1
            running = replace(
                record,
                state=RUNNING,
                owner=owner,
                start_time=now,
                tmp_dir=str(temp_dir_for(Path(record.output_dir), f"{record.job_id}-{attempt}")),
                tensors_done=0,
                bytes_done=0,
                eta_seconds=0.0,
            )
            conn.execute(
                "UPDATE merge_jobs SET state = %s, owner = %s, attempts = %s, lease_until = now() + make_interval(secs => %s),"
                " record = %s WHERE job_id = %s",
                (RUNNING, owner, attempt, lease_seconds, running.to_json(), record.job_id),
            )
            return Claimed(running, attempt, stale)

        return self.database.run(work)

    def renew(self, owner: str, lease_seconds: float) -> dict[str, bool]:
        """Extend the lease of every job `owner` runs; {job_id: cancel requested} of those it still holds."""

        def work(conn: Connection) -> dict[str, bool]:
            rows = conn.execute(
                "UPDATE merge_jobs SET lease_until = now() + make_interval(secs => %s)"
                " WHERE owner = %s AND state = %s RETURNING job_id, cancel_requested",
                (lease_seconds, owner, RUNNING),
            ).fetchall()
            return {str(job_id): bool(flag) for job_id, flag in rows}

        return self.database.run(work)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a QUEUED one ends CANCELLED now; a RUNNING one gets the flag its runner's lease renewal sees."""

        def work(conn: Connection) -> JobRecord:
            row = conn.execute("SELECT state, record FROM merge_jobs WHERE job_id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no merge job {job_id}", reason="JOB_NOT_FOUND", field="job_id")
            state, text = row
            record = _record(text)
            if state == QUEUED:
                record = replace(record, state=CANCELLED, end_time=time.time(), eta_seconds=0.0)
                conn.execute("UPDATE merge_jobs SET state = %s, record = %s WHERE job_id = %s", (CANCELLED, record.to_json(), job_id))
            elif state == RUNNING:
                conn.execute("UPDATE merge_jobs SET cancel_requested = true WHERE job_id = %s", (job_id,))
            return record

        return self.database.run(work)

    def release(self, record: JobRecord) -> None:
        """Give a job this replica stopped running (it shuts down) back to the queue, without counting the attempt."""
        queued = replace(record, state=QUEUED, start_time=None, tensors_done=0, bytes_done=0, eta_seconds=0.0)
        self.database.run(
            lambda conn: conn.execute(
                "UPDATE merge_jobs SET state = %s, owner = '', lease_until = NULL, attempts = greatest(attempts - 1, 0),"
                " record = %s WHERE job_id = %s AND owner = %s AND state = %s",
                (QUEUED, queued.to_json(), record.job_id, record.owner, RUNNING),
            )
        )
