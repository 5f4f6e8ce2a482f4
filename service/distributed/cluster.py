"""The connection to the Ray cluster named by `KINSHIP_RAY_ADDRESS`, and the timed waits every Ray call goes through.

`ray` is imported here, lazily, and only when the variable is set: without it the service never loads Ray.
Every wait on a Ray result has a timeout, so a lost worker or cluster ends as an error, never a hang;
`ray_failure` turns Ray's exceptions into the service's errors (reasons in docs/errors.md).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from kinship_service.config import ConfigError, Settings
from kinship_service.errors import KinshipError, Unavailable

log = logging.getLogger("kinship.ray")

_lock = threading.Lock()
_connected: str | None = None

POLL_SECONDS = 0.5
"""How often a wait on Ray results checks for cancellation."""


def ray_module() -> ModuleType:
    """The `ray` package (imported on first use)."""
    import ray

    return ray


def connect(settings: Settings) -> None:
    """Join the cluster at `settings.ray_address` (once per process); ConfigError naming the variable when it cannot."""
    global _connected
    address = settings.ray_address
    with _lock:
        if _connected == address:
            return
        try:
            ray = ray_module()
        except ImportError:
            raise ConfigError(
                f"KINSHIP_RAY_ADDRESS={address!r} is set but ray is not installed; install model-kinship[ray] or unset it"
            ) from None
        probe(address)
        if ray.is_initialized():  # this process joined a cluster already (tests that start one)
            _connected = address
            return
        try:
            ray.init(address=address, log_to_driver=False, namespace="kinship", configure_logging=False)
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError: all mean "no cluster there"
            raise ConfigError(
                f"KINSHIP_RAY_ADDRESS={address!r}: cannot connect to a Ray cluster there ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); start the cluster, fix the address "
                "(host:port of the head's GCS, or ray://host:10001) or unset the variable"
            ) from None
        _connected = address
        log.info("connected to the Ray cluster", extra={"address": address, "resources": ray.cluster_resources()})


CONNECT_PROBE_SECONDS = 5.0


def probe(address: str) -> None:
    """Refuse at once an address nothing listens on (ray.init would retry it for minutes)."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_PROBE_SECONDS):
            pass
    except ValueError:
        raise ConfigError(f"KINSHIP_RAY_ADDRESS={address!r}: use host:port (the head's GCS port) or ray://host:port") from None
    except OSError as exc:
        raise ConfigError(
            f"KINSHIP_RAY_ADDRESS={address!r}: nothing answers there ({exc}); start the Ray cluster, "
            "fix the address (host:port of the head's GCS, or ray://host:10001) or unset the variable"
        ) from None


def cluster_cpus() -> int:
    """CPUs the cluster has now (at least 1)."""
    return max(1, int(ray_module().cluster_resources().get("CPU", 1)))


def ray_failure(exc: BaseException, what: str) -> KinshipError:
    """The service error for a Ray exception raised while waiting for `what`."""
    ray = ray_module()
    exceptions = ray.exceptions
    if isinstance(exc, KinshipError):
        return exc
    if isinstance(exc, exceptions.GetTimeoutError):
        return Unavailable(
            f"{what} did not finish on the Ray cluster in time (KINSHIP_RAY_TIMEOUT_SECONDS); check the cluster's "
            "workers and resources, or raise the timeout",
            reason="RAY_TIMEOUT",
        )
    if isinstance(exc, (exceptions.WorkerCrashedError, exceptions.ActorDiedError, exceptions.NodeDiedError, exceptions.ObjectLostError)):
        return Unavailable(f"a Ray worker died while running {what} ({type(exc).__name__}); retry", reason="RAY_WORKER_DIED")
    if isinstance(exc, exceptions.RayTaskError):
        first = str(exc.cause if getattr(exc, "cause", None) is not None else exc).strip().splitlines()
        return Unavailable(
            f"{what} failed on a Ray worker: {first[-1] if first else type(exc).__name__}; the worker's log has the details",
            reason="RAY_TASK_FAILED",
        )
    return Unavailable(f"the Ray cluster failed while running {what} ({type(exc).__name__}: {exc}); retry", reason="RAY_UNAVAILABLE")


def wait_all(
    refs: Sequence[Any], *, what: str, timeout: float, check_cancelled: Callable[[], None] = lambda: None
) -> list[Any]:
    """The results of `refs` in order; cancels them all and raises on cancellation, a task error or `timeout` seconds."""
    ray = ray_module()
    deadline = time.monotonic() + timeout
    pending = list(refs)
    results: dict[Any, Any] = {}
    try:
        while pending:
            check_cancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ray.exceptions.GetTimeoutError(f"{what}: {len(pending)} tasks still running")
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(POLL_SECONDS, left))
            for ref in ready:  # at once, so a failed task ends the wait without waiting for the others
                results[ref] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        return [results[ref] for ref in refs]
    except BaseException as exc:
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished or its worker is gone
                pass
        if isinstance(exc, KinshipError) or not isinstance(exc, Exception):
            raise
        raise ray_failure(exc, what) from None
