"""Every close the server starts is bounded in time and leaves nothing behind, over both transports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal

import aiohttp
import pytest
from conftest import (
    TIMEOUT,
    connected,
    eventually,
    gateway_process,
    grown_since,
    make_gateway,
    nothing_left,
    redis_server,
    refusal,
    serve,
    server_state,
    token,
)

import gateway as gateway_module
from asgi import create_app, is_socketio_path
from gateway import END_EVENT

from soak import client_frame, raw_websocket, server_text

pytestmark = pytest.mark.anyio

QUICK = {"PING_INTERVAL": "1", "PING_TIMEOUT": "1"}  # python-engineio sweeps closed sessions once a ping timeout


class Polling:
    """A raw long-polling Engine.IO client: it polls only when told to, as a client that vanished would not."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url, self.sid = http, url, ""

    async def open(self) -> Polling:
        async with self.http.get(f"{self.url}/socket.io/?EIO=4&transport=polling") as response:
            self.sid = json.loads((await response.text())[1:])["sid"]
        return self

    async def post(self, *packets: str) -> int:
        url = f"{self.url}/socket.io/?EIO=4&transport=polling&sid={self.sid}"
        async with self.http.post(url, data="\x1e".join(packets).encode()) as response:
            return response.status

    async def poll(self) -> list[str]:
        async with self.http.get(f"{self.url}/socket.io/?EIO=4&transport=polling&sid={self.sid}") as response:
            return (await response.text()).split("\x1e") if response.status == 200 else [f"status {response.status}"]


@pytest.fixture
async def live(monkeypatch):
    monkeypatch.setattr(gateway_module, "CLOSE_TIMEOUT", 1.0)
    gateway = make_gateway(JWT_LEEWAY="0", **QUICK)
    async with serve(create_app(gateway)) as url, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(TIMEOUT)) as http:
        yield gateway, url, http


async def test_refused_polling_connects_whose_client_never_polls_again_leave_nothing(live):
    """Before: each left python-engineio's close waiting for a poll that never came, a task and ~7 KB for good."""
    gateway, url, http = live
    await Polling(http, url).open()  # warm up
    await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if gateway.sio.eio.sockets else {})
    baseline = server_state(gateway)
    for _ in range(300):
        assert await (await Polling(http, url).open()).post("40" + json.dumps({"token": "forged.token.here"})) == 200
    await nothing_left(lambda: grown_since(baseline, gateway))


async def test_a_malformed_packet_posted_over_polling_gets_an_answer_and_closes_the_session(live, caplog):
    gateway, url, http = live
    session = await Polling(http, url).open()
    assert await session.post("40" + json.dumps({"token": token("mallory")})) == 200
    await eventually(lambda: gateway.connection_count("mallory") == 1)
    assert await asyncio.wait_for(session.post("4abc"), TIMEOUT) == 200  # before: never answered
    await eventually(lambda: gateway.connection_count("mallory") == 0)
    assert "closed the connection of 127.0.0.1:" in caplog.text
    await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if gateway.sio.eio.sockets else {})


async def test_an_unknown_engineio_packet_posted_over_polling_is_answered(live):
    """python-engineio closes the session and waits for the client's next poll before answering such a POST."""
    gateway, url, http = live
    session = await Polling(http, url).open()
    assert await asyncio.wait_for(session.post("9"), TIMEOUT) in (200, 400)
    await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if gateway.sio.eio.sockets else {})


REQUESTS = ["malformed POST", "unknown packet POST", "long-poll GET", "long-poll GET, no CONNECT", "partial POST",
            "partial /publish"]


@pytest.mark.parametrize("request_kind", REQUESTS)
def test_sigterm_ends_plain_uvicorn_promptly_whatever_request_is_pending(request_kind):
    """`uvicorn asgi:app` without --timeout-graceful-shutdown waits for every request still open: each is bounded."""
    key = "publish-key-" + "k" * 40
    with gateway_process(env={"GATEWAY_PUBLISH_KEY": key}) as (url, process):

        async def scenario() -> None:
            async with aiohttp.ClientSession() as http:
                session = await Polling(http, url).open()
                if request_kind != "long-poll GET, no CONNECT":
                    assert await session.post("40" + json.dumps({"token": token("pat")})) == 200
                    assert (await session.poll())[0].startswith("40{")
                _, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
                polling = f"/socket.io/?EIO=4&transport=polling&sid={session.sid}"
                head = {  # each written to the server's socket, then left pending there
                    "partial POST": f"POST {polling} HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n42[",
                    "partial /publish": f"POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
                    f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n\r\n[",
                }.get(request_kind, f"GET {polling} HTTP/1.1\r\nHost: t\r\n\r\n")
                if "POST" in request_kind and "partial" not in request_kind:
                    # before: python-engineio never answered these, and SIGTERM waited for them for ever
                    body = "4abc" if request_kind == "malformed POST" else "9"
                    assert await asyncio.wait_for(session.post(body), TIMEOUT) in (200, 400)
                else:
                    writer.write(head.encode())
                    await writer.drain()
                process.send_signal(signal.SIGTERM)
                # Bounded by the longest wait a pending request may have: a /publish body's 10 s.
                await asyncio.wait_for(asyncio.to_thread(process.wait), TIMEOUT + 5)

        asyncio.run(scenario())
        assert process.returncode == -signal.SIGTERM


async def raw_request(url: str, head: str) -> bytes:
    """What the server answers to a request head written as is (no client library normalises the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(head.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n").encode())
    answer = await asyncio.wait_for(reader.read(65536), TIMEOUT)
    while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT) if b"\r\n\r\n" in answer else b"":
        answer += chunk
    writer.close()
    return answer


PATHS = ["/socket.io", "/socket.io/", "/socket.iox", "/socket.io/x", "/socket.io//", "/socket", "/x/socket.io/",
         "/SOCKET.IO/", "/socket.io/..", "/publish"]


@pytest.mark.parametrize("path", PATHS)
async def test_the_size_guard_covers_exactly_the_paths_python_engineio_serves(live, path):
    """A POST announcing 10 MB is refused from its headers exactly where python-engineio would take it."""
    gateway, url, _ = live
    handshake = await raw_request(url, f"GET {path}?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\n\r\n")
    served_by_engineio = handshake.startswith(b"HTTP/1.1 200") and b'0{"sid"' in handshake
    announced = await raw_request(url, f"POST {path}?EIO=4&transport=polling HTTP/1.1\r\nHost: t\r\n"
                                       f"Content-Length: 10000000\r\n\r\n")
    refused_from_headers = announced.startswith(b"HTTP/1.1 413")
    assert refused_from_headers == served_by_engineio == is_socketio_path(path)


async def test_a_session_that_answers_pings_but_never_connects_is_closed(live):
    """Before, the session lived as long as its client answered pings (over long-polling: no WebSocket keepalive)."""
    gateway, url, http = live
    session = await Polling(http, url).open()
    while (packets := await asyncio.wait_for(session.poll(), TIMEOUT)) not in (["1"], ["status 400"]):
        if "2" in packets:  # answer every ping, send nothing else
            await session.post("3")
    await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if gateway.sio.eio.sockets else {})


@pytest.mark.parametrize("ended_by", ["logout", "token_expired"])
async def test_a_connection_the_gateway_ended_cannot_connect_again_on_the_same_websocket(live, ended_by):
    """The transport closes too: a raw client that ignores DISCONNECT gets nothing for a second CONNECT."""
    gateway, url, _ = live
    reader, writer = await raw_websocket(url)
    assert (await server_text(reader)).startswith("0{")
    writer.write(client_frame("40" + json.dumps({"token": token("eve", ttl=1 if ended_by == "token_expired" else 60)})))
    assert (await server_text(reader)).startswith("40{")
    if ended_by == "logout":
        assert await gateway.disconnect_user("eve") == 1
    received = []
    while (text := await asyncio.wait_for(server_text(reader), TIMEOUT)) != "1":  # ends with Engine.IO CLOSE
        if text == "2":
            writer.write(client_frame("3"))  # answer pings while the token runs out
        else:
            received.append(text)
    assert received == [f'42["{END_EVENT}",{{"reason":"{ended_by}"}}]', "41"]
    writer.write(client_frame("40" + json.dumps({"token": token("eve")})))
    await writer.drain()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        while True:  # nothing but pings, until the server closes the WebSocket (within ping interval + timeout)
            assert await asyncio.wait_for(server_text(reader), TIMEOUT) in ("2", "6")
    assert gateway.connection_count("eve") == 0
    await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if gateway.sio.eio.sockets else {})
    writer.close()


async def test_a_polling_connection_the_gateway_ended_has_its_session_closed(live):
    gateway, url, http = live
    session = await Polling(http, url).open()
    assert await session.post("40" + json.dumps({"token": token("eve")})) == 200
    await eventually(lambda: gateway.connection_count("eve") == 1)
    await session.poll()  # the CONNECT reply
    pending = asyncio.ensure_future(session.poll())  # a real client always has its next poll waiting
    await eventually(lambda: gateway.sio.eio.sockets[session.sid].queue._getters)  # test-only peek: it waits
    await gateway.disconnect_user("eve")
    assert (await pending)[:2] == [f'42["{END_EVENT}",{{"reason":"logout"}}]', "41"]
    assert await session.post("40" + json.dumps({"token": token("eve")})) == 400  # the session is gone
    assert gateway.connection_count("eve") == 0


@pytest.mark.parametrize("transport", ["websocket", "polling"])
@pytest.mark.parametrize("with_redis", [False, True])
@pytest.mark.parametrize("failure", [RuntimeError, asyncio.CancelledError])
async def test_a_connect_handler_that_fails_is_refused_leaves_nothing_and_the_user_can_connect_again(
    monkeypatch, transport, with_redis, failure
):
    """python-socketio would keep the half-made connection, in the user's room and under the limit, for good; and
    it takes a cancelled handler (the lifespan cancels what is under way at shutdown) as one that accepted."""

    async def failing_save_session(*args, **kwargs):
        raise failure("a bug, or a dependency answering what it should not")

    with contextlib.ExitStack() as stack:
        env = {"REDIS_URL": stack.enter_context(redis_server()).url} if with_redis else {}
        gateway = make_gateway(MAX_CONNECTIONS_PER_USER="1", RECOVERY_SECONDS="60", **env)
        async with serve(create_app(gateway)) as url:
            monkeypatch.setattr(gateway.sio, "save_session", failing_save_session)
            refused = await refusal(url, {"token": token("una")}, transports=[transport])
            assert refused == {"message": "server error", "data": {"reason": "error"}}
            await nothing_left(lambda: {"una": n} if (n := gateway.connection_count("una")) else {})
            assert not (gateway.manager.held or gateway.pids or gateway._deadlines)
            monkeypatch.undo()
            async with connected(url, "una", transports=[transport]):
                assert gateway.connection_count("una") == 1


@pytest.mark.parametrize("packets", [("41", "1"), ("1",)])
async def test_a_polling_client_that_closes_its_own_session_has_its_pending_poll_answered(live, packets):
    """python-socketio's client posts DISCONNECT and CLOSE, then waits for its pending poll to end."""
    gateway, url, http = live
    session = await Polling(http, url).open()
    assert await session.post("40" + json.dumps({"token": token("ida")})) == 200
    await session.poll()  # the CONNECT reply
    pending = asyncio.ensure_future(session.poll())
    await eventually(lambda: gateway.sio.eio.sockets[session.sid].queue._getters)  # test-only peek: it waits
    assert await session.post(*packets) == 200
    # before: python-engineio answered it only after ping interval + timeout (a 400), and a shutdown waited for it
    assert await asyncio.wait_for(pending, TIMEOUT) == ["1"]
    await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if gateway.sio.eio.sockets else {})


async def test_a_client_that_stops_reading_is_ended_and_the_others_keep_receiving(monkeypatch, caplog):
    """Judged by progress: its queue held GATEWAY_MAX_QUEUED_MESSAGES and it took none for the ping timeout."""
    caplog.set_level(logging.WARNING, "gateway")
    monkeypatch.setattr(gateway_module, "CLOSE_TIMEOUT", 1.0)
    gateway = make_gateway(MAX_QUEUED_MESSAGES="100", PING_TIMEOUT="2", METRICS="1")
    async with serve(create_app(gateway)) as url, connected(url, "good") as [good]:
        _, writer = await raw_websocket(url, receive_buffer=4096)
        writer.write(client_frame("40" + json.dumps({"token": token("slow")})))
        await eventually(lambda: gateway.connection_count("slow") == 1)
        writer.transport.pause_reading()  # from here on the client reads nothing: the kernel buffers fill
        sent = 0
        while gateway.connection_count("slow"):
            assert sent < 20_000, "the client that stopped reading was never ended"
            await gateway.emit_to_user("slow", "big", "x" * 10_000)
            await gateway.emit_to_user("good", "n", sent)
            sent += 1
            await asyncio.sleep(0.001)  # a backend emitting about a thousand messages a second, not a burst
        assert [data for _, data in [await good.next_event() for _ in range(sent)]] == list(range(sent))
        stalled = gateway.metrics.registry.get_sample_value("gateway_disconnects_total", {"reason": "stalled"})
        assert stalled == 1 and "its client took nothing for 2 s" in caplog.text
        writer.close()  # what python-engineio's writer still held for it goes with the TCP connection
        await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if len(gateway.sio.eio.sockets) > 1
                           else {})


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_second_connect_after_a_refused_one_leaves_nothing_behind(live, transport):
    """Before: the refused session was still closing, python-socketio registered the second CONNECT, and the
    connect handler failed on it: the registration stayed for good."""
    gateway, url, http = live
    await Polling(http, url).open()
    await nothing_left(lambda: {"sessions": len(gateway.sio.eio.sockets)} if gateway.sio.eio.sockets else {})
    baseline = server_state(gateway)
    forged = "40" + json.dumps({"token": "forged.token.here"})
    for _ in range(50):
        if transport == "polling":
            await (await Polling(http, url).open()).post(forged, forged)
        else:
            reader, writer = await raw_websocket(url)
            writer.write(client_frame(forged) + client_frame(forged))
            await writer.drain()
            writer.close()
    await nothing_left(lambda: grown_since(baseline, gateway))
