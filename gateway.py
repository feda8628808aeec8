"""The Socket.IO server: who may connect, which room each user is in, and how the backend reaches them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import socketio
from starlette.config import Config
from starlette.datastructures import Secret

from auth import JWTSettings, TokenRefused, is_valid_user_id, load_jwt_settings, verify_auth

logger = logging.getLogger("gateway")

NAMESPACE = "/"
MAX_ROOM_LENGTH = 512
MIN_MESSAGE_BYTES = 9 * 1024  # a CONNECT packet carrying a token of the largest accepted size must fit
# Event names the official JavaScript client reserves for itself; emitting them would break clients.
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"})
MIN_PUBLISH_KEY_LENGTH = 32
REFUSAL_MESSAGES = {"missing": "missing token", "invalid": "invalid token", "expired": "token expired"}


@dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from GATEWAY_* variables, validated once at start-up."""

    jwt: JWTSettings
    cors_origins: list[str] | str | None  # None: same origin only; "*": any origin
    max_message_bytes: int
    publish_key: Secret | None  # None: no HTTP publish API
    publish_max_bytes: int

    def __repr__(self) -> str:  # never print key material
        return f"Settings(jwt={self.jwt!r}, cors_origins={self.cors_origins!r}, publish={self.publish_key is not None})"


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read every GATEWAY_* variable; raise ValueError with one sentence naming the bad one."""
    config = Config(environ=environ, env_prefix="GATEWAY_")
    publish_key = config("PUBLISH_KEY", cast=Secret, default="")
    if str(publish_key) and len(str(publish_key)) < MIN_PUBLISH_KEY_LENGTH:
        raise ValueError(f"GATEWAY_PUBLISH_KEY must be at least {MIN_PUBLISH_KEY_LENGTH} characters")
    return Settings(
        jwt=load_jwt_settings(config),
        cors_origins=parse_cors_origins(config("CORS_ORIGINS", default="")),
        max_message_bytes=int_setting(config, "MAX_MESSAGE_BYTES", 16 * 1024, MIN_MESSAGE_BYTES, 100 * 1024 * 1024),
        publish_key=publish_key if str(publish_key) else None,
        publish_max_bytes=int_setting(config, "PUBLISH_MAX_BYTES", 1024 * 1024, 1024, 100 * 1024 * 1024),
    )


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


def create_server(settings: Settings) -> socketio.AsyncServer:
    return socketio.AsyncServer(
        async_mode="asgi",
        cors_allowed_origins=settings.cors_origins,
        max_http_buffer_size=settings.max_message_bytes,
    )


class SocketGateway:
    """The backend's handle on connected users; registers the server's connect and disconnect handlers."""

    def __init__(self, sio: socketio.AsyncServer, settings: Settings) -> None:
        self.sio = sio
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()  # keeps background tasks referenced until they finish
        sio.on("connect", self.on_connect)
        sio.on("disconnect", self.on_disconnect)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        address = client_address(environ["asgi.scope"])
        try:
            identity = verify_auth(auth, self.settings.jwt)
        except TokenRefused as refused:
            logger.info("refused connection from %s: %s (%s)", address, refused.reason, refused.detail)
            self._close_transport_soon(sid)
            raise socketio.exceptions.ConnectionRefusedError(
                REFUSAL_MESSAGES[refused.reason], {"reason": refused.reason}
            ) from None
        await self.sio.save_session(sid, {"user_id": identity.user_id})
        await self.sio.enter_room(sid, user_room(identity.user_id))
        logger.debug("user %r connected as %s from %s", identity.user_id, sid, address)

    def _close_transport_soon(self, sid: str) -> None:
        """Close a refused client's Engine.IO connection right after its connect_error, so none lingers."""
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        task = asyncio.create_task(self.sio.eio.disconnect(eio_sid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_disconnect(self, sid: str, reason: str) -> None:
        logger.debug("%s disconnected", sid, extra={"reason": reason})

    async def emit_to_user(self, user_id: str, event: str, data: Any = None) -> None:
        """Send to every connection of one user. This is a coroutine."""
        if not is_valid_user_id(user_id):
            raise ValueError(f"user_id must be a valid user id, got {user_id!r:.80}")
        await self._emit(event, data, user_room(user_id))

    async def emit_to_room(self, room: str, event: str, data: Any = None) -> None:
        """Send to every connection in `room`. This is a coroutine."""
        await self._emit(event, data, check_room(room))

    async def broadcast(self, event: str, data: Any = None) -> None:
        """Send to every connection. This is a coroutine."""
        await self._emit(event, data, None)

    async def _emit(self, event: str, data: Any, room: str | None) -> None:
        # The one place that emits: python-socketio reads a falsy `to` as "everyone", so only
        # broadcast() may pass None, and every other caller has checked its room above.
        await self.sio.emit(check_event(event), data, to=room, namespace=NAMESPACE)

    async def join_room(self, sid: str, room: str) -> None:
        """Add one connection to `room`. This is a coroutine."""
        self._check_sid(sid)
        await self.sio.enter_room(sid, check_room(room), namespace=NAMESPACE)

    async def leave_room(self, sid: str, room: str) -> None:
        """Remove one connection from `room`. This is a coroutine."""
        self._check_sid(sid)
        await self.sio.leave_room(sid, check_room(room), namespace=NAMESPACE)

    def _check_sid(self, sid: Any) -> None:
        if not isinstance(sid, str) or not sid:
            raise ValueError(f"sid must be a non-empty string, got {sid!r:.80}")
        if not self.sio.manager.is_connected(sid, NAMESPACE):
            raise LookupError(f"no connection with sid {sid!r:.80} on this gateway")


def load_settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ValueError as exc:
        raise SystemExit(f"gateway: bad configuration: {exc}") from None


settings = load_settings_or_exit()
sio = create_server(settings)
gateway = SocketGateway(sio, settings)
