"""Server wiring: the gRPC server with health, reflection and metrics, its start-up and shutdown.

`serve(settings)` builds and starts a server and returns a `RunningServer` (tests use
it in-process on port 0); `main()` is the `kinship-server` console script: it reads
`KINSHIP_*` settings, serves, and on SIGTERM or SIGINT marks health NOT_SERVING,
stops accepting RPCs and gives in-flight ones `KINSHIP_GRACE_SECONDS` to finish.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kinship_client.v1 import service_pb2, service_pb2_grpc
from kinship_service import __version__
from kinship_service.config import ConfigError, Settings
from kinship_service.kinship.exact import resolve_device
from kinship_service.server import auth, metrics, priority
from kinship_service.server.servicer import KinshipServicer

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["KinshipService"].full_name
REFLECTED_SERVICES = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
"""What server reflection lists (the front's aio server and this one alike)."""

log = logging.getLogger("kinship.server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra=` fields included."""

    _STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings, role: str = "server") -> None:
    """Log lines to stderr, each naming its process `role` (server, front or heavy: see front.py)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(role)s]: %(message)s"))

    def add_role(record: logging.LogRecord) -> bool:
        record.role = role
        return True

    handler.addFilter(add_role)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


def grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel options: explicit message limits, keepalive, and connection ageing so load rebalances."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", 30 * 60_000),
        ("grpc.max_connection_age_grace_ms", 5 * 60_000),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class RunningServer:
    """A started server and what is needed to stop it."""

    server: grpc.Server
    health: health.HealthServicer
    servicer: KinshipServicer
    port: int
    settings: Settings
    metrics_server: Any = None
    health_server: grpc.Server | None = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "[::]", "") else self.settings.host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None, drain: float = 0.0) -> None:
        """Mark every service NOT_SERVING, keep serving `drain` seconds, then stop, giving in-flight RPCs `grace` seconds.

        The drain lets probes and load balancers see NOT_SERVING and route elsewhere
        while the server still accepts calls; after `grace` unfinished RPCs are cancelled
        (their work stops at its next cancellation check).
        """
        self.health.enter_graceful_shutdown()
        if drain > 0:
            time.sleep(drain)
        grace = self.settings.grace_seconds if grace is None else grace
        stopped = self.server.stop(grace)
        # Merge jobs get the same grace to finish; then they stop and leave no partial output.
        self.servicer.jobs.shutdown(grace)
        stopped.wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


def serve(settings: Settings, *, bind: str | None = None, warm_up: bool = True) -> RunningServer:
    """Build, bind and start the server; health turns SERVING once it is ready.

    `bind` replaces `host:port` (the heavy-work process of front.py listens on `unix:PATH`, plaintext).
    `warm_up`: compile the CPU kernels in the background (`start_kernel_warm_up`); false where the
    caller has started that already.
    """
    credentials = auth.server_credentials(settings)  # ConfigError on unreadable PEM files, before any work
    if settings.ray_address:  # ConfigError naming KINSHIP_RAY_ADDRESS when no cluster answers there
        from kinship_service.distributed import cluster

        cluster.connect(settings)
    interceptors: list[grpc.ServerInterceptor] = [metrics.MetricsInterceptor()]  # outermost: counts refusals too
    tokens = auth.token_source(settings)
    if tokens is not None:
        interceptors.append(auth.BearerTokenInterceptor(tokens))
    servicer = KinshipServicer(settings)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=grpc_options(settings),
        # Decoupled from the thread count: calls beyond max_workers queue for a thread instead of being refused.
        maximum_concurrent_rpcs=max(settings.max_concurrent_rpcs, settings.max_workers),
    )
    service_pb2_grpc.add_KinshipServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]  # generated, untyped
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(REFLECTED_SERVICES, server)
    address = bind or f"{settings.host}:{settings.port}"
    if credentials is not None and bind is None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}: is the port in use?")
    health_server = None
    if settings.health_port:
        # Plaintext, health only: Kubernetes' native gRPC probes speak neither TLS nor tokens.
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        if health_server.add_insecure_port(f"{settings.host}:{settings.health_port}") == 0:
            raise RuntimeError(f"cannot bind health port {settings.health_port}: is it in use?")
        health_server.start()
    metrics_server = metrics.start_metrics_server(settings.metrics_port, settings.host)
    server.start()
    metrics.BUILD_INFO.labels(__version__, str(servicer.device)).set(1)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if warm_up:
        start_kernel_warm_up(settings, servicer.device)
    log_serving(settings, address, port, servicer.device, tls=credentials is not None, auth=tokens is not None)
    return RunningServer(server, health_servicer, servicer, port, settings, metrics_server, health_server)


def log_serving(settings: Settings, address: str, port: int, device: Any, *, tls: bool, auth: bool, **more: Any) -> None:
    """The one "serving" log line of a started server (this one or the front), with its configuration."""
    log.info(
        "serving",
        extra={
            "address": address,
            "port": port,
            "metrics_port": settings.metrics_port,
            "health_port": settings.health_port,
            "device": str(device),
            "tls": tls,
            "mutual_tls": settings.tls_client_ca_file is not None,
            "auth": auth,
            **more,
        },
    )


def start_kernel_warm_up(settings: Settings, device: torch.device | None = None) -> None:
    """Compile the fused CPU kernels on a background thread when exact passes will use them.

    Every exact pass on CPU waits for these kernels (numba compiles under one process-wide
    lock): a cold compile is about 15 s of CPU. The heavy-work process starts this thread
    before it lowers its own priority, so the compile keeps normal priority (it once ran in
    the CPU's idle time, where a busy machine starved it for minutes and every first pass with it).
    """
    if device is None:
        try:
            device = resolve_device(settings.device)
        except RuntimeError:  # serve() reports it
            return
    if settings.cpu_kernel and device.type == "cpu":
        from kinship_service.checkpoints import mapped

        mapped.configure(settings.mapped_reads)
        threading.Thread(target=_warm_up_cpu_kernel, name="cpu-kernel-warm-up", daemon=True).start()


def _warm_up_cpu_kernel() -> None:
    """Compile (or load from numba's cache) the fused CPU kernel, so the first exact pass does not wait for it."""
    from kinship_service.kinship import cpu_kernel

    if not cpu_kernel.available():
        log.info("fused CPU kernel unavailable (numba not installed); exact passes use torch")
        return
    try:
        seconds = cpu_kernel.warm_up()
    except Exception:  # the first pass compiles it instead, or falls back
        log.exception("fused CPU kernel warm-up failed")
        return
    from kinship_service.checkpoints import mapped

    reason = mapped.unavailable_reason()
    reads = f"pread ({reason})" if reason else "mapped"
    log.info("fused CPU kernel ready", extra={"seconds": round(seconds, 3), "reads": reads})
    try:  # the merge's SLERP kernels (slerp_kernel.py), so the first merge does not compile them
        from kinship_service.merge import slerp_kernel

        seconds = slerp_kernel.warm_up()
    except Exception:
        log.exception("SLERP kernel warm-up failed")
        return
    log.info("SLERP kernels ready", extra={"seconds": round(seconds, 3)})
    try:  # the task-vector merges' kernels (task_vectors_jit.py: ties, dare_*, task_arithmetic)
        from kinship_service.merge import task_vectors_jit

        seconds = task_vectors_jit.warm_up()
    except Exception:
        log.exception("task-vector kernel warm-up failed")
        return
    log.info("task-vector kernels ready", extra={"seconds": round(seconds, 3)})


def main(argv: list[str] | None = None) -> int:
    """`kinship-server`: serve until SIGTERM or SIGINT. Configuration comes from KINSHIP_* variables."""
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print("usage: kinship-server\n\nConfigured with KINSHIP_* environment variables; see the README.")
        return 0
    if argv and argv[0] == "--version":
        print(__version__)
        return 0
    # Internal: the heavy-work process that front.py starts, serving on a private Unix socket.
    backend_socket = argv[1] if len(argv) == 2 and argv[0] == "--backend" else None
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"kinship-server: configuration error: {exc}", file=sys.stderr)
        return 2
    role = "heavy" if backend_socket else ("front" if settings.heavy_process else "server")
    configure_logging(settings, role)
    if settings.state_url:
        from kinship_service.state.backend import shared_database

        try:  # connect and migrate now: a wrong KINSHIP_STATE_URL stops the server here, not at its first call
            shared_database(settings)
        except ConfigError as exc:
            log.error("cannot start: %s", exc)
            return 1
    if backend_socket is None and settings.heavy_process:
        from kinship_service.server import front

        try:
            return front.run(settings)
        except ConfigError as exc:
            log.error("cannot start: %s", exc)
            return 1
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        log.info(
            "shutting down",
            extra={
                "signal": signal.Signals(signum).name,
                "drain_seconds": settings.drain_seconds,
                "grace_seconds": settings.grace_seconds,
            },
        )
        stop.set()

    # Installed before the server starts, so a SIGTERM right after start-up still shuts down gracefully.
    signal.signal(signal.SIGTERM, on_signal)
    # The heavy-work process shares the front's terminal: Ctrl-C is the front's to handle (it stops us in order).
    signal.signal(signal.SIGINT, signal.SIG_IGN if backend_socket else on_signal)
    if backend_socket:
        # The warm-up thread keeps normal priority: Linux's nice values and scheduling policies are per thread.
        start_kernel_warm_up(settings)
        _yield_cpu_to_the_front()
        # Before serve() starts the heavy threads: they are put in SCHED_IDLE (or not) as they start.
        priority.configure("idle" if settings.heavy_scheduling == "idle" else "nice")
    try:
        running = serve(settings, bind=f"unix:{backend_socket}" if backend_socket else None, warm_up=not backend_socket)
    except (ConfigError, RuntimeError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    if backend_socket:
        running.metrics_server, metrics_port = metrics.start_loopback_metrics_server()
        _exit_when_parent_goes()
        print(f"kinship-backend ready metrics_port={metrics_port}", flush=True)
    else:
        # Tells a parent process (tests, the demo) which port was bound when KINSHIP_PORT=0.
        print(f"kinship-server listening on {running.address}", flush=True)
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    # Ctrl-C (SIGINT) skips the drain: nobody routes traffic by probe to an interactive server.
    running.stop(drain=settings.drain_seconds if received[0] == signal.SIGTERM else 0.0)
    log.info("stopped")
    _exit_soon_if_work_lingers(EXIT_WAIT_SECONDS)
    return 0


def _exit_when_parent_goes() -> None:
    """The heavy-work process: exit at once when the front's end of our stdin closes (the front died).

    Everything this cuts short is crash-safe, as after SIGKILL; a graceful stop comes as SIGTERM first.
    """

    def watch() -> None:
        try:  # the raw descriptor: a buffered reader's lock would stall interpreter shutdown
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        log.warning("the front process is gone; the heavy-work process exits")
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


HEAVY_PROCESS_NICE = 5
"""Niceness of the heavy-work process (front.py) as a whole; its heavy threads add priority.HEAVY_NICE."""


def _yield_cpu_to_the_front() -> None:
    """The heavy-work process runs at a lower priority: nice +HEAVY_PROCESS_NICE, inherited by every thread it starts.

    Its heavy threads go lower still (priority.py: nice 15, and SCHED_IDLE with a starvation guard
    under KINSHIP_HEAVY_SCHEDULING=idle); the process as a whole never runs SCHED_IDLE: its handler
    threads (job queries, lease renewals) would starve with it whenever other processes keep every
    core busy (the demo once ran past 300 s so). Best effort: failures (not Linux, not allowed) are ignored.
    """
    try:
        os.nice(HEAVY_PROCESS_NICE)
    except (OSError, AttributeError):
        pass


EXIT_WAIT_SECONDS = 5.0
"""After the grace period, how long cancelled work may take to reach its next cancellation check."""


def _exit_soon_if_work_lingers(seconds: float) -> None:
    """Bound the exit: interpreter shutdown joins worker threads, and a cancelled pass that is
    mid-chunk could hold it past the pod's termination budget. A daemon watchdog ends the
    process after `seconds`; everything it cuts short is crash-safe (atomic cache writes,
    merge outputs renamed into place only when complete), as after SIGKILL."""

    def watchdog() -> None:
        time.sleep(seconds)
        others = (threading.current_thread(), threading.main_thread())
        busy = [t.name for t in threading.enumerate() if t not in others]
        log.warning("work still running %.0fs after the grace period; exiting without it", seconds, extra={"threads": busy})
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()
