"""The HTTP publish API: any backend pushes with a bearer key; everything else gets a clear 4xx."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import aiohttp
import anyio.from_thread
import pytest
from conftest import connected, make_gateway, serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi import MAX_BATCH, create_app

pytestmark = pytest.mark.anyio

KEY = "publish-key-" + "k" * 40
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture
async def live_gateway():
    gateway = make_gateway(PUBLISH_KEY=KEY, PUBLISH_MAX_BYTES="4096")
    async with serve(create_app(gateway)) as url:
        async with aiohttp.ClientSession() as http:
            yield gateway, url, http


@pytest.fixture
def live(live_gateway):
    return live_gateway[1:]


async def post(http: aiohttp.ClientSession, url: str, body: Any = None, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(f"{url}/publish", data=data, headers=AUTH if headers is None else headers) as response:
        return response.status, await response.json()


async def test_publish_to_a_user_reaches_that_user_only(live):
    url, http = live
    async with connected(url, "alice", "bob") as [alice, bob]:
        status, body = await post(http, url, {"user_id": "alice", "event": "note", "data": {"n": 1}})
        assert (status, body) == (200, {"published": 1})
        await post(http, url, {"broadcast": True, "event": "marker"})
        assert await alice.events_until("marker") == [("note", {"n": 1})]
        assert await bob.events_until("marker") == []


async def test_publish_to_a_room_and_to_everyone(live_gateway):
    gateway, url, http = live_gateway
    async with connected(url, "alice", "bob") as [alice, bob]:
        await gateway.join_room(bob.sid, "orders:7")
        assert (await post(http, url, {"room": "orders:7", "event": "order", "data": [1, 2]}))[0] == 200
        assert (await post(http, url, {"broadcast": True, "event": "news", "data": "hello"}))[0] == 200
        assert await alice.next_event() == ("news", "hello")
        assert await bob.next_event() == ("order", [1, 2])
        assert await bob.next_event() == ("news", "hello")


async def test_batch_is_applied_in_order(live):
    url, http = live
    async with connected(url, "alice", "bob") as [alice, bob]:
        batch = [{"user_id": "alice", "event": "n", "data": n} for n in range(5)]
        batch.insert(2, {"user_id": "bob", "event": "n", "data": "bob"})
        batch.append({"broadcast": True, "event": "marker"})
        assert await post(http, url, batch) == (200, {"published": 7})
        assert await alice.events_until("marker") == [("n", n) for n in range(5)]
        assert await bob.events_until("marker") == [("n", "bob")]


async def test_a_bad_message_in_a_batch_sends_nothing(live):
    url, http = live
    async with connected(url, "alice") as [alice]:
        batch = [{"user_id": "alice", "event": "n", "data": 1}, {"user_id": "alice", "event": ""}]
        status, body = await post(http, url, batch)
        assert status == 422 and body["field"] == "[1].event"
        await post(http, url, {"broadcast": True, "event": "marker"})
        assert await alice.events_until("marker") == []


async def test_a_number_too_large_for_a_float_is_400_and_the_batch_sends_nothing(live):
    """json.loads reads 1e400 as Infinity, which parse_constant never sees; browsers cannot parse it."""
    url, http = live
    async with connected(url, "alice") as [alice]:
        raw = b'[{"user_id": "alice", "event": "first"}, {"user_id": "alice", "event": "n", "data": [1e400]}]'
        assert (await post(http, url, raw=raw))[0] == 400
        await post(http, url, {"broadcast": True, "event": "marker"})
        assert await alice.events_until("marker") == []


@pytest.mark.parametrize("depth", [101, 500, 900, 990, 1900])
async def test_data_nested_too_deeply_is_422_and_the_batch_sends_nothing(live, depth):
    """Before: data that loaded but could not be encoded again answered 500 after earlier messages went out."""
    url, http = live
    async with connected(url, "alice") as [alice]:
        deep = "[" * depth + "]" * depth
        raw = f'[{{"user_id": "alice", "event": "n", "data": 1}}, {{"user_id": "alice", "event": "n", "data": {deep}}}]'
        status, body = await post(http, url, raw=raw.encode())
        assert (status, body.get("field")) in ((422, "[1].data"), (400, None))  # 400: too deep for json.loads itself
        async with http.post(f"{url}/publish", json={"user_id": "alice", "event": "n", "data": [[[1]]] * 2},
                             headers=AUTH) as response:
            assert response.status == 200  # a hundred levels or fewer go through
        assert await alice.next_event() == ("n", [[[1]]] * 2)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json"},
        {"Content-Type": "application/json", "Authorization": "Bearer wrong-key"},
        {"Content-Type": "application/json", "Authorization": f"Basic {KEY}"},
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}x"},
        {"Authorization": "Bearer", "Content-Type": "application/json"},
    ],
)
async def test_missing_or_wrong_key_gets_the_same_401(live, headers):
    url, http = live
    status, body = await post(http, url, {"broadcast": True, "event": "x"}, headers=headers)
    assert (status, body) == (401, {"error": "missing or wrong publish key"})


async def test_wrong_content_type_is_415(live):
    url, http = live
    status, _ = await post(http, url, {"broadcast": True, "event": "x"}, headers={**AUTH, "Content-Type": "text/plain"})
    assert status == 415


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b"\xff\xfe", b'{"broadcast": true, "event": "x", "data": NaN}', b"[" * 4000]
)
async def test_body_that_is_not_json_is_400(live, raw):
    url, http = live
    assert (await post(http, url, raw=raw))[0] == 400


async def test_body_over_the_limit_is_413_before_it_is_read(live):
    url, http = live
    status, body = await post(http, url, raw=b" " * 5000)
    assert status == 413

    async def chunks():  # no Content-Length: refused once the limit is passed
        for _ in range(100):
            yield b" " * 1000

    async with http.post(f"{url}/publish", data=chunks(), headers=AUTH) as response:
        assert response.status == 413


@pytest.mark.parametrize(
    "body, field",
    [
        ({"event": "x"}, "user_id|room|broadcast"),
        ({"user_id": "a", "room": "r", "event": "x"}, "user_id|room|broadcast"),
        ({"user_id": "", "event": "x"}, "user_id"),
        ({"user_id": 42, "event": "x"}, "user_id"),
        ({"room": "", "event": "x"}, "room"),
        ({"room": ["r"], "event": "x"}, "room"),
        ({"broadcast": False, "event": "x"}, "broadcast"),
        ({"broadcast": "yes", "event": "x"}, "broadcast"),
        ({"user_id": "a"}, "event"),
        ({"user_id": "a", "event": ""}, "event"),
        ({"user_id": "a", "event": "disconnect"}, "event"),
        ({"user_id": "a", "event": "x", "users_id": "b"}, "users_id"),
        ("just a string", None),
        ([1], "[0]"),
    ],
)
async def test_wrong_shape_is_422_naming_the_field(live, body, field):
    url, http = live
    status, answer = await post(http, url, body)
    assert status == 422
    assert answer.get("field") == field
    assert answer["error"]


async def test_batch_over_the_limit_is_422():
    gateway = make_gateway(PUBLISH_KEY=KEY)
    async with serve(create_app(gateway)) as url, aiohttp.ClientSession() as http:
        status, _ = await post(http, url, [{"broadcast": True, "event": "x"}] * (MAX_BATCH + 1))
        assert status == 422


async def test_routes_do_not_exist_without_a_key():
    async with serve(create_app(make_gateway())) as url, aiohttp.ClientSession() as http:
        async with http.post(f"{url}/publish", json={"broadcast": True, "event": "x"}) as response:
            assert response.status == 404


async def test_the_key_never_reaches_the_logs(live, caplog):
    url, http = live
    caplog.set_level(logging.DEBUG)
    await post(http, url, {"broadcast": True, "event": "x"})
    await post(http, url, {"broadcast": True, "event": ""})
    await post(http, url, {"broadcast": True, "event": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert "publish refused" in caplog.text
    assert KEY not in caplog.text


def test_short_publish_key_is_refused_at_start_up():
    with pytest.raises(ValueError, match="GATEWAY_PUBLISH_KEY must be at least 32"):
        make_gateway(PUBLISH_KEY="short")


# ---- property: any JSON body publishes exactly what it says or is refused with a 4xx ---------------

USERS = ["u1", "u2"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.sampled_from(USERS) | json_values,
        "room": st.sampled_from(["r1", ""]) | json_values,
        "broadcast": st.just(True) | json_values,
        "event": st.sampled_from(["e", "connect"]) | json_values,
        "data": json_values,
        "extra": json_values,
    },
)
bodies = message_like | st.lists(message_like, max_size=4) | json_values


def expected_deliveries(body: Any) -> dict[str, list[Any]]:
    messages = body if isinstance(body, list) else [body]
    got: dict[str, list[Any]] = {user: [] for user in USERS}
    for message in messages:
        for user in USERS:
            if message.get("broadcast") is True or message.get("user_id") == user or message.get("room") == "r1":
                got[user].append([message["event"], message.get("data")])
    return got


@pytest.fixture
def portal_with_clients():
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        stack = contextlib.AsyncExitStack()
        gateway = make_gateway(PUBLISH_KEY=KEY)

        async def start():
            url = await stack.enter_async_context(serve(create_app(gateway)))
            clients = await stack.enter_async_context(connected(url, *USERS))
            await gateway.join_room(clients[0].sid, "r1")
            await gateway.join_room(clients[1].sid, "r1")
            http = await stack.enter_async_context(aiohttp.ClientSession())
            return url, clients, http

        yield portal, *portal.call(start)
        portal.call(stack.aclose)


def test_any_json_body_publishes_exactly_what_it_says_or_gets_a_4xx(portal_with_clients):
    portal, url, clients, http = portal_with_clients

    async def run(body: Any) -> None:
        status, answer = await post(http, url, body)
        assert status in (200, 422), answer
        await post(http, url, {"broadcast": True, "event": "marker"})
        for user, client in zip(USERS, clients):
            got = [[event, data if data != () else None] for event, data in await client.events_until("marker")]
            assert got == (expected_deliveries(body)[user] if status == 200 else [])

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=bodies)
    def check(body):
        portal.call(run, body)

    check()
