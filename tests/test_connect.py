"""Who may connect: real clients against the real app under uvicorn."""

from __future__ import annotations

import logging
import time

import pytest
import socketio
from conftest import SECRET, Client, connected, eventually, make_gateway, refusal, serve, token
from jose import jwt
from test_auth import unsigned

from asgi import create_app
from gateway import NAMESPACE, user_room

pytestmark = pytest.mark.anyio


@pytest.fixture
async def live():
    """A fresh gateway served by uvicorn on a free port: (gateway, url)."""
    gateway = make_gateway()
    async with serve(create_app(gateway)) as url:
        yield gateway, url


def room_members(gateway, room: str) -> set[str]:
    return {sid for sid, _ in gateway.sio.manager.get_participants(NAMESPACE, room)}


def all_rooms(gateway) -> dict:
    return gateway.sio.manager.rooms.get(NAMESPACE, {})


async def test_valid_token_connects_and_joins_the_personal_room(live):
    gateway, url = live
    async with connected(url, "alice") as [alice]:
        assert await gateway.sio.get_session(alice.sid) == {"user_id": "alice"}  # no pid: recovery is off
        assert room_members(gateway, user_room("alice")) == {alice.sid}
        assert gateway.sio.manager.get_rooms(alice.sid, NAMESPACE) == [alice.sid, "user:alice"]


async def test_several_tabs_of_one_user_all_join_the_room(live):
    gateway, url = live
    async with connected(url, "alice", "alice", "alice") as tabs:
        assert room_members(gateway, "user:alice") == {tab.sid for tab in tabs}
        assert len({tab.sid for tab in tabs}) == 3


@pytest.mark.parametrize(
    "auth, message, reason",
    [
        (None, "missing token", "missing"),
        ({}, "missing token", "missing"),
        ({"token": None}, "missing token", "missing"),
        ({"token": "not-a-jwt"}, "invalid token", "invalid"),
        ({"token": 12345}, "invalid token", "invalid"),
        ({"token": ["a", "b"]}, "invalid token", "invalid"),
        ({"token": {"nested": "x"}}, "invalid token", "invalid"),
        ({"token": token("alice") + "A" * 8_000}, "invalid token", "invalid"),
        ({"token": token("alice", secret="forged-secret-" + "f" * 40)}, "invalid token", "invalid"),
        ({"token": unsigned({"sub": "alice", "exp": int(time.time()) + 60})}, "invalid token", "invalid"),
        ({"token": token("alice", ttl=-3600)}, "token expired", "expired"),
        ({"token": token("")}, "invalid token", "invalid"),
        ({"tok": token("alice")}, "missing token", "missing"),
        ("a.b.c", "invalid token", "invalid"),
        (["token"], "invalid token", "invalid"),
    ],
)
async def test_bad_auth_is_refused_with_a_connect_error_a_client_can_show(live, auth, message, reason):
    gateway, url = live
    assert await refusal(url, auth) == {"message": message, "data": {"reason": reason}}
    assert set(all_rooms(gateway).get(None, {})) == set()


async def test_connect_packet_over_the_message_limit_is_closed_not_hung(live):
    gateway, url = live
    # python-socketio's client waits out wait_timeout when the transport closes before CONNECT; the server side
    # is what this test is about: it drops the connection at once and keeps nothing of it.
    assert await refusal(url, {"token": token("alice") + "A" * 100_000}, wait_timeout=1) is None
    await eventually(lambda: not gateway.sio.eio.sockets)


async def test_refused_client_transport_is_closed_by_the_server(live):
    gateway, url = live
    for transports in (["websocket"], ["polling"]):
        await refusal(url, {"token": "x.y.z"}, transports=transports)
        await eventually(lambda: not gateway.sio.eio.sockets)


async def test_refusal_over_long_polling_too(live):
    _, url = live
    error = await refusal(url, {"token": token("bob", ttl=-3600)}, transports=["polling"])
    assert error == {"message": "token expired", "data": {"reason": "expired"}}


async def test_expired_client_can_retry_with_a_fresh_token(live):
    gateway, url = live
    client = Client()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(url, auth={"token": token("carol", ttl=-60)})
    assert client.connect_error["data"]["reason"] == "expired"
    await client.connect(url, auth={"token": token("carol")})
    assert room_members(gateway, "user:carol") == {client.sid}
    await client.close()


async def test_refused_connection_leaves_nothing_and_never_runs_disconnect(live, caplog):
    gateway, url = live
    caplog.set_level(logging.DEBUG, logger="gateway")
    async with connected(url, "dave") as [dave]:
        for auth in [None, {"token": "x.y.z"}, {"token": token("eve", ttl=-60)}]:
            await refusal(url, auth)
        assert set(all_rooms(gateway)) == {None, dave.sid, "user:dave"}
        assert set(all_rooms(gateway)[None]) == {dave.sid}
        assert getattr(gateway.sio.manager, "pending_connect", {}) == {}  # python-socketio 5.18 and later
        sid = dave.sid
    await eventually(lambda: not all_rooms(gateway))
    disconnects = [r.getMessage() for r in caplog.records if " ended: " in r.getMessage()]
    assert len(disconnects) == 1 and disconnects[0].startswith(f"{sid} of user 'dave' ended: ")


async def test_refusal_is_logged_with_the_client_address_and_never_the_token(live, caplog):
    _, url = live
    caplog.set_level(logging.INFO, logger="gateway")
    bad = token("mallory", secret="forged-secret-" + "f" * 40)
    await refusal(url, {"token": bad})
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway"]
    assert any(line.startswith("refused connection from 127.0.0.1:") and "invalid" in line for line in lines)
    assert not any(bad in line or bad.split(".")[2] in line for line in caplog.text.splitlines())


async def test_disconnect_removes_the_connection_from_every_room(live):
    gateway, url = live
    async with connected(url, "frank", "grace") as [frank, grace]:
        await gateway.join_room(frank.sid, "orders:7")
        sid = frank.sid
        await frank.close()
        await eventually(lambda: not gateway.sio.manager.get_rooms(sid, NAMESPACE))
        assert "orders:7" not in all_rooms(gateway)
        assert "user:frank" not in all_rooms(gateway)
        assert set(all_rooms(gateway)[None]) == {grace.sid}
        await eventually(lambda: len(gateway.sio.eio.sockets) == 1)
        assert set(gateway.sio.environ) == set(gateway.sio.eio.sockets) == {grace.sio.eio.sid}
        assert await gateway.sio.get_session(grace.sid) == {"user_id": "grace"}


async def test_clients_cannot_join_rooms_themselves(live):
    gateway, url = live
    async with connected(url, "ivan", "judy") as [ivan, judy]:
        for event in ["join", "join_room", "enter_room", "subscribe"]:
            await ivan.sio.emit(event, "user:judy")
            await ivan.sio.emit(event, {"room": "user:judy"})
        await gateway.emit_to_user("judy", "secret", {"for": "judy"})
        await gateway.broadcast("marker")
        assert await ivan.events_until("marker") == []
        assert await judy.events_until("marker") == [("secret", {"for": "judy"})]
        assert gateway.sio.manager.get_rooms(ivan.sid, NAMESPACE) == [ivan.sid, "user:ivan"]


async def test_algorithm_outside_the_configured_list_is_refused_end_to_end():
    gateway = make_gateway(JWT_ALGORITHMS="HS512")
    async with serve(create_app(gateway)) as url:
        hs256 = token("kate")
        hs512 = jwt.encode({"sub": "kate", "exp": int(time.time()) + 60}, SECRET, "HS512")
        assert (await refusal(url, {"token": hs256}))["message"] == "invalid token"
        client = Client()
        await client.connect(url, auth={"token": hs512})
        assert room_members(gateway, "user:kate") == {client.sid}
        await client.close()
