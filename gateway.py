"""The Socket.IO server: who may connect, which room each user is in, and how the backend reaches them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import engineio
import engineio.async_drivers.asgi
import engineio.async_socket
import socketio
from engineio import packet as eio_packet
from prometheus_client import CollectorRegistry, Counter, Gauge
from socketio import packet
from socketio.async_pubsub_manager import AsyncPubSubManager
from starlette.config import Config
from starlette.datastructures import Secret

from auth import (
    JWTSettings,
    TokenRefused,
    is_valid_user_id,
    load_jwt_settings,
    verify_auth,
)

logger = logging.getLogger("gateway")

NAMESPACE = "/"
MAX_ROOM_LENGTH = 512
MIN_MESSAGE_BYTES = 9 * 1024  # a CONNECT packet carrying a token of the largest accepted size must fit
END_EVENT = "gateway_disconnect"  # sent with {"reason": ...} just before the server ends a connection
# Event names the official JavaScript client reserves for itself (emitting them would break clients), and ours.
RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener", END_EVENT}
)
DEFAULT_REDIS_CHANNEL = "socket-gateway"
REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_PING_TIMEOUT = 2.0
TRANSPORTS = ("polling", "websocket")
YIELD_EVERY = 1000  # recipients served between two yields to the event loop during one emit
MIN_PUBLISH_KEY_LENGTH = 32
REFUSAL_MESSAGES = {
    "missing": "missing token",
    "invalid": "invalid token",
    "expired": "token expired",
    "limit": "too many connections",
}


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
        return (
            f"Settings(jwt={self.jwt!r}, cors_origins={self.cors_origins!r}, "
            f"publish={self.publish_key is not None}, redis={self.redis_url is not None})"
        )


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read every GATEWAY_* variable; raise ValueError with one sentence naming the bad one."""
    config = Config(environ=environ, env_prefix="GATEWAY_")
    publish_key = config("PUBLISH_KEY", default="")
    if publish_key and len(publish_key) < MIN_PUBLISH_KEY_LENGTH:
        raise ValueError(f"GATEWAY_PUBLISH_KEY must be at least {MIN_PUBLISH_KEY_LENGTH} characters")
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
        redis_url=parse_redis_url(config("REDIS_URL", default="")),
        redis_channel=config("REDIS_CHANNEL", default=DEFAULT_REDIS_CHANNEL).strip() or DEFAULT_REDIS_CHANNEL,
        transports=parse_transports(config("TRANSPORTS", default=",".join(TRANSPORTS))),
        metrics=config("METRICS", cast=bool, default=False),
        log_level=choice_setting(config, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=choice_setting(config, "LOG_FORMAT", "text", ("text", "json")),
    )


def choice_setting(config: Config, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = config(name, default=default).strip()
    match = next((choice for choice in choices if choice.lower() == value.lower()), None)
    if match is None:
        raise ValueError(f"GATEWAY_{name} must be one of {', '.join(choices)}, got {value!r}")
    return match


def parse_redis_url(value: str) -> str | None:
    if not value.strip():
        return None
    scheme = urlsplit(value.strip()).scheme
    if scheme not in REDIS_SCHEMES:  # the URL may hold a password: name only its scheme
        raise ValueError(f"GATEWAY_REDIS_URL must start with redis://, rediss:// or unix://, not {scheme or 'nothing'!r}")
    return value.strip()


def parse_transports(value: str) -> list[str]:
    transports = [t.strip() for t in value.split(",") if t.strip()]
    if not transports or any(t not in TRANSPORTS for t in transports):
        raise ValueError(f"GATEWAY_TRANSPORTS must be websocket, polling or both, comma-separated; got {value!r}")
    return transports


def int_setting(config: Config, name: str, default: int, low: int, high: int) -> int:
    value = config(name, cast=int, default=default)
    if not low <= value <= high:
        raise ValueError(f"GATEWAY_{name} must be between {low} and {high}, got {value}")
    return value


def parse_cors_origins(value: str) -> list[str] | str | None:
    origins = [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
    if not origins:
        return None
    if "*" in origins:
        return "*"
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"GATEWAY_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com")
    return origins


def user_room(user_id: str) -> str:
    """The room every connection of one user joins."""
    return f"user:{user_id}"


def check_user_id(user_id: Any) -> str:
    if not is_valid_user_id(user_id):
        raise ValueError(
            f"user_id must be a non-empty string of at most 256 characters without control characters, "
            f"got {user_id!r:.80}"
        )
    return user_id


def check_room(room: Any) -> str:
    if not isinstance(room, str) or not room:
        raise ValueError(f"room must be a non-empty string, got {room!r:.80}")
    if len(room) > MAX_ROOM_LENGTH:
        raise ValueError(f"room is longer than {MAX_ROOM_LENGTH} characters")
    return room


def check_event(event: Any) -> str:
    if not isinstance(event, str) or not event:
        raise ValueError(f"event must be a non-empty string, got {event!r:.80}")
    if event in RESERVED_EVENTS:
        raise ValueError(f"event {event!r} is reserved by Socket.IO clients")
    return event


def client_address(scope: Mapping[str, Any]) -> str:
    """The peer's address from an ASGI scope (python-engineio's REMOTE_ADDR is a fixed 127.0.0.1 under ASGI)."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"


def encode_event(packet_class: type[packet.Packet], namespace: str, data: list[Any]) -> str | list[Any]:
    """A Socket.IO EVENT packet exactly as python-socketio encodes it, with a single json.dumps when there are no bytes.

    python-socketio first walks the data looking for bytes (`Packet.data_is_binary`): about a sixth of a targeted
    emit's CPU. Bytes make json.dumps raise TypeError, and python-socketio's binary encoding takes over.
    """
    prefix = str(packet.EVENT) if namespace == "/" else f"{packet.EVENT}{namespace},"
    try:
        return prefix + packet_class.json.dumps(data, separators=(",", ":"))
    except TypeError:
        return packet_class(packet.EVENT, namespace=namespace, data=data).encode()


class GatewayManager(socketio.AsyncManager):
    """python-socketio's in-memory client manager with two changes.

    - Delivery without a task per recipient: python-socketio's `AsyncManager.emit` creates one asyncio task per
      recipient and waits on all of them. Here the packet is encoded once (`encode_event`) and, for each recipient
      in turn, written straight to its WebSocket when nothing else is waiting to go out on it
      (`GatewayWebSocket.write_now`), else queued on its Engine.IO socket for python-engineio's writer task.
      One connection gets at most one direct write per turn of the event loop: the writer task sends the rest
      back to back, which the kernel handles for less than writes interleaved with other connections' (without
      this rule, a burst of targeted emits cost 78 µs per message instead of 58). Every YIELD_EVERY recipients the
      loop gets a turn, so a huge room does not stall other work. Emits with an ack callback keep python-socketio's
      own path. This reads python-engineio's `sockets` map, `AsyncSocket`'s queue and upgrade flags and
      `AsyncSocket.send`, hence the pinned version range; `tests/test_delivery.py` fails if they change.
    - END_EVENT sent to a room also ends the connections in it: that is what lets a logout reach every node,
      since the Redis manager below delivers through this class.
    """

    max_queued = 1000  # packets waiting on one connection before its client counts as stalled; set by create_server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.end_reasons: dict[str, str] = {}  # sid -> why the gateway ends it; the disconnect handler pops it
        self.written_this_turn: set[str] = set()  # Engine.IO sids written to directly since the loop last had a turn

    async def emit(
        self, event: str, data: Any, namespace: str, room: Any = None, skip_sid: Any = None, callback: Any = None,
        to: Any = None, **kwargs: Any,
    ) -> None:
        room = to or room
        ending = [sid for sid, _ in self.get_participants(namespace, room)] if event == END_EVENT and room else []
        if callback is None:
            await self._deliver(event, data, namespace, room, skip_sid)
        else:
            await super().emit(event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs)
        for sid in ending:
            self.end_reasons[sid] = data.get("reason", "server") if isinstance(data, dict) else "server"
            await self.server.disconnect(sid, namespace=namespace, ignore_queue=True)

    async def _deliver(self, event: str, data: Any, namespace: str, room: Any, skip_sid: Any) -> None:
        if namespace not in self.rooms:
            return
        # The same argument rules as python-socketio: a tuple is several arguments, None is none.
        arguments = list(data) if isinstance(data, tuple) else [] if data is None else [data]
        encoded = encode_event(self.server.packet_class, namespace, [event, *arguments])
        parts = encoded if isinstance(encoded, list) else [encoded]  # binary data: a text part plus attachments
        eio_packets = [eio_packet.Packet(eio_packet.MESSAGE, part) for part in parts]
        frame = eio_packets[0].encode() if len(eio_packets) == 1 else None  # what a WebSocket carries
        skip = set(skip_sid) if isinstance(skip_sid, list) else {skip_sid}
        sockets, websockets = self.server.eio.sockets, self.server.eio.websockets
        written = self.written_this_turn
        stalled = []
        for count, (sid, eio_sid) in enumerate(self.get_participants(namespace, room), 1):
            socket = sockets.get(eio_sid)
            if sid in skip or socket is None or socket.closed:
                continue
            websocket = websockets.get(eio_sid)
            if frame is not None and websocket is not None and eio_sid not in written and websocket.can_write_now():
                if not written:
                    asyncio.get_running_loop().call_soon(written.clear)
                written.add(eio_sid)
                websocket.write_now(frame)
            elif socket.queue.qsize() >= self.max_queued:
                stalled.append((sid, socket))
            else:
                for eio_pkt in eio_packets:
                    await socket.send(eio_pkt)
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        for sid, socket in stalled:
            await self._drop_stalled(sid, socket)

    async def _drop_stalled(self, sid: str, socket: Any) -> None:
        """End a connection whose client stopped reading, so its queue stops growing.

        python-engineio's queue has no bound, and its writer waits on the client for as long as the TCP connection
        lives. Closing without waiting (abort) runs the disconnect handlers at once; the packets already queued are
        freed when the TCP connection finally goes.
        """
        logger.warning(
            "ended %s: client stopped reading (%d packets queued)", sid, socket.queue.qsize(),
            extra={"reason": "stalled"},
        )
        self.end_reasons[sid] = "stalled"
        await socket.close(wait=False, abort=True, reason=self.server.reason.SERVER_DISCONNECT)


class GatewayRedisManager(socketio.AsyncRedisManager, GatewayManager):
    """python-socketio's Redis manager (its local delivery goes through GatewayManager) that logs foreign messages."""

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in super()._listen():
            try:
                data = json.loads(message)
            except (ValueError, TypeError):
                data = None
            if isinstance(data, dict) and isinstance(data.get("method"), str):
                yield data
            else:
                logger.warning(
                    "ignored a message on Redis channel %r that is not the gateway's: %.80r", self.channel, message
                )


class GatewayMetrics:
    """The gateway's Prometheus series, served at /metrics when GATEWAY_METRICS=1.

    Counting happens once per connection or per emit call, never per recipient, so it stays off the fan-out path.
    Under `--workers N` with PROMETHEUS_MULTIPROC_DIR set, prometheus-client sums the workers' values.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.connections = Gauge(
            "gateway_connections", "Open Socket.IO connections.", registry=registry, multiprocess_mode="livesum"
        )
        self.users = Gauge(
            "gateway_connected_users", "Users with an open connection (per process; summed over workers).",
            registry=registry, multiprocess_mode="livesum",
        )
        self.accepted = Counter("gateway_connections_accepted", "Connections accepted.", registry=registry)
        self.refused = Counter("gateway_connections_refused", "Connections refused.", ["reason"], registry=registry)
        self.emitted = Counter("gateway_emits", "Emit calls, by target kind.", ["kind"], registry=registry)
        self.published = Counter(
            "gateway_publish_api_messages", "Messages accepted by POST /publish.", ["kind"], registry=registry
        )
        self.disconnects = Counter("gateway_disconnects", "Connections ended.", ["reason"], registry=registry)
        self.redis_up = Gauge(
            "gateway_redis_up", "1 while Redis answers a ping (with GATEWAY_REDIS_URL).",
            registry=registry, multiprocess_mode="livemostrecent",
        )


def run_eagerly(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coroutine` now, up to the first time it must wait; from there a task finishes it (None: it is done).

    A task would first wait for its turn in the event loop, which costs a fan-out more than the write itself.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    task = asyncio.ensure_future(_resume(coroutine, waiting_on))
    task.add_done_callback(lambda _: coroutine.close())  # a task cancelled before its first step never resumed it
    return task


async def _resume(coroutine: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Drive a coroutine that `run_eagerly` started, as asyncio's Task does: resume it when what it awaits is done."""
    while True:
        try:
            if waiting_on is None:  # a bare yield, as in asyncio.sleep(0)
                await asyncio.sleep(0)
            else:
                waiting_on._asyncio_future_blocking = False
                await asyncio.wait([waiting_on])
        except asyncio.CancelledError as cancelled:
            step, value = coroutine.throw, cancelled
        else:
            step, value = coroutine.send, None
        try:
            waiting_on = step(value)
        except StopIteration:
            return


class SendQueue(asyncio.Queue[Any]):
    """The packets waiting to go out on one Engine.IO connection; knows when its writer waits for the next one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.readers = 0  # get() calls waiting: while the writer task waits here, it holds no packet of its own

    async def get(self) -> Any:
        self.readers += 1
        try:
            return await super().get()
        finally:
            self.readers -= 1


class GatewayWebSocket(engineio.async_drivers.asgi.WebSocket):
    """python-engineio's ASGI WebSocket, which the gateway may also write to directly.

    python-engineio sends through a writer task per connection: a queue put, then a turn of the event loop and a
    wake-up of that task per message, about half of a fan-out's CPU. When the writer waits for a packet and
    none is queued, the gateway writes the frame itself (`write_now`); a direct write that has to wait for a slow
    client goes out before anything the writer task sends next.
    """

    def __init__(self, handler: Any, server: GatewayEngineIOServer) -> None:
        super().__init__(handler, server)
        self.server = server
        self.socket: engineio.async_socket.AsyncSocket = handler.__self__  # whose _websocket_handler this runs
        self.waiting: asyncio.Task[None] | None = None  # a direct write that waits for the client

    async def __call__(self, environ: dict[str, Any]) -> str:
        self.server.websockets[self.socket.sid] = self
        try:
            return await super().__call__(environ)
        finally:
            self.server.websockets.pop(self.socket.sid, None)

    async def send(self, message: str | bytes) -> None:
        """python-engineio's writer task sends through here."""
        if self.waiting is not None:
            await asyncio.wait([self.waiting])
        await super().send(message)

    def can_write_now(self) -> bool:
        """The upgrade is done, the writer task waits for a packet and none is queued: a frame written now keeps
        its place."""
        socket = self.socket
        queue = socket.queue
        return (
            socket.upgraded and not socket.upgrading and self.waiting is None and queue.readers > 0 and queue.empty()
        )

    def write_now(self, frame: str) -> None:
        """Write one Engine.IO packet (after `can_write_now`); if the client is slow, a task finishes the write."""
        self.waiting = run_eagerly(self._write(frame))

    async def _write(self, frame: str) -> None:
        try:
            await self.asgi_send({"type": "websocket.send", "text": frame})
        except Exception:  # the connection is going away; its reader ends the session, as after a writer's error
            logger.debug("a write to %s failed", self.socket.sid, exc_info=True)
        finally:
            self.waiting = None


class GatewayEngineIOServer(engineio.AsyncServer):
    """python-engineio's server with two changes.

    - A connection's ping task ends with the connection. python-engineio leaves each connection's next ping
      waiting out its interval (25 s by default) after the connection closed, and with it the whole socket: a
      flood of refused connections held about 6 KB each.
    - Its WebSockets are GatewayWebSockets, found by Engine.IO sid in `websockets`, and its queues SendQueues.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ping_tasks: dict[str, asyncio.Task[None]] = {}
        self.websockets: dict[str, GatewayWebSocket] = {}
        self._async = {**self._async, "websocket": GatewayWebSocket}  # python-engineio's table for async_mode="asgi"

    def create_queue(self, *args: Any, **kwargs: Any) -> SendQueue:
        return SendQueue(*args, **kwargs)  # python-engineio makes each connection's queue here

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = super().start_background_task(target, *args, **kwargs)
        if getattr(target, "__func__", None) is engineio.async_socket.AsyncSocket._send_ping:
            sid = target.__self__.sid
            self.ping_tasks[sid] = task
            task.add_done_callback(lambda done: self.ping_tasks.get(sid) is done and self.ping_tasks.pop(sid))
        return task

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "disconnect" and (ping := self.ping_tasks.get(args[0])) and ping is not asyncio.current_task():
            ping.cancel()
        return await super()._trigger_event(event, *args, **kwargs)


class GatewayServer(socketio.AsyncServer):
    """python-socketio's server, except that a client sending a malformed or binary packet is disconnected,
    and a CONNECT that arrives after its session closed is dropped.

    python-socketio logs a traceback for a malformed packet and keeps the connection; binary packets make it
    collect attachments for as long as the client announces them. Clients of this gateway send only JSON
    (`refresh`), so either ends that connection, with one log line.
    """

    def _engineio_server_class(self) -> type[engineio.AsyncServer]:
        return GatewayEngineIOServer

    async def _handle_connect(self, eio_sid: str, namespace: str, data: Any) -> None:
        # python-socketio registers the connection, then reads self.environ[eio_sid]. When the Engine.IO session
        # closed while this CONNECT waited its turn, that raised KeyError and left the sid registered for good
        # (found by the fuzz test in tests/test_hostile.py).
        if eio_sid in self.environ:
            await super()._handle_connect(eio_sid, namespace, data)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if isinstance(data, bytes) or data[:1] in (str(packet.BINARY_EVENT), str(packet.BINARY_ACK)):
            problem = "binary packet"
        else:
            try:
                return await super()._handle_eio_message(eio_sid, data)
            except Exception as exc:  # whatever python-socketio's decoder raised on this client's input
                problem = f"malformed packet ({type(exc).__name__})"
        client = client_address(self.environ.get(eio_sid, {}).get("asgi.scope", {}))
        logger.info("closed the connection of %s: %s", client, problem, extra={"client": client, "reason": "malformed"})
        await self.eio.disconnect(eio_sid)


def create_server(settings: Settings) -> socketio.AsyncServer:
    if settings.redis_url:
        manager: GatewayManager = GatewayRedisManager(settings.redis_url, channel=settings.redis_channel)
    else:
        manager = GatewayManager()
    manager.max_queued = settings.max_queued_messages
    return GatewayServer(
        client_manager=manager,
        async_mode="asgi",
        cors_allowed_origins=settings.cors_origins,
        max_http_buffer_size=settings.max_message_bytes,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        transports=settings.transports,
    )


class Emitter:
    """Reach users, rooms or everyone through a python-socketio client manager.

    The gateway's own manager delivers to this node's connections (and, with Redis, publishes to the other
    nodes); a write-only Redis manager (see `redis_publisher`) lets any other process do the same.
    """

    def __init__(self, manager: socketio.AsyncManager, metrics: GatewayMetrics | None = None) -> None:
        self.manager = manager
        self.metrics = metrics

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
        return len(self.manager.rooms.get(NAMESPACE, {}).get(user_room(check_user_id(user_id)), ()))

    async def _emit(self, event: str, data: Any, room: str | None, kind: str) -> None:
        # The one place that emits: python-socketio reads a falsy room as "everyone", so only
        # broadcast() may pass None, and every other caller has checked its room above.
        await self.manager.emit(event, data, namespace=NAMESPACE, room=room)
        if self.metrics:
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
        if not isinstance(self.manager, AsyncPubSubManager) and not self.manager.is_connected(sid, NAMESPACE):
            raise LookupError(f"no connection with sid {sid!r:.80} on this gateway")
        return sid


def redis_publisher(redis_url: str, channel: str = DEFAULT_REDIS_CHANNEL) -> Emitter:
    """An Emitter for a process that runs no server (a worker, a script): it publishes through Redis only."""
    return Emitter(socketio.AsyncRedisManager(redis_url, channel=channel, write_only=True))


class SocketGateway(Emitter):
    """The backend's handle on connected users; registers the server's connect, disconnect and refresh handlers."""

    def __init__(self, sio: socketio.AsyncServer, settings: Settings, metrics: GatewayMetrics | None = None) -> None:
        super().__init__(sio.manager, metrics or GatewayMetrics())
        self.sio = sio
        self.settings = settings
        self._deadlines: dict[str, asyncio.TimerHandle] = {}  # sid -> the timer that ends it when its token expires
        self._tasks: set[asyncio.Task[None]] = set()  # keeps background tasks referenced until they finish
        self._redis_up: bool | None = None  # last answer of redis_problem(), to log changes only
        self.shutting_down = False  # set on SIGTERM (see asgi.py): transport closes after it are the shutdown's
        sio.on("connect", self.on_connect)
        sio.on("disconnect", self.on_disconnect)
        sio.on("refresh", self.on_refresh)

    def start(self) -> None:
        """Start the client manager now, so a node listens to Redis before its first client arrives."""
        # python-socketio does this itself on the first Engine.IO connection, with this same flag.
        if not self.sio.manager_initialized:
            self.sio.manager_initialized = True
            self.manager.initialize()

    async def redis_problem(self) -> str | None:
        """Why this node cannot reach Redis right now, or None (also None without Redis)."""
        if not isinstance(self.manager, GatewayRedisManager):
            return None
        try:
            if self.manager.redis is None:
                self.manager._redis_connect()
            await asyncio.wait_for(self.manager.redis.ping(), REDIS_PING_TIMEOUT)
            problem = None
        except Exception as exc:  # any failure to answer is "unreachable", whatever the client library raised
            problem = f"redis unreachable: {type(exc).__name__}: {str(exc)[:200]}"
        if self._redis_up is not (problem is None):
            logger.warning(problem or "redis reachable", extra={"reason": problem or "reachable"})
        self._redis_up = problem is None
        self.metrics.redis_up.set(1 if self._redis_up else 0)
        return problem

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        address = client_address(environ["asgi.scope"])
        try:
            identity = await verify_auth(auth, self.settings.jwt)
        except TokenRefused as refused:
            raise self._refuse(sid, address, refused.reason, refused.detail) from None
        room = user_room(identity.user_id)
        # Enter first, then count: no await can slip another connection of this user in between.
        await self.sio.enter_room(sid, room, namespace=NAMESPACE)
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
        """Log a refusal and close the client's transport once its connect_error is on the way."""
        logger.info(
            "refused connection from %s: %s (%s)", address, reason, detail, extra={"client": address, "reason": reason}
        )
        self.metrics.refused.labels(reason).inc()
        # python-socketio sends the connect_error and forgets the sid (rooms included) when the handler raises;
        # this task runs after that, and closes the Engine.IO connection so nothing of the client lingers.
        self._spawn(self.sio.eio.disconnect(self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)))
        return socketio.exceptions.ConnectionRefusedError(REFUSAL_MESSAGES[reason], {"reason": reason})

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_disconnect(self, sid: str, reason: str) -> None:
        self._cancel_deadline(sid)
        user_id = (await self.sio.get_session(sid, namespace=NAMESPACE)).get("user_id")
        ended_by = self.manager.end_reasons.pop(sid, None) or ("shutdown" if self.shutting_down else None)
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
        session = await self.sio.get_session(sid, namespace=NAMESPACE)
        if identity.user_id != session["user_id"]:
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
        self._spawn(self._emit(END_EVENT, {"reason": "token_expired"}, sid, "expiry"))  # GatewayManager ends it


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
    """Log to stderr at GATEWAY_LOG_LEVEL, as text or JSON; leave alone a process that configured logging itself."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    # python-socketio and python-engineio log a line per message at INFO: keep them quieter unless debugging.
    for name in ("socketio", "engineio"):
        logging.getLogger(name).setLevel(settings.log_level if settings.log_level == "DEBUG" else "WARNING")


def load_settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ValueError as exc:
        raise SystemExit(f"gateway: bad configuration: {exc}") from None


settings = load_settings_or_exit()
configure_logging(settings)
sio = create_server(settings)
gateway = SocketGateway(sio, settings)
