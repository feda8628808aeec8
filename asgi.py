"""One ASGI object: Socket.IO at /socket.io/ and a small Starlette app for everything else."""

from __future__ import annotations

import contextlib
import gc
import hmac
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import socketio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from auth import key_problem, start_key_refresh, stop_key_refresh
from gateway import (
    SocketGateway,
    check_event,
    check_room,
    check_user_id,
    client_address,
    gateway,
)

logger = logging.getLogger("gateway.publish")

MAX_BATCH = 1000
FULL_COLLECTION_AFTER = 30  # middle-generation garbage collections between two full ones (Python's default: 10)
TARGETS = ("user_id", "room", "broadcast")
MESSAGE_FIELDS = frozenset({*TARGETS, "event", "data"})


async def health(request: Request) -> JSONResponse:
    """Liveness: the process is up and serving."""
    return JSONResponse({"status": "ok"})


def metrics_route(gateway: SocketGateway) -> Route:
    """GET /metrics in Prometheus' text format (only with GATEWAY_METRICS=1; keep it off the public network)."""

    async def metrics(request: Request) -> Response:
        await gateway.redis_problem()  # refreshes gateway_redis_up
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # --workers N: every worker's values, summed
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = gateway.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics)


def ready_route(gateway: SocketGateway) -> Route:
    """Readiness: 200 when this node can serve, 503 with the reason while Redis (when configured) is unreachable."""

    async def ready(request: Request) -> JSONResponse:
        if problem := key_problem(gateway.settings.jwt) or await gateway.redis_problem():
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Route("/ready", ready)


class PublishRefused(Exception):
    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field = status, error, field


def publish_route(gateway: SocketGateway) -> Route:
    """POST /publish: a server-to-server way to reach users, rooms or everyone, with a bearer key."""
    key = str(gateway.settings.publish_key).encode()
    max_bytes = gateway.settings.publish_max_bytes

    async def publish(request: Request) -> JSONResponse:
        try:
            if not hmac.compare_digest(bearer_token(request).encode(), key):
                raise PublishRefused(401, "missing or wrong publish key")
            messages = parse_messages(await read_json(request, max_bytes))
        except PublishRefused as refused:
            logger.info("publish refused for %s: %d %s", client_address(request.scope), refused.status, refused.error)
            body = {"error": refused.error} | ({"field": refused.field} if refused.field else {})
            headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
            return JSONResponse(body, status_code=refused.status, headers=headers)
        for target, name, event, data in messages:
            gateway.metrics.published.labels(target.removesuffix("_id")).inc()
            if target == "user_id":
                await gateway.emit_to_user(name, event, data)
            elif target == "room":
                await gateway.emit_to_room(name, event, data)
            else:
                await gateway.broadcast(event, data)
        return JSONResponse({"published": len(messages)})

    return Route("/publish", publish, methods=["POST"])


def bearer_token(request: Request) -> str:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


async def read_json(request: Request, max_bytes: int) -> Any:
    """The JSON body, refused with 415, 413 or 400 before more than `max_bytes` are read."""
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
        raise PublishRefused(415, "Content-Type must be application/json")
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > max_bytes:
        raise PublishRefused(413, f"body larger than {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PublishRefused(413, f"body larger than {max_bytes} bytes")
    try:
        return json.loads(body, parse_constant=refuse_constant)
    except (ValueError, RecursionError):
        raise PublishRefused(400, "body is not valid JSON") from None


def refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python reads them, browsers do not


def parse_messages(body: Any) -> list[tuple[str, Any, str, Any]]:
    """One message object, or a list of them (a batch, applied in order); all are checked before any is sent."""
    if isinstance(body, list):
        if len(body) > MAX_BATCH:
            raise PublishRefused(422, f"a batch holds at most {MAX_BATCH} messages")
        return [parse_message(item, f"[{i}].") for i, item in enumerate(body)]
    return [parse_message(body, "")]


def parse_message(message: Any, at: str) -> tuple[str, Any, str, Any]:
    if not isinstance(message, dict):
        raise PublishRefused(422, "a message must be a JSON object", at.rstrip(".") or None)
    for field in message:
        if field not in MESSAGE_FIELDS:
            raise PublishRefused(422, f"unknown field; expected {', '.join(sorted(MESSAGE_FIELDS))}", at + field)
    targets = [field for field in TARGETS if field in message]
    if len(targets) != 1:
        raise PublishRefused(422, "name exactly one target: user_id, room or broadcast", at + "user_id|room|broadcast")
    target = targets[0]
    name = message[target]
    if target == "broadcast" and name is not True:
        raise PublishRefused(422, "broadcast must be true", at + target)
    if target == "user_id":
        checked(check_user_id, name, at + target)
    if target == "room":
        checked(check_room, name, at + target)
    return target, name, checked(check_event, message.get("event"), at + "event"), message.get("data")


def checked(check: Callable[[Any], str], value: Any, field: str) -> str:
    """Run one of the gateway's own argument checks, turning its ValueError into a 422 naming `field`."""
    try:
        return check(value)
    except ValueError as error:
        raise PublishRefused(422, str(error), field) from None


def watch_for_shutdown(gateway: SocketGateway) -> None:
    """Mark the gateway as shutting down on SIGTERM, then let the server's own handler do the rest.

    uvicorn closes the sockets before the application's lifespan hears of the shutdown; this is how the
    disconnects it causes are told apart from clients that went away (in the logs and in the metrics).
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread; a server run in another thread keeps its own
    server_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        gateway.shutting_down = True
        if callable(server_handler):
            server_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def space_out_full_collections() -> None:
    """Let Python's garbage collector run a full collection after FULL_COLLECTION_AFTER middle-generation ones, not 10.

    A full collection walks every live object, and a node's live objects grow with its connections: connecting
    2,000 clients ran 5 of them, about 120 ms each, a fifth of the CPU of those connects. The young collections,
    which free most short-lived garbage, keep their pace; cycles that reached the old generation wait longer
    (a churn of 10,000 connections left the node at 78 MiB instead of 69).
    """
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)


def create_app(gateway: SocketGateway, routes: Sequence[BaseRoute] = ()) -> ASGIApp:
    """Combine `gateway`'s Socket.IO server with the HTTP routes (and any of yours) under one lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        space_out_full_collections()
        gateway.start()
        await start_key_refresh(gateway.settings.jwt)
        watch_for_shutdown(gateway)
        yield
        stop_key_refresh(gateway.settings.jwt)
        await gateway.sio.shutdown()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(os.getpid())  # drops this worker's live gauges from the sums

    own_routes = [Route("/health", health), ready_route(gateway)]
    if gateway.settings.metrics:
        own_routes.append(metrics_route(gateway))
    if gateway.settings.publish_key is not None:
        own_routes.append(publish_route(gateway))
    http = Starlette(routes=[*own_routes, *routes], lifespan=lifespan)
    socketio_app = socketio.ASGIApp(gateway.sio, other_asgi_app=http, socketio_path="socket.io")
    return refuse_large_polling_posts(socketio_app, gateway.settings.max_message_bytes)


def refuse_large_polling_posts(app: ASGIApp, max_bytes: int) -> ASGIApp:
    """Answer 413 to a long-polling POST announcing more than `max_bytes` (or no length) before reading its body.

    python-engineio checks Content-Length only after the first body chunk has arrived; clients always send it.
    """

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/socket.io/"):
            length = dict(scope["headers"]).get(b"content-length", b"")
            if not length.isdigit() or int(length) > max_bytes:
                await PlainTextResponse(f"a message is at most {max_bytes} bytes", status_code=413)(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


app = create_app(gateway)
