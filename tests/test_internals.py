"""The python-socketio and python-engineio internals gateway.py uses (its one marked place): each test fails when
an upgrade changes what the gateway relies on. The overrides of AsyncServer methods are tested by what they do:
`_handle_eio_connect` by test_closing.py::test_a_session_that_answers_pings_but_never_connects_is_closed,
`_handle_connect` by test_closing.py::test_a_connection_the_gateway_ended_cannot_connect_again_on_the_same_websocket,
`_handle_eio_message` by test_hostile.py::test_a_malformed_or_binary_packet_closes_that_connection_only,
`_handle_eio_disconnect` with the ping tasks below and by
test_closing.py::test_a_polling_client_that_closes_its_own_session_has_its_pending_poll_answered; the Redis manager's `_publish` by
test_cluster.py::test_publish_api_answers_503_with_retry_after_when_redis_does_not_take_a_message and its `_listen`
by test_cluster.py::test_readiness_follows_the_subscription_not_a_pool_connection."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from conftest import TIMEOUT, connected, eventually, make_gateway, refusal, serve, token
from test_closing import Polling

from asgi import create_app
from gateway import all_taken, queued_packets

pytestmark = pytest.mark.anyio


@pytest.fixture
async def live():
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url, aiohttp.ClientSession() as http:
        yield gateway, url, http


async def test_queued_packets_counts_what_waits_for_a_client_and_all_taken_waits_until_it_took_them(live):
    gateway, url, http = live
    session = await Polling(http, url).open()  # the OPEN packet was answered by the handshake itself
    assert queued_packets(gateway.sio, session.sid) == 0
    assert await session.post("40" + json.dumps({"token": token("quiet")})) == 200
    for n in range(3):
        await gateway.emit_to_user("quiet", "n", n)
    assert queued_packets(gateway.sio, session.sid) == 4  # the CONNECT reply and three events
    taken = asyncio.ensure_future(all_taken(gateway.sio, session.sid))
    await asyncio.sleep(0)
    assert not taken.done()
    assert len(await session.poll()) == 4
    await asyncio.wait_for(taken, TIMEOUT)
    assert queued_packets(gateway.sio, session.sid) == 0 and queued_packets(gateway.sio, "no-such-sid") == 0


async def test_the_client_manager_is_started_once_before_any_client(live):
    gateway, url, _ = live  # the lifespan has run gateway.start()
    assert gateway.sio.manager_initialized
    calls = []
    gateway.manager.initialize = lambda: calls.append("again")
    async with connected(url, "alice"):
        pass
    assert calls == []  # python-socketio saw the flag and did not start it a second time


def ping_tasks() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks() if task.get_coro().__qualname__.endswith("._send_ping")]


async def test_a_closed_sessions_ping_task_ends_with_it_not_a_ping_interval_later(live):
    gateway, url, _ = live
    async with connected(url, "alice") as [alice]:
        eio_sid = gateway.manager.eio_sid_from_sid(alice.sid, "/")
        assert gateway.sio.ping_tasks[eio_sid] in ping_tasks()  # python-engineio still names its ping task so
    await refusal(url, {"token": "forged.token.here"})
    await eventually(lambda: not ping_tasks() and not gateway.sio.ping_tasks)  # before: 25 s each
