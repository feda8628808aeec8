"""The clients users really have: the official socket.io-client in Node, and in headless Chromium across origins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import uvicorn
from conftest import ROOT, TIMEOUT, listening_socket, make_gateway, require_program, serve, token

from asgi import create_app
from gateway import END_EVENT

pytestmark = pytest.mark.anyio

JS = ROOT / "tests" / "js"
NODE_MODULES = ROOT / "tests" / "node_modules"


def require_node_modules() -> str:
    node = require_program("node")
    if not (NODE_MODULES / "socket.io-client").is_dir():
        pytest.fail("tests/node_modules is missing: ./run test installs it with npm ci")
    return node


class NodeClient:
    """tests/js/node_client.mjs in its own Node process: each fact it reports is one JSON line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, token_text: str, transport: str = "default") -> NodeClient:
        node = require_node_modules()
        process = await asyncio.create_subprocess_exec(
            node, str(JS / "node_client.mjs"), url, token_text, transport,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT / "tests",
        )
        return cls(process)

    async def next_fact(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
        assert line, "the Node client exited"
        return json.loads(line)

    async def until(self, key: str, skipping: tuple[str, ...] = ("upgraded",)) -> dict[str, Any]:
        """The next fact that has `key`, skipping those with a key in `skipping` (upgrades come when they come)."""
        while True:
            fact = await self.next_fact()
            if key in fact:
                return fact
            assert any(skip in fact for skip in skipping), f"expected {key!r}, got {fact}"

    async def send(self, **command: Any) -> None:
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()

    async def close(self) -> None:
        if self.process.returncode is None:
            await self.send(close=True)
            await asyncio.wait_for(self.process.wait(), TIMEOUT)


@contextlib.asynccontextmanager
async def node_client(url: str, user_id: str, transport: str = "default") -> AsyncIterator[NodeClient]:
    client = await NodeClient.start(url, token(user_id), transport)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def live():
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url:
        yield gateway, url


@pytest.mark.parametrize("transport", ["websocket", "default"])
async def test_node_client_receives_user_room_and_broadcast_messages(live, transport):
    gateway, url = live
    async with node_client(url, "alice", transport) as alice, node_client(url, "bob", transport) as bob:
        sid = (await alice.until("connected"))["connected"]
        await bob.until("connected")
        await gateway.join_room(sid, "orders:7")
        await gateway.emit_to_user("alice", "note", {"to": "alice"})
        await gateway.emit_to_room("orders:7", "order", {"id": 7})
        await gateway.broadcast("news", "for everyone")
        assert await alice.until("event") == {"event": "note", "args": [{"to": "alice"}]}
        assert await alice.until("event") == {"event": "order", "args": [{"id": 7}]}
        assert await alice.until("event") == {"event": "news", "args": ["for everyone"]}
        assert await bob.until("event") == {"event": "news", "args": ["for everyone"]}


async def test_polling_client_upgrades_to_websocket(live):
    gateway, url = live
    async with node_client(url, "alice") as alice:
        facts = [await alice.next_fact(), await alice.next_fact()]  # connect and upgrade, in either order
        assert {"upgraded": "websocket"} in facts and any("connected" in fact for fact in facts)
        await gateway.emit_to_user("alice", "after-upgrade", 1)
        assert await alice.until("event") == {"event": "after-upgrade", "args": [1]}


async def test_bad_token_gives_connect_error_with_the_gateways_message(live):
    _, url = live
    client = await NodeClient.start(url, "not-a-jwt", "websocket")
    try:
        assert await client.until("connect_error") == {"connect_error": "invalid token", "data": {"reason": "invalid"}}
    finally:
        await client.close()


async def test_expired_token_is_told_apart_and_retried_with_a_fresh_one(live):
    gateway, url = live
    client = await NodeClient.start(url, token("alice", ttl=-60), "websocket")
    try:
        error = await client.until("connect_error")
        assert error == {"connect_error": "token expired", "data": {"reason": "expired"}}
        await client.send(token=token("alice"))
        await client.until("connected")
        await gateway.emit_to_user("alice", "welcome-back", 1)
        assert await client.until("event") == {"event": "welcome-back", "args": [1]}
    finally:
        await client.close()


async def test_refresh_without_reconnecting(live):
    gateway, url = live
    async with node_client(url, "alice", "websocket") as alice:
        sid = (await alice.until("connected"))["connected"]
        await alice.send(refresh=token("alice", ttl=600))
        ack = (await alice.until("ack"))["ack"]
        assert ack["ok"] is True and ack["expires_at"] > 0
        await alice.send(refresh=token("mallory", ttl=600))
        assert (await alice.until("ack"))["ack"] == {
            "ok": False, "reason": "invalid", "error": "token is for another user"
        }
        await gateway.emit_to_user("alice", "same-connection", sid)
        assert await alice.until("event") == {"event": "same-connection", "args": [sid]}


async def test_logout_reason_reaches_the_node_client(live):
    gateway, url = live
    async with node_client(url, "alice", "websocket") as alice:
        await alice.until("connected")
        await gateway.disconnect_user("alice")
        assert await alice.until("event") == {"event": END_EVENT, "args": [{"reason": "logout"}]}
        assert await alice.until("disconnected") == {"disconnected": "io server disconnect"}


async def test_client_reconnects_by_itself_after_the_server_restarts():
    gateway = make_gateway()
    sock = listening_socket()
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), log_level="warning", timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with node_client(url, "alice", "websocket") as alice:
        await alice.until("connected")
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()
        assert (await alice.until("disconnected"))["disconnected"] in ("transport close", "transport error")
        restarted = make_gateway()  # a new process would have a new gateway; the client only knows the URL
        async with serve(create_app(restarted), port=port):
            # Attempts made while the port was closed fail with "websocket error" until one reaches the new server.
            await alice.until("connected", skipping=("upgraded", "connect_error"))
            await restarted.emit_to_user("alice", "after-restart", 1)
            assert await alice.until("event") == {"event": "after-restart", "args": [1]}


# ---- a real browser, the page on another origin --------------------------------------------------------


@contextlib.contextmanager
def static_site(files: dict[str, Path]):
    """Serve `files` (URL path -> file) over HTTP on 127.0.0.1: a page origin other than the gateway's."""

    class Handler(SimpleHTTPRequestHandler):
        def translate_path(self, path: str) -> str:
            return str(files.get(path.split("?")[0], Path("/nonexistent")))

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(ROOT)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.asynccontextmanager
async def browser_page(page_url: str) -> AsyncIterator[NodeClient]:
    """tests/js/browser.mjs: Playwright drives Debian's chromium to `page_url` and reports what the page shows."""
    node = require_node_modules()
    chromium = require_program("chromium")
    process = await asyncio.create_subprocess_exec(
        node, str(JS / "browser.mjs"), chromium, page_url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT / "tests",
    )
    page = NodeClient(process)
    try:
        yield page
    finally:
        await page.close()


def example_page_url(site: str, gateway_url: str, token_text: str, client: str = "/socket.io.min.js") -> str:
    query = urlencode({"gateway": gateway_url, "token": token_text, "client": client})
    return f"{site}/live.html?{query}"


SITE_FILES = {
    "/live.html": ROOT / "examples" / "live.html",
    "/socket.io.min.js": NODE_MODULES / "socket.io-client" / "dist" / "socket.io.min.js",
}


async def test_browser_on_an_allowed_origin_shows_a_message_from_emit_to_user():
    with static_site(SITE_FILES) as site:
        gateway = make_gateway(CORS_ORIGINS=site)
        async with serve(create_app(gateway)) as url:
            async with browser_page(example_page_url(site, url, token("alice"))) as page:
                assert (await page.until("status"))["status"].startswith("connected")
                await gateway.emit_to_user("alice", "notification", {"text": "hello from the backend"})
                message = (await page.until("message"))["message"]
                assert "notification" in message and "hello from the backend" in message


async def test_browser_on_an_origin_not_allowed_is_refused():
    with static_site(SITE_FILES) as site:
        gateway = make_gateway(CORS_ORIGINS="https://app.example")
        async with serve(create_app(gateway)) as url:
            async with browser_page(example_page_url(site, url, token("alice"))) as page:
                status = (await page.until("status"))["status"]
                assert status.startswith("error"), status
                assert not gateway.sio.manager.rooms.get("/")


@contextlib.contextmanager
def foreign_origin() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on another origin that records every connection made to it and answers any request with a
    script that would show on the page that it ran; yields its host:port and the record."""
    connections: list[str] = []

    class Recording(ThreadingHTTPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            connections.append(f"{client_address[0]}:{client_address[1]}")
            return True

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'document.getElementById("status").textContent = "foreign script ran";'
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = Recording(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", connections
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "form", ["http://{host}/socket.io.min.js", "//{host}/socket.io.min.js"], ids=["absolute", "protocol-relative"]
)
async def test_example_page_refuses_a_client_script_from_another_origin(form):
    with static_site(SITE_FILES) as site, foreign_origin() as (host, connections):
        client = form.format(host=host)
        # The gateway URL does not matter: the page must stop before it loads any client.
        async with browser_page(example_page_url(site, site, token("alice"), client)) as page:
            status = (await page.until("status"))["status"]
        assert status.startswith(f"error: refused to load client {client}: only "), status
        assert connections == []
