"""The two servers the benchmark compares, each with the same POST /bench/emit route that makes it emit.

- `gateway_app`: this project's `asgi:app` as configured by GATEWAY_* (JWT-checked connections).
- `bare_app`: python-socketio with the same transport settings and no authentication; a connection joins
  `user:{auth.user}` so targeted emits have the same rooms to reach.
Never deploy either: /bench/emit lets anyone emit.
"""

from __future__ import annotations

import asyncio
import random
import time

import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def emit_route(broadcast, emit_to_user) -> Route:
    """POST /bench/emit {"kind": "fanout" | "targeted" | "latency", "count": n, "users": u}."""

    async def emit(request: Request) -> JSONResponse:
        job = await request.json()
        users = job["users"]
        for n in range(job["count"]):
            if job["kind"] == "fanout":
                await broadcast("msg", {"sent": time.time(), "text": "x" * 60})
            elif job["kind"] == "targeted":
                await emit_to_user(f"user{n % users}", "msg", {"sent": time.time()})
            else:  # latency: light load, one emit every 5 ms
                await emit_to_user(f"user{random.randrange(users)}", "msg", {"sent": time.time()})
                await asyncio.sleep(0.005)
        return JSONResponse({"emitted": job["count"]})

    return Route("/bench/emit", emit, methods=["POST"])


def make_gateway_app():
    from asgi import create_app
    from gateway import gateway

    return create_app(gateway, routes=[emit_route(gateway.broadcast, gateway.emit_to_user)])


def make_bare_app():
    from gateway import settings  # the same transport settings, read the same way

    sio = socketio.AsyncServer(
        async_mode="asgi",
        transports=settings.transports,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        max_http_buffer_size=settings.max_message_bytes,
    )

    @sio.on("connect")
    async def connect(sid, environ, auth):
        await sio.enter_room(sid, f"user:{auth['user']}")

    async def broadcast(event, data):
        await sio.emit(event, data)

    async def emit_to_user(user_id, event, data):
        await sio.emit(event, data, to=f"user:{user_id}")

    http = Starlette(routes=[emit_route(broadcast, emit_to_user)])
    return socketio.ASGIApp(sio, other_asgi_app=http)
