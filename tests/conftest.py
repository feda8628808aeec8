"""Shared test helpers: a real uvicorn on 127.0.0.1, real Socket.IO clients, tokens signed with a test secret."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + "x" * 40

# Tests never see the developer's own GATEWAY_* variables; the module-level gateway uses the test secret.
for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
    del os.environ[name]
os.environ["GATEWAY_JWT_SECRET"] = SECRET
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # the benchmark's helpers: raw WebSocket clients, process measurements

import socketio  # noqa: E402
import uvicorn  # noqa: E402

from auth import mint_token  # noqa: E402
from gateway import NAMESPACE, Settings, SocketGateway, create_server  # noqa: E402
from harness import wait_for_port  # noqa: E402, F401  (re-exported to the tests)

TIMEOUT = 10  # seconds any single wait may take before a test fails
# ./run test runs three legs at once: they must not share hypothesis' example database.
settings.register_profile("side-by-side", database=None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def token(user_id: str, ttl: float = 3600, secret: str = SECRET, **claims: Any) -> str:
    return mint_token(user_id, secret, ttl, **claims)


def make_gateway(**env: str) -> SocketGateway:
    """A fresh gateway and Socket.IO server configured as GATEWAY_<name>=<value> for each keyword."""
    environ = {"GATEWAY_JWT_SECRET": SECRET, **{f"GATEWAY_{k}": v for k, v in env.items()}}
    settings = Settings(environ)
    return SocketGateway(create_server(settings), settings)


def listening_socket(port: int = 0) -> socket.socket:
    """A socket bound to 127.0.0.1 (a free port by default) and listening: clients may connect before the server runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    return sock


@contextlib.asynccontextmanager
async def serve(app: Any, port: int = 0) -> AsyncIterator[str]:
    """Run `app` under a real uvicorn in this event loop (on `port`, or a free one); yield its base URL."""
    sock = listening_socket(port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, for state the server changes a moment after a client acts; fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {TIMEOUT} s")
        await asyncio.sleep(0.005)


async def nothing_left(leftovers: Callable[[], dict[str, Any]], timeout: float = TIMEOUT) -> None:
    """Wait until `leftovers()` is empty: a leak never converges, and the failure names what is left."""
    deadline = time.monotonic() + timeout
    while left := leftovers():
        if time.monotonic() > deadline:
            raise AssertionError(f"left after {timeout} s: {left}")
        await asyncio.sleep(0.005)


def server_state(gateway: SocketGateway) -> dict[str, int]:
    """What the server keeps per connection, and the process resources a leak would grow."""
    return {
        "engine.io sockets": len(gateway.sio.eio.sockets),
        "environs": len(gateway.sio.environ),
        "rooms": len(gateway.manager.rooms.get(NAMESPACE, {})),
        "pending connects": len(getattr(gateway.manager, "pending_connect", {})),  # python-socketio 5.18 and later
        "gateway tasks": len(gateway.sio.tasks),
        "stall marks": len(gateway.manager.full_since),
        "replay marks and held events": len(gateway.manager.marks) + len(gateway.manager.held),
        "expiry timers": len(gateway._deadlines),
        "asyncio tasks": len(asyncio.all_tasks()),
        "file descriptors": len(os.listdir("/proc/self/fd")),
    }


def grown_since(baseline: dict[str, int], gateway: SocketGateway) -> dict[str, str]:
    """The parts of `server_state` that are larger than in `baseline`, as "before -> now"."""
    state = server_state(gateway)
    return {name: f"{baseline[name]} -> {state[name]}" for name in state if state[name] > baseline[name]}


class Client:
    """A real python-socketio client that records every event it receives, in order."""

    def __init__(self, **client_options: Any) -> None:
        self.sio = socketio.AsyncClient(reconnection=False, **client_options)
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.connect_error: Any = None
        self.disconnected = asyncio.Event()
        self.disconnect_reason: Any = None
        self.sio.on("*", self._record)
        self.sio.on("connect_error", self._record_connect_error)
        self.sio.on("disconnect", self._record_disconnect)

    async def _record(self, event: str, *args: Any) -> None:
        await self.events.put((event, args[0] if len(args) == 1 else args))

    async def _record_connect_error(self, data: Any = None) -> None:
        self.connect_error = data

    async def _record_disconnect(self, reason: Any = None) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    async def wait_disconnected(self) -> Any:
        await asyncio.wait_for(self.disconnected.wait(), TIMEOUT)
        return self.disconnect_reason

    @property
    def sid(self) -> str:
        return self.sio.get_sid()

    async def connect(
        self, url: str, auth: Any = None, transports: list[str] | None = None, wait_timeout: float = TIMEOUT
    ) -> None:
        await self.sio.connect(url, auth=auth, transports=transports or ["websocket"], wait_timeout=wait_timeout)

    async def next_event(self) -> tuple[str, Any]:
        return await asyncio.wait_for(self.events.get(), TIMEOUT)

    async def events_until(self, marker: str) -> list[tuple[str, Any]]:
        """Every event received before `marker`; the server sends in order, so nothing else is still in flight."""
        seen = []
        while (event := await self.next_event())[0] != marker:
            seen.append(event)
        return seen

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@contextlib.asynccontextmanager
async def connected(url: str, *user_ids: str, **connect_options: Any) -> AsyncIterator[list[Client]]:
    """One connected client per user id given (repeat an id for several tabs of one user)."""
    clients = [Client() for _ in user_ids]
    try:
        for client, user_id in zip(clients, user_ids):
            await client.connect(url, auth={"token": token(user_id)}, **connect_options)
        yield clients
    finally:
        for client in clients:
            await client.close()


async def refusal(url: str, auth: Any, **connect_options: Any) -> Any:
    """Connect with `auth`, expect a refusal, and return the connect_error payload the client got."""
    client = Client()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(url, auth=auth, **connect_options)
    await client.close()
    return client.connect_error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_program(name: str) -> str:
    """The path of an installed program; outside CI a missing one skips the test, in CI it fails it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it: apt-get install -y {name})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    """A real redis-server on 127.0.0.1, started and stopped by the tests; it can be killed and started again."""

    def __init__(self, port: int | None = None) -> None:
        self.executable = require_program("redis-server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> RedisServer:
        command = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        for line in self.process.stdout:  # ends (and fails below) if redis-server exits
            if "Ready to accept connections" in line:
                return self
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(TIMEOUT)
            self.process.stdout.close()
            self.process = None


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[RedisServer]:
    server = RedisServer(port).start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def gateway_process(
    *args: str, env: dict[str, str] | None = None, server: str = "uvicorn", app: str = "asgi:app"
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run `app` in its own server process on an inherited listening socket; yield (base URL, process).

    granian cannot take a socket: it binds a free port itself, and the base URL is yielded once that port accepts.
    """
    sock = listening_socket()
    fd = sock.fileno()
    port = sock.getsockname()[1]
    if server == "granian":
        sock.close()
    command = {
        "uvicorn": [sys.executable, "-m", "uvicorn", app, "--fd", str(fd), *args],
        "hypercorn": [sys.executable, "-m", "hypercorn", app, "--bind", f"fd://{fd}", *args],
        "./run start": [str(ROOT / "run"), "start", "--fd", str(fd), *args],  # the README's start command
        "granian": [sys.executable, "-m", "granian", "--interface", "asgi", "--port", str(port), app, *args],
    }[server]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update({"GATEWAY_JWT_SECRET": SECRET, **(env or {})})
    pass_fds = [] if server == "granian" else [fd]
    process = subprocess.Popen(command, cwd=ROOT, env=full_env, pass_fds=pass_fds, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, process)  # at once for an inherited socket; granian binds its port itself
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(TIMEOUT)
        sock.close()
