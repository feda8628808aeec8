"""Connection state recovery: the official client, dropped and back, gets what it missed, once and in order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import signal
import socket
import struct
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi import create_app
from conftest import (
    TIMEOUT,
    eventually,
    gateway_process,
    grown_since,
    make_gateway,
    nothing_left,
    redis_server,
    serve,
    server_state,
    token,
)
from gateway import RECOVERY_EVENT, RedisUnavailable, offset_order, redis_publisher, user_room
from soak import client_frame, raw_websocket, server_text
from test_cluster import wait_for_subscribers
from test_js_clients import SITE_FILES, NodeClient, browser_page, example_page_url, static_site

pytestmark = pytest.mark.anyio


class Cable:
    """A TCP proxy between clients and the gateway that can be cut, as a network drops: no close, no FIN, an RST."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.cut_off, self.links = target_port, False, set[asyncio.StreamWriter]()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.link, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            return self.reset(writer)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.links |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            self.reset(sink)

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def reset(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        self.links.discard(writer)

    def cut(self) -> None:
        """Both ends see their connection reset: the client at once, the server when it next writes or pings."""
        self.cut_off = True
        for writer in list(self.links):
            self.reset(writer)

    def restore(self) -> None:
        self.cut_off = False


@contextlib.asynccontextmanager
async def recovering_gateway(**env: str) -> AsyncIterator[tuple[Any, str, Cable]]:
    gateway = make_gateway(RECOVERY_SECONDS=env.pop("RECOVERY_SECONDS", "60"), **env)
    async with serve(create_app(gateway)) as url:
        cable = Cable(int(url.rsplit(":", 1)[1]))
        yield gateway, await cable.start(), cable
        cable.server.close()


async def events(client: NodeClient, until: str) -> list[tuple[str, list[Any]]]:
    """The events the Node client reports up to `until` (the connect offset event left out)."""
    seen = []
    while (fact := await client.until("event"))["event"] != until:
        if fact["event"] != RECOVERY_EVENT:
            seen.append((fact["event"], fact["args"]))
    return seen


async def until_connected(client: NodeClient) -> tuple[dict[str, Any], list[tuple[str, list[Any]]]]:
    """The next connect fact and the events before it: a replay and the offset come before the client's "connect"."""
    seen = []
    while "connected" not in (fact := await client.next_fact()):
        if "event" in fact:
            seen.append((fact["event"], fact["args"]))
    return fact, [(event, args) for event, args in seen if event != RECOVERY_EVENT]


def without_offsets(seen: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
    for _, args in seen:
        assert isinstance(args[-1], str) and "-" in args[-1], args  # every event carries its offset last
    return [(event, args[:-1]) for event, args in seen]


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_the_official_client_recovers_what_it_missed_after_a_network_drop(transport):
    async with recovering_gateway(PING_INTERVAL="2", PING_TIMEOUT="2") as (gateway, url, cable):
        client = await NodeClient.start(url, token("alice"), transport)
        try:
            fact, _ = await until_connected(client)
            assert fact["recovered"] is False
            [alice] = [s for s, _ in gateway.manager.get_participants("/", "user:alice")]
            await gateway.join_room(alice, "orders:7")
            await gateway.emit_to_user("alice", "before", 1)
            await gateway.emit_to_user("alice", "marker")
            assert without_offsets(await events(client, "marker")) == [("before", [1])]
            cable.cut()
            assert (await client.until("disconnected"))["disconnected"] in ("transport close", "transport error")
            await gateway.emit_to_user("alice", "missed", 1)
            await gateway.emit_to_room("orders:7", "missed", 2)
            await gateway.broadcast("missed", 3)
            await gateway.emit_to_user("bob", "not-for-alice", 4)
            cable.restore()
            fact, replayed = await until_connected(client)
            assert fact["recovered"] is True
            assert without_offsets(replayed) == [("missed", [1]), ("missed", [2]), ("missed", [3])]
            await gateway.emit_to_user("alice", "live", 5)
            await gateway.emit_to_room("orders:7", "marker")  # the room was restored with the session
            assert without_offsets(await events(client, "marker")) == [("live", [5])]
        finally:
            await client.close()


async def test_recovery_is_off_by_default_and_nothing_changes_on_the_wire():
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url:
        reader, writer = await raw_websocket(url)
        assert (await server_text(reader)).startswith("0{")
        writer.write(client_frame("40" + json.dumps({"token": token("alice"), "pid": "x", "offset": "0-1"})))
        connected = json.loads((await server_text(reader))[2:])
        assert set(connected) == {"sid"}  # no pid
        await gateway.emit_to_user("alice", "n", "text")
        assert await asyncio.wait_for(server_text(reader), TIMEOUT) == '42["n","text"]'  # no offset
        writer.close()


class RawClient:
    """A WebSocket Socket.IO client speaking the recovery protocol as the official client does, from raw frames."""

    def __init__(self, url: str, user_id: str) -> None:
        self.url, self.user_id = url, user_id
        self.pid: str | None = None
        self.offset: str | None = None
        self.received: list[tuple[str, list[Any]]] = []  # every event, replayed or live, offsets left out

    async def connect(self, **auth: Any) -> dict[str, Any]:
        """Connect (with pid and offset once it has them); the CONNECT reply, or the connect_error payload."""
        self.reader, self.writer = await raw_websocket(self.url)
        assert (await server_text(self.reader)).startswith("0{")
        recovery = {"pid": self.pid, "offset": self.offset} if self.pid else {}
        self.writer.write(client_frame("40" + json.dumps(recovery | {"token": token(self.user_id)} | auth)))
        buffered = []
        while not (text := await self.text()).startswith(("40", "44")):
            buffered.append(text)
        reply = json.loads(text[2:])
        if text.startswith("40"):
            self.recovered = reply.get("pid") is not None and reply.get("pid") == self.pid
            self.pid = reply.get("pid")
            for event in buffered:  # as the official client: buffered events count once it is connected
                self.take(event)
        return reply

    async def text(self) -> str:
        while (text := await asyncio.wait_for(server_text(self.reader), TIMEOUT)) == "2":
            self.writer.write(client_frame("3"))  # answer pings
        return text

    def take(self, text: str) -> tuple[str, list[Any]]:
        assert text.startswith("42"), text
        event, *args = json.loads(text[2:])
        if self.pid and args and isinstance(args[-1], str):
            self.offset, args = args[-1], args[:-1]
        if event != RECOVERY_EVENT:
            self.received.append((event, args))
        return event, args

    async def until(self, marker: str) -> None:
        while self.take(await self.text())[0] != marker:
            pass

    def drop(self) -> None:
        """A network drop: the connection is reset, without Socket.IO's DISCONNECT or Engine.IO's CLOSE."""
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


@pytest.fixture
async def live():
    gateway = make_gateway(RECOVERY_SECONDS="60")
    async with serve(create_app(gateway)) as url:
        yield gateway, url


async def dropped_client(gateway, url: str, user_id: str, *, quiet: bool = False) -> RawClient:
    """A client that connected, got one event (none if `quiet`), and dropped; its session is kept once the server
    noticed."""
    client = RawClient(url, user_id)
    await client.connect()
    if not quiet:
        await gateway.emit_to_user(user_id, "first")
        await client.until("first")
    client.drop()
    await eventually(lambda: gateway.connection_count(user_id) == 0)
    return client


async def test_a_quiet_client_that_got_no_event_recovers_too(live):
    gateway, url = live
    client = await dropped_client(gateway, url, "quiet", quiet=True)
    assert client.offset is not None  # from the gateway's own connect event
    await gateway.emit_to_user("quiet", "missed", 1)
    await client.connect()
    assert client.recovered and client.received == [("missed", [1])]


async def test_another_users_pid_is_not_recovered_and_the_owner_still_can(live):
    gateway, url = live
    alice = await dropped_client(gateway, url, "alice")
    await gateway.emit_to_user("alice", "secret", "for alice")
    mallory = RawClient(url, "mallory")
    mallory.pid, mallory.offset = alice.pid, alice.offset  # a stolen pid, with mallory's own valid token
    reply = await mallory.connect()
    assert reply["pid"] != alice.pid and not mallory.recovered and mallory.received == []
    await alice.connect()
    assert alice.recovered and alice.received[-1] == ("secret", ["for alice"])


async def test_a_good_pid_with_a_bad_token_is_refused_and_the_session_survives(live):
    gateway, url = live
    alice = await dropped_client(gateway, url, "alice")
    await gateway.emit_to_user("alice", "missed")
    for bad in ("forged.token.here", token("alice", ttl=-60)):
        intruder = RawClient(url, "alice")
        intruder.pid, intruder.offset = alice.pid, alice.offset
        reply = await intruder.connect(token=bad)
        assert reply["data"]["reason"] in ("invalid", "expired") and intruder.received == []
    await alice.connect()
    assert alice.recovered and alice.received[-1] == ("missed", [])


async def test_a_pid_is_recovered_once(live):
    gateway, url = live
    alice = await dropped_client(gateway, url, "alice")
    pid, offset = alice.pid, alice.offset
    await alice.connect()
    assert alice.recovered
    alice.writer.write(client_frame("41"))  # this connection leaves on purpose: its session is not kept again
    await eventually(lambda: gateway.connection_count("alice") == 0)
    again = RawClient(url, "alice")
    again.pid, again.offset = pid, offset
    await again.connect()
    assert not again.recovered


async def test_a_reconnect_faster_than_the_server_noticed_the_drop_is_recovered(live):
    """The old connection is still open on the server (its ping has not timed out): it is ended and taken over."""
    gateway, url = live
    alice = RawClient(url, "alice")
    await alice.connect()
    alice.writer.transport.pause_reading()  # gone quiet, as a dead network looks; the server does not know yet
    await gateway.emit_to_user("alice", "into-the-void", 1)  # written to the dead connection, never read
    alice.reader, alice.writer = None, None
    await alice.connect()
    assert alice.recovered and alice.received == [("into-the-void", [1])]  # the client's offset decided
    assert gateway.connection_count("alice") == 1


@pytest.mark.parametrize("how", ["disconnect", "logout"])
async def test_a_connection_ended_on_purpose_is_not_recovered(live, how):
    gateway, url = live
    alice = RawClient(url, "alice")
    await alice.connect()
    if how == "disconnect":
        alice.writer.write(client_frame("41"))  # the client's own disconnect()
        await eventually(lambda: gateway.connection_count("alice") == 0)
    else:
        await gateway.disconnect_user("alice")
    alice.drop()
    await alice.connect()
    assert not alice.recovered


async def test_a_logout_while_away_ends_the_session(live):
    gateway, url = live
    alice = await dropped_client(gateway, url, "alice")
    await gateway.disconnect_user("alice")
    await alice.connect()
    assert not alice.recovered and alice.received == [("first", [])]  # not the logout, nothing replayed


async def test_an_expired_window_is_not_recovered():
    gateway = make_gateway(RECOVERY_SECONDS="1")
    async with serve(create_app(gateway)) as url:
        alice = await dropped_client(gateway, url, "alice")
        await gateway.emit_to_user("alice", "too-late")
        kept_until = asyncio.get_running_loop().time() + 1
        await eventually(lambda: asyncio.get_running_loop().time() > kept_until)  # the window, not a guess
        await alice.connect()
        assert not alice.recovered and alice.received == [("first", [])]


async def test_more_missed_events_than_the_history_holds_are_not_partly_replayed(monkeypatch):
    import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "RECOVERY_MAX_EVENTS", 5)
    gateway = make_gateway(RECOVERY_SECONDS="60")
    async with serve(create_app(gateway)) as url:
        alice = await dropped_client(gateway, url, "alice")
        for n in range(6):
            await gateway.broadcast("missed", n)
        await alice.connect()
        assert not alice.recovered and alice.received == [("first", [])]


async def test_events_with_an_ack_callback_carry_no_offset_and_are_not_replayed(live):
    gateway, url = live
    alice = RawClient(url, "alice")
    await alice.connect()
    offset = alice.offset
    [sid] = [s for s, _ in gateway.manager.get_participants("/", "user:alice")]
    await gateway.sio.emit("ask", "question", to=sid, callback=lambda *answer: None)
    assert (await alice.text()).startswith('421["ask","question"]')  # an ack id, and no offset
    assert alice.offset == offset


@contextlib.asynccontextmanager
async def redis_node(redis_url: str) -> AsyncIterator[tuple[Any, str]]:
    gateway = make_gateway(RECOVERY_SECONDS="60", REDIS_URL=redis_url)
    async with serve(create_app(gateway)) as url:
        await wait_for_subscribers(redis_url, 1, at_least=True)
        yield gateway, url


async def test_a_client_recovers_on_another_node_with_the_same_offsets():
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (node_a, url_a), redis_node(redis_srv.url) as (node_b, url_b):
            alice = RawClient(url_a, "alice")
            await alice.connect()
            [sid] = [s for s, _ in node_a.manager.get_participants("/", "user:alice")]
            await node_b.join_room(sid, "orders:7")  # through Redis, to the node that holds it
            await eventually(lambda: "orders:7" in node_a.manager.get_rooms(sid, "/"))
            await node_b.emit_to_user("alice", "seen", 0)
            await alice.until("seen")
            alice.drop()
            await eventually(lambda: node_a.connection_count("alice") == 0)
            await node_b.emit_to_room("orders:7", "missed", 1)  # from either node, and from a publisher process
            await node_a.broadcast("missed", 2)
            await redis_publisher(redis_srv.url, recovery_seconds=60).emit_to_user("alice", "missed", 3)
            alice.url = url_b
            await alice.connect()
            assert alice.recovered
            assert alice.received == [("seen", [0]), ("missed", [1]), ("missed", [2]), ("missed", [3])]
            await node_a.emit_to_room("orders:7", "live", 4)  # the room followed it to node B
            await alice.until("live")


async def test_a_node_that_delivered_nothing_yet_hands_out_the_historys_newest_offset():
    """Not "0-0": after a drop, that would replay the whole stream, events from before the client came too."""
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (node_a, _):
            await node_a.emit_to_user("alice", "before", 1)  # alice is not connected
        async with redis_node(redis_srv.url) as (node_b, url_b):  # a node started since
            alice = await dropped_client(node_b, url_b, "alice", quiet=True)
            await node_b.emit_to_user("alice", "missed", 2)
            await alice.connect()
            assert alice.recovered and alice.received == [("missed", [2])]


async def test_a_connection_made_while_an_emit_waits_its_turn_gets_that_event_live(live):
    """Recipients are those of when the event goes out: else the client's offset would be older than an event it never
    got, and only a drop and a recovery would give it."""
    gateway, url = live
    await gateway.broadcast("warm-up")
    await gateway.manager.in_order.acquire()  # as behind a long emit: the next one waits its turn
    waiting = asyncio.ensure_future(gateway.emit_to_user("alice", "sent", 1))
    await eventually(lambda: len(gateway.recovery.events) == 2)  # it has its offset, and waits
    alice = RawClient(url, "alice")
    await alice.connect()
    gateway.manager.in_order.release()
    await waiting
    await alice.until("sent")
    alice.drop()
    await eventually(lambda: gateway.connection_count("alice") == 0)
    await alice.connect()
    assert alice.recovered and alice.received == [("sent", [1])]


async def test_with_redis_the_window_is_trimmed_by_redis_clock_not_the_nodes(monkeypatch):
    """A node whose clock ran ahead of Redis's by more than the window would otherwise trim each new event away."""
    import gateway as gateway_module

    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (gateway, url):
            alice = await dropped_client(gateway, url, "alice", quiet=True)  # the stream is empty: its offset is 0-0
            ahead = types.SimpleNamespace(time=lambda: time.time() + 3600, monotonic=time.monotonic)
            monkeypatch.setattr(gateway_module, "time", ahead)  # only while alice is away: tokens use the real clock
            await gateway.emit_to_user("alice", "missed", 1)
            monkeypatch.undo()
            await alice.connect()
            assert alice.recovered and alice.received == [("missed", [1])]


async def test_an_offset_redis_cannot_read_is_a_new_session_and_leaves_nothing_behind():
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (gateway, url):
            alice = await dropped_client(gateway, url, "alice")
            alice.offset = "0-99999999999999999999"  # matches the offset pattern; beyond Redis's 64-bit ids
            await alice.connect()
            assert not alice.recovered and not gateway.manager.held and gateway.connection_count("alice") == 1


async def test_with_redis_more_missed_events_than_the_history_holds_are_not_partly_replayed(monkeypatch):
    import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "RECOVERY_MAX_EVENTS", 100)  # trimmed by whole nodes of 100 entries
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (gateway, url):
            alice = await dropped_client(gateway, url, "alice")
            for n in range(300):
                await gateway.emit_to_user("alice", "missed", n)
            assert await gateway.recovery.redis.xlen(gateway.recovery.stream) < 300
            await alice.connect()
            assert not alice.recovered and alice.received == [("first", [])]


async def test_a_node_that_cannot_read_the_history_gives_a_new_connection_no_pid(monkeypatch):
    """Else its client would hold "0-0", and a recovery would replay it events from before it came."""
    import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "REDIS_TIMEOUT", 0.5)
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (node_a, _):
            await node_a.emit_to_user("alice", "before", 1)  # alice is not connected
        async with redis_node(redis_srv.url) as (node_b, url_b):  # a node started since
            await node_b.recovery.redis.client_pause(1500)  # Redis answers nothing for longer than REDIS_TIMEOUT
            reply = await RawClient(url_b, "alice").connect()
            assert "sid" in reply and "pid" not in reply


async def test_with_redis_a_client_whose_own_offset_aged_out_of_the_window_still_recovers():
    """The trim of the window keeps the event before the new one: a quiet client's offset never looks trimmed."""
    with redis_server() as redis_srv:
        gateway = make_gateway(RECOVERY_SECONDS="2", REDIS_URL=redis_srv.url)
        async with serve(create_app(gateway)) as url:
            await wait_for_subscribers(redis_srv.url, 1, at_least=True)
            alice, start = RawClient(url, "alice"), asyncio.get_running_loop().time()
            await alice.connect()
            for n in range(200):  # two whole nodes of the stream: Redis's approximate trimming removes whole nodes
                await gateway.emit_to_user("bob" if n < 100 else "alice", "seen", n)
            while alice.received[-1:] != [("seen", [199])]:  # its offset is now the last one's
                alice.take(await alice.text())
            await eventually(lambda: asyncio.get_running_loop().time() > start + 2.5)  # past the window
            alice.drop()
            await eventually(lambda: gateway.connection_count("alice") == 0)
            await gateway.emit_to_user("alice", "missed", 200)  # trims bob's node, not the one with alice's offset
            assert await gateway.recovery.redis.xlen(gateway.recovery.stream) == 101
            await alice.connect()
            assert alice.recovered and alice.received[-1] == ("missed", [200])


def test_sessions_survive_a_rolling_restart_with_redis_and_not_without():
    """SIGTERM keeps the sessions of the connections still open; in memory they die with the process."""
    with redis_server() as redis_srv:
        for env, recovered in (({}, False), ({"GATEWAY_REDIS_URL": redis_srv.url}, True)):
            env |= {"GATEWAY_RECOVERY_SECONDS": "60"}
            with gateway_process("--timeout-graceful-shutdown", "5", env=env) as (url, process):
                alice = RawClient(url, "alice")
                asyncio.run(alice.connect())
                process.send_signal(signal.SIGTERM)
                process.wait(TIMEOUT)
            with gateway_process(env=env) as (url, _):
                alice.url = url
                asyncio.run(alice.connect())
                assert alice.recovered is recovered


async def test_with_redis_down_emits_raise_and_a_returning_client_connects_unrecovered():
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (gateway, url):
            alice = await dropped_client(gateway, url, "alice")
            redis_srv.kill()
            with pytest.raises(RedisUnavailable):  # nothing is sent, so nothing is lost without the caller knowing
                await gateway.emit_to_user("alice", "lost")
            await alice.connect()  # the node cannot read the session: a new one, and the app refetches
            assert not alice.recovered and gateway.connection_count("alice") == 1


@pytest.fixture
def portal_with_gateway():
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        stack = contextlib.AsyncExitStack()
        gateway = make_gateway(RECOVERY_SECONDS="60")
        url = portal.call(stack.enter_async_context, serve(create_app(gateway)))
        yield portal, gateway, url
        portal.call(stack.aclose)


TARGETS = ["user", "room", "everyone", "another user", "another room"]


async def emit(gateway, target: str, user: str, n: int) -> None:
    if target in ("user", "another user"):
        await gateway.emit_to_user(user if target == "user" else "someone-else", "e", n)
    elif target in ("room", "another room"):
        await gateway.emit_to_room("room" if target == "room" else "elsewhere", "e", n)
    else:
        await gateway.broadcast("e", n)


def test_for_any_emits_drops_and_reconnects_the_client_gets_exactly_what_was_for_it_in_order(portal_with_gateway):
    portal, gateway, url = portal_with_gateway
    users = itertools.count()

    async def run(steps: list[str]) -> None:
        user = f"user{next(users)}"
        client, connected, expected = RawClient(url, user), True, []
        await client.connect()
        [sid] = [s for s, _ in gateway.manager.get_participants("/", user_room(user))]
        await gateway.join_room(sid, "room")
        for n, step in enumerate(steps):
            if step == "drop" and connected:
                client.drop()
                connected = False
            elif step == "reconnect" and not connected:
                await client.connect()
                assert client.recovered, steps
                connected = True
            elif step in TARGETS:
                await emit(gateway, step, user, n)
                expected += [("e", [n])] if step in ("user", "room", "everyone") else []
        if not connected:
            await client.connect()
            assert client.recovered, steps
        await gateway.emit_to_user(user, "marker")
        await client.until("marker")
        assert client.received[:-1] == expected, steps
        client.writer.write(client_frame("41"))
        client.drop()

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(steps=st.lists(st.sampled_from([*TARGETS, "drop", "reconnect"]), max_size=12))
    def check(steps: list[str]) -> None:
        portal.call(run, steps)

    check()


async def test_the_official_client_in_chromium_recovers_through_the_example_page():
    with static_site(SITE_FILES) as site:
        async with (
            recovering_gateway(CORS_ORIGINS=site) as (gateway, url, cable),
            browser_page(example_page_url(site, url, token("alice"))) as page,
        ):
            assert (await page.until("status"))["status"].startswith("connected as ")
            assert RECOVERY_EVENT in (await page.until("message"))["message"]
            cable.cut()
            assert (await page.until("status"))["status"].startswith("disconnected: transport")
            await gateway.emit_to_user("alice", "notification", {"text": "sent while away"})
            cable.restore()
            facts = [await page.next_fact() for _ in range(3)]  # the replayed message, the offset, the status
            [status] = [fact["status"] for fact in facts if "status" in fact]
            assert status.endswith("(recovered)")
            messages = [fact["message"] for fact in facts if "message" in fact]
            assert "sent while away" in messages[0] and RECOVERY_EVENT in messages[1]


async def test_with_recovery_data_that_is_not_json_raises_type_error_and_sends_nothing(live):
    gateway, url = live
    alice = RawClient(url, "alice")
    await alice.connect()
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    for data in (float("nan"), float("inf"), b"bytes", deep):
        with pytest.raises(TypeError, match="not JSON"):
            await gateway.emit_to_user("alice", "bad", data)
    await gateway.emit_to_user("alice", "marker")
    await alice.until("marker")
    assert alice.received == [("marker", [])]


async def test_a_fast_reconnect_at_the_connection_limit_takes_the_stale_connections_place():
    gateway = make_gateway(RECOVERY_SECONDS="60", MAX_CONNECTIONS_PER_USER="1")
    async with serve(create_app(gateway)) as url:
        alice = RawClient(url, "alice")
        await alice.connect()
        alice.writer.transport.pause_reading()  # the network died; the server does not know yet
        alice.reader, alice.writer = None, None
        await alice.connect()
        assert alice.recovered and gateway.connection_count("alice") == 1


async def test_a_logout_is_counted_and_logged_as_a_logout_with_recovery_on(live, caplog):
    gateway, url = live
    caplog.set_level(logging.INFO, "gateway")
    alice = RawClient(url, "alice")
    await alice.connect()
    await gateway.disconnect_user("alice")
    await eventually(lambda: gateway.connection_count("alice") == 0)
    assert gateway.metrics.registry.get_sample_value("gateway_disconnects_total", {"reason": "logout"}) == 1
    assert "ended: logout" in caplog.text


async def test_history_is_kept_for_the_window_only_and_the_offsets_of_quiet_clients_follow_it():
    gateway = make_gateway(RECOVERY_SECONDS="2")
    async with serve(create_app(gateway)) as url:
        quiet, start = RawClient(url, "quiet"), asyncio.get_running_loop().time()
        await quiet.connect()
        first = quiet.offset
        for n in range(3):  # events for someone else, older than the window by the end
            await gateway.emit_to_user("someone-else", "e", n)
        await eventually(lambda: asyncio.get_running_loop().time() > start + 2.5)  # past the window
        await gateway.emit_to_user("someone-else", "e", 3)
        assert [entry[0] for entry in gateway.recovery.events] == ["0-4"]  # the three older ones are gone
        await quiet.until(RECOVERY_EVENT)  # the refresh every half window
        assert offset_order(quiet.offset) > offset_order(first)
        quiet.drop()
        await eventually(lambda: gateway.connection_count("quiet") == 0)
        await gateway.emit_to_user("quiet", "missed")
        await quiet.connect()
        assert quiet.recovered and quiet.received[-1] == ("missed", [])


async def test_history_and_sessions_are_bounded_in_memory(monkeypatch):
    import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "RECOVERY_MAX_BYTES", 1000)
    monkeypatch.setattr(gateway_module, "RECOVERY_MAX_SESSIONS", 3)
    gateway = make_gateway(RECOVERY_SECONDS="60")
    async with serve(create_app(gateway)) as url:
        for n in range(10):
            await gateway.broadcast("big", "x" * 300)
        assert gateway.recovery.bytes <= 1000 and len(gateway.recovery.events) == 3
        for n in range(5):
            await dropped_client(gateway, url, f"user{n}")
        assert len(gateway.recovery.sessions) == 3


async def test_a_fresh_client_connects_with_redis_down_and_leaves_nothing_behind():
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (gateway, url):
            await RawClient(url, "warm-up").connect()  # python-engineio's lazily started tasks
            redis_srv.kill()
            baseline = server_state(gateway)
            for n in range(20):
                client = RawClient(url, f"fresh{n}")
                assert "sid" in await client.connect()  # a normal connection: nothing to read from Redis
                client.drop()
            await nothing_left(lambda: grown_since(baseline, gateway))


async def test_events_published_during_a_reconnect_on_another_node_arrive_once_and_in_order():
    with redis_server() as redis_srv:
        async with redis_node(redis_srv.url) as (node_a, url_a), redis_node(redis_srv.url) as (node_b, _):
            alice = await dropped_client(node_a, url_a, "alice")

            async def publish() -> None:
                for n in range(2000):
                    await node_b.broadcast("n", n)

            await node_b.broadcast("n", -1)  # one at least before the reconnect
            publishing = asyncio.create_task(publish())
            await alice.connect()
            await publishing
            await node_b.broadcast("marker")
            await alice.until("marker")
            numbers = [args[0] for event, args in alice.received if event == "n"]
            assert numbers == list(range(-1, 2000))  # every one, once, in order


async def test_the_offset_refresh_never_lands_in_the_middle_of_an_emit(live, monkeypatch):
    """A large room's emit yields to the loop; a refresh then must not tell those already served an older offset."""
    import gateway as gateway_module

    gateway, url = live
    monkeypatch.setattr(gateway_module, "YIELD_EVERY", 1)
    clients = [RawClient(url, f"user{n}") for n in range(3)]
    for client in clients:
        await client.connect()
    emitting = asyncio.create_task(gateway.broadcast("e", 1))
    await asyncio.sleep(0)  # the broadcast has served its first recipient and yields
    await gateway.send_offsets()
    await emitting
    await gateway.broadcast("marker")
    for client in clients:
        offsets = []
        while (text := await client.text()) != "":
            event, args = json.loads(text[2:])[0], json.loads(text[2:])[1:]
            offsets.append(args[-1])
            if event == "marker":
                break
        assert offsets == sorted(offsets, key=offset_order), offsets  # never backwards
