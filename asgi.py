"""One ASGI object: Socket.IO at /socket.io/ and a small Starlette app for everything else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from gateway import SocketGateway, gateway


async def health(request: Request) -> JSONResponse:
    """Liveness: the process is up and serving."""
    return JSONResponse({"status": "ok"})


def create_app(gateway: SocketGateway, routes: Sequence[BaseRoute] = ()) -> socketio.ASGIApp:
    """Combine `gateway`'s Socket.IO server with the HTTP routes (and any of yours) under one lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.sio.shutdown()

    http = Starlette(routes=[Route("/health", health), *routes], lifespan=lifespan)
    return socketio.ASGIApp(gateway.sio, other_asgi_app=http, socketio_path="socket.io")


app = create_app(gateway)
