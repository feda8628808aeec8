"""The Socket.IO server: who may connect, which room each user is in, and how the backend reaches them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio
import socketio
from engineio import packet as eio_packet
from prometheus_client import CollectorRegistry, Counter, Gauge
from socketio import packet
from starlette.config import Config
from starlette.datastructures import Secret

from auth import JWTSettings, TokenRefused, is_valid_user_id, key_problem, load_jwt_settings, verify_auth

logger = logging.getLogger("gateway")

NAMESPACE = "/"
USER_ROOM_PREFIX = "user:"  # personal rooms are "user:<id>"; the backend's own rooms may not start with it
MAX_ROOM_LENGTH = 512
MIN_MESSAGE_BYTES = 9 * 1024  # a CONNECT packet carrying a token of the largest accepted size must fit
END_EVENT = "gateway_disconnect"  # sent with {"reason": ...} just before the server ends a connection
# Event names the official JavaScript client reserves for itself (emitting them would break clients), and ours.
RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener", END_EVENT}
)
CONNECT_DEADLINE = "gateway.connect_deadline"  # the environ key of a session's timer; its CONNECT cancels it
CLOSE_TIMEOUT = 5.0  # seconds a connection the server closes has to collect its last packets
YIELD_EVERY = 1000  # recipients served between two turns of the event loop during one emit
DEFAULT_REDIS_CHANNEL = "socket-gateway"
REDIS_TIMEOUT = 5.0  # seconds for a Redis connect, publish or readiness probe
TRANSPORTS = ("polling", "websocket")
MIN_PUBLISH_KEY_LENGTH = 32
REFUSAL_MESSAGES = {"missing": "missing token", "invalid": "invalid token", "expired": "token expired"}
REFUSAL_MESSAGES["limit"] = "too many connections"
# json.dumps without NaN and Infinity, which browsers cannot parse.
STRICT_JSON = SimpleNamespace(dumps=partial(json.dumps, allow_nan=False), loads=json.loads)


@dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from GATEWAY_* variables, validated once at start-up."""

    jwt: JWTSettings
    cors_origins: list[str] | str | None  # None: same origin only; "*": any origin
    max_message_bytes: int
    max_connections_per_user: int
    max_queued_messages: int
    ping_interval: int
    ping_timeout: int
    publish_key: Secret | None  # None: no HTTP publish API
    publish_max_bytes: int
    redis_url: str | None  # None: one process, in-memory rooms
    redis_channel: str
    transports: list[str]
    metrics: bool
    log_level: str
    log_format: str  # "text" or "json"

    def __repr__(self) -> str:  # never print key material
        return f"Settings(jwt={self.jwt!r}, publish={self.publish_key is not None}, redis={self.redis_url is not None})"


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read every GATEWAY_* variable; raise ValueError with one sentence naming the bad one."""
    config = Config(environ=environ, env_prefix="GATEWAY_")
    publish_key = config("PUBLISH_KEY", default="")
    if publish_key and (len(publish_key) < MIN_PUBLISH_KEY_LENGTH or not publish_key.isascii()):
        raise ValueError(f"GATEWAY_PUBLISH_KEY must be at least {MIN_PUBLISH_KEY_LENGTH} ASCII characters")
    redis_url = config("REDIS_URL", default="").strip() or None
    if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):  # name the scheme, not a password
        raise ValueError(f"GATEWAY_REDIS_URL must start with redis://, rediss:// or unix://, not {redis_url[:6]!r}")
    transports = [t.strip() for t in config("TRANSPORTS", default="polling,websocket").split(",") if t.strip()]
    if not transports or not set(transports) <= set(TRANSPORTS):
        raise ValueError(f"GATEWAY_TRANSPORTS must be websocket, polling or both, comma-separated; got {transports}")
    return Settings(
        jwt=load_jwt_settings(config),
        cors_origins=parse_cors_origins(config("CORS_ORIGINS", default="")),
        max_message_bytes=int_setting(config, "MAX_MESSAGE_BYTES", 16 * 1024, MIN_MESSAGE_BYTES, 100 * 1024 * 1024),
        max_connections_per_user=int_setting(config, "MAX_CONNECTIONS_PER_USER", 32, 1, 1_000_000),
        max_queued_messages=int_setting(config, "MAX_QUEUED_MESSAGES", 1000, 10, 1_000_000),
        ping_interval=int_setting(config, "PING_INTERVAL", 25, 1, 300),
        ping_timeout=int_setting(config, "PING_TIMEOUT", 20, 1, 300),
        publish_key=Secret(publish_key) if publish_key else None,
        publish_max_bytes=int_setting(config, "PUBLISH_MAX_BYTES", 1024 * 1024, 1024, 100 * 1024 * 1024),
        redis_url=redis_url,
        redis_channel=config("REDIS_CHANNEL", default=DEFAULT_REDIS_CHANNEL).strip() or DEFAULT_REDIS_CHANNEL,
        transports=transports,
        metrics=config("METRICS", cast=bool, default=False),
        log_level=choice_setting(config, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=choice_setting(config, "LOG_FORMAT", "text", ("text", "json")),
    )


def choice_setting(config: Config, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = config(name, default=default).strip()
    if value.upper() not in (choice.upper() for choice in choices):
        raise ValueError(f"GATEWAY_{name} must be one of {', '.join(choices)}, got {value!r}")
    return next(choice for choice in choices if choice.upper() == value.upper())


def int_setting(config: Config, name: str, default: int, low: int, high: int) -> int:
    value: int = config(name, cast=int, default=default)
    if not low <= value <= high:
        raise ValueError(f"GATEWAY_{name} must be between {low} and {high}, got {value}")
    return value


def parse_cors_origins(value: str) -> list[str] | str | None:
    origins = [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
    if "*" in origins:
        return "*"
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"GATEWAY_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com")
    return origins or None


def user_room(user_id: str) -> str:
    """The room every connection of one user joins; no room the backend may name starts like it."""
    return USER_ROOM_PREFIX + user_id


def check_user_id(user_id: Any) -> str:
    if not is_valid_user_id(user_id):
        raise ValueError(f"user_id must be a non-empty string of at most 256 characters without control characters, "
                         f"got {user_id!r:.80}")
    return str(user_id)


def check_room(room: Any) -> str:
    if not isinstance(room, str) or not room or len(room) > MAX_ROOM_LENGTH:
        raise ValueError(f"room must be a non-empty string of at most {MAX_ROOM_LENGTH} characters, got {room!r:.80}")
    if room.startswith(USER_ROOM_PREFIX):
        raise ValueError(f"room names starting with {USER_ROOM_PREFIX!r} are users' own rooms: use emit_to_user")
    return room


def check_event(event: Any) -> str:
    if not isinstance(event, str) or not event or event in RESERVED_EVENTS:
        raise ValueError(f"event must be a non-empty string and not one Socket.IO reserves, got {event!r:.80}")
    return event


def client_address(scope: Mapping[str, Any]) -> str:
    """The peer's address from an ASGI scope (python-engineio's REMOTE_ADDR is a fixed 127.0.0.1 under ASGI)."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"


def encode_event(packet_class: type[packet.Packet], namespace: str, data: list[Any]) -> str | list[Any]:
    """A Socket.IO EVENT packet as python-socketio encodes it, with one json.dumps when there are no bytes.

    Raises TypeError for data that is not JSON (NaN and Infinity included) before anything is sent.
    """
    prefix = str(packet.EVENT) if namespace == "/" else f"{packet.EVENT}{namespace},"
    try:
        try:
            return prefix + STRICT_JSON.dumps(data, separators=(",", ":"))
        except TypeError:  # bytes, or not JSON at all: python-socketio's binary encoding once the rest is JSON
            STRICT_JSON.dumps(data, default=bytes_only)
            return packet_class(packet.EVENT, namespace=namespace, data=data).encode()  # type: ignore[no-any-return]
    except (ValueError, RecursionError) as error:
        raise TypeError(f"data is not JSON: {error}") from None


def bytes_only(value: Any) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{type(value).__name__} is not JSON")


async def bounded(awaitable: Awaitable[Any], seconds: float) -> None:
    """Await `awaitable` for at most `seconds`, then give up on it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, seconds)


class GatewayManager(socketio.AsyncManager):  # type: ignore[misc]
    """python-socketio's in-memory client manager, delivering an emit with one encode and no task per recipient.

    python-socketio's own emit starts an asyncio task per recipient. Here the packet is encoded once and handed to
    each recipient's Engine.IO connection (`send_packet`), whose writer task sends it. Emits with an ack callback
    keep python-socketio's path. END_EVENT sent to a room also ends the connections in it: that is how a logout
    reaches every node, since the Redis manager below delivers through this class.
    """

    max_queued = 1000  # packets waiting on one connection before it must show progress; set by create_server
    stall_seconds = 20.0  # how long it may then take nothing before it counts as stalled; set by create_server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_since: dict[str, float] = {}  # sid -> when an emit first found max_queued packets waiting on it

    async def emit(
        self, event: str, data: Any, namespace: str, room: Any = None, skip_sid: Any = None, callback: Any = None,
        to: Any = None, **kwargs: Any,
    ) -> None:
        room = to or room
        if callback is not None:
            return await super().emit(event, data, namespace, room=room, skip_sid=skip_sid, callback=callback)  # type: ignore[no-any-return]
        # The same argument rules as python-socketio: a tuple is several arguments, None is none.
        arguments = list(data) if isinstance(data, tuple) else [] if data is None else [data]
        packet_class = self.server.packet_class if self.server else packet.Packet  # no server: a write-only publisher
        encoded = encode_event(packet_class, namespace, [event, *arguments])
        parts = [eio_packet.Packet(eio_packet.MESSAGE, part) for part in (encoded if isinstance(encoded, list) else [encoded])]
        skip = set(skip_sid) if isinstance(skip_sid, list) else {skip_sid}
        recipients = [(sid, eio_sid) for sid, eio_sid in self.get_participants(namespace, room) if sid not in skip]
        now, any_full, stalled = time.monotonic(), False, []
        for count, (sid, eio_sid) in enumerate(recipients, 1):
            if queued_packets(self.server, eio_sid) < self.max_queued:
                self.full_since.pop(sid, None)
            elif now - self.full_since.setdefault(sid, now) > self.stall_seconds:
                stalled.append(sid)  # it took nothing for stall_seconds: its client stopped reading
                continue
            else:
                any_full = True
            for part in parts:
                await self.server.eio.send_packet(eio_sid, part)
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        for sid in stalled:
            logger.warning("ended %s: its client took nothing for %.0f s", sid, self.stall_seconds)
            await self.server.end(sid, "stalled")
        if event == END_EVENT:
            reason = data.get("reason", "server") if isinstance(data, dict) else "server"
            for sid, _ in recipients:
                await self.server.end(sid, reason)
        if any_full:
            await asyncio.sleep(0)  # a burst: let the full connections' writers run before the next emit


class RedisUnavailable(ConnectionError):
    """Redis did not take a message meant for every node: this node's connections got it, the other nodes' did not."""


class GatewayRedisManager(socketio.AsyncRedisManager, GatewayManager):  # type: ignore[misc]
    """python-socketio's Redis manager, with timeouts, publish failures raised, and a probe of its subscription."""

    def __init__(self, url: str, channel: str, write_only: bool = False) -> None:
        options: dict[str, Any] = {"socket_connect_timeout": REDIS_TIMEOUT}
        if not url.startswith("unix:"):  # TCP keepalive finds a Redis that vanished silently, in about 25 s
            keepalive = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}
            options |= {"socket_keepalive": True, "socket_keepalive_options": {
                getattr(socket, name): value for name, value in keepalive.items() if hasattr(socket, name)}}
        # python-socketio's subscription blocks on reads, so it gets no read timeout; publishes do.
        super().__init__(url, channel=channel, write_only=write_only, redis_options=options)
        self.publisher = redis.asyncio.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, **options)
        self.probes: dict[str, asyncio.Future[None]] = {}  # probe id -> resolved when it came back on the channel
        self.last_problem: str | None = "not probed yet"

    async def _publish(self, data: Any) -> None:
        # python-socketio's _publish logs a failure and carries on, so a caller would believe a message went out.
        try:
            await self.publisher.publish(self.channel, STRICT_JSON.dumps(data))
        except redis.RedisError as error:
            logger.warning("redis publish failed: %s", error)
            raise RedisUnavailable(f"redis did not take the message ({type(error).__name__})") from None

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in super()._listen():
            text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
            if (probe := self.probes.get(text)) is not None:
                probe.done() or probe.set_result(None)
            elif text.startswith('{"method": '):  # how python-socketio's messages begin
                yield message
            else:
                logger.warning("ignored a message on Redis channel %r that is not the gateway's: %.80r", self.channel, text)

    async def problem(self) -> str | None:
        """Why this node's subscription does not work: a probe it publishes on the channel must come back to it."""
        probe_id, problem = f"gateway-probe:{uuid.uuid4().hex}", None
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


class GatewayMetrics:
    """The gateway's Prometheus series (GET /metrics with GATEWAY_METRICS=1), counted per connection or emit call."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        live = {"registry": registry, "multiprocess_mode": "livesum"}
        self.connections = Gauge("gateway_connections", "Open Socket.IO connections.", **live)  # type: ignore[arg-type]
        self.users = Gauge("gateway_connected_users", "Users with an open connection.", **live)  # type: ignore[arg-type]
        self.accepted = Counter("gateway_connections_accepted", "Connections accepted.", registry=registry)
        self.refused = Counter("gateway_connections_refused", "Connections refused.", ["reason"], registry=registry)
        self.emitted = Counter("gateway_emits", "Emit calls, by target kind.", ["kind"], registry=registry)
        self.published = Counter("gateway_publish_api_messages", "Messages taken by POST /publish.", ["kind"],
                                 registry=registry)
        self.disconnects = Counter("gateway_disconnects", "Connections ended.", ["reason"], registry=registry)
        self.redis_up = Gauge("gateway_redis_up", "1 while this node's Redis subscription works.", registry=registry,
                              multiprocess_mode="livemostrecent")


# ---- The only place the gateway uses python-socketio's and python-engineio's internals --------------------------
# sio.eio.sockets[...].queue, sio.manager_initialized, python-engineio's _send_ping tasks, and the four
# AsyncServer methods GatewayServer overrides.
# Each works around one upstream behaviour, named on its line; tests/test_internals.py fails if upstream changes it.


def queued_packets(sio: socketio.AsyncServer, eio_sid: str) -> int:
    """Packets waiting to go out on one connection: python-engineio's queues have no bound and no public size."""
    engineio_socket = sio.eio.sockets.get(eio_sid)
    return engineio_socket.queue.qsize() if engineio_socket is not None else 0  # type: ignore[no-any-return]


async def all_taken(sio: socketio.AsyncServer, eio_sid: str) -> None:
    """Wait until the client took every packet queued for it: python-engineio's close makes them unreachable."""
    if (engineio_socket := sio.eio.sockets.get(eio_sid)) is not None:
        await engineio_socket.queue.join()


def start_manager(sio: socketio.AsyncServer) -> None:
    """Start the client manager now: python-socketio starts it at the first connection, after Redis traffic began."""
    if not sio.manager_initialized:
        sio.manager_initialized = True
        sio.manager.initialize()


class GatewayServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server, which ends connections on purpose with every wait bounded."""

    connect_timeout = 45.0  # seconds an Engine.IO session may go without a Socket.IO CONNECT; set by create_server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.end_reasons: dict[str, str] = {}  # sid -> why the gateway ended it; the disconnect handler pops it
        self.tasks: set[asyncio.Task[None]] = set()  # closes under way, referenced until they finish
        self.ping_tasks: dict[str, asyncio.Task[None]] = {}  # Engine.IO sid -> its latest ping task
        start_background_task = self.eio.start_background_task

        def start_tracking_pings(target: Any, *args: Any, **kwargs: Any) -> asyncio.Task[None]:
            task: asyncio.Task[None] = start_background_task(target, *args, **kwargs)
            if getattr(target, "__name__", "") == "_send_ping":  # python-engineio's next ping of one session
                self.ping_tasks[target.__self__.sid] = task
            return task

        self.eio.start_background_task = start_tracking_pings

    async def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> Any:
        # python-socketio keeps a session that never sends CONNECT for as long as it answers pings.
        loop = asyncio.get_running_loop()
        environ[CONNECT_DEADLINE] = loop.call_later(self.connect_timeout, self.close_if_unconnected, eio_sid)
        return await super()._handle_eio_connect(eio_sid, environ)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: str) -> None:
        # python-engineio's ping task keeps a closed session (about 6 KB) until its next ping is due: 25 s of a
        # flood of refused connections would stay in memory.
        if (ping := self.ping_tasks.pop(eio_sid, None)) and ping is not asyncio.current_task():
            ping.cancel()
        await super()._handle_eio_disconnect(eio_sid, reason)

    async def _handle_connect(self, eio_sid: str, namespace: str, data: Any) -> None:
        # python-socketio registers a CONNECT that arrives after its session closed, then fails on its environ
        # and keeps the registration for good (a raw client can send one on a transport the server closed).
        if eio_sid in self.environ:
            await super()._handle_connect(eio_sid, namespace, data)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        # python-socketio logs a traceback per malformed packet and collects binary attachments for as long as a
        # client announces them; clients of this gateway send only JSON, so either closes that connection.
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

    def close_if_unconnected(self, eio_sid: str) -> None:
        if eio_sid in self.environ and self.manager.sid_from_eio_sid(eio_sid, NAMESPACE) is None:
            logger.info("closed session %s: no Socket.IO CONNECT within %.0f s", eio_sid, self.connect_timeout)
            self.close_transport(eio_sid)

    def close_transport(self, eio_sid: str) -> None:
        """Close an Engine.IO connection once its client took its last packets, waiting at most CLOSE_TIMEOUT each
        for those and for the close (python-engineio's disconnect waits for ever on a client that stopped polling)."""

        async def close() -> None:
            await bounded(all_taken(self, eio_sid), CLOSE_TIMEOUT)
            await bounded(self.eio.disconnect(eio_sid), CLOSE_TIMEOUT)

        self.spawn(close())

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` in a task kept referenced until it ends (the lifespan cancels those left at shutdown)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def end(self, sid: str, reason: str) -> None:
        """End a connection on purpose: the client gets DISCONNECT, so it does not reconnect by itself."""
        self.end_reasons[sid] = reason
        await self.disconnect(sid, namespace=NAMESPACE, ignore_queue=True)  # the handler closes the transport


# ---- end of the internals: everything below uses public APIs only -----------------------------------------------


def create_server(settings: Settings) -> GatewayServer:
    if settings.redis_url:
        manager: GatewayManager = GatewayRedisManager(settings.redis_url, settings.redis_channel)
    else:
        manager = GatewayManager()
    manager.max_queued, manager.stall_seconds = settings.max_queued_messages, settings.ping_timeout
    server = GatewayServer(
        client_manager=manager, async_mode="asgi", cors_allowed_origins=settings.cors_origins,
        max_http_buffer_size=settings.max_message_bytes, ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout, transports=settings.transports,
    )
    server.connect_timeout = settings.ping_interval + settings.ping_timeout
    return server


class Emitter:
    """Reach users, rooms or everyone through a python-socketio client manager: the gateway's own (this node, and
    the other nodes through Redis), or a write-only Redis one for a process that runs no server (`redis_publisher`).
    With Redis, each call raises RedisUnavailable when Redis did not take the message."""

    def __init__(self, manager: socketio.AsyncManager, metrics: GatewayMetrics | None = None) -> None:
        self.manager = manager
        self.metrics = metrics or GatewayMetrics()

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


def redis_publisher(redis_url: str, channel: str = DEFAULT_REDIS_CHANNEL) -> Emitter:
    """An Emitter for a process that runs no server (a worker, a script): it publishes through Redis only."""
    return Emitter(GatewayRedisManager(redis_url, channel, write_only=True))


class SocketGateway(Emitter):
    """The backend's handle on connected users; registers the server's connect, disconnect and refresh handlers."""

    def __init__(self, sio: GatewayServer, settings: Settings, metrics: GatewayMetrics | None = None) -> None:
        super().__init__(sio.manager, metrics)
        self.sio = sio
        self.settings = settings
        self._deadlines: dict[str, asyncio.TimerHandle] = {}  # sid -> the timer that ends it when its token expires
        self.shutting_down = False  # set on SIGTERM (see asgi.py): transport closes after it are the shutdown's
        sio.on("connect", self.on_connect)
        sio.on("disconnect", self.on_disconnect)
        sio.on("refresh", self.on_refresh)

    def start(self) -> None:
        """Start the client manager, so a node listens to Redis before its first client arrives."""
        start_manager(self.sio)

    async def ready_problem(self) -> str | None:
        """Why this node cannot serve right now, or None."""
        redis_problem = await self.manager.problem() if isinstance(self.manager, GatewayRedisManager) else None
        self.metrics.redis_up.set(0 if redis_problem else 1)
        return key_problem(self.settings.jwt) or redis_problem

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        environ.pop(CONNECT_DEADLINE).cancel()
        address = client_address(environ["asgi.scope"])
        try:
            identity = await verify_auth(auth, self.settings.jwt)
        except TokenRefused as refused:
            raise self._refuse(sid, address, refused.reason, refused.detail) from None
        # Enter first, then count: no await can slip another connection of this user in between.
        await self.sio.enter_room(sid, user_room(identity.user_id), namespace=NAMESPACE)
        connections = self.connection_count(identity.user_id)
        if connections > self.settings.max_connections_per_user:
            raise self._refuse(sid, address, "limit", f"user {identity.user_id!r} has {connections - 1} connections")
        await self.sio.save_session(sid, {"user_id": identity.user_id}, namespace=NAMESPACE)
        self._end_at(sid, identity.expires_at)
        self.metrics.accepted.inc()
        self.metrics.connections.inc()
        if connections == 1:
            self.metrics.users.inc()
        logger.debug("user %r connected as %s from %s", identity.user_id, sid, address)

    def _refuse(self, sid: str, address: str, reason: str, detail: str) -> Exception:
        """Log a refusal, and close the client's transport once python-socketio has queued its connect_error."""
        logger.info("refused connection from %s: %s (%s)", address, reason, detail,
                    extra={"client": address, "reason": reason})
        self.metrics.refused.labels(reason).inc()
        self.sio.close_transport(self.manager.eio_sid_from_sid(sid, NAMESPACE))  # a task: runs after the handler
        return socketio.exceptions.ConnectionRefusedError(REFUSAL_MESSAGES[reason], {"reason": reason})

    async def on_disconnect(self, sid: str, reason: str) -> None:
        # One namespace: a Socket.IO connection that ends leaves its Engine.IO session nothing to do.
        self.sio.close_transport(self.manager.eio_sid_from_sid(sid, NAMESPACE))
        self._cancel_deadline(sid)
        self.manager.full_since.pop(sid, None)
        user_id = (await self.sio.get_session(sid, namespace=NAMESPACE)).get("user_id")
        ended_by = self.sio.end_reasons.pop(sid, None) or ("shutdown" if self.shutting_down else None)
        if ended_by:
            logger.info("ended %s of user %r: %s", sid, user_id, ended_by, extra={"reason": ended_by, "user_id": user_id})
        else:
            logger.debug("%s of user %r disconnected: %s", sid, user_id, reason, extra={"reason": reason})
        self.metrics.disconnects.labels(ended_by or reason.replace(" ", "_")).inc()
        self.metrics.connections.dec()
        if user_id is not None and self.connection_count(user_id) == 1:  # this one leaves the room after the handler
            self.metrics.users.dec()

    async def on_refresh(self, sid: str, *args: Any) -> dict[str, Any]:
        """The client's `refresh` event: a new token of the same user moves its connection's deadline."""
        try:
            identity = await verify_auth(args[0] if len(args) == 1 else args or None, self.settings.jwt)
        except TokenRefused as refused:
            return {"ok": False, "reason": refused.reason, "error": REFUSAL_MESSAGES[refused.reason]}
        if sid not in self._deadlines:  # disconnected while the token was checked
            return {"ok": False, "reason": "invalid", "error": "not connected"}
        if identity.user_id != (await self.sio.get_session(sid, namespace=NAMESPACE))["user_id"]:
            return {"ok": False, "reason": "invalid", "error": "token is for another user"}
        self._end_at(sid, identity.expires_at)
        return {"ok": True, "expires_at": identity.expires_at}

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
        # GatewayManager ends it; only this node holds the sid, so Redis is left out.
        self.sio.spawn(self.manager.emit(END_EVENT, {"reason": "token_expired"}, NAMESPACE, room=sid, ignore_queue=True))


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the fields a call passed in `extra`."""

    standard_fields = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{key: value for key, value in vars(record).items() if key not in self.standard_fields},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> None:
    """Log to stderr at GATEWAY_LOG_LEVEL, as text or JSON, unless the process configured logging itself."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    json_lines = settings.log_format == "json"
    handler.setFormatter(JSONFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    for name in ("socketio", "engineio"):  # a line per message at INFO: quieter unless debugging
        logging.getLogger(name).setLevel(settings.log_level if settings.log_level == "DEBUG" else "WARNING")


def load_settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ValueError as error:
        raise SystemExit(f"gateway: bad configuration: {error}") from None


settings = load_settings_or_exit()
configure_logging(settings)
sio = create_server(settings)
gateway = SocketGateway(sio, settings)
