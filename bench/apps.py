"""The two servers the benchmark compares, each with the same POST /bench/emit route that makes it emit.

- `gateway_app`: this project's `asgi:app` as configured by GATEWAY_* (JWT-checked connections). With
  BENCH_GATEWAY_TREE=DIR, the gateway's modules come from another checkout (to measure before against after).
- `bare_app`: python-socketio with the same transport settings and no authentication; a connection joins
  `user:{auth.user}` so targeted emits have the same rooms to reach.
BENCH_COUNTERS and BENCH_GC_THRESHOLD ask either for more (`bench_extras`).
Never deploy either: /bench/emit lets anyone emit.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sys
import time

import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def emit_route(broadcast, emit_to_user) -> Route:
    """POST /bench/emit {"kind": "fanout" | "targeted" | "latency", "count": n, "users": u, "spacing": turns}.

    The emits are awaited one after the other. With `spacing`, the route lets the event loop turn that many times
    after each emit, so that every connection's writer has sent what it got before the next emit ("spaced"); without
    it, a server whose emit does not yield queues a burst and its writers send several messages per wake-up.
    """

    async def emit(request: Request) -> JSONResponse:
        job = await request.json()
        users, spacing = job["users"], job.get("spacing", 0)
        for n in range(job["count"]):
            if job["kind"] == "fanout":
                await broadcast("msg", {"sent": time.time(), "text": "x" * 60})
            elif job["kind"] == "targeted":
                await emit_to_user(f"user{n % users}", "msg", {"sent": time.time()})
            else:  # latency: light load, one emit every 5 ms
                await emit_to_user(f"user{random.randrange(users)}", "msg", {"sent": time.time()})
                await asyncio.sleep(0.005)
            for _ in range(spacing):
                await asyncio.sleep(0)
        return JSONResponse({"emitted": job["count"]})

    return Route("/bench/emit", emit, methods=["POST"])


def bench_extras() -> list[Route]:
    """What the bench's environment asks of a server process, besides the app itself.

    BENCH_GC_THRESHOLD=700,10,30 sets Python's garbage-collection thresholds, as an application could at start-up.
    BENCH_COUNTERS=1 adds GET /bench/counters: how often python-engineio's writer tasks woke and how many packets they
    took (by wrapping `AsyncSocket.poll`, the call each connection's writer makes to wait for packets: a method of
    python-engineio's internal socket class, wrapped here only), and how many full garbage collections ran, for how
    much CPU time (`gc.callbacks`). Nothing of the gateway uses either.
    """
    if threshold := os.environ.get("BENCH_GC_THRESHOLD"):
        gc.set_threshold(*(int(value) for value in threshold.split(",")))
    if os.environ.get("BENCH_COUNTERS") != "1":
        return []
    from engineio import async_socket

    counters = {"wakeups": 0, "packets": 0, "full_collections": 0, "full_collection_seconds": 0.0}
    poll, started = async_socket.AsyncSocket.poll, [0.0]

    async def counting_poll(self):
        packets = await poll(self)
        counters["wakeups"] += 1
        counters["packets"] += len(packets)
        return packets

    def time_full_collections(phase: str, info: dict) -> None:
        if info["generation"] == 2 and phase == "start":
            started[0] = time.process_time()
        elif info["generation"] == 2:
            counters["full_collections"] += 1
            counters["full_collection_seconds"] += time.process_time() - started[0]

    async_socket.AsyncSocket.poll = counting_poll
    gc.callbacks.append(time_full_collections)

    async def report(request: Request) -> JSONResponse:
        return JSONResponse(counters)

    return [Route("/bench/counters", report)]


def make_gateway_app():
    if tree := os.environ.get("BENCH_GATEWAY_TREE"):
        sys.path.insert(0, tree)  # its asgi, gateway and auth modules, ahead of this checkout's
    from asgi import create_app
    from gateway import gateway

    return create_app(gateway, routes=[emit_route(gateway.broadcast, gateway.emit_to_user), *bench_extras()])


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

    http = Starlette(routes=[emit_route(broadcast, emit_to_user), *bench_extras()])
    return socketio.ASGIApp(sio, other_asgi_app=http)
