"""What the backend sends reaches exactly the connections it names: real clients, real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import anyio.from_thread
import pytest
import socketio
from conftest import TIMEOUT, Client, connected, eventually, make_gateway, serve, token
from engineio import packet as eio_packet
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi import create_app
from gateway import NAMESPACE, check_room, encode_event, user_room
from test_js_clients import node_client

pytestmark = pytest.mark.anyio


@pytest.fixture
async def live():
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url:
        yield gateway, url


async def test_emit_to_user_reaches_every_tab_of_that_user_and_nobody_else(live):
    gateway, url = live
    async with connected(url, "alice", "alice", "bob") as [tab1, tab2, bob]:
        await gateway.emit_to_user("alice", "notification", {"text": "hi alice"})
        await gateway.broadcast("marker")
        assert await tab1.events_until("marker") == [("notification", {"text": "hi alice"})]
        assert await tab2.events_until("marker") == [("notification", {"text": "hi alice"})]
        assert await bob.events_until("marker") == []


async def test_two_users_never_see_each_others_messages(live):
    gateway, url = live
    async with connected(url, "alice", "bob") as [alice, bob]:
        for n in range(5):
            await gateway.emit_to_user("alice", "n", {"to": "alice", "n": n})
            await gateway.emit_to_user("bob", "n", {"to": "bob", "n": n})
        await gateway.broadcast("marker")
        assert await alice.events_until("marker") == [("n", {"to": "alice", "n": n}) for n in range(5)]
        assert await bob.events_until("marker") == [("n", {"to": "bob", "n": n}) for n in range(5)]


async def test_emit_to_user_with_no_connection_is_harmless(live):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        await gateway.emit_to_user("nobody-here", "n", 1)
        await gateway.broadcast("marker")
        assert await alice.events_until("marker") == []


@pytest.mark.parametrize("data", [None, "text", 42, 1.5, True, [1, "two"], {"nested": {"list": [1, 2]}}, b"\x00\xffbin"])
async def test_every_json_type_and_bytes_arrive_unchanged(live, data):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        await gateway.emit_to_user("alice", "payload", data)
        event, received = await alice.next_event()
        assert event == "payload"
        assert received == (data if data is not None else ())


async def test_emit_to_room_reaches_the_room_only(live):
    gateway, url = live
    async with connected(url, "alice", "bob", "carol") as [alice, bob, carol]:
        await gateway.join_room(alice.sid, "orders:7")
        await gateway.join_room(carol.sid, "orders:7")
        await gateway.emit_to_room("orders:7", "order", {"id": 7})
        await gateway.broadcast("marker")
        assert await alice.events_until("marker") == [("order", {"id": 7})]
        assert await bob.events_until("marker") == []
        assert await carol.events_until("marker") == [("order", {"id": 7})]


async def test_broadcast_reaches_every_connection(live):
    gateway, url = live
    async with connected(url, "alice", "alice", "bob", "carol") as clients:
        await gateway.broadcast("news", {"v": 1})
        for client in clients:
            assert await client.next_event() == ("news", {"v": 1})


async def test_leave_room_stops_room_messages_and_join_room_starts_them(live):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        await gateway.join_room(alice.sid, "chat")
        await gateway.emit_to_room("chat", "m", 1)
        await gateway.leave_room(alice.sid, "chat")
        await gateway.emit_to_room("chat", "m", 2)
        await gateway.join_room(alice.sid, "chat")
        await gateway.emit_to_room("chat", "m", 3)
        await gateway.broadcast("marker")
        assert await alice.events_until("marker") == [("m", 1), ("m", 3)]


@pytest.mark.parametrize("room", ["", None, 0, ["a"], b"room", "r" * 513])
async def test_emit_to_room_refuses_a_bad_room_instead_of_broadcasting(live, room):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        with pytest.raises(ValueError, match="room"):
            await gateway.emit_to_room(room, "leak", "everyone?")
        await gateway.broadcast("marker")
        assert await alice.events_until("marker") == []


@pytest.mark.parametrize("user_id", ["", None, 7, "x" * 257, "a\nb"])
async def test_emit_to_user_refuses_a_bad_user_id(live, user_id):
    gateway, _ = live
    with pytest.raises(ValueError, match="user_id"):
        await gateway.emit_to_user(user_id, "n", 1)


@pytest.mark.parametrize("event", ["", None, 3, "connect", "disconnect", "connect_error"])
async def test_bad_or_reserved_event_names_are_refused(live, event):
    gateway, _ = live
    with pytest.raises(ValueError, match="event"):
        await gateway.broadcast(event, 1)


async def test_data_that_is_not_json_is_refused_and_loses_nothing(live):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        with pytest.raises(TypeError):
            await gateway.emit_to_user("alice", "bad", {"a set": {1, 2}})
        await gateway.emit_to_user("alice", "good", 1)
        assert await alice.next_event() == ("good", 1)


async def test_room_operations_refuse_bad_arguments(live):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        with pytest.raises(ValueError, match="room"):
            await gateway.join_room(alice.sid, "")
        with pytest.raises(ValueError, match="sid"):
            await gateway.join_room(None, "chat")
        with pytest.raises(LookupError, match="no connection"):
            await gateway.join_room("not-a-sid", "chat")
        with pytest.raises(LookupError, match="no connection"):
            await gateway.leave_room("not-a-sid", "chat")
        assert gateway.sio.manager.get_rooms(alice.sid, NAMESPACE) == [alice.sid, "user:alice"]
        assert "chat" not in gateway.sio.manager.rooms[NAMESPACE]


async def test_module_singleton_serves_under_uvicorn():
    import asgi
    import gateway as gateway_module

    async with serve(asgi.app) as url:
        async with connected(url, "zoe") as [zoe]:
            await gateway_module.gateway.emit_to_user("zoe", "hello", {"from": "the backend"})
            assert await zoe.next_event() == ("hello", {"from": "the backend"})


async def test_polling_client_receives_too(live):
    gateway, url = live
    client = Client()
    await client.connect(url, auth={"token": token("paula")}, transports=["polling"])
    await gateway.emit_to_user("paula", "n", {"over": "polling"})
    assert await client.next_event() == ("n", {"over": "polling"})
    # Closed from the server: python-socketio's polling client closing itself waits out its pending long-poll.
    await gateway.sio.disconnect(client.sid)
    await asyncio.wait_for(client.disconnected.wait(), 10)


# ---- properties ---------------------------------------------------------------------------------


@given(user_id=st.text(min_size=1))
def test_a_users_room_is_always_user_colon_id(user_id):
    assert user_room(user_id) == "user:" + user_id
    assert user_room(user_id).removeprefix("user:") == user_id


@given(user_id=st.text(min_size=1, max_size=256), other=st.text(min_size=1, max_size=256), room=st.text())
def test_no_room_the_backend_can_name_is_a_personal_room_and_no_two_users_share_one(user_id, other, room):
    try:
        accepted = check_room(room)
    except ValueError:
        accepted = None
    assert accepted != user_room(user_id)
    assert (user_room(user_id) == user_room(other)) == (user_id == other)


async def test_a_backend_room_named_like_a_personal_room_is_refused_and_reaches_no_user(live):
    gateway, url = live
    async with connected(url, "42", "42:orders") as [user42, other]:
        for operation in (lambda: gateway.join_room(user42.sid, "user:42:orders"),
                          lambda: gateway.leave_room(user42.sid, "user:42"),
                          lambda: gateway.emit_to_room("user:42", "leak", 1)):
            with pytest.raises(ValueError, match="users' own rooms"):
                await operation()
        assert gateway.connection_count("42:orders") == 1 and gateway.connection_count("42") == 1
        await gateway.emit_to_user("42:orders", "for", "42:orders")
        assert await gateway.disconnect_user("42:orders") == 1
        assert await other.next_event() == ("for", "42:orders")
        await gateway.emit_to_user("42", "still", "here")
        assert await user42.next_event() == ("still", "here")


json_and_bytes = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(namespace=st.sampled_from(["/", "/chat"]), event=st.text(min_size=1), arguments=st.lists(json_and_bytes))
def test_the_gateways_packet_encoding_is_python_socketios(namespace, event, arguments):
    data = [event, *arguments]
    library = socketio.packet.Packet(socketio.packet.EVENT, namespace=namespace, data=data).encode()
    assert encode_event(namespace, data) == library


USERS = ["u1", "u2", "u3"]
TABS = ["u1", "u1", "u2", "u3", "u3"]  # connection i belongs to TABS[i]
ROOMS = ["r1", "r2"]

targets = st.one_of(
    st.tuples(st.just("user"), st.sampled_from(USERS)),
    st.tuples(st.just("room"), st.sampled_from(ROOMS)),
    st.tuples(st.just("broadcast"), st.none()),
)
memberships = st.lists(st.sets(st.sampled_from(["r1", "r2"])), min_size=len(TABS), max_size=len(TABS))


def expected_recipients(target: tuple[str, str | None], rooms_of: list[set[str]]) -> set[int]:
    kind, name = target
    if kind == "broadcast":
        return set(range(len(TABS)))
    if kind == "user":
        return {i for i, user in enumerate(TABS) if user == name}
    return {i for i, rooms in enumerate(rooms_of) if name in rooms}


@pytest.fixture
def portal_with_clients():
    """One live server and five connections, driven from hypothesis' synchronous examples through a portal."""
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        stack = contextlib.AsyncExitStack()
        gateway = make_gateway()

        async def start():
            url = await stack.enter_async_context(serve(create_app(gateway)))
            return await stack.enter_async_context(connected(url, *TABS))

        clients = portal.call(start)
        yield portal, gateway, clients
        portal.call(stack.aclose)


def test_an_emit_reaches_exactly_the_intended_connections(portal_with_clients):
    portal, gateway, clients = portal_with_clients

    async def run(rooms_of: list[set[str]], emits: list[tuple[str, str | None]]) -> None:
        for client, rooms in zip(clients, rooms_of):
            for room in ("r1", "r2"):
                operation = gateway.join_room if room in rooms else gateway.leave_room
                await operation(client.sid, room)
        for n, (kind, name) in enumerate(emits):
            if kind == "user":
                await gateway.emit_to_user(name, "e", n)
            elif kind == "room":
                await gateway.emit_to_room(name, "e", n)
            else:
                await gateway.broadcast("e", n)
        await gateway.broadcast("marker")
        for i, client in enumerate(clients):
            got = [data for _, data in await client.events_until("marker")]
            want = [n for n, target in enumerate(emits) if i in expected_recipients(target, rooms_of)]
            assert got == want, f"connection {i} of {TABS[i]} in {rooms_of[i]}"

    @settings(max_examples=40, deadline=None)
    @given(rooms_of=memberships, emits=st.lists(targets, max_size=6))
    def check(rooms_of, emits):
        portal.call(run, rooms_of, emits)

    check()


def test_room_operations_pass_their_arguments_through_unchanged(portal_with_clients):
    portal, gateway, clients = portal_with_clients
    sid = clients[0].sid

    async def run(room: str) -> None:
        await gateway.join_room(sid, room)
        assert room in gateway.sio.manager.get_rooms(sid, NAMESPACE)
        await gateway.emit_to_room(room, "r", room)
        assert await clients[0].next_event() == ("r", room)
        await gateway.leave_room(sid, room)
        assert room not in gateway.sio.manager.get_rooms(sid, NAMESPACE)

    @settings(max_examples=40, deadline=None)
    @given(room=st.text(min_size=1, max_size=512).filter(lambda r: r not in {c.sid for c in clients}))
    def check(room):
        if not room.startswith("user:"):
            portal.call(run, room)

    check()


# ---- delivery through python-engineio's public send_packet, bursts and order ----------------------------------


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_10000_back_to_back_emits_to_one_user_all_arrive_in_order(live, transport):
    """A backend loop that never yields fills the client's queue far past GATEWAY_MAX_QUEUED_MESSAGES: a client
    that reads takes it all, in order, and is not ended (the official client, over either transport)."""
    gateway, url = live
    async with node_client(url, "burst", transport) as client:
        await client.until("connected")
        for n in range(10_000):
            await gateway.emit_to_user("burst", "n", n)
        await gateway.emit_to_user("burst", "done")
        received = []
        while (fact := await client.until("event"))["event"] != "done":
            received.append(fact["args"][0])
        assert received == list(range(10_000))
        assert gateway.connection_count("burst") == 1


async def test_10000_messages_to_one_user_in_publish_batches_all_arrive_in_order():
    key = "publish-key-" + "k" * 40
    gateway = make_gateway(PUBLISH_KEY=key)
    async with serve(create_app(gateway)) as url, connected(url, "burst") as [client]:
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            for batch in range(10):
                messages = [{"user_id": "burst", "event": "n", "data": batch * 1000 + n} for n in range(1000)]
                async with http.post(f"{url}/publish", json=messages) as response:
                    assert response.status == 200, await response.text()
        await gateway.emit_to_user("burst", "marker")
        assert [data for _, data in await client.events_until("marker")] == list(range(10_000))
        assert gateway.connection_count("burst") == 1


async def test_a_burst_to_one_python_client_arrives_whole_while_others_are_served(live):
    gateway, url = live
    async with connected(url, "burst", "other") as [burst, other]:
        for n in range(5000):
            await gateway.emit_to_user("burst", "n", n)
            if n % 1000 == 0:
                await gateway.emit_to_user("other", "n", n)
        await gateway.broadcast("marker")
        assert [data for _, data in await burst.events_until("marker")] == list(range(5000))
        assert [data for _, data in await other.events_until("marker")] == list(range(0, 5000, 1000))


def test_emits_and_python_engineios_own_packets_reach_a_connection_in_the_order_they_were_sent(portal_with_clients):
    """Whatever mix of emits, packets handed to python-engineio directly and turns of the loop, order is kept."""
    portal, gateway, clients = portal_with_clients
    client = clients[0]

    async def run(steps: list[str]) -> None:
        eio_sid = gateway.manager.eio_sid_from_sid(client.sid, NAMESPACE)
        for n, step in enumerate(steps):
            if step == "emit":
                await gateway.manager.emit("e", n, NAMESPACE, room=client.sid)
            elif step == "engine.io":  # as python-socketio's own packets (acks, connect replies) travel
                encoded = encode_event(NAMESPACE, ["e", n])
                await gateway.sio.eio.send_packet(eio_sid, eio_packet.Packet(eio_packet.MESSAGE, encoded))
            else:
                await asyncio.sleep(0)
        await gateway.broadcast("marker")
        got = [data for _, data in await client.events_until("marker")]
        assert got == [n for n, step in enumerate(steps) if step != "turn"]
        for other in clients[1:]:
            await other.events_until("marker")

    @settings(max_examples=60, deadline=None)
    @given(steps=st.lists(st.sampled_from(["emit", "engine.io", "turn"]), max_size=30))
    def check(steps):
        portal.call(run, steps)

    check()


async def test_delivery_yields_inside_a_large_room_and_still_reaches_everyone(live, monkeypatch):
    import gateway as gateway_module

    gateway, url = live
    monkeypatch.setattr(gateway_module, "YIELD_EVERY", 2)
    async with connected(url, *[f"user{n}" for n in range(7)]) as clients:
        await gateway.broadcast("many", [1, 2])
        for client in clients:
            assert await client.next_event() == ("many", [1, 2])


async def test_skip_sid_tuple_arguments_and_ack_callbacks_keep_python_socketio_semantics(live):
    gateway, url = live
    async with connected(url, "alice", "bob") as [alice, bob]:
        await gateway.manager.emit("skipped", 1, NAMESPACE, room=None, skip_sid=alice.sid)
        await gateway.manager.emit("skipped", 2, NAMESPACE, room=None, skip_sid=[alice.sid, bob.sid])
        await gateway.emit_to_user("alice", "pair", ("a", 1))
        acked = asyncio.Event()
        await gateway.sio.emit("ask", "q", to=bob.sid, callback=lambda *args: acked.set())
        await asyncio.wait_for(acked.wait(), 10)
        await gateway.broadcast("marker")
        assert await alice.events_until("marker") == [("pair", ("a", 1))]
        assert await bob.events_until("marker") == [("skipped", 1), ("ask", "q")]


@pytest.mark.parametrize("data", [float("nan"), float("inf"), [1, {"x": -float("inf")}]])
async def test_nan_and_infinity_are_refused_for_every_emit_before_anything_is_sent(live, data):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        await gateway.join_room(alice.sid, "r")
        for emit in (
            lambda: gateway.emit_to_user("alice", "bad", data),
            lambda: gateway.emit_to_room("r", "bad", data),
            lambda: gateway.broadcast("bad", data),
            lambda: gateway.emit_to_user("alice", "bad", (b"bytes", data)),  # python-socketio's binary encoding
        ):
            with pytest.raises(TypeError, match="not JSON"):
                await emit()
        await gateway.broadcast("marker")
        assert await alice.events_until("marker") == []


async def test_data_nested_too_deeply_to_encode_is_refused_as_not_json(live):
    gateway, _ = live
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TypeError, match="not JSON"):
        await gateway.broadcast("deep", deep)
