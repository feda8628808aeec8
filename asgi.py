"""One ASGI object: Socket.IO at /socket.io/ and a small Starlette app for everything else."""

from __future__ import annotations

import asyncio
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
from engineio import packet as eio_packet
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth import start_key_refresh, stop_key_refresh
from gateway import (
    CLOSE_TIMEOUT,
    NAMESPACE,
    RedisUnavailable,
    SocketGateway,
    check_event,
    check_room,
    check_user_id,
    client_address,
    gateway,
)

logger = logging.getLogger("gateway.publish")

MAX_BATCH = 1000
MAX_NESTING = 100  # levels of arrays and objects in published data; json.dumps recurses per level
FULL_COLLECTION_AFTER = 30  # middle-generation garbage collections between two full ones (Python's default: 10)
TARGETS = ("user_id", "room", "broadcast")
MESSAGE_FIELDS = frozenset({*TARGETS, "event", "data"})
SOCKETIO_PATH = "/socket.io/"


async def health(request: Request) -> JSONResponse:
    """Liveness: the process is up and serving."""
    return JSONResponse({"status": "ok"})


def ready_route(gateway: SocketGateway) -> Route:
    """Readiness: 200, or 503 with a reason (no address: that goes to the log) while this node cannot serve."""

    async def ready(request: Request) -> JSONResponse:
        if problem := await gateway.ready_problem():
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Route("/ready", ready)


def metrics_route(gateway: SocketGateway) -> Route:
    """GET /metrics in Prometheus' text format (only with GATEWAY_METRICS=1; keep it off the public network)."""

    async def metrics(request: Request) -> Response:
        await gateway.ready_problem()  # refreshes gateway_redis_up
        registry = gateway.metrics.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # --workers N: every worker's values, summed
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics)


class PublishRefused(Exception):
    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field = status, error, field


def publish_route(gateway: SocketGateway) -> Route:
    """POST /publish: a server-to-server way to reach users, rooms or everyone, with a bearer key."""
    key = str(gateway.settings.publish_key).encode()

    async def publish(request: Request) -> JSONResponse:
        try:
            if not hmac.compare_digest(bearer_token(request).encode(errors="replace"), key):
                raise PublishRefused(401, "missing or wrong publish key")
            messages = parse_messages(await read_json(request, gateway.settings.publish_max_bytes))
        except PublishRefused as refused:
            logger.info("publish refused for %s: %d %s", client_address(request.scope), refused.status, refused.error)
            body = {"error": refused.error} | ({"field": refused.field} if refused.field else {})
            return JSONResponse(body, refused.status, {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None)
        send = {"user_id": gateway.emit_to_user, "room": gateway.emit_to_room}
        for published, (target, name, event, data) in enumerate(messages):
            try:
                await (send[target](name, event, data) if target in send else gateway.broadcast(event, data))
            except RedisUnavailable as error:  # messages before this one reached every node; this one this node only
                body = {"error": str(error), "published": published}
                return JSONResponse(body, 503, {"Retry-After": str(int(CLOSE_TIMEOUT))})
            gateway.metrics.published.labels(target.removesuffix("_id")).inc()
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
    target, name = targets[0], message[targets[0]]
    if target == "broadcast" and name is not True:
        raise PublishRefused(422, "broadcast must be true", at + target)
    if target != "broadcast":
        checked(check_user_id if target == "user_id" else check_room, name, at + target)
    if nesting(message.get("data")) > MAX_NESTING:  # checked here, so that a batch is sent whole or not at all
        raise PublishRefused(422, f"data nests deeper than {MAX_NESTING} levels", at + "data")
    return target, name, checked(check_event, message.get("event"), at + "event"), message.get("data")


def nesting(data: Any) -> int:
    """How many levels of arrays and objects `data` has, counted without recursion."""
    depth, level = 0, [data]
    while containers := [item for item in level if isinstance(item, list | dict)]:
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def checked(check: Callable[[Any], str], value: Any, field: str) -> str:
    """Run one of the gateway's own checks, turning its error into a 422 naming `field`."""
    try:
        return check(value)
    except (ValueError, RecursionError) as error:
        raise PublishRefused(422, str(error) or type(error).__name__, field) from None


def watch_for_shutdown(gateway: SocketGateway) -> None:
    """On SIGTERM, mark the gateway as shutting down and close every session, then let the server's handler run.

    uvicorn closes the sockets before the lifespan hears of the shutdown: this tells the disconnects it causes
    apart from clients that went away, and answers pending long-polls at once instead of at their timeout.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread; a server run in another thread keeps its own
    server_handler, loop = signal.getsignal(signal.SIGTERM), asyncio.get_running_loop()

    def answer_long_polls() -> None:  # a NOOP answers a pending poll; the client's next one finds the server gone
        for sid, eio_sid in gateway.manager.get_participants(NAMESPACE, None):
            if gateway.sio.transport(sid, NAMESPACE) == "polling":
                gateway.sio.spawn(gateway.sio.eio.send_packet(eio_sid, eio_packet.Packet(eio_packet.NOOP)))

    def on_sigterm(signum: int, frame: Any) -> None:
        gateway.shutting_down = True
        loop.call_soon_threadsafe(answer_long_polls)
        if callable(server_handler):
            server_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def space_out_full_collections() -> None:
    """Let Python's garbage collector run a full collection after FULL_COLLECTION_AFTER middle-generation ones, not 10.

    A full collection walks every live object, and a node's live objects grow with its connections: connecting
    2,000 clients ran 5 of them, about 120 ms each, a fifth of the CPU of those connects.
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
        for task in list(gateway.sio.tasks):
            task.cancel()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(os.getpid())  # drops this worker's live gauges from the sums

    own_routes = [Route("/health", health), ready_route(gateway)]
    if gateway.settings.metrics:
        own_routes.append(metrics_route(gateway))
    if gateway.settings.publish_key is not None:
        own_routes.append(publish_route(gateway))
    http = Starlette(routes=[*own_routes, *routes], lifespan=lifespan)
    socketio_app = socketio.ASGIApp(gateway.sio, other_asgi_app=http, socketio_path=SOCKETIO_PATH)
    return guard_polling_posts(socketio_app, gateway.settings.max_message_bytes, gateway.settings.ping_timeout)


def is_socketio_path(path: str) -> bool:
    """The paths python-engineio's ASGIApp serves: /socket.io, and everything under /socket.io/."""
    return (path if path.endswith("/") else path + "/").startswith(SOCKETIO_PATH)


def guard_polling_posts(app: ASGIApp, max_bytes: int, seconds: float) -> ASGIApp:
    """Answer 413 to a long-polling POST announcing more than `max_bytes` (or no length) before reading its body,
    and 400 to one that python-engineio has not answered within `seconds`.

    python-engineio checks the length only after the first body chunk, and on some client errors it waits for
    the client's next poll before answering the POST.
    """

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not is_socketio_path(scope["path"]):
            return await app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit() or int(length) > max_bytes:
            return await PlainTextResponse(f"a message is at most {max_bytes} bytes", 413)(scope, receive, send)
        started = False

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(app(scope, receive, noting_send), seconds)
        except TimeoutError:
            if not started:
                await PlainTextResponse("not answered in time", 400)(scope, receive, send)

    return guarded


app = create_app(gateway)
