"""One ASGI object: Socket.IO at /socket.io/ and a small Starlette app for everything else."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import socketio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth import start_key_refresh, stop_key_refresh
from gateway import RedisUnavailable, SocketGateway, check_event, check_room, check_user_id, client_address, gateway

logger = logging.getLogger("gateway.publish")

MAX_BATCH = 1000
READ_TIMEOUT = 10  # seconds a /publish body may take to arrive
POST_TIMEOUT = 5  # seconds python-engineio may take to answer a long-polling POST
MAX_NESTING = 100  # levels of arrays and objects in published data: json.dumps recurses once per level
TARGETS: dict[str, Callable[[Any], Any]] = {"user_id": check_user_id, "room": check_room, "broadcast": lambda x: x}
SOCKETIO_PATH = "/socket.io/"


class PublishRefused(Exception):
    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status, self.body = status, {"error": error} | ({"field": field} if field else {})


def publish_route(gateway: SocketGateway) -> Route:
    """POST /publish: a server-to-server way to reach users, rooms or everyone, with a bearer key."""
    key = str(gateway.settings.publish_key).encode()

    async def publish(request: Request) -> JSONResponse:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), key):
                raise PublishRefused(401, "missing or wrong publish key")
            body = await read_json(request, gateway.settings.publish_max_bytes)  # within READ_TIMEOUT
            batch = body if isinstance(body, list) else [body]
            if len(batch) > MAX_BATCH:
                raise PublishRefused(422, f"a batch holds at most {MAX_BATCH} messages")
            messages = [parse_message(message, f"[{i}]." if batch is body else "") for i, message in enumerate(batch)]
        except PublishRefused as refused:
            logger.info("publish refused for %s: %d %s", client_address(request.scope), refused.status, refused)
            headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
            return JSONResponse(refused.body, refused.status, headers)
        emit = {"user_id": gateway.emit_to_user, "room": gateway.emit_to_room}
        for published, (target, name, event, data) in enumerate(messages):
            try:  # all checked above, so a batch goes whole unless Redis fails mid-way
                await (emit[target](name, event, data) if target in emit else gateway.broadcast(event, data))
            except RedisUnavailable as error:  # the ones before reached every node; this one this node only
                return JSONResponse({"error": str(error), "published": published}, 503, {"Retry-After": "5"})
            gateway.metrics.published.labels(target.removesuffix("_id")).inc()
        return JSONResponse({"published": len(messages)})

    return Route("/publish", publish, methods=["POST"])


async def read_json(request: Request, max_bytes: int) -> Any:
    """The JSON body, refused with 415, 413, 408 or 400 before more than `max_bytes` are read."""
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
        raise PublishRefused(415, "Content-Type must be application/json")
    body, length = b"", request.headers.get("content-length", "0")  # a chunked body has none: counted as it comes
    if not length.isdigit() or int(length) > max_bytes:
        raise PublishRefused(413, f"body larger than {max_bytes} bytes")
    try:
        async with asyncio.timeout(READ_TIMEOUT):  # a body sent slowly must not hold a request (and a shutdown)
            async for chunk in request.stream():
                if len(body := body + chunk) > max_bytes:
                    raise PublishRefused(413, f"body larger than {max_bytes} bytes")
        return json.loads(body, parse_constant=finite, parse_float=finite)
    except TimeoutError:
        raise PublishRefused(408, f"body not received within {READ_TIMEOUT} s") from None
    except (ValueError, RecursionError):
        raise PublishRefused(400, "body is not valid JSON") from None


def finite(text: str) -> float:
    if not math.isfinite(number := float(text)):  # NaN, Infinity, 1e400: Python reads them, browsers do not
        raise ValueError(f"{text} is not a finite number")
    return number


def parse_message(message: Any, at: str) -> tuple[str, Any, str, Any]:
    """A message names one target, an event and optional data; every check raises PublishRefused naming the field."""
    if not isinstance(message, dict):
        raise PublishRefused(422, "a message must be a JSON object", at.rstrip(".") or None)
    if unknown := [field for field in message if field not in {*TARGETS, "event", "data"}]:
        raise PublishRefused(422, "unknown field: use user_id, room, broadcast, event and data", at + unknown[0])
    if len(targets := [field for field in TARGETS if field in message]) != 1:
        raise PublishRefused(422, "name exactly one target: user_id, room or broadcast", at + "user_id|room|broadcast")
    if message.get("broadcast", True) is not True:
        raise PublishRefused(422, "broadcast must be true", at + "broadcast")
    if nesting(message.get("data")) > MAX_NESTING:  # checked here, so that a batch is sent whole or not at all
        raise PublishRefused(422, f"data nests deeper than {MAX_NESTING} levels", at + "data")
    for field, check in [(targets[0], TARGETS[targets[0]]), ("event", check_event)]:
        try:
            check(message.get(field))  # raises, or returns the value unchanged
        except ValueError as error:
            raise PublishRefused(422, str(error), at + field) from None
    return targets[0], message[targets[0]], message["event"], message.get("data")


def nesting(data: Any) -> int:
    """How many levels of arrays and objects `data` has, counted without recursion."""
    depth, level = 0, [data]
    while containers := [item for item in level if isinstance(item, list | dict)]:
        depth += 1
        level = [child for item in containers for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def watch_for_shutdown(gateway: SocketGateway) -> None:
    """On SIGTERM, mark the gateway as shutting down and answer pending long-polls, then run the server's handler."""
    server_handler, loop = signal.getsignal(signal.SIGTERM), asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: Any) -> None:
        gateway.shutting_down = True  # uvicorn closes the sockets before the lifespan hears of the shutdown
        loop.call_soon_threadsafe(gateway.sio.answer_long_polls)  # uvicorn waits for them: a NOOP ends each at once
        if callable(server_handler):
            server_handler(signum, frame)

    with contextlib.suppress(ValueError):  # raised off the main thread: a server run in another thread keeps its own
        signal.signal(signal.SIGTERM, on_sigterm)


def create_app(gateway: SocketGateway, routes: Sequence[BaseRoute] = ()) -> ASGIApp:
    """Combine `gateway`'s Socket.IO server with the HTTP routes (and any of yours) under one lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway.start()
        await start_key_refresh(gateway.settings.jwt)
        watch_for_shutdown(gateway)
        yield
        await gateway.stop()
        stop_key_refresh(gateway.settings.jwt)
        await gateway.sio.shutdown()
        for task in list(gateway.sio.tasks):
            task.cancel()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(os.getpid())  # drops this worker's live gauges from the sums

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if problem := await gateway.ready_problem():  # a reason without addresses: those go to the log
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        await gateway.ready_problem()  # refreshes gateway_redis_up
        registry = gateway.metrics.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # --workers N: every worker's values summed
            multiprocess.MultiProcessCollector(registry := CollectorRegistry())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    own_routes = [Route("/health", health), Route("/ready", ready)]
    own_routes += [Route("/metrics", metrics)] if gateway.settings.metrics else []  # keep it off the public network
    own_routes += [publish_route(gateway)] if gateway.settings.publish_key else []
    http = Starlette(routes=[*own_routes, *routes], lifespan=lifespan)
    socketio_app = socketio.ASGIApp(gateway.sio, other_asgi_app=http, socketio_path=SOCKETIO_PATH)
    return guard_polling_posts(socketio_app, gateway.settings.max_message_bytes, POST_TIMEOUT, gateway.sio.spawn)


def is_socketio_path(path: str) -> bool:
    """The paths python-engineio's ASGIApp serves: /socket.io, and everything under /socket.io/."""
    return (path + "/").startswith(SOCKETIO_PATH)


def guard_polling_posts(
    app: ASGIApp, max_bytes: int, seconds: float, spawn: Callable[[Any], asyncio.Task[None]]
) -> ASGIApp:
    """Answer a long-polling POST with 413 if it announces over `max_bytes` (or no length), 400 if not in `seconds`."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not is_socketio_path(scope["path"]):
            return await app(scope, receive, send)
        # python-engineio checks the length only after the first body chunk
        if not (length := dict(scope["headers"]).get(b"content-length", b"")).isdigit() or int(length) > max_bytes:
            return await PlainTextResponse(f"a message is at most {max_bytes} bytes", 413)(scope, receive, send)
        started = answered = False

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            if not answered:  # python-engineio's own answer, unless it came too late
                await send(message)

        # Outlived, never cancelled: python-socketio reads a cancelled connect handler as one that accepted.
        handling = spawn(app(scope, receive, noting_send))  # a task kept referenced until it ends
        with contextlib.suppress(TimeoutError, KeyError):  # KeyError: a POST to a session python-engineio is closing
            await asyncio.wait_for(asyncio.shield(handling), seconds)  # on some errors it waits for the next poll
        if answered := not started:
            await PlainTextResponse("session closed or not answered in time", 400)(scope, receive, send)

    return guarded


app = create_app(gateway)
