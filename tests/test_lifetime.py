"""Connection lifetime: tokens expire on live connections, refresh, log out everywhere, limits, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest
import socketio
from conftest import (
    TIMEOUT,
    Client,
    connected,
    eventually,
    gateway_process,
    grown_since,
    make_gateway,
    nothing_left,
    refusal,
    serve,
    server_state,
    token,
)

from asgi import create_app
from gateway import END_EVENT, NAMESPACE

pytestmark = pytest.mark.anyio


@pytest.fixture
async def live():
    gateway = make_gateway(JWT_LEEWAY="0", MAX_CONNECTIONS_PER_USER="3")
    async with serve(create_app(gateway)) as url:
        yield gateway, url


async def connect(url: str, user_id: str, ttl: float = 3600) -> Client:
    client = Client()
    await client.connect(url, auth={"token": token(user_id, ttl=ttl)})
    return client


async def test_expired_token_disconnects_a_live_connection_with_the_reason(live):
    gateway, url = live
    alice = await connect(url, "alice", ttl=1)
    assert await alice.next_event() == (END_EVENT, {"reason": "token_expired"})
    assert await alice.wait_disconnected() == "server disconnect"
    await eventually(lambda: not gateway.sio.manager.rooms.get(NAMESPACE))
    assert gateway._deadlines == {}


async def test_refresh_before_expiry_keeps_the_connection_past_the_old_exp(live):
    gateway, url = live
    refreshed, control = await connect(url, "alice", ttl=2), await connect(url, "alice", ttl=2)
    answer = await refreshed.sio.call("refresh", {"token": token("alice", ttl=60)}, timeout=10)
    assert answer["ok"] is True and answer["expires_at"] > control_deadline(gateway, control)
    assert await control.wait_disconnected() == "server disconnect"  # the old exp has passed now
    assert refreshed.sio.connected
    await gateway.emit_to_user("alice", "still", "here")
    assert await refreshed.next_event() == ("still", "here")
    await refreshed.close()


def control_deadline(gateway, client: Client) -> float:
    """The unix time at which the gateway will end `client`'s connection."""
    return time.time() + gateway._deadlines[client.sid].when() - asyncio.get_running_loop().time()


@pytest.mark.parametrize(
    "payload, reason, error",
    [
        ({"token": "forged.token.here"}, "invalid", "invalid token"),
        ({"token": token("bob", ttl=3600)}, "invalid", "token is for another user"),  # minted at collection
        ({"token": token("alice", ttl=-60)}, "expired", "token expired"),
        (None, "missing", "missing token"),
        ("text", "invalid", "invalid token"),
        (("two", "arguments"), "invalid", "invalid token"),
        ([], "invalid", "invalid token"),
    ],
)
async def test_refresh_with_a_bad_token_is_refused_and_the_old_deadline_holds(live, payload, reason, error):
    gateway, url = live
    alice = await connect(url, "alice", ttl=2)
    answer = await alice.sio.call("refresh", payload, timeout=10)
    assert answer == {"ok": False, "reason": reason, "error": error}
    assert await alice.next_event() == (END_EVENT, {"reason": "token_expired"})
    await alice.wait_disconnected()


async def test_disconnect_user_closes_every_tab_of_that_user_only(live, caplog):
    gateway, url = live
    caplog.set_level(logging.INFO, logger="gateway")
    async with connected(url, "alice", "alice", "bob") as [tab1, tab2, bob]:
        assert await gateway.disconnect_user("alice") == 2
        for tab in (tab1, tab2):
            assert await tab.next_event() == (END_EVENT, {"reason": "logout"})
            assert await tab.wait_disconnected() == "server disconnect"
        await gateway.emit_to_user("bob", "still", "here")
        assert await bob.next_event() == ("still", "here")
        assert gateway.connection_count("alice") == 0
        assert await gateway.disconnect_user("alice") == 0
    assert "logged out user 'alice': 2 connections closed" in caplog.text


async def test_connection_limit_refuses_the_extra_one_and_admits_again_after_a_disconnect(live):
    gateway, url = live
    async with connected(url, "alice", "alice", "alice") as tabs:
        error = await refusal(url, {"token": token("alice")})
        assert error == {"message": "too many connections", "data": {"reason": "limit"}}
        async with connected(url, "bob"):  # the limit is per user
            pass
        await tabs[0].close()
        await eventually(lambda: gateway.connection_count("alice") == 2)
        async with connected(url, "alice"):
            assert gateway.connection_count("alice") == 3


async def test_nothing_is_left_after_1000_connect_disconnect_cycles():
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url:
        await churn(gateway, url)


async def churn(gateway, url: str) -> None:
    await one_cycle(url, 0)  # warm up python-socketio's and aiohttp's own lazily started tasks
    await eventually(lambda: not gateway.sio.eio.sockets)
    baseline = server_state(gateway)

    async def worker(n: int) -> None:
        for i in range(100):
            await one_cycle(url, n * 100 + i)

    await asyncio.gather(*(worker(n) for n in range(10)))
    await nothing_left(lambda: grown_since(baseline, gateway), timeout=3 * TIMEOUT)  # each is freed soon after it left


async def one_cycle(url: str, n: int) -> None:
    """Connect and leave; every fifth attempt has an expired token and is refused."""
    client = Client()
    if n % 5 == 4:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(url, auth={"token": token(f"user{n % 7}", ttl=-60)})
    else:
        await client.connect(url, auth={"token": token(f"user{n % 7}", ttl=60)})
    await client.close()


def test_sigterm_ends_cleanly_and_clients_see_the_transport_close():
    with gateway_process("--timeout-graceful-shutdown", "5") as (url, process):

        async def scenario() -> None:
            clients = [await connect(url, user) for user in ("alice", "alice", "bob")]
            process.send_signal(signal.SIGTERM)
            for client in clients:
                # A transport-level end (uvicorn closes WebSockets with 1012 "service restart"), not a Socket.IO
                # "server disconnect": Socket.IO clients reconnect by themselves after the former only.
                assert await client.wait_disconnected() in ("transport close", "transport error")

        asyncio.run(scenario())
        # uvicorn re-raises the signal once its graceful shutdown is done, so the exit status is -SIGTERM.
        assert process.wait(10) == -signal.SIGTERM
        log = process.stderr.read()
        assert "Application shutdown complete." in log
        assert "Traceback" not in log
        ended = [line for line in log.splitlines() if line.endswith(" ended: shutdown")]
        assert len(ended) == 3  # one line per connection, told apart from clients leaving by themselves
