"""Clients that misbehave on purpose, spoken to with raw sockets where a Socket.IO client would not misbehave."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import urllib.request

import anyio.from_thread
import pytest
from conftest import connected, eventually, make_gateway, serve, token
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi import create_app
from gateway import NAMESPACE

pytestmark = pytest.mark.anyio


def client_frame(text: str) -> bytes:
    """One masked WebSocket text frame, as a client must send it."""
    data, mask = text.encode(), os.urandom(4)
    length = bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + struct.pack("!H", len(data))
    return bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def raw_websocket(url: str, receive_buffer: int = 4096) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket connection to the gateway's Engine.IO endpoint, with a small kernel receive buffer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_a_client_that_stops_reading_is_ended_and_the_others_keep_receiving():
    gateway = make_gateway(MAX_QUEUED_MESSAGES="100", METRICS="1")
    async with serve(create_app(gateway)) as url:
        async with connected(url, "good") as [good]:
            _, writer = await raw_websocket(url)
            writer.write(client_frame("40" + json.dumps({"token": token("slow")})))
            await writer.drain()
            await eventually(lambda: gateway.connection_count("slow") == 1)
            writer.transport.pause_reading()  # from here on the client reads nothing: the kernel buffers fill
            stalled_socket = gateway.sio.eio.sockets[
                gateway.manager.eio_sid_from_sid(
                    next(sid for sid, _ in gateway.manager.get_participants(NAMESPACE, "user:slow")), NAMESPACE
                )
            ]
            largest_queue = 0
            for n in range(2000):
                await gateway.emit_to_user("slow", "big", "x" * 10_000)
                await gateway.emit_to_user("good", "n", n)
                largest_queue = max(largest_queue, stalled_socket.queue.qsize())
                if n % 100 == 0:
                    await asyncio.sleep(0.01)  # let the server's writers run, as they would between real emits
            assert largest_queue <= 100 + 2  # the limit, plus the packets of the emit that found it full
            assert gateway.connection_count("slow") == 0
            assert [data for _, data in [await good.next_event() for _ in range(2000)]] == list(range(2000))
            stalled = gateway.metrics.registry.get_sample_value("gateway_disconnects_total", {"reason": "stalled"})
            assert stalled == 1
            writer.close()


@pytest.fixture
async def live():
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url:
        async with connected(url, "good") as [good]:
            yield gateway, url, good


MALFORMED = {
    "not a packet type": "4abc",
    "unknown Socket.IO type": "4z",
    "cut-off JSON": "42[",
    "event that is an object": "42{}",
    "binary event announcing attachments": '451-["upload",{"_placeholder":true,"num":0}]',
}


async def engineio_close_packet(reader: asyncio.StreamReader) -> None:
    """Read server frames until the Engine.IO CLOSE packet (a one-byte text frame holding "1")."""
    received = b""
    while b"\x81\x011" not in received:
        chunk = await reader.read(4096)
        assert chunk, "the connection ended without a CLOSE packet"
        received += chunk


@pytest.mark.parametrize("connect_first", [False, True], ids=["before-connect", "after-connect"])
@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_or_binary_packet_closes_that_connection_only(live, frame, connect_first, caplog):
    gateway, url, good = live
    reader, writer = await raw_websocket(url, 1 << 20)
    if connect_first:
        writer.write(client_frame("40" + json.dumps({"token": token("mallory")})))
        await eventually(lambda: gateway.connection_count("mallory") == 1)
    writer.write(client_frame(frame))
    await asyncio.wait_for(engineio_close_packet(reader), 10)
    writer.close()
    await eventually(lambda: gateway.connection_count("mallory") == 0 and len(gateway.sio.eio.sockets) == 1)
    assert gateway.sio._binary_packet == {}
    assert "closed the connection of 127.0.0.1:" in caplog.text
    await gateway.emit_to_user("good", "still", "served")
    assert await good.next_event() == ("still", "served")


@pytest.mark.parametrize("frames", [["9"], ['42["hello"]'], ["40/admin,{}"], ["40" + json.dumps({"token": "x.y.z"})]])
async def test_packets_python_socketio_ignores_or_refuses_leave_the_node_serving(live, frames):
    gateway, url, good = live
    _, writer = await raw_websocket(url, 1 << 20)
    for frame in frames:
        writer.write(client_frame(frame))
    await writer.drain()
    await gateway.emit_to_user("good", "still", "served")
    assert await good.next_event() == ("still", "served")
    assert set(gateway.manager.rooms[NAMESPACE]) == {None, good.sid, "user:good"}
    writer.close()


async def test_a_half_open_client_is_dropped_within_ping_interval_and_timeout():
    gateway = make_gateway(PING_INTERVAL="1", PING_TIMEOUT="1")
    async with serve(create_app(gateway)) as url:
        async with connected(url, "good") as [good]:
            _, writer = await raw_websocket(url)
            writer.write(client_frame("40" + json.dumps({"token": token("ghost")})))
            await eventually(lambda: gateway.connection_count("ghost") == 1)
            # It never answers a ping from here on (python-socketio's client, good, does by itself).
            await eventually(lambda: gateway.connection_count("ghost") == 0)  # 1 s + 1 s, within TIMEOUT
            assert set(gateway.manager.rooms[NAMESPACE]) == {None, good.sid, "user:good"}
            await gateway.emit_to_user("good", "still", "here")
            assert await good.next_event() == ("still", "here")
            writer.close()


async def test_a_polling_post_over_the_limit_is_refused_before_its_body_is_read(live):
    gateway, url, good = live
    handshake = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"{url}/socket.io/?EIO=4&transport=polling", timeout=10).read()
    )
    sid = json.loads(handshake[1:])["sid"]
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    # Announce 10 MB, send none of it: the answer must come from the headers alone.
    writer.write(
        f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n".encode()
    )
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.split()[1] == b"413", status_line
    writer.close()
    # No length at all (a chunked body of unknown size) is refused the same way.
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(
        f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"413"
    writer.close()
    await gateway.emit_to_user("good", "still", "here")
    assert await good.next_event() == ("still", "here")


# ---- fuzzing: random and mutated Engine.IO / Socket.IO frames against a live server ------------------------

PREFIXES = ["", "0", "1", "2", "3", "4", "5", "6", "40", "41", "42", "43", "44", "45", "46", "4/", "451-", "42/x,"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
frames = st.one_of(
    st.text(max_size=200),
    st.builds(lambda prefix, rest: prefix + rest, st.sampled_from(PREFIXES), st.text(max_size=120)),
    st.builds(lambda prefix, value: prefix + json.dumps(value), st.sampled_from(PREFIXES), json_values),
)


@pytest.fixture
def portal_with_live_server():
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        stack = contextlib.AsyncExitStack()
        gateway = make_gateway(PING_INTERVAL="1", PING_TIMEOUT="1")

        async def start():
            url = await stack.enter_async_context(serve(create_app(gateway)))
            [good] = await stack.enter_async_context(connected(url, "good"))
            return url, good

        url, good = portal.call(start)
        yield portal, gateway, url, good
        portal.call(stack.aclose)


def test_random_frames_never_take_the_node_down(portal_with_live_server):
    portal, gateway, url, good = portal_with_live_server

    async def run(batch: list[str], connect_first: bool, auth: object) -> None:
        _, writer = await raw_websocket(url, 1 << 20)
        if connect_first:
            writer.write(client_frame("40" + json.dumps(auth)))
        for frame in batch:
            writer.write(client_frame(frame))
        await writer.drain()
        writer.close()
        status = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/health", timeout=10).status)
        assert status == 200
        await gateway.emit_to_user("good", "still", "served")
        assert await good.next_event() == ("still", "served")

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        batch=st.lists(frames, min_size=1, max_size=5),
        connect_first=st.booleans(),
        auth=st.one_of(st.builds(lambda: {"token": token("fuzz")}), json_values),
    )
    def check(batch, connect_first, auth):
        portal.call(run, batch, connect_first, auth)

    check()
    # Every fuzzing connection has gone; only the good client is left in any room. (A frame python-engineio
    # cannot parse at all, such as "x", ends its handler without closing the session; its ping timeout frees it,
    # which the short ping settings above bring within this wait.)
    portal.call(eventually, lambda: set(gateway.manager.rooms[NAMESPACE]) == {None, good.sid, "user:good"})
    portal.call(eventually, lambda: len(gateway.sio.eio.sockets) == 1)
    assert gateway.manager.pending_connect == {} and set(gateway.sio.environ) == set(gateway.sio.eio.sockets)
