"""The one ASGI object: HTTP routes beside Socket.IO, one lifespan, more than one ASGI server, transport limits."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import socketio
from conftest import Client, connected, eventually, gateway_process, make_gateway, refusal, serve, token

from asgi import create_app

pytestmark = pytest.mark.anyio


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(get, url, headers)


async def test_health_answers_beside_socketio():
    async with serve(create_app(make_gateway())) as url:
        status, _, body = await fetch(f"{url}/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, _, _ = await fetch(f"{url}/no-such-route")
        assert status == 404
        status, _, body = await fetch(f"{url}/socket.io/?EIO=4&transport=polling")
        assert status == 200 and body.startswith(b"0{")


async def test_lifespan_shuts_the_socketio_server_down():
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url:
        async with connected(url, "alice"):
            pass
        assert gateway.sio.eio.service_task_handle is not None
    assert gateway.sio.eio.service_task_handle is None


async def test_extra_routes_of_the_backend_share_the_app():
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    gateway = make_gateway()

    async def notify(request):
        await gateway.emit_to_user(request.path_params["user_id"], "notification", {"text": "from a route"})
        return PlainTextResponse("sent")

    async with serve(create_app(gateway, routes=[Route("/notify/{user_id}", notify)])) as url:
        async with connected(url, "alice") as [alice]:
            status, _, body = await fetch(f"{url}/notify/alice")
            assert (status, body) == (200, b"sent")
            assert await alice.next_event() == ("notification", {"text": "from a route"})


def test_uvicorn_command_line_serves_the_app():
    with gateway_process() as (url, _):
        status, _, body = get(f"{url}/health")  # the socket listens already; this waits for the server
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        asyncio.run(check_accepts_and_refuses(url))


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
def test_other_asgi_servers_serve_the_same_app(server):
    with gateway_process(server=server) as (url, _):
        status, _, body = get(f"{url}/health")  # the socket listens already; this waits for the server
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        asyncio.run(check_accepts_and_refuses(url))


async def check_accepts_and_refuses(url: str) -> None:
    assert (await refusal(url, {"token": "x.y.z"}))["message"] == "invalid token"
    for transports in (["websocket"], ["polling", "websocket"]):
        client = Client()
        await client.connect(url, auth={"token": token("alice")}, transports=transports)
        assert client.sio.connected
        await client.sio.disconnect()


async def test_cross_origin_request_is_refused_unless_the_origin_is_allowed():
    async with serve(create_app(make_gateway())) as url:
        status, _, _ = await fetch(f"{url}/socket.io/?EIO=4&transport=polling", {"Origin": "https://evil.example"})
        assert status == 400
    allowed = make_gateway(CORS_ORIGINS="https://app.example")
    async with serve(create_app(allowed)) as url:
        status, headers, _ = await fetch(f"{url}/socket.io/?EIO=4&transport=polling", {"Origin": "https://app.example"})
        assert status == 200
        assert headers["access-control-allow-origin"] == "https://app.example"
        status, _, _ = await fetch(f"{url}/socket.io/?EIO=4&transport=polling", {"Origin": "https://evil.example"})
        assert status == 400


async def test_websocket_from_a_foreign_origin_is_refused():
    async with serve(create_app(make_gateway(CORS_ORIGINS="https://app.example"))) as url:
        client = Client()
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.sio.connect(
                url, auth={"token": token("alice")}, transports=["websocket"], wait_timeout=2,
                headers={"Origin": "https://evil.example"},
            )
        good = Client()
        await good.sio.connect(
            url, auth={"token": token("alice")}, transports=["websocket"], headers={"Origin": "https://app.example"}
        )
        assert good.sio.connected
        await good.close()


async def test_message_over_the_limit_closes_that_connection_only():
    gateway = make_gateway(MAX_MESSAGE_BYTES="10000")
    async with serve(create_app(gateway)) as url:
        async with connected(url, "alice", "bob") as [alice, bob]:
            await alice.sio.emit("anything", "x" * 20_000)
            await asyncio.wait_for(alice.disconnected.wait(), 10)
            await eventually(lambda: len(gateway.sio.eio.sockets) == 1)
            await gateway.emit_to_user("bob", "still", "here")
            assert await bob.next_event() == ("still", "here")


def test_notify_example_pushes_to_a_connected_user():
    with gateway_process(app="examples.notify:app") as (url, _):

        async def scenario() -> None:
            async with connected(url, "alice") as [alice]:
                request = urllib.request.Request(f"{url}/notify/alice", data=b"hello", method="POST")
                status = (await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)).status
                assert status == 200
                assert await alice.next_event() == ("notification", {"text": "hello"})

        asyncio.run(scenario())
