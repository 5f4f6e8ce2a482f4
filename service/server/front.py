"""The front process: the public gRPC port on grpc.aio, with heavy work in a child process.

`kinship-server` (with `KINSHIP_HEAVY_PROCESS=true`, the default) runs two processes:

- this **front**, which owns the public port, TLS, tokens, health, reflection and /metrics. It
  answers light calls itself, inline on one asyncio event loop: FINGERPRINT Kinship,
  RankCandidates / ShouldStop whose kinship values are all given or come from fingerprints, and
  EXACT / AUTO requests the cache answers without a pass (pair results; fingerprints for AUTO).
  The cache-only answerers (light.py) validate as the servicer does and answer a response, or
  None where heavy work is needed: then the call is forwarded;
- the **heavy-work process** (`kinship-server --backend SOCKET`, the monolithic server of
  server.py on a Unix socket in a private directory), which runs everything else: exact passes,
  registrations, merge jobs and merge-job queries, with admission control (admission.py),
  at a lower priority (nice +5; its heavy threads nice 15 and SCHED_IDLE with a starvation guard, priority.py).

Why: heavy work (reading gigabytes, SLERP kernels, safetensors writes) sharing a process with the
light calls took the GIL and the handler threads from them; a single process topped out near 600
light calls/s with p99 in seconds while two exact passes and a merge ran (docs/reliability.md).
Here the light path has its own GIL and event loop, and the heavy process runs its heavy threads
at a lower priority.

Forwarding is byte for byte: requests, responses, status codes, messages and rich error details
(trailing metadata) pass through unchanged; the caller's deadline goes along and a cancelled call
is cancelled in the heavy process too (which stops the work once nobody waits for it). When the
heavy process dies (OOM kill), forwarded calls fail with UNAVAILABLE until it is restarted, a
second later; light calls go on. If the front dies, the heavy process sees its stdin close and
exits at once. Both processes' metrics are served together on the front's /metrics port.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kinship_client.v1 import service_pb2
from kinship_service import __version__
from kinship_service.cache.registry import KinshipCache
from kinship_service.config import Settings
from kinship_service.kinship.exact import resolve_device
from kinship_service.server import auth, front_calls, metrics
from kinship_service.server.light import LightAnswers, LightMethod, Prepared, QueryMemo, memory_only
from kinship_service.server.main import REFLECTED_SERVICES, SERVICE_NAME, grpc_options, log_serving
from kinship_service.server.servicer import rpc_status

log = logging.getLogger("kinship.front")

SERVICE = service_pb2.DESCRIPTOR.services_by_name["KinshipService"]
LOOKUP_THREADS = 4
"""Threads for light calls that may read the cache (EXACT/AUTO answered from stored pair results)."""
BACKEND_START_SECONDS = 120.0
HEAVY_DRAIN_SECONDS = 1.0
RESTART_DELAY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


# -- the heavy-work process -------------------------------------------------------------------------
class HeavyProcess:
    """Starts, watches and restarts the heavy-work process (`kinship-server --backend SOCKET`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._dir = Path(tempfile.mkdtemp(prefix="kinship-heavy-"))  # mode 0700: only this user reaches the socket
        self.socket = self._dir / "heavy.sock"
        self.metrics_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0
        self._stopping = False
        self._lock = threading.Lock()
        self._ready = threading.Event()

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Private, plaintext, unauthenticated: the socket's directory is readable by this user only,
        # and the front has checked tokens and TLS already.
        env.update(
            KINSHIP_HEAVY_PROCESS="false",
            KINSHIP_METRICS_PORT="0",
            KINSHIP_HEALTH_PORT="0",
            # It is stopped together with the front: for a moment it still takes the calls that the front
            # accepted just before its own stop and forwards a few milliseconds later.
            KINSHIP_DRAIN_SECONDS=str(HEAVY_DRAIN_SECONDS if self.settings.grace_seconds > 0 else 0),
            KINSHIP_AUTH_TOKEN="",
            KINSHIP_AUTH_TOKEN_FILE="",
            KINSHIP_TLS_CERT_FILE="",
            KINSHIP_TLS_KEY_FILE="",
            KINSHIP_TLS_CLIENT_CA_FILE="",
            KINSHIP_GRACE_SECONDS=str(self.settings.grace_seconds),
        )
        return env

    def start(self) -> None:
        """Start the process and wait until it serves; RuntimeError if it does not within BACKEND_START_SECONDS."""
        self.socket.unlink(missing_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "kinship_service", "--backend", str(self.socket)],
            env=self._environment(),
            stdin=subprocess.PIPE,  # closed when the front dies: the heavy process exits at once
            stdout=subprocess.PIPE,
            # Same session on purpose: with scheduler autogroups (one per session) a new session would get
            # a full group's CPU share whatever its scheduling class (server._yield_cpu_to_the_front).
            # It ignores Ctrl-C's SIGINT; the front stops it.
        )
        assert process.stdout is not None
        line = _ready_line(process, BACKEND_START_SECONDS)
        if not line.startswith(b"kinship-backend ready"):
            process.kill()
            process.wait()
            raise RuntimeError("the heavy-work process did not start; its log lines above say why")
        self.metrics_port = int(line.split(b"metrics_port=", 1)[1].split()[0])
        # Keep reading its stdout (nothing is expected there), so a stray print can never block it on a full pipe.
        threading.Thread(target=_drain, args=(process.stdout,), name="heavy-process-stdout", daemon=True).start()
        with self._lock:
            self.process = process
            self.started_at = time.monotonic()
        self._ready.set()
        metrics.HEAVY_PROCESS_UP.set(1)
        log.info("heavy-work process ready", extra={"pid": process.pid, "restarts": self.restarts})

    def adopt(self) -> None:
        """Treat a server already listening on `self.socket` as the heavy-work process (tests run one in-process)."""
        self._ready.set()

    def supervise(self) -> None:
        """Restart the process whenever it exits unexpectedly (runs on its own thread until stop())."""
        delays = iter(RESTART_DELAY_SECONDS)
        delay = next(delays)
        while not self._stopping:
            process = self.process
            if process is None:
                return
            code = process.wait()
            if self._stopping:
                return
            if time.monotonic() - self.started_at > 60:  # it had been serving a while: a fresh failure
                delays = iter(RESTART_DELAY_SECONDS)
                delay = next(delays)
            self._ready.clear()
            metrics.HEAVY_PROCESS_UP.set(0)
            log.error(
                "the heavy-work process exited unexpectedly; heavy calls answer UNAVAILABLE until it is back",
                extra={"exit_code": code, "restart_in_seconds": delay},
            )
            time.sleep(delay)
            try:
                self.restarts += 1
                metrics.HEAVY_PROCESS_RESTARTS.inc()
                self.start()
            except (RuntimeError, OSError):  # self.process stays the dead one: the next turn waits longer
                log.exception("restarting the heavy-work process failed")
            delay = next(delays, RESTART_DELAY_SECONDS[-1])

    def stop(self, grace: float) -> None:
        """SIGTERM it (after HEAVY_DRAIN_SECONDS it gives its in-flight work `grace` seconds), wait, then kill."""
        self._stopping = True
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace + HEAVY_DRAIN_SECONDS + 10)
            except subprocess.TimeoutExpired:
                log.warning("the heavy-work process did not stop in time; killing it")
                process.kill()
                process.wait()
        if process is not None and process.stdin is not None:
            process.stdin.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _ready_line(process: subprocess.Popen[bytes], seconds: float) -> bytes:
    """The first line the starting heavy-work process prints, or b"" if it exits or stays silent for `seconds`."""
    assert process.stdout is not None
    deadline = time.monotonic() + seconds
    pending = b""
    while b"\n" not in pending and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            pending += chunk
        elif process.poll() is not None:
            break
    return pending.split(b"\n", 1)[0]


def _drain(stream: Any) -> None:
    for line in stream:
        log.info("heavy-work process stdout: %s", line.decode(errors="replace").rstrip())


# -- the front server ---------------------------------------------------------------------------
class Front:
    """Builds the aio server: light calls inline, the rest forwarded to the heavy-work process."""

    def __init__(self, settings: Settings, heavy: HeavyProcess) -> None:
        self.settings = settings
        self.heavy = heavy
        self.device = resolve_device(settings.device)
        self.answers = LightAnswers(settings, KinshipCache(settings, self.device))
        self.queries = QueryMemo()
        self.channel: grpc.aio.Channel | None = None
        self.lookups = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="front-lookup")

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        """Every KinshipService method, by name: light ones answered here when they can be, the rest forwarded."""
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        for method in SERVICE.methods:
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(self._streaming(method.name))
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(self._unary(method))
        return handlers

    def _open_channel(self) -> grpc.aio.Channel:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(
                self.heavy.target,
                options=[
                    ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                    ("grpc.max_send_message_length", self.settings.max_message_bytes),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
        return self.channel

    def _unary(self, method: Any) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Any]:
        name = method.name
        path = f"/{SERVICE_NAME}/{name}"
        light = self.answers.methods().get(name)

        async def handle(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            if light is not None:
                response = await self._answer_light(name, light, raw, context)
                if response is not None:
                    return response
            return await self._forward_unary(path, raw, context)

        return handle

    async def _answer_light(
        self, name: str, light: LightMethod, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes | None:
        """The serialised answer from the cache alone, or None (forward it); bad input ends the call with its status."""
        prepared = self.queries.get(name, raw)
        if prepared is None:
            try:
                request = light.request_class.FromString(raw)
            except Exception:  # malformed bytes from a client
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the {name} request could not be parsed")
            try:
                query = light.validate(request)
            except Exception as exc:  # the same status the heavy path gives (KinshipError), else INTERNAL
                await context.abort_with_status(rpc_status(name, exc))
            prepared = Prepared(query, memory_only(query))
            self.queries.put(name, raw, prepared)
        try:
            # With KINSHIP_STATE_URL a fingerprint not yet in memory comes over the network: never on the loop.
            if prepared.memory_only and not self.settings.state_url:
                response = light.answer(prepared.query)
            else:
                # May read the cache (pair results, delta manifests: SQLite, whose locks the heavy-work
                # process also takes): on a thread, so the event loop never waits on a disk or a lock.
                response = await asyncio.get_running_loop().run_in_executor(self.lookups, light.answer, prepared.query)
        except Exception as exc:  # the same status the heavy path gives (KinshipError), else INTERNAL
            await context.abort_with_status(rpc_status(name, exc))
        return response.SerializeToString() if response is not None else None

    async def _forward_unary(self, path: str, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._open_channel().unary_unary(path)
        try:
            return await call(raw, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as error:
            await self._abort_like(error, context)

    def _streaming(self, name: str) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], AsyncIterator[bytes]]:
        path = f"/{SERVICE_NAME}/{name}"

        async def handle(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
            method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self._open_channel().unary_stream(path)
            call = method(raw, timeout=context.time_remaining())
            try:
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as error:
                await self._abort_like(error, context)

        return handle

    async def _abort_like(self, error: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext[bytes, bytes]) -> NoReturn:
        """End the front's call with the heavy process's status, or a clear UNAVAILABLE when it is down."""
        if error.code() == grpc.StatusCode.UNAVAILABLE and not self.heavy.ready:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the heavy-work process is restarting (light calls are still answered); retry in a few seconds",
            )
        await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))


# -- metrics of both processes ------------------------------------------------------------------------
_FRONT_ONLY = ("grpc_server_", "kinship_rpcs_in_flight", "kinship_build_info")
"""Families the front counts for every call it receives; the heavy process's copies would count forwarded calls twice."""


class CombinedRegistry(CollectorRegistry):
    """The front's metrics plus the heavy process's (scraped from its loopback endpoint), merged by name.

    Series present in both (cache counters, say) are summed; `_created` timestamps keep the front's.
    """

    def __init__(self, front: CollectorRegistry, heavy: HeavyProcess) -> None:
        super().__init__(auto_describe=True)
        self._front = front
        self._heavy = heavy

    def _heavy_families(self) -> list[Any]:
        if not self._heavy.ready or not self._heavy.metrics_port:
            return []
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self._heavy.metrics_port}/metrics", timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            return []
        return [f for f in text_string_to_metric_families(text) if not f.name.startswith(_FRONT_ONLY)]

    def collect(self) -> Any:
        families = {f.name: f for f in self._front.collect()}
        for family in self._heavy_families():
            mine = families.get(family.name)
            if mine is None:
                families[family.name] = family
                continue
            index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(mine.samples)}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in index:
                    mine.samples.append(sample)
                elif not sample.name.endswith("_created"):
                    old = mine.samples[index[key]]
                    mine.samples[index[key]] = old._replace(value=old.value + sample.value)
        yield from families.values()


# -- start and stop -------------------------------------------------------------------------------------
@dataclass
class RunningFront:
    """A started front server and what is needed to stop it."""

    server: grpc.aio.Server
    health: Any
    front: Front
    port: int
    settings: Settings
    health_server: grpc.aio.Server | None = None
    metrics_server: Any = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "[::]", "") else self.settings.host
        return f"{host}:{self.port}"

    async def stop(self, grace: float) -> None:
        """Refuse new calls and give in-flight ones `grace` seconds (the heavy process is stopped by its owner)."""
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.front.channel is not None:
            await self.front.channel.close()
        self.front.lookups.shutdown(wait=False)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


async def start_front(settings: Settings, heavy: HeavyProcess) -> RunningFront:
    """Build, bind and start the front for a started heavy-work process (or, in tests, any server at `heavy.target`).

    Raises ConfigError (unreadable TLS files) or RuntimeError (a port in use).
    """
    credentials = auth.server_credentials(settings)
    front = Front(settings, heavy)
    tokens = auth.token_source(settings)
    # No interceptors: metrics and tokens are built into each method's handler (front_calls.py), which
    # costs a fraction of an interceptor's coroutine chain per call.
    server = grpc.aio.server(options=grpc_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    registrar = front_calls.Registrar(server, tokens)
    handlers = front.handlers()
    registrar.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    registrar.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, cast(grpc.aio.Server, registrar))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]  # generated, untyped
        reflection.aio.ReflectionServicer(REFLECTED_SERVICES), cast(grpc.aio.Server, registrar)
    )
    registrar.refuse_unknown_methods()
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}: is the port in use?")
    running = RunningFront(server, health_servicer, front, port, settings)
    if settings.health_port:
        running.health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, running.health_server)
        if running.health_server.add_insecure_port(f"{settings.host}:{settings.health_port}") == 0:
            raise RuntimeError(f"cannot bind health port {settings.health_port}: is it in use?")
        await running.health_server.start()
    if settings.metrics_port:
        running.metrics_server = metrics.start_metrics_server(
            settings.metrics_port, settings.host, registry=CombinedRegistry(metrics.REGISTRY, heavy)
        )
    await server.start()
    metrics.BUILD_INFO.labels(__version__, str(front.device)).set(1)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_serving(
        settings,
        address,
        port,
        front.device,
        tls=credentials is not None,
        auth=tokens is not None,
        heavy_process_pid=heavy.process.pid if heavy.process else None,
    )
    return running


async def _serve(settings: Settings, stop: asyncio.Event, received: list[int]) -> int:
    auth.server_credentials(settings)  # ConfigError on unreadable PEM files, before starting anything
    heavy = HeavyProcess(settings)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, heavy.start)
    except (RuntimeError, OSError) as exc:
        log.error("cannot start: %s", exc)
        heavy.stop(0)
        return 1
    threading.Thread(target=heavy.supervise, name="heavy-process-supervisor", daemon=True).start()
    try:
        running = await start_front(settings, heavy)
    except (RuntimeError, OSError) as exc:
        log.error("cannot start: %s", exc)
        heavy.stop(0)
        return 1
    # Everything built so far (torch, protobuf descriptors, the cache) lives as long as the process:
    # keep it out of the cyclic collector, whose full passes over it stalled light calls for tens of ms.
    gc.collect()
    gc.freeze()
    print(f"kinship-server listening on {running.address}", flush=True)

    await stop.wait()
    # Ctrl-C (SIGINT) skips the drain: nobody routes traffic by probe to an interactive server.
    await running.health.enter_graceful_shutdown()
    if received and received[0] == signal.SIGTERM and settings.drain_seconds > 0:
        await asyncio.sleep(settings.drain_seconds)
    # Both stop at once, each giving its in-flight calls the grace period.
    heavy_stopped = loop.run_in_executor(None, heavy.stop, settings.grace_seconds)
    await running.stop(settings.grace_seconds)
    await heavy_stopped
    log.info("stopped")
    return 0


def run(settings: Settings) -> int:
    """`kinship-server` with a heavy-work process: serve until SIGTERM or SIGINT; the exit status."""
    if settings.ray_address:  # refuse an address nothing answers on here, not in a heavy process restarted in a loop
        from kinship_service.distributed.cluster import probe

        probe(settings.ray_address)

    async def main() -> int:
        stop = asyncio.Event()
        received: list[int] = []
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if not received:
                log.info(
                    "shutting down",
                    extra={
                        "signal": signal.Signals(signum).name,
                        "drain_seconds": settings.drain_seconds,
                        "grace_seconds": settings.grace_seconds,
                    },
                )
            received.append(signum)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        return await _serve(settings, stop, received)

    return asyncio.run(main())
