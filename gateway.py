"""The Socket.IO server: who may connect, which room each user is in, and how the backend reaches them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping
from functools import partial
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis.asyncio
import socketio
from engineio import packet as eio_packet
from prometheus_client import CollectorRegistry, Counter, Gauge
from socketio import packet
from starlette.config import Config
from starlette.datastructures import Secret

from auth import TokenRefused, is_valid_user_id, key_problem, load_jwt_settings, verify_auth

logger = logging.getLogger("gateway")

NAMESPACE = "/"
USER_ROOM_PREFIX = "user:"  # personal rooms are "user:<id>"; the backend's own rooms may not start with it
END_EVENT = "gateway_disconnect"  # sent with {"reason": ...} just before the server ends a connection
# Event names the official JavaScript client reserves for itself (emitting them would break clients), and ours.
RESERVED_EVENTS = {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
RECOVERY_EVENT = "gateway_offset"  # sent on connect with recovery on: every client then holds an offset
RESERVED_EVENTS |= {END_EVENT, RECOVERY_EVENT}
REFUSALS = {"missing": "missing token", "invalid": "invalid token", "expired": "token expired"}
REFUSALS |= {"limit": "too many connections", "error": "server error"}
RECOVERY_MAX_EVENTS = 10_000  # events kept for recovery (also at most N seconds): per node, or in Redis per cluster
RECOVERY_MAX_BYTES = 64 * 2**20  # and in memory, at most these bytes of them
RECOVERY_MAX_SESSIONS = 100_000  # dropped connections' sessions kept in memory (also at most N seconds)
OFFSET = re.compile(r"\d{1,19}-\d{1,19}")  # Redis stream ids (64-bit numbers); in memory "0-<n>"
CLOSE_TIMEOUT = 5.0  # seconds a connection the server closes has to take its last packets
YIELD_EVERY = 1000  # recipients served between two turns of the event loop during one emit
DEFAULT_REDIS_CHANNEL = "socket-gateway"
REDIS_TIMEOUT = 5.0  # seconds for a Redis connect, publish or readiness probe
KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))  # probes: 10 s idle, every 5 s, 3 times
strict_dumps = partial(json.dumps, allow_nan=False)  # browsers cannot parse NaN or Infinity


class Settings:
    """Every GATEWAY_* variable, read once at start-up; a bad one raises ValueError with a sentence naming it."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        config = Config(environ=environ, env_prefix="GATEWAY_")
        self.jwt = load_jwt_settings(config)
        self.cors_origins = cors_origins(config("CORS_ORIGINS", default=""))  # None: same origin only
        self.max_message_bytes = number(config, "MAX_MESSAGE_BYTES", 16384, 9 * 1024, 100 * 2**20)  # a CONNECT fits
        self.max_connections_per_user = number(config, "MAX_CONNECTIONS_PER_USER", 32, 1, 10**6)
        self.max_queued_messages = number(config, "MAX_QUEUED_MESSAGES", 1000, 10, 10**6)
        self.ping_interval = number(config, "PING_INTERVAL", 25, 1, 300)
        self.ping_timeout = number(config, "PING_TIMEOUT", 20, 1, 300)
        if (key := config("PUBLISH_KEY", default="")) and (len(key) < 32 or not key.isascii()):
            raise ValueError("GATEWAY_PUBLISH_KEY must be at least 32 ASCII characters")
        self.publish_key = Secret(key) if key else None  # None: no HTTP publish API
        self.publish_max_bytes = number(config, "PUBLISH_MAX_BYTES", 2**20, 1024, 100 * 2**20)
        self.redis_url = config("REDIS_URL", default="").strip() or None  # None: one process, rooms in memory
        if self.redis_url and urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):  # no password
            raise ValueError("GATEWAY_REDIS_URL must start with redis://, rediss:// or unix://")
        self.redis_channel = config("REDIS_CHANNEL", default="").strip() or DEFAULT_REDIS_CHANNEL
        self.transports = [t.strip() for t in config("TRANSPORTS", default="polling,websocket").split(",") if t.strip()]
        if not self.transports or not {*self.transports} <= {"polling", "websocket"}:
            raise ValueError(f"GATEWAY_TRANSPORTS must be websocket, polling or both, got {self.transports}")
        self.recovery_seconds = number(config, "RECOVERY_SECONDS", 0, 0, 3600)  # 0: no connection state recovery
        self.metrics = config("METRICS", cast=bool, default=False)
        self.log_level = choice(config, "LOG_LEVEL", ["INFO", "DEBUG", "WARNING", "ERROR"]).upper()
        self.log_format = choice(config, "LOG_FORMAT", ["text", "json"]).lower()


def number(config: Config, name: str, default: int, low: int, high: int) -> int:
    if not low <= (value := config(name, cast=int, default=default)) <= high:
        raise ValueError(f"GATEWAY_{name} must be between {low} and {high}, got {value}")
    return int(value)


def choice(config: Config, name: str, choices: list[str]) -> str:
    if (value := config(name, default=choices[0]).strip()).lower() not in [c.lower() for c in choices]:
        raise ValueError(f"GATEWAY_{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def cors_origins(value: str) -> list[str] | str | None:
    origins = [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
    for origin in [] if "*" in origins else origins:
        if (parts := urlsplit(origin)).scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"GATEWAY_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com")
    return "*" if "*" in origins else origins or None


def user_room(user_id: str) -> str:
    """The room every connection of one user joins; no room the backend may name starts like it."""
    return USER_ROOM_PREFIX + user_id


def check_user_id(user_id: Any) -> str:
    if not is_valid_user_id(user_id):
        raise ValueError(f"user_id must be 1 to 256 characters without control characters, got {user_id!r:.80}")
    return user_id


def check_room(room: Any) -> str:
    if not isinstance(room, str) or not 0 < len(room) <= 512:
        raise ValueError(f"room must be a string of 1 to 512 characters, got {room!r:.80}")
    if room.startswith(USER_ROOM_PREFIX):
        raise ValueError(f"room names starting with {USER_ROOM_PREFIX!r} are users' own rooms: use emit_to_user")
    return room


def check_event(event: Any) -> str:
    if not isinstance(event, str) or not event or event in RESERVED_EVENTS:
        raise ValueError(f"event must be a non-empty string and not one Socket.IO reserves, got {event!r:.80}")
    return event


def client_address(scope: Mapping[str, Any]) -> str:
    """The peer's address from an ASGI scope (python-engineio's REMOTE_ADDR is a fixed 127.0.0.1 under ASGI)."""
    return f"{client[0]}:{client[1]}" if (client := scope.get("client")) else "unknown"


def to_json(data: Any, **options: Any) -> str:
    """JSON text of `data`; TypeError for anything that is not JSON (NaN, Infinity, too deeply nested included)."""
    try:
        return strict_dumps(data, separators=(",", ":"), **options)
    except (ValueError, RecursionError) as error:
        raise TypeError(f"data is not JSON: {error}") from None


def event_arguments(data: Any) -> list[Any]:
    """An emit's data as the event's arguments, as python-socketio reads it: a tuple is several, None is none."""
    return list(data) if isinstance(data, tuple) else [] if data is None else [data]


def encode_event(namespace: str, data: list[Any]) -> str | list[Any]:
    """An EVENT packet as python-socketio encodes it (one json.dumps without bytes); TypeError if data is not JSON."""
    prefix = str(packet.EVENT) if namespace == "/" else f"{packet.EVENT}{namespace},"
    try:
        return prefix + to_json(data)
    except TypeError:  # bytes, or not JSON at all: python-socketio's binary encoding once the rest is JSON
        to_json(data, default=lambda value: None if isinstance(value, bytes) else strict_dumps(value))
        return packet.Packet(packet.EVENT, namespace=namespace, data=data).encode()  # type: ignore[no-any-return]


async def bounded(awaitable: Awaitable[Any], seconds: float) -> None:
    """Await `awaitable` for at most `seconds`, then give up on it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, seconds)


class GatewayManager(socketio.AsyncManager):
    """python-socketio's in-memory client manager, delivering an emit with one encode and no task per recipient."""

    # python-socketio's emit starts a task per recipient; here each recipient's Engine.IO connection gets the packet
    # from `send_packet` and its writer task sends it (emits with an ack callback keep python-socketio's path).
    # END_EVENT sent to a room also ends its connections: that is how a logout reaches every node.

    max_queued, stall_seconds = 1000, 20.0  # set by create_server from the settings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_since: dict[str, float] = {}  # sid -> when an emit first found max_queued packets waiting on it
        self.offsets = False  # recovery on: an event's last argument is its offset
        self.delivered = "0-0"  # the newest offset this node delivered (in offset order: see in_order)
        self.held: dict[str, list[tuple[Any, Any, list[Any]]]] = {}  # sid -> (room, offset, packets) held back
        self.marks: dict[str, tuple[int, int]] = {}  # sid -> offset up to which its replay went: later copies go
        self.in_order = asyncio.Lock()

    async def emit(self, event: str, data: Any, namespace: str, room: Any = None, **kwargs: Any) -> None:
        room, skip = kwargs.get("to") or room, kwargs.get("skip_sid")
        if kwargs.get("callback") is not None:
            return await super().emit(event, data, namespace, room, skip, kwargs["callback"])  # type: ignore[no-any-return]
        arguments = event_arguments(data)
        encoded = encode_event(namespace, [event, *arguments])
        last = arguments[-1] if self.offsets and arguments else None
        offset = offset_order(last) if isinstance(last, str) and OFFSET.fullmatch(last) else None
        parts = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in ([encoded] if isinstance(encoded, str) else encoded)]
        skip = set(skip) if isinstance(skip, list) else {skip}
        now, any_full, stalled = time.monotonic(), False, []
        # Events with offsets go out one emit at a time, so that a client's offsets only ever grow; the recipients
        # are those of when it goes out, so that one connecting meanwhile is not given an offset older than it.
        async with self.in_order if offset and event != RECOVERY_EVENT else contextlib.nullcontext():
            recipients = [(sid, eio_sid) for sid, eio_sid in self.get_participants(namespace, room) if sid not in skip]
            for count, (sid, eio_sid) in enumerate(recipients, 1):
                if queued_packets(self.server, eio_sid) < self.max_queued:
                    self.full_since.pop(sid, None)
                elif now - self.full_since.setdefault(sid, now) > self.stall_seconds:  # stopped reading
                    stalled.append(sid)
                    continue
                any_full = any_full or sid in self.full_since
                if sid in self.held:  # a recovering connection: after its replay
                    self.held[sid].append((room, offset, parts))
                    continue
                if offset and (mark := self.marks.get(sid)):  # the replay sent it already (Redis delivers a bit later)
                    if offset <= mark:
                        continue
                    del self.marks[sid]
                for part in parts:
                    await self.server.eio.send_packet(eio_sid, part)
                if count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            if offset and offset > offset_order(self.delivered):
                self.delivered = str(last)
        for sid in stalled:
            logger.warning("ended %s: its client took nothing for %.0f s", sid, self.stall_seconds)
            await self.server.end(sid, "stalled")
        for sid, _ in recipients if event == END_EVENT else ():
            ending = arguments[0] if arguments and isinstance(arguments[0], dict) else {}
            await self.server.end(sid, ending.get("reason", "server"))
        if any_full:
            await asyncio.sleep(0)  # a burst: let the writers of the connections that are behind run first


class RedisUnavailable(ConnectionError):
    """Redis did not take a message meant for every node: this node's connections got it, the other nodes' did not."""


def offset_order(offset: str) -> tuple[int, int]:
    milliseconds, _, sequence = offset.partition("-")
    return int(milliseconds), int(sequence)


Missed = tuple[list[tuple[str, str, str]], str]  # (offset, room or "" for everyone, [event, *arguments]), newest offset


class MemoryRecovery:
    """One node's events of the last `seconds` and its dropped connections' sessions, in memory and bounded."""

    def __init__(self, seconds: int) -> None:
        self.seconds, self.events = seconds, deque[tuple[str, str, str, float]]()  # (offset, room, data, when)
        self.trimmed, self.count, self.bytes = (0, 0), 0, 0  # the newest offset dropped, the offsets handed out
        self.sessions: dict[str, tuple[float, str, list[str]]] = {}  # pid -> (kept until, user id, rooms), in order

    async def emit(self, manager: GatewayManager, event: str, arguments: list[Any], room: str | None) -> None:
        payload = to_json([event, *arguments])  # bytes too raise TypeError: the history keeps JSON
        # No await from here to the delivery's lock (GatewayManager.in_order): offsets go out in the order given.
        self.count, self.bytes, now = self.count + 1, self.bytes + len(payload), time.monotonic()
        self.events.append((offset := f"0-{self.count}", room or "", payload, now))
        too_old, events = now - self.seconds, self.events
        while events and (
            events[0][3] < too_old or len(events) > RECOVERY_MAX_EVENTS or self.bytes > RECOVERY_MAX_BYTES
        ):
            dropped, _, data, _ = events.popleft()
            self.trimmed, self.bytes = offset_order(dropped), self.bytes - len(data)
        await manager.emit(event, (*arguments, offset), NAMESPACE, room=room)

    async def since(self, offset: str) -> Missed | None:
        """The events after `offset` and the newest offset, or None when some are gone or `offset` is unknown."""
        if not self.trimmed <= offset_order(offset) <= (0, self.count):
            return None
        missed = [entry[:3] for entry in self.events if offset_order(entry[0]) > offset_order(offset)]
        return missed, f"0-{self.count}"

    async def newest(self) -> str:
        return f"0-{self.count}"

    async def keep(self, pid: str, user_id: str, rooms: list[str]) -> None:
        sessions, now = self.sessions, time.monotonic()
        while sessions and (len(sessions) >= RECOVERY_MAX_SESSIONS or next(iter(sessions.values()))[0] < now):
            del sessions[next(iter(sessions))]  # the oldest first
        self.sessions[pid] = (now + self.seconds, user_id, rooms)

    async def take(self, pid: str, user_id: str) -> list[str] | None:
        """The rooms of a session of this user, which can be taken once; None for any other pid or user."""
        if (session := self.sessions.get(pid)) is None or session[1] != user_id or session[0] < time.monotonic():
            return None
        return self.sessions.pop(pid)[2]


# XADD and PUBLISH in one step, so that every node delivers events in offset order, and with the same offsets. The
# window is trimmed by Redis's clock, which makes the ids, and never past the event before the new one: a quiet
# client holds that one's offset, which must not look trimmed.
ADD_AND_PUBLISH = """local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'room', ARGV[2], 'd', ARGV[3])
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[7]) * 1000
local keep = tonumber(string.match(last and last[1] or id, '^%d+'))
redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', math.min(oldest, keep)))
redis.call('PUBLISH', ARGV[4], (string.gsub(ARGV[5], ARGV[6], id, 1)))
return id"""


class RedisRecovery:
    """The cluster's recent events in a Redis stream and dropped connections' sessions as expiring keys."""

    def __init__(self, manager: GatewayRedisManager, seconds: int) -> None:
        self.redis, self.channel, self.seconds = manager.publisher, manager.channel, seconds
        self.stream, self.add_and_publish = f"{manager.channel}:events", self.redis.register_script(ADD_AND_PUBLISH)

    async def emit(self, manager: GatewayManager, event: str, arguments: list[Any], room: str | None) -> None:
        payload, placeholder = to_json([event, *arguments]), secrets.token_hex(16)
        message = pubsub_emit(event, [*arguments, placeholder], room)
        script_arguments = [RECOVERY_MAX_EVENTS, room or "", payload, self.channel, message, placeholder, self.seconds]
        await self.redis_call(self.add_and_publish(keys=[self.stream], args=script_arguments))

    async def since(self, offset: str) -> Missed | None:
        async with self.redis.pipeline(transaction=True) as pipe:  # no trimming between the two
            pipe.xinfo_stream(self.stream)
            pipe.xrange(self.stream, f"({offset}", "+")
            info, entries = await self.redis_call(pipe.execute(raise_on_error=False))
        if isinstance(info, redis.ResponseError):  # no stream yet: nothing was ever sent
            return ([], offset) if offset == "0-0" else None
        first, newest = info["recorded-first-entry-id"].decode(), info["last-generated-id"].decode()
        trimmed = info["entries-added"] > info["length"] and offset_order(offset) < offset_order(first)
        if trimmed or offset_order(offset) > offset_order(newest):
            return None
        missed = [(key.decode(), entry[b"room"].decode(), entry[b"d"].decode()) for key, entry in entries]
        return missed, newest

    async def newest(self) -> str:
        """The newest offset in the stream; "0-0" when it is empty (all it will hold is newer than now)."""
        entries = await self.redis_call(self.redis.xrevrange(self.stream, count=1))
        return str(entries[0][0].decode()) if entries else "0-0"

    async def keep(self, pid: str, user_id: str, rooms: list[str]) -> None:
        key, value = f"{self.channel}:session:{pid}", strict_dumps([user_id, rooms])
        await self.redis_call(self.redis.set(key, value, ex=self.seconds))

    async def take(self, pid: str, user_id: str) -> list[str] | None:
        key = f"{self.channel}:session:{pid}"
        if (found := await self.redis_call(self.redis.get(key))) is None or (kept := json.loads(found))[0] != user_id:
            return None
        return kept[1] if await self.redis_call(self.redis.delete(key)) == 1 else None  # taken once

    async def redis_call(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except redis.RedisError as error:
            raise RedisUnavailable(f"redis failed: {type(error).__name__}") from error


class GatewayMetrics:
    """The gateway's Prometheus series (GET /metrics with GATEWAY_METRICS=1), counted per connection or emit call."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        live: Any = {"registry": registry, "multiprocess_mode": "livesum"}  # summed over the live workers
        self.connections = Gauge("gateway_connections", "Open Socket.IO connections.", **live)
        self.users = Gauge("gateway_connected_users", "Users with an open connection.", **live)
        self.accepted = Counter("gateway_connections_accepted", "Connections accepted.", registry=registry)
        self.refused = Counter("gateway_connections_refused", "Connections refused.", ["reason"], registry=registry)
        self.emitted = Counter("gateway_emits", "Emit calls, by target kind.", ["kind"], registry=registry)
        self.published = Counter("gateway_publish_api_messages", "POST /publish messages.", ["kind"], registry=registry)
        self.disconnects = Counter("gateway_disconnects", "Connections ended.", ["reason"], registry=registry)
        self.redis_up = Gauge("gateway_redis_up", "Redis works.", **live | {"multiprocess_mode": "livemostrecent"})


# ---- The only place the gateway uses python-socketio's and python-engineio's internals --------------------------
# sio.eio.sockets[...].queue, .closed and .upgraded, sio.environ, sio.manager_initialized, python-engineio's
# _send_ping tasks, the shape of python-socketio's CONNECT reply and of its pub/sub messages, the pub/sub manager's
# _publish and _listen (the hooks its docstrings tell subclasses to write), and four AsyncServer methods
# GatewayServer overrides (asgi.py's guard_polling_posts also catches the KeyError python-engineio raises for a POST
# to a session it is closing). Each works around the upstream behaviour its comment names; tests/test_internals.py
# fails if upstream changes one.


def queued_packets(sio: socketio.AsyncServer, eio_sid: str) -> int:
    """Packets waiting to go out on one connection: python-engineio's queues have no bound and no public size."""
    engineio_socket = sio.eio.sockets.get(eio_sid)
    return int(engineio_socket.queue.qsize()) if engineio_socket is not None else 0


async def all_taken(sio: socketio.AsyncServer, eio_sid: str) -> None:
    """Wait until the client took every packet queued for it: python-engineio's close makes them unreachable."""
    if (engineio_socket := sio.eio.sockets.get(eio_sid)) is not None and not engineio_socket.closed:
        await engineio_socket.queue.join()


def session_open(sio: socketio.AsyncServer, eio_sid: str) -> bool:
    """python-socketio forgets a session's environ when it closes: a CONNECT still being checked is then pending."""
    return eio_sid in sio.environ


def start_manager(sio: socketio.AsyncServer) -> None:
    """Start the client manager now: python-socketio starts it at the first connection, after Redis traffic began."""
    if not sio.manager_initialized:
        sio.manager_initialized = True
        sio.manager.initialize()


class RecoveryPacket(packet.Packet):
    """python-socketio's packet, whose CONNECT reply also carries the connection's private session id (pid)."""

    # The only way in: python-socketio builds that reply ({"sid": ...}) itself, after the connect handler returned.

    pids: ClassVar[dict[str, str]] = {}  # sid -> pid, set just before python-socketio builds that reply

    def __init__(self, packet_type: int = packet.EVENT, data: Any = None, *args: Any, **kwargs: Any) -> None:
        if packet_type == packet.CONNECT and (pid := self.pids.pop(data["sid"], None)):  # python-socketio's reply
            data = {**data, "pid": pid}
        super().__init__(packet_type, data, *args, **kwargs)


def pubsub_emit(event: str, data: list[Any], room: str | None) -> str:
    """An emit in python-socketio's pub/sub format, for the recovery script to publish; every node delivers it."""
    message = {"method": "emit", "event": event, "data": data, "room": room, "namespace": "/", "host_id": "-"}
    return strict_dumps(message)  # host id "-" is no node's own, so this node delivers it too


class GatewayRedisManager(socketio.AsyncRedisManager, GatewayManager):
    """python-socketio's Redis manager, with timeouts, publish failures raised, and a probe of its subscription."""

    def __init__(self, url: str, channel: str, write_only: bool = False) -> None:
        options: dict[str, Any] = {"socket_connect_timeout": REDIS_TIMEOUT}
        if not url.startswith("unix:"):  # python-socketio's subscription blocks on reads: it gets no read timeout
            keepalive = {getattr(socket, name): value for name, value in KEEPALIVE if hasattr(socket, name)}
            options |= {"socket_keepalive": True, "socket_keepalive_options": keepalive}  # a vanished Redis: ~25 s
        super().__init__(url, channel=channel, write_only=write_only, redis_options=options)
        # At most 100 connections, each waited for at most REDIS_TIMEOUT: redis-py's default pool raises at once.
        pool_options = options | {"timeout": REDIS_TIMEOUT, "socket_timeout": REDIS_TIMEOUT}
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, **pool_options)
        self.publisher = redis.asyncio.Redis(connection_pool=pool)
        self.probes: dict[str, asyncio.Future[None]] = {}  # probe id -> resolved when it came back on the channel
        self.last_problem: str | None = "not probed yet"

    async def _publish(self, data: Any) -> None:
        # python-socketio's _publish logs a failure and carries on, so a caller would believe a message went out.
        try:
            await self.publisher.publish(self.channel, strict_dumps(data))
        except redis.RedisError as error:
            logger.warning("redis publish failed: %s", error)
            raise RedisUnavailable(f"redis did not take the message ({type(error).__name__})") from None

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in super()._listen():
            text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
            if (probe := self.probes.get(text)) is not None and not probe.done():
                probe.set_result(None)
            elif text.startswith('{"method": '):  # how python-socketio's messages begin
                yield message
            elif not text.startswith("gateway-probe:"):  # other nodes' probes pass by
                logger.warning("ignored a message on %r that is not the gateway's: %.80r", self.channel, text)

    async def problem(self) -> str | None:
        """Why this node's subscription does not work: a probe it publishes on the channel must come back to it."""
        probe_id, problem = f"gateway-probe:{secrets.token_hex(16)}", None
        self.probes[probe_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.publisher.publish(self.channel, probe_id), REDIS_TIMEOUT)
            await asyncio.wait_for(self.probes[probe_id], REDIS_TIMEOUT)
        except (redis.RedisError, TimeoutError) as error:
            problem = "redis unreachable" if isinstance(error, redis.RedisError) else "redis subscription not receiving"
            detail = f"{problem}: {type(error).__name__}: {error}"  # the address stays in the log
        finally:
            del self.probes[probe_id]
        if problem != self.last_problem:  # log changes only: a load balancer asks every few seconds
            logger.warning(detail if problem else "redis reachable", extra={"reason": problem or "reachable"})
            self.last_problem = problem
        return problem


class GatewayServer(socketio.AsyncServer):
    """python-socketio's server, which ends connections on purpose with every wait bounded."""

    connect_timeout = 45.0  # seconds an Engine.IO session may go without a Socket.IO CONNECT; set by create_server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.end_reasons: dict[str, str] = {}  # sid -> why the gateway ended it; the disconnect handler pops it
        self.left: set[str] = set()  # sids whose client sent Socket.IO DISCONNECT; the disconnect handler removes it
        self.closing: set[str] = set()  # Engine.IO sids the server is closing: a CONNECT on them is ignored
        self.tasks: set[asyncio.Task[None]] = set()  # closes under way, referenced until they finish
        self.ping_tasks: dict[str, asyncio.Task[None]] = {}  # Engine.IO sid -> its latest ping task
        self.eio.start_background_task = partial(self.start_tracking_pings, self.eio.start_background_task)

    def start_tracking_pings(self, start: Any, target: Any, *args: Any, **kwargs: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = start(target, *args, **kwargs)
        if getattr(target, "__name__", "") == "_send_ping":  # python-engineio's next ping of one session
            self.ping_tasks[target.__self__.sid] = task
        return task

    async def _handle_eio_disconnect(self, eio_sid: str, reason: str) -> None:
        # python-engineio's ping task keeps a closed session (about 6 KB) until its next ping is due: 25 s of a
        # flood of refused connections would stay in memory.
        if (ping := self.ping_tasks.pop(eio_sid, None)) and ping is not asyncio.current_task():
            ping.cancel()
        # When a client closes its own session, python-engineio leaves the long-poll it has pending unanswered for
        # ping interval + timeout, and a shutdown waits for it; Node's server answers it with a CLOSE.
        engineio_socket = self.eio.sockets.get(eio_sid)
        if reason == self.reason.CLIENT_DISCONNECT and engineio_socket and not engineio_socket.upgraded:
            engineio_socket.queue.put_nowait(eio_packet.Packet(eio_packet.CLOSE))
        await super()._handle_eio_disconnect(eio_sid, reason)

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        # python-socketio keeps a session that never sends CONNECT for as long as it answers pings.
        loop = asyncio.get_running_loop()
        environ["gateway.connect_deadline"] = loop.call_later(self.connect_timeout, self.close_unconnected, eio_sid)
        return await super()._handle_eio_connect(eio_sid, environ)

    async def _handle_connect(self, eio_sid: str, namespace: str, data: Any) -> None:
        # python-socketio registers a CONNECT that arrives after its session closed, then fails on its environ
        # and keeps the registration for good (a raw client can send one on a transport the server closed).
        if session_open(self, eio_sid) and eio_sid not in self.closing:
            await super()._handle_connect(eio_sid, namespace, data)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        # python-socketio logs a traceback per malformed packet and collects binary attachments for as long as a
        # client announces them; clients of this gateway send only JSON, so either closes that connection.
        if data == str(packet.DISCONNECT):  # the client leaves on purpose, unlike a bare Engine.IO close (a drop)
            self.left.add(self.manager.sid_from_eio_sid(eio_sid, NAMESPACE))
        if isinstance(data, bytes) or data[:1] in (str(packet.BINARY_EVENT), str(packet.BINARY_ACK)):
            problem = "binary packet"
        else:
            try:
                return await super()._handle_eio_message(eio_sid, data)  # type: ignore[no-any-return]
            except Exception as error:  # whatever python-socketio's decoder raised on this client's input
                problem = f"malformed packet ({type(error).__name__})"
        client = client_address(self.environ.get(eio_sid, {}).get("asgi.scope", {}))
        logger.info("closed the connection of %s: %s", client, problem, extra={"client": client, "reason": "malformed"})
        self.close_transport(eio_sid)

    def close_unconnected(self, eio_sid: str) -> None:
        if session_open(self, eio_sid) and self.manager.sid_from_eio_sid(eio_sid, NAMESPACE) is None:
            logger.info("closed session %s: no Socket.IO CONNECT within %.0f s", eio_sid, self.connect_timeout)
            self.close_transport(eio_sid)

    def answer_long_polls(self) -> None:
        """On SIGTERM: a pending long-poll answered with a NOOP ends at once; the client's next poll finds us gone."""
        for eio_sid in list(self.environ):
            with contextlib.suppress(KeyError):  # a session that is closing
                if self.eio.transport(eio_sid) == "polling":
                    self.spawn(self.eio.send_packet(eio_sid, eio_packet.Packet(eio_packet.NOOP)))

    # ---- end of the internals: everything below uses public APIs only -------------------------------------------

    def close_transport(self, eio_sid: str) -> None:
        """Close an Engine.IO connection once its client took its last packets, or after CLOSE_TIMEOUT."""
        # python-engineio's own disconnect waits for ever on a client that stopped polling.

        async def close() -> None:
            try:
                await bounded(all_taken(self, eio_sid), CLOSE_TIMEOUT)
                await bounded(self.eio.disconnect(eio_sid), 1.0)  # its CLOSE: a client that took the rest takes it
            finally:
                self.closing.discard(eio_sid)

        self.closing.add(eio_sid)
        self.spawn(close())

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coroutine` in a task kept referenced until it ends (the lifespan cancels those left at shutdown)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def end(self, sid: str, reason: str) -> None:
        """End a connection on purpose: the client gets DISCONNECT, so it does not reconnect by itself."""
        self.end_reasons[sid] = reason
        await self.disconnect(sid, namespace=NAMESPACE, ignore_queue=True)  # the handler closes the transport


def create_server(settings: Settings) -> GatewayServer:
    redis_url, channel = settings.redis_url, settings.redis_channel
    manager = GatewayRedisManager(redis_url, channel) if redis_url else GatewayManager()
    manager.max_queued, manager.stall_seconds = settings.max_queued_messages, settings.ping_timeout
    options: dict[str, Any] = {"async_mode": "asgi", "serializer": RecoveryPacket, "transports": settings.transports}
    options |= {"ping_interval": settings.ping_interval, "ping_timeout": settings.ping_timeout}
    options |= {"max_http_buffer_size": settings.max_message_bytes, "cors_allowed_origins": settings.cors_origins}
    server = GatewayServer(client_manager=manager, **options)
    server.connect_timeout = settings.ping_interval + settings.ping_timeout
    return server


class Emitter:
    """Reach users, rooms or everyone; with Redis, a method raises RedisUnavailable if Redis did not take it."""

    # Through the gateway's own client manager (this node, and the others through Redis), or through a write-only
    # Redis one for a process that runs no server (redis_publisher).

    def __init__(self, manager: Any, metrics: GatewayMetrics | None = None, recovery: Any = None) -> None:
        self.manager, self.metrics, self.recovery = manager, metrics or GatewayMetrics(), recovery

    async def emit_to_user(self, user_id: str, event: str, data: Any = None) -> None:
        """Send to every connection of one user. This is a coroutine."""
        await self._emit(check_event(event), data, user_room(check_user_id(user_id)), "user")

    async def emit_to_room(self, room: str, event: str, data: Any = None) -> None:
        """Send to every connection in `room`. This is a coroutine."""
        await self._emit(check_event(event), data, check_room(room), "room")

    async def broadcast(self, event: str, data: Any = None) -> None:
        """Send to every connection. This is a coroutine."""
        await self._emit(check_event(event), data, None, "broadcast")

    async def disconnect_user(self, user_id: str) -> int:
        """Log a user out on every node; return how many connections were closed on this one. A coroutine."""
        closed = self.connection_count(user_id)
        await self._emit(END_EVENT, {"reason": "logout"}, user_room(user_id), "logout")  # GatewayManager ends them
        logger.info("logged out user %r: %d connections closed here", user_id, closed)
        return closed

    def connection_count(self, user_id: str) -> int:
        """How many connections `user_id` has on this node."""
        return sum(1 for _ in self.manager.get_participants(NAMESPACE, user_room(check_user_id(user_id))))

    async def _emit(self, event: str, data: Any, room: str | None, kind: str) -> None:
        # The one place that emits: python-socketio reads a falsy room as "everyone", so only broadcast() passes None.
        if self.recovery:  # the event gets its offset (its last argument) and a place in the history
            await self.recovery.emit(self.manager, event, event_arguments(data), room)
        else:
            await self.manager.emit(event, data, namespace=NAMESPACE, room=room)
        self.metrics.emitted.labels(kind).inc()

    async def join_room(self, sid: str, room: str) -> None:
        """Add one connection, on any node, to `room`. This is a coroutine."""
        await self.manager.enter_room(self._check_sid(sid), NAMESPACE, check_room(room))

    async def leave_room(self, sid: str, room: str) -> None:
        """Remove one connection, on any node, from `room`. This is a coroutine."""
        await self.manager.leave_room(self._check_sid(sid), NAMESPACE, check_room(room))

    def _check_sid(self, sid: Any) -> str:
        if not isinstance(sid, str) or not sid:
            raise ValueError(f"sid must be a non-empty string, got {sid!r:.80}")
        # With Redis a sid this node does not hold may live on another; the manager forwards it there.
        if not isinstance(self.manager, GatewayRedisManager) and not self.manager.is_connected(sid, NAMESPACE):
            raise LookupError(f"no connection with sid {sid!r:.80} on this gateway")
        return sid


def redis_publisher(
    redis_url: str, channel: str = DEFAULT_REDIS_CHANNEL, recovery_seconds: int | None = None
) -> Emitter:
    """An Emitter for a process that runs no server; `recovery_seconds` must be the nodes' (by default this one's)."""
    manager, seconds = GatewayRedisManager(redis_url, channel, write_only=True), recovery_seconds
    seconds = settings.recovery_seconds if seconds is None else seconds
    return Emitter(manager, recovery=RedisRecovery(manager, seconds) if seconds else None)


class SocketGateway(Emitter):
    """The backend's handle on connected users; registers the server's connect, disconnect and refresh handlers."""

    def __init__(self, sio: GatewayServer, settings: Settings, metrics: GatewayMetrics | None = None) -> None:
        seconds, redis_manager = settings.recovery_seconds, isinstance(sio.manager, GatewayRedisManager)
        recovery = RedisRecovery(sio.manager, seconds) if redis_manager else MemoryRecovery(seconds)
        super().__init__(sio.manager, metrics, recovery if seconds else None)
        self.manager.offsets = bool(seconds)
        self.sio, self.settings = sio, settings
        self.pids: dict[str, str] = {}  # pid -> sid of this node's open connections, with recovery on
        self._deadlines: dict[str, asyncio.TimerHandle] = {}  # sid -> the timer that ends it when its token expires
        self.shutting_down = False  # set on SIGTERM (see asgi.py): transport closes after it are the shutdown's
        sio.on("connect", self.on_connect)
        sio.on("disconnect", self.on_disconnect)
        sio.on("refresh", self.on_refresh)

    def start(self) -> None:
        """Start the client manager (to listen to Redis before the first client comes) and the offsets' refresh."""
        start_manager(self.sio)
        if self.recovery:
            self.sio.spawn(self.refresh_offsets())

    async def ready_problem(self) -> str | None:
        """Why this node cannot serve right now, or None."""
        redis_problem = await self.manager.problem() if isinstance(self.manager, GatewayRedisManager) else None
        self.metrics.redis_up.set(0 if redis_problem else 1)
        return key_problem(self.settings.jwt) or redis_problem

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        try:
            await self.accept(sid, environ, auth)
        # A refusal, or a failure, after which python-socketio would keep the connection half-made; it takes a
        # cancelled handler (the lifespan cancels what is under way at shutdown) as one that accepted.
        except (Exception, asyncio.CancelledError) as error:
            self.forget(sid)
            if isinstance(error, socketio.exceptions.ConnectionRefusedError):
                raise
            logger.exception("connect of %s failed", sid)
            raise self._refuse(sid, client_address(environ["asgi.scope"]), "error", repr(error)) from None

    async def accept(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        if deadline := environ.pop("gateway.connect_deadline", None):
            deadline.cancel()
        address = client_address(environ["asgi.scope"])
        try:
            identity = await verify_auth(auth, self.settings.jwt)
        except TokenRefused as refused:
            raise self._refuse(sid, address, refused.reason, refused.detail) from None
        if self.recovery:
            await self.replace_stale(auth, identity.user_id)
            self.manager.held[sid] = []  # live events wait until what it missed is out
        # Enter first, then count: no await can slip another connection of this user in between.
        await self.sio.enter_room(sid, user_room(identity.user_id), namespace=NAMESPACE)
        if (connections := self.connection_count(identity.user_id)) > self.settings.max_connections_per_user:
            raise self._refuse(sid, address, "limit", f"user {identity.user_id!r} has {connections - 1} connections")
        pid = await self.recover(sid, identity.user_id, auth) if self.recovery else None
        if not session_open(self.sio, self.manager.eio_sid_from_sid(sid, NAMESPACE)):  # it closed while this waited
            raise socketio.exceptions.ConnectionRefusedError("gone")  # python-socketio forgets it then
        session = {"user_id": identity.user_id} | ({"pid": pid} if pid else {})
        await self.sio.save_session(sid, session, namespace=NAMESPACE)
        self._end_at(sid, identity.expires_at)
        self.metrics.accepted.inc()
        self.metrics.connections.inc()
        self.metrics.users.inc(connections == 1)
        logger.debug("user %r connected as %s from %s", identity.user_id, sid, address)

    async def recover(self, sid: str, user_id: str, auth: dict[str, Any]) -> str | None:
        """Replay what a connection missed if its session is recovered, send its offset and return its pid."""
        # Runs after every refusal check. The pid is the same one when the session is recovered, else a new one.
        pid, offset, rooms = auth.get("pid"), auth.get("offset"), [user_room(user_id)]
        kept = found = None
        with contextlib.suppress(RedisUnavailable):  # Redis down: a new session, nothing replayed
            if isinstance(pid, str) and isinstance(offset, str) and OFFSET.fullmatch(offset):
                kept = await self.recovery.take(pid, user_id)
            for room in kept or []:  # before reading the history: events sent from now on are held, none is lost
                await self.sio.enter_room(sid, room, namespace=NAMESPACE)
            found = await self.recovery.since(offset) if kept is not None else None
        rooms += kept or []
        missed = None if found is None else [(o, data) for o, room, data in found[0] if not room or room in rooms]
        mark, recoverable = found[1] if found else self.manager.delivered, True  # the offset the client holds next
        if missed is None or any(data.startswith(f'["{END_EVENT}",') for _, data in missed):  # or logged out since
            for room in rooms[1:]:
                await self.sio.leave_room(sid, room, namespace=NAMESPACE)
            rooms, missed, pid, mark = rooms[:1], [], secrets.token_urlsafe(16), self.manager.delivered
            try:  # a node that delivered nothing yet asks the history: "0-0" would replay all of it after a drop
                mark = await self.recovery.newest() if mark == "0-0" else mark
            except RedisUnavailable:  # not known: this connection gets no pid, so it cannot be recovered
                recoverable = False
        eio_sid = self.manager.eio_sid_from_sid(sid, NAMESPACE)
        for o, data in [*missed, (mark, f'["{RECOVERY_EVENT}"]')]:  # each event with its offset last
            text = f"{packet.EVENT}{data[:-1]},{strict_dumps(o)}]"
            await self.sio.eio.send_packet(eio_sid, eio_packet.Packet(eio_packet.MESSAGE, text))
        for room, o, parts in self.manager.held.pop(sid, []):  # then the live events held back, but those it has
            for part in parts if (room is None or room in rooms) and not (o and o <= offset_order(mark)) else []:
                await self.sio.eio.send_packet(eio_sid, part)
        if offset_order(mark) > offset_order(self.manager.delivered):  # Redis delivers some here late: drop them
            self.manager.marks[sid] = offset_order(mark)
        if not recoverable:
            return None
        RecoveryPacket.pids[sid] = pid = str(pid)
        self.pids[pid] = sid
        return pid

    async def replace_stale(self, auth: dict[str, Any], user_id: str) -> None:
        """End this user's connection whose pid a reconnect brings: it dropped before its ping timed out."""
        # Ending it keeps its session for the new one, and frees its place under the limit.
        old = self.pids.get(pid, "") if isinstance(pid := auth.get("pid"), str) else ""
        if self.manager.is_connected(old, NAMESPACE) and (await self.sio.get_session(old))["user_id"] == user_id:
            await self.sio.end(old, "replaced")

    async def keep_session(self, sid: str, user_id: str, pid: str) -> None:
        """Keep what a dropped connection needs to be recovered: its user and the rooms it was put in."""
        rooms = [room for room in self.manager.get_rooms(sid, NAMESPACE) if room not in (sid, user_room(user_id))]
        with contextlib.suppress(RedisUnavailable):  # not recoverable then
            await self.recovery.keep(pid, user_id, rooms)

    async def stop(self) -> None:
        """At shutdown, keep the sessions of connections still open, so that they recover, on another node too."""
        for sid, _ in self.manager.get_participants(NAMESPACE, None) if self.recovery else []:
            with contextlib.suppress(KeyError):  # a connection still connecting (or gone) has no full session yet
                session = await self.sio.get_session(sid, namespace=NAMESPACE)
                await self.keep_session(sid, session["user_id"], session["pid"])

    async def refresh_offsets(self) -> None:
        """Every half window, send each connection the newest offset this node delivered."""
        # So the offset of a client that receives nothing never gets older than the history it must be found in.
        while True:
            await asyncio.sleep(self.settings.recovery_seconds / 2)
            await self.send_offsets()

    async def send_offsets(self) -> None:
        delivered, marks = offset_order(self.manager.delivered), self.manager.marks
        self.manager.marks = marks = {sid: mark for sid, mark in marks.items() if mark > delivered}
        skip = [*marks, *self.manager.held]  # those catching up keep their own
        async with self.manager.in_order:  # never in the middle of an emit that some have got and others not yet
            await self.manager.emit(RECOVERY_EVENT, self.manager.delivered, NAMESPACE, skip_sid=skip, ignore_queue=True)

    def _refuse(self, sid: str, address: str, reason: str, detail: str) -> Exception:
        """Log a refusal, and close the client's transport once it took the connect_error python-socketio sends."""
        fields = {"client": address, "reason": reason}
        logger.info("refused connection from %s: %s (%s)", address, reason, detail, extra=fields)
        self.metrics.refused.labels(reason).inc()
        self.sio.close_transport(self.manager.eio_sid_from_sid(sid, NAMESPACE))  # a task: runs after the handler
        error: Exception = socketio.exceptions.ConnectionRefusedError(REFUSALS[reason], {"reason": reason})
        return error

    async def on_disconnect(self, sid: str, reason: str) -> None:
        # One namespace: a Socket.IO connection that ends leaves its Engine.IO session nothing to do.
        self.sio.close_transport(self.manager.eio_sid_from_sid(sid, NAMESPACE))
        self.forget(sid)
        session = await self.sio.get_session(sid, namespace=NAMESPACE)
        user_id, pid = session.get("user_id"), session.get("pid")
        ended_by = self.sio.end_reasons.pop(sid, None) or ("shutdown" if self.shutting_down else None)
        log = logger.info if ended_by else logger.debug
        log("%s of user %r ended: %s", sid, user_id, ended_by or reason, extra={"reason": ended_by or reason})
        # Kept after a drop: a transport closed or failed, a ping timed out, or the client's Engine.IO closed its
        # transport (as Node's server does); never after a logout, an expiry, a stall or the client's DISCONNECT.
        dropped = not ended_by and reason != self.sio.reason.SERVER_DISCONNECT and sid not in self.sio.left
        self.sio.left.discard(sid)
        if pid and self.pids.pop(pid, None) and (dropped or ended_by in ("shutdown", "replaced")):
            await self.keep_session(sid, user_id, pid)  # not after a logout, an expiry, a stall or a client's leaving
        self.metrics.disconnects.labels(ended_by or reason.replace(" ", "_")).inc()
        self.metrics.connections.dec()
        self.metrics.users.dec(user_id is not None and self.connection_count(user_id) == 1)  # it leaves after this

    async def on_refresh(self, sid: str, *args: Any) -> dict[str, Any]:
        """The client's `refresh` event: a new token of the same user moves its connection's deadline."""
        try:
            identity = await verify_auth(args[0] if len(args) == 1 else args or None, self.settings.jwt)
        except TokenRefused as refused:
            return {"ok": False, "reason": refused.reason, "error": REFUSALS[refused.reason]}
        if sid not in self._deadlines:  # disconnected while the token was checked
            return {"ok": False, "reason": "invalid", "error": "not connected"}
        if identity.user_id != (await self.sio.get_session(sid, namespace=NAMESPACE))["user_id"]:
            return {"ok": False, "reason": "invalid", "error": "token is for another user"}
        self._end_at(sid, identity.expires_at)
        return {"ok": True, "expires_at": identity.expires_at}

    def forget(self, sid: str) -> None:
        """Drop what this node keeps for a connection: its deadline, held events, marks, and a pid never sent."""
        self._cancel_deadline(sid)
        for sids in (self.manager.full_since, self.manager.marks, self.manager.held):
            sids.pop(sid, None)
        if pid := RecoveryPacket.pids.pop(sid, None):
            self.pids.pop(pid, None)

    def _end_at(self, sid: str, expires_at: float) -> None:
        """One timer per connection (no task until it fires): end it when its token expires, leeway included."""
        self._cancel_deadline(sid)
        delay = max(0.0, expires_at + self.settings.jwt.leeway - time.time())
        self._deadlines[sid] = asyncio.get_running_loop().call_later(delay, self._expire, sid)

    def _cancel_deadline(self, sid: str) -> None:
        if deadline := self._deadlines.pop(sid, None):
            deadline.cancel()

    def _expire(self, sid: str) -> None:
        self._deadlines.pop(sid, None)
        self.metrics.emitted.labels("expiry").inc()
        ending = {"reason": "token_expired"}  # GatewayManager ends it; only this node holds the sid: Redis is left out
        self.sio.spawn(self.manager.emit(END_EVENT, ending, NAMESPACE, room=sid, ignore_queue=True))


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the fields a call passed in `extra`."""

    standard = frozenset([*vars(logging.makeLogRecord({})), "message", "asctime"])

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname}
        entry |= {"logger": record.name, "message": record.getMessage()}
        entry |= {key: value for key, value in vars(record).items() if key not in self.standard}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> None:
    """Log to stderr at GATEWAY_LOG_LEVEL, as text or JSON, unless the process configured logging itself."""
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        handler.setFormatter(JSONFormatter() if settings.log_format == "json" else text)
        logging.basicConfig(level=settings.log_level, handlers=[handler])
        for name in ("socketio", "engineio"):  # a line per message at INFO: quieter unless debugging
            logging.getLogger(name).setLevel(settings.log_level if settings.log_level == "DEBUG" else "WARNING")


def load_settings_or_exit() -> Settings:
    try:
        return Settings()
    except ValueError as error:
        raise SystemExit(f"gateway: bad configuration: {error}") from None


settings = load_settings_or_exit()
configure_logging(settings)
sio = create_server(settings)
gateway = SocketGateway(sio, settings)
