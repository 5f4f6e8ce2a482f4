"""The front's method handlers with metrics and bearer tokens built in, instead of grpc.aio interceptors.

Why: a grpc.aio server interceptor runs on every call as a chain of coroutines and rebuilds
the method handler each time; on the 2-core machine class that cost the front about 100 us of
CPU per light call, a fifth of all it spent (docs/reliability.md). Here every method's handler
is wrapped once, when the server is built, with its metric series already bound to their
labels (no label look-up per call), and checks the token itself. Series, label values and
token rules are those of the threaded server's interceptors (metrics.MetricsInterceptor,
auth.BearerTokenInterceptor): go-grpc-prometheus names, refusals counted as Unauthenticated,
health and reflection open, an unknown method refused before it is named UNIMPLEMENTED.

`Registrar` stands in for the server where handlers are added (generated `add_*_to_server`
functions, reflection): it wraps what they add and passes it on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from kinship_service.errors import to_rpc_status
from kinship_service.server import auth, metrics

log = logging.getLogger("kinship.auth")

Behaviour = Callable[..., Any]


class _Series:
    """One method's metric series, bound to their labels once."""

    def __init__(self, kind: str, service: str, method: str) -> None:
        labels = (kind, service, method)
        self.labels = labels
        self.started = metrics.GRPC_STARTED.labels(*labels)
        self.sent = metrics.GRPC_MSG_SENT.labels(*labels)
        self.seconds = metrics.GRPC_HANDLING_SECONDS.labels(*labels)
        self.in_flight = metrics.IN_FLIGHT.labels(method)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def begin(self) -> float:
        """Count a call in and return its start time."""
        self.started.inc()
        self.in_flight.inc()
        return time.perf_counter()

    def end(self, started: float, code: grpc.StatusCode) -> None:
        """Count the call out: its time and its status code."""
        self.in_flight.dec()
        self.seconds.observe(time.perf_counter() - started)
        self.handled(code).inc()

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:  # one per status code met, at most 17
            child = self._handled[code] = metrics.GRPC_HANDLED.labels(*self.labels, metrics.go_code_name(code))
        return child


def _aio_code_of(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status an aborted aio call ends with (UNKNOWN when the handler raised without aborting)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code
    if isinstance(code, int) and code:
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


async def _check_token(tokens: auth.TokenSource, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """End the call with UNAUTHENTICATED (TOKEN_MISSING / TOKEN_INVALID) unless it carries the valid token."""
    error = auth.token_error(context.invocation_metadata(), tokens)
    if error is not None:
        log.info("unauthenticated call refused", extra={"rpc": method, "reason": error.reason})
        await context.abort_with_status(to_rpc_status(error))


def _unary(behaviour: Behaviour, series: _Series, tokens: auth.TokenSource | None, method: str) -> Behaviour:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = series.begin()
        code = grpc.StatusCode.OK
        try:
            if tokens is not None:
                await _check_token(tokens, method, context)
            response = await behaviour(request, context)
            series.sent.inc()
            return response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = _aio_code_of(context)
            raise
        finally:
            series.end(started, code)

    return call


def _server_stream(behaviour: Behaviour, series: _Series, tokens: auth.TokenSource | None, method: str) -> Behaviour:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = series.begin()
        code = grpc.StatusCode.OK
        try:
            if tokens is not None:
                await _check_token(tokens, method, context)
            async for response in behaviour(request, context):
                series.sent.inc()
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = _aio_code_of(context)
            raise
        finally:
            series.end(started, code)

    return call


def _client_stream_refused(behaviour: Behaviour, tokens: auth.TokenSource, method: str, streaming: bool) -> Behaviour:
    """A client-streaming behaviour behind the token check (not counted: the interceptors never counted these)."""
    if streaming:

        async def stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await _check_token(tokens, method, context)
            async for response in behaviour(requests, context):
                yield response

        return stream

    async def unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _check_token(tokens, method, context)
        return await behaviour(requests, context)

    return unary


def instrument(handler: grpc.RpcMethodHandler[Any, Any], method: str, tokens: auth.TokenSource | None) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` of the full method name `method` (`/package.Service/Method`) with metrics and, unless open, the token check."""
    _, service, name = method.split("/", 2)
    if service in auth.OPEN_SERVICES:
        tokens = None
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        behaviour = _unary(handler.unary_unary, _Series("unary", service, name), tokens, method)
        return grpc.unary_unary_rpc_method_handler(behaviour, deserializer, serializer)
    if handler.unary_stream:
        behaviour = _server_stream(handler.unary_stream, _Series("server_stream", service, name), tokens, method)
        return grpc.unary_stream_rpc_method_handler(behaviour, deserializer, serializer)
    if tokens is None:
        return handler
    if handler.stream_unary:
        behaviour = _client_stream_refused(handler.stream_unary, tokens, method, streaming=False)
        return grpc.stream_unary_rpc_method_handler(behaviour, deserializer, serializer)
    assert handler.stream_stream is not None  # the one kind left
    behaviour = _client_stream_refused(handler.stream_stream, tokens, method, streaming=True)
    return grpc.stream_stream_rpc_method_handler(behaviour, deserializer, serializer)


class _Instrumented(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are instrumented, each once (the inner handler's are fixed per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler, tokens: auth.TokenSource | None) -> None:
        self._inner = inner
        self._tokens = tokens
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = instrument(handler, method, self._tokens)
        self._wrapped[method] = (handler, wrapped)  # one entry per method the inner handler serves
        return wrapped


class _RefuseUnknown(grpc.GenericRpcHandler):
    """Last in line with tokens on: a method nobody serves is refused UNAUTHENTICATED without a valid token.

    Callers without a token learn nothing, not even which methods exist; with one they get UNIMPLEMENTED.
    Counted under the method's name, as the threaded server's interceptors do.
    """

    def __init__(self, tokens: auth.TokenSource) -> None:
        self._tokens = tokens

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        error = auth.token_error(handler_call_details.invocation_metadata, self._tokens)
        if error is None or method.count("/") < 2:
            return None
        status = to_rpc_status(error)

        async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort_with_status(status)

        # instrumented per call: these are rare and their names are the caller's
        return instrument(grpc.unary_unary_rpc_method_handler(deny), method, None)


class Registrar:
    """Where handlers are added (in place of the aio server): each is instrumented, then added to the server."""

    def __init__(self, server: grpc.aio.Server, tokens: auth.TokenSource | None) -> None:
        self._server = server
        self._tokens = tokens

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Instrumented(h, self._tokens) for h in generic_rpc_handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        self._server.add_registered_method_handlers(
            service_name, {name: instrument(h, f"/{service_name}/{name}", self._tokens) for name, h in method_handlers.items()}
        )

    def refuse_unknown_methods(self) -> None:
        """Add, last, the refusal of unknown methods without a valid token (when tokens are on)."""
        if self._tokens is not None:
            self._server.add_generic_rpc_handlers((_RefuseUnknown(self._tokens),))
