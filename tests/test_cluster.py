"""Several nodes behave as one through a real Redis: real uvicorn processes, a real publisher process, faults."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from conftest import (
    ROOT,
    SECRET,
    TIMEOUT,
    Client,
    connected,
    free_port,
    gateway_process,
    make_gateway,
    redis_server,
    serve,
    token,
)

from asgi import create_app
from gateway import DEFAULT_REDIS_CHANNEL, END_EVENT, RedisUnavailable, redis_publisher

pytestmark = pytest.mark.anyio


async def subscribers(url: str) -> int:
    """How many nodes listen on the gateway's channel, as Redis itself counts them."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        [(_, count)] = await client.pubsub_numsub(DEFAULT_REDIS_CHANNEL)
        return count
    finally:
        await client.aclose()


async def wait_for_subscribers(url: str, count: int, at_least: bool = False) -> None:
    deadline = time.monotonic() + TIMEOUT * 3
    while not (await subscribers(url) >= count if at_least else await subscribers(url) == count):
        assert time.monotonic() < deadline, f"{await subscribers(url)} of {count} nodes subscribed"
        await asyncio.sleep(0.02)


def status(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.asynccontextmanager
async def node_in_process(redis_url: str) -> AsyncIterator[tuple[object, str]]:
    """A node in this process, so the test can call its gateway; the others run as their own uvicorn processes."""
    gateway = make_gateway(REDIS_URL=redis_url)
    async with serve(create_app(gateway)) as url:
        yield gateway, url


@pytest.fixture
async def cluster():
    """Redis, nodes A and B as separate uvicorn processes, node C in this process; all three subscribed."""
    with redis_server() as redis_srv:
        env = {"GATEWAY_REDIS_URL": redis_srv.url}
        with gateway_process(env=env) as (url_a, _), gateway_process(env=env) as (url_b, _):
            async with node_in_process(redis_srv.url) as (gateway_c, url_c):
                await wait_for_subscribers(redis_srv.url, 3)
                yield redis_srv, gateway_c, url_a, url_b, url_c


async def test_every_node_is_ready_with_redis(cluster):
    _, _, url_a, url_b, url_c = cluster
    for url in (url_a, url_b, url_c):
        assert await asyncio.to_thread(status, f"{url}/ready") == (200, {"status": "ready"})


async def test_emit_to_user_reaches_every_tab_on_every_node_exactly_once(cluster):
    _, gateway_c, url_a, url_b, _ = cluster
    async with connected(url_a, "alice", "bob") as [alice_a, bob_a], connected(url_b, "alice") as [alice_b]:
        for n in range(3):
            await gateway_c.emit_to_user("alice", "note", n)
        await gateway_c.broadcast("marker")
        assert await alice_a.events_until("marker") == [("note", n) for n in range(3)]
        assert await alice_b.events_until("marker") == [("note", n) for n in range(3)]
        assert await bob_a.events_until("marker") == []


async def test_rooms_joined_and_left_for_a_sid_on_another_node(cluster):
    _, gateway_c, url_a, url_b, url_c = cluster
    async with connected(url_a, "alice") as [alice], connected(url_b, "bob") as [bob]:
        async with connected(url_c, "carol") as [carol]:
            await gateway_c.join_room(alice.sid, "orders:7")  # alice is on node A, not on C
            await gateway_c.join_room(carol.sid, "orders:7")
            await gateway_c.emit_to_room("orders:7", "order", {"id": 7})
            await gateway_c.leave_room(alice.sid, "orders:7")
            await gateway_c.emit_to_room("orders:7", "order", {"id": 8})
            await gateway_c.broadcast("marker")
            assert await alice.events_until("marker") == [("order", {"id": 7})]
            assert await bob.events_until("marker") == []
            assert await carol.events_until("marker") == [("order", {"id": 7}), ("order", {"id": 8})]


async def test_disconnect_user_logs_out_on_every_node(cluster):
    _, gateway_c, url_a, url_b, url_c = cluster
    async with connected(url_a, "alice", "bob") as [alice_a, bob], connected(url_b, "alice") as [alice_b]:
        async with connected(url_c, "alice") as [alice_c]:
            assert await gateway_c.disconnect_user("alice") == 1  # the one on this node
            for tab in (alice_a, alice_b, alice_c):
                assert await tab.next_event() == (END_EVENT, {"reason": "logout"})
                assert await tab.wait_disconnected() == "server disconnect"
            await gateway_c.emit_to_user("bob", "still", "here")
            assert await bob.next_event() == ("still", "here")


PUBLISHER = """
import asyncio, sys
from gateway import redis_publisher

async def main():
    publisher = redis_publisher(sys.argv[1])
    await publisher.emit_to_user("alice", "from-worker", {"n": 1})
    await publisher.emit_to_room("orders:7", "from-worker", {"n": 2})
    await publisher.broadcast("from-worker", {"n": 3})

asyncio.run(main())
"""


async def test_a_process_without_a_server_publishes_through_redis(cluster):
    redis_srv, gateway_c, url_a, url_b, _ = cluster
    async with connected(url_a, "alice") as [alice], connected(url_b, "bob") as [bob]:
        await gateway_c.join_room(bob.sid, "orders:7")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {"GATEWAY_JWT_SECRET": SECRET}
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", PUBLISHER, redis_srv.url], cwd=ROOT, env=env, check=True, timeout=30
        )
        assert await alice.next_event() == ("from-worker", {"n": 1})
        assert await alice.next_event() == ("from-worker", {"n": 3})
        assert await bob.next_event() == ("from-worker", {"n": 2})
        assert await bob.next_event() == ("from-worker", {"n": 3})


async def test_garbage_on_the_channel_is_logged_and_ignored(cluster, caplog):
    redis_srv, gateway_c, url_a, _, url_c = cluster
    caplog.set_level(logging.WARNING, logger="gateway")
    async with connected(url_a, "alice") as [alice], connected(url_c, "carol") as [carol]:
        client = redis.asyncio.Redis.from_url(redis_srv.url)
        for garbage in [b"not json", b"[1, 2]", b'"method"', b"5", b'{"method": 5}', b'{"method": "emit"}', b"\xff"]:
            await client.publish(DEFAULT_REDIS_CHANNEL, garbage)
        await client.aclose()
        publisher = redis_publisher(redis_srv.url)
        await publisher.broadcast("after-garbage", 1)
        assert await alice.next_event() == ("after-garbage", 1)
        assert await carol.next_event() == ("after-garbage", 1)
    # The last two look like python-socketio's own messages, so they reach it: it ignores one, logs the other.
    assert caplog.text.count("that is not the gateway's:") == 5


async def test_redis_down_at_start_up_then_up(caplog):
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    async with node_in_process(redis_url) as (gateway, url):
        code, body = await asyncio.to_thread(status, f"{url}/ready")
        assert (code, body) == (503, {"status": "unavailable", "reason": "redis unreachable"})  # no address
        assert f"127.0.0.1:{port}" in caplog.text  # the address goes to the log
        assert (await asyncio.to_thread(status, f"{url}/health"))[0] == 200
        async with connected(url, "alice") as [alice]:
            with pytest.raises(RedisUnavailable):  # the caller learns the other nodes did not get it
                await gateway.emit_to_user("alice", "local", 1)
            assert await alice.next_event() == ("local", 1)  # this node's connections did
            with redis_server(port) as redis_srv:
                started = time.monotonic()
                await wait_for_subscribers(redis_srv.url, 1)  # the node's listener retries by itself
                print(f"\ncross-node delivery resumed {time.monotonic() - started:.1f} s after Redis came up")
                assert (await asyncio.to_thread(status, f"{url}/ready"))[0] == 200
                await redis_publisher(redis_srv.url).emit_to_user("alice", "remote", 2)
                assert await alice.next_event() == ("remote", 2)


async def test_redis_killed_mid_run_and_restarted():
    with redis_server() as redis_srv:
        with gateway_process(env={"GATEWAY_REDIS_URL": redis_srv.url}) as (url_a, node_a):
            async with node_in_process(redis_srv.url) as (gateway_c, url_c):
                await wait_for_subscribers(redis_srv.url, 2)
                async with connected(url_a, "alice") as [alice], connected(url_c, "carol") as [carol]:
                    redis_srv.kill()
                    with pytest.raises(RedisUnavailable):
                        await gateway_c.emit_to_user("carol", "local", 1)  # local delivery never stops
                    assert await carol.next_event() == ("local", 1)
                    with pytest.raises(RedisUnavailable):  # a logout that missed the other nodes says so
                        await gateway_c.disconnect_user("alice")
                    assert (await asyncio.to_thread(status, f"{url_c}/ready"))[0] == 503
                    redis_srv.start()
                    started = time.monotonic()
                    received = await probe_until_delivered(gateway_c, alice)
                    print(f"\ncross-node delivery resumed {time.monotonic() - started:.1f} s after Redis restarted")
                    await gateway_c.emit_to_user("alice", "probe", "last")
                    while (event := await alice.next_event()) != ("probe", "last"):
                        received.append(event[1])
                    assert received == sorted(set(received))  # in order, nothing twice
                    assert node_a.poll() is None  # node A never crashed


async def probe_until_delivered(gateway, client: Client) -> list[int]:
    """Emit numbered probes across nodes, one per 0.2 s without an arrival, until one arrives; return its number."""
    deadline = time.monotonic() + 90  # python-socketio's listener backs off up to 60 s between retries
    for n in itertools.count():
        with contextlib.suppress(RedisUnavailable):  # until this node's publisher reconnects
            await gateway.emit_to_user("alice", "probe", n)
        try:
            return [(await asyncio.wait_for(client.events.get(), 0.2))[1]]
        except asyncio.TimeoutError:
            assert time.monotonic() < deadline, "cross-node delivery did not resume"
    raise AssertionError("unreachable")


def test_uvicorn_workers_share_one_redis():
    with redis_server() as redis_srv:
        env = {"GATEWAY_REDIS_URL": redis_srv.url, "GATEWAY_TRANSPORTS": "websocket"}
        with gateway_process("--workers", "2", env=env) as (url, _):

            async def scenario() -> None:
                await wait_for_subscribers(redis_srv.url, 2)  # both workers listen before any client arrives
                users = [f"user{n}" for n in range(8)]
                async with connected(url, *users) as clients:
                    publisher = redis_publisher(redis_srv.url)
                    for user in users:
                        await publisher.emit_to_user(user, "hello", user)
                    await publisher.broadcast("marker")
                    for user, client in zip(users, clients):
                        assert await client.events_until("marker") == [("hello", user)]

            asyncio.run(scenario())


async def test_websocket_only_transport_refuses_polling():
    gateway = make_gateway(TRANSPORTS="websocket")
    async with serve(create_app(gateway)) as url:
        code, _ = await asyncio.to_thread(status_raw, f"{url}/socket.io/?EIO=4&transport=polling")
        assert code == 400
        client = Client()
        await client.connect(url, auth={"token": token("alice")}, transports=["websocket"])
        assert client.sio.connected
        await client.close()


def status_raw(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()



async def test_readiness_follows_the_subscription_not_a_pool_connection():
    """Publishing still works, but this node's subscription cannot come back: it must not report ready."""
    with redis_server() as redis_srv:
        async with node_in_process(redis_srv.url) as (gateway, url):
            await wait_for_subscribers(redis_srv.url, 1)
            assert (await asyncio.to_thread(status, f"{url}/ready"))[0] == 200  # its publisher is connected now
            admin = redis.asyncio.Redis.from_url(redis_srv.url)
            await admin.config_set("maxclients", len(await admin.client_list()) - 1)  # no new connection
            await admin.client_kill_filter(_type="pubsub")
            code, body = await asyncio.to_thread(status, f"{url}/ready")
            assert (code, body["reason"]) == (503, "redis subscription not receiving")
            await admin.config_set("maxclients", 10000)
            await wait_for_subscribers(redis_srv.url, 1)
            assert (await asyncio.to_thread(status, f"{url}/ready"))[0] == 200
            await admin.aclose()


async def test_publish_api_answers_503_with_retry_after_when_redis_does_not_take_a_message():
    key = "publish-key-" + "k" * 40
    with redis_server() as redis_srv:
        gateway = make_gateway(REDIS_URL=redis_srv.url, PUBLISH_KEY=key)
        async with serve(create_app(gateway)) as url, connected(url, "alice") as [alice]:
            await wait_for_subscribers(redis_srv.url, 1)
            batch = [{"user_id": "alice", "event": "n", "data": n} for n in range(3)]
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            request = urllib.request.Request(f"{url}/publish", json.dumps(batch).encode(), headers)
            assert await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).status) == 200
            redis_srv.kill()
            try:
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
                raise AssertionError("a publish Redis did not take was answered 200")
            except urllib.error.HTTPError as error:
                assert error.code == 503 and error.headers["Retry-After"].isdigit()
                assert json.loads(error.read())["published"] == 0  # none of the batch reached every node
