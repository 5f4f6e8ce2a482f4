"""Prometheus metrics: go-grpc-prometheus compatible request metrics plus domain metrics.

The request metrics use the names and label values of go-grpc-prometheus
(`grpc_type="unary"`, `grpc_code="InvalidArgument"`), so stock gRPC dashboards and
alerts work unchanged. They are recorded by `MetricsInterceptor` in the threaded server,
which sees every RPC including server-streaming ones, and by the front's own method handlers
(`front_calls.py`) in the front process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"], registry=REGISTRY
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    registry=REGISTRY,
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from RPC start to its status, by method.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent_total", "Response messages sent.", ["grpc_type", "grpc_service", "grpc_method"], registry=REGISTRY
)
IN_FLIGHT = Gauge("kinship_rpcs_in_flight", "RPCs being handled now.", ["grpc_method"], registry=REGISTRY)

BYTES_READ = Counter("kinship_checkpoint_bytes_read_total", "Checkpoint bytes read from disk.", registry=REGISTRY)
TENSORS_COMPARED = Counter("kinship_tensors_compared_total", "Tensors compared by exact kinship passes.", registry=REGISTRY)
ELEMENTS_COMPARED = Counter(
    "kinship_elements_compared_total", "Task-vector elements compared (per model) by exact passes.", registry=REGISTRY
)
EXACT_SECONDS = Histogram(
    "kinship_exact_pass_seconds", "Wall time of exact kinship passes.", ["device"], buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
EXACT_BYTES_PER_SECOND = Gauge(
    "kinship_exact_pass_bytes_per_second", "Read throughput of the last exact pass.", registry=REGISTRY
)
MERGE_SECONDS = Histogram(
    "kinship_merge_seconds",
    "Wall time of finished merges (reading, math and writing), by method and the device their math ran on.",
    ["method", "device"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
BUILD_INFO = Gauge("kinship_build_info", "Version and compute device of this server.", ["version", "device"], registry=REGISTRY)

# Cache (issue 3). `kind` is fp (fingerprints), delta, dchunk (delta chunks), pair (pair results) or mem (in-memory fingerprints).
CACHE_HITS = Counter("kinship_cache_hits_total", "Cache lookups answered from the cache.", ["kind"], registry=REGISTRY)
CACHE_MISSES = Counter("kinship_cache_misses_total", "Cache lookups that found nothing usable.", ["kind"], registry=REGISTRY)
CACHE_BYTES_READ = Counter("kinship_cache_bytes_read_total", "Bytes read from the cache.", ["kind"], registry=REGISTRY)
CACHE_BYTES_WRITTEN = Counter("kinship_cache_bytes_written_total", "Bytes written to the cache.", ["kind"], registry=REGISTRY)
CACHE_EVICTIONS = Counter("kinship_cache_evictions_total", "Entries evicted (least recently used) to stay under the size limit.", registry=REGISTRY)
CACHE_CORRUPT = Counter("kinship_cache_corrupt_total", "Corrupted or truncated cache entries detected and dropped.", registry=REGISTRY)
HEAVY_PROCESS_UP = Gauge(
    "kinship_heavy_process_up", "1 while the heavy-work process (front.py) serves, 0 while it is down or restarting.", registry=REGISTRY
)
HEAVY_PROCESS_RESTARTS = Counter(
    "kinship_heavy_process_restarts_total", "Times the front restarted a heavy-work process that had exited unexpectedly.", registry=REGISTRY
)
STATE_SECONDS = Histogram(
    "kinship_state_seconds",
    "Transactions on the shared PostgreSQL state (KINSHIP_STATE_URL), by outcome (ok, error, unavailable).",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
STATE_UNAVAILABLE = Counter(
    "kinship_state_unavailable_total", "Calls that found the shared PostgreSQL state unreachable (answered UNAVAILABLE).", registry=REGISTRY
)
KINSHIP_MODE_USED = Counter("kinship_mode_used_total", "Kinship requests by the mode actually used.", ["mode"], registry=REGISTRY)


def start_metrics_server(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> Any:
    """Serve /metrics over HTTP on `port`; returns the server (or None when port is 0)."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def start_loopback_metrics_server() -> tuple[Any, int]:
    """Serve /metrics on 127.0.0.1 at a free port (the heavy-work process, scraped by the front); (server, port)."""
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=REGISTRY)
    return server, int(server.server_port)


# go-grpc-prometheus spells codes as Go's codes.Code.String(): CamelCase.
_GO_CODE_NAMES = {code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode}
_GO_CODE_NAMES[grpc.StatusCode.OK] = "OK"


def go_code_name(code: grpc.StatusCode | None) -> str:
    """`grpc.StatusCode.INVALID_ARGUMENT` -> `InvalidArgument` (as go-grpc-prometheus)."""
    return _GO_CODE_NAMES[code or grpc.StatusCode.OK]


def _split_method(full: str) -> tuple[str, str]:
    _, service, method = full.split("/", 2)
    return service, method


def _code_of(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    # grpc.ServicerContext.code() exists since grpcio 1.38; types-grpcio does not declare it.
    code = context.code()  # type: ignore[attr-defined]
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _instrumented(handler: Any, details: grpc.HandlerCallDetails, wrap_unary: Callable[..., Any], wrap_stream: Callable[..., Any]) -> Any:
    """`handler` with its unary or server-streaming behaviour wrapped for metrics (other kinds as they are)."""
    if handler is None:
        return None
    service, method = _split_method(details.method)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary, service, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream, service, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC, unary and server-streaming alike."""

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        return _instrumented(continuation(handler_call_details), handler_call_details, self._wrap_unary, self._wrap_stream)

    @staticmethod
    def _wrap_unary(behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        labels = ("unary", service, method)

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            GRPC_STARTED.labels(*labels).inc()
            IN_FLIGHT.labels(method).inc()
            started = time.perf_counter()
            failed = False
            try:
                response = behavior(request, context)
                GRPC_MSG_SENT.labels(*labels).inc()
                return response
            except BaseException:
                failed = True
                raise
            finally:
                IN_FLIGHT.labels(method).dec()
                GRPC_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - started)
                GRPC_HANDLED.labels(*labels, go_code_name(_code_of(context, failed))).inc()

        return wrapped

    @staticmethod
    def _wrap_stream(behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        labels = ("server_stream", service, method)

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            GRPC_STARTED.labels(*labels).inc()
            IN_FLIGHT.labels(method).inc()
            started = time.perf_counter()
            failed = False
            cancelled = False
            try:
                for response in behavior(request, context):
                    GRPC_MSG_SENT.labels(*labels).inc()
                    yield response
            except GeneratorExit:  # the client went away mid-stream
                cancelled = True
                raise
            except BaseException:
                failed = True
                raise
            finally:
                IN_FLIGHT.labels(method).dec()
                GRPC_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - started)
                code = grpc.StatusCode.CANCELLED if cancelled else _code_of(context, failed)
                GRPC_HANDLED.labels(*labels, go_code_name(code)).inc()

        return wrapped
