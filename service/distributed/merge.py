"""Merges on Ray workers: one short-lived actor per merge runs the same `MergeRunner`, writing to shared storage.

The actor (`num_gpus=KINSHIP_RAY_GPUS_PER_MERGE`, one CPU) writes the output into the job's temporary
directory under the output root and renames it into place, exactly as a local merge does, so a
failed, cancelled or killed merge publishes nothing. The gRPC process polls the actor for progress
and cancels it through a flag the runner checks between chunks. The actor is not detached: it dies
with this process, whose job record in the job store (not the Ray result) is the durable state,
and the manager's recovery marks such a job FAILED and removes its temporary directory. Every wait
has a timeout: a worker that dies, never starts (no node with the resources) or stops answering
ends the job FAILED with a RAY_* reason.

With `KINSHIP_RAY_GPUS_PER_MERGE > 0` the actor merges on the GPU Ray assigned it (Ray sets the
actor's `CUDA_VISIBLE_DEVICES` to it, so torch sees it as `cuda:0`; `worker_device`); with 0 it
merges on its CPU even on a GPU node, whatever `KINSHIP_DEVICE` says.
"""

from __future__ import annotations

import dataclasses
import errno
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kinship_service import errors
from kinship_service.config import Settings
from kinship_service.distributed import cluster
from kinship_service.errors import Cancelled, FailedPrecondition, KinshipError
from kinship_service.jobs.executor import PlannedMerge, run_planned
from kinship_service.merge.runner import MergeSummary, Progress

CANCEL_WAIT_SECONDS = 60.0
"""After a cancel, how long the worker gets to stop at its next check before it is killed."""
CALL_SECONDS = 30.0
"""The longest wait for a live actor to answer a progress or cancel call."""


def worker_device(gpus_per_merge: float, gpu_ids: Sequence[object]) -> str:
    """The device a merge actor uses: the first GPU Ray assigned it when the merge asked for GPUs, else `cpu`.

    FAILED_PRECONDITION `MERGE_DEVICE_UNAVAILABLE` when GPUs were asked for but this worker has
    none torch can use (no GPU assigned, or a CPU-only torch in the worker's image)."""
    if gpus_per_merge <= 0:
        return "cpu"
    if not gpu_ids or not torch.cuda.is_available():
        have = f"Ray assigned GPUs {list(gpu_ids)} but torch sees no CUDA device" if gpu_ids else "Ray assigned it no GPU"
        raise FailedPrecondition(
            f"the merge asked for {gpus_per_merge:g} GPU(s) (KINSHIP_RAY_GPUS_PER_MERGE) but {have}; "
            "use a CUDA build of torch on the GPU workers, or set KINSHIP_RAY_GPUS_PER_MERGE=0 to merge on CPUs",
            reason="MERGE_DEVICE_UNAVAILABLE",
        )
    return "cuda:0"  # Ray's CUDA_VISIBLE_DEVICES lists only the assigned GPUs: the first one is index 0


class MergeWorker:
    """The actor's body: runs one merge on a thread and answers progress and cancel calls meanwhile."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._progress: Progress | None = None

    def ready(self) -> bool:
        """Answers once the actor is placed and started."""
        return True

    def progress(self) -> Progress | None:
        """The latest progress report of the running merge."""
        return self._progress

    def cancel(self) -> None:
        """Ask the running merge to stop at its next check (it then removes its temporary directory)."""
        self._cancel.set()

    def run(self, merge: PlannedMerge, gpus_per_merge: float = 0.0) -> dict[str, Any]:
        """Run the merge; the outcome as data (`summary`, `cancelled` or `error`), so the service's errors keep their reasons.

        `gpus_per_merge`: the GPUs the actor was placed with (`worker_device` picks the device)."""

        def check_cancelled() -> None:
            if self._cancel.is_set():
                raise Cancelled("the merge job was cancelled")

        def progress(p: Progress) -> None:
            self._progress = p

        try:
            device = worker_device(gpus_per_merge, cluster.ray_module().get_gpu_ids() if gpus_per_merge > 0 else ())
            return {"summary": run_planned(dataclasses.replace(merge, device=device), progress, check_cancelled)}
        except Cancelled:
            return {"cancelled": True}
        except KinshipError as exc:
            return {"error": (type(exc).__name__, exc.message, exc.reason, exc.field)}
        except OSError as exc:
            return {"os_error": (exc.errno, exc.strerror, exc.filename)}


class RayMergeExecutor:
    """A `jobs.executor.MergeExecutor` that runs each merge on a Ray worker (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._actor_class: Any = None

    def _actor(self) -> Any:
        if self._actor_class is None:
            ray = cluster.ray_module()
            self._actor_class = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=4)(MergeWorker)
        return self._actor_class.options(num_cpus=1, num_gpus=self.settings.ray_gpus_per_merge)

    def run(self, merge: PlannedMerge, progress: Callable[[Progress], None], check_cancelled: Callable[[], None]) -> MergeSummary:
        ray = cluster.ray_module()
        timeout = self.settings.ray_timeout_seconds
        try:
            actor = self._actor().remote()
        except Exception as exc:  # the cluster went away since start-up
            raise cluster.ray_failure(exc, "the merge") from None
        try:
            # Placed: a node had the resources. Cancellable meanwhile; RAY_TIMEOUT when no node frees them in time.
            cluster.wait_all([actor.ready.remote()], what="the merge's Ray worker", timeout=timeout, check_cancelled=check_cancelled)
            done = actor.run.remote(merge, self.settings.ray_gpus_per_merge)
            outcome = self._wait(actor, done, progress, check_cancelled, timeout)
        except Cancelled:
            raise
        except KinshipError:
            raise
        except Exception as exc:
            raise cluster.ray_failure(exc, "the merge") from None
        finally:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        return _result(outcome)

    def _wait(
        self, actor: Any, done: Any, progress: Callable[[Progress], None], check_cancelled: Callable[[], None], timeout: float
    ) -> dict[str, Any]:
        ray = cluster.ray_module()
        last: Progress | None = None
        cancelled_at: float | None = None
        while True:
            ready, _ = ray.wait([done], timeout=cluster.POLL_SECONDS)
            if ready:
                outcome: dict[str, Any] = ray.get(done, timeout=CALL_SECONDS)
                if cancelled_at is not None and "summary" not in outcome:
                    raise Cancelled("the merge job was cancelled")
                final = ray.get(actor.progress.remote(), timeout=CALL_SECONDS)
                if final is not None and final != last:  # a merge quicker than one poll still reports its totals
                    progress(final)
                return outcome
            if cancelled_at is None:
                try:
                    check_cancelled()
                except Cancelled:
                    ray.get(actor.cancel.remote(), timeout=CALL_SECONDS)
                    cancelled_at = time.monotonic()
            elif time.monotonic() - cancelled_at > CANCEL_WAIT_SECONDS:
                raise Cancelled("the merge job was cancelled (its worker was stopped)")
            current = ray.get(actor.progress.remote(), timeout=min(timeout, CALL_SECONDS))
            if current is not None and current != last:
                last = current
                progress(current)


def _result(outcome: dict[str, Any]) -> MergeSummary:
    """The summary of a finished merge, or its error raised again here."""
    if "summary" in outcome:
        summary: MergeSummary = outcome["summary"]
        return summary
    if "cancelled" in outcome:
        raise Cancelled("the merge job was cancelled")
    if "os_error" in outcome:
        code, message, filename = outcome["os_error"]
        raise OSError(code if code is not None else errno.EIO, message, filename)
    name, message, reason, field = outcome["error"]
    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, KinshipError)):
        kind = errors.Internal
    raise kind(message, reason=reason, field=field)
