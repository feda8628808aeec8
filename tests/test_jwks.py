"""Keys from an identity provider's JWKS URL: a real HTTP provider the tests control, real clients, real attacks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import hashlib
import hmac
import itertools
import json
import socket
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jose import jwk, jwt
from starlette.config import Config

from asgi import create_app
from auth import (
    JWTSettings,
    TokenRefused,
    load_jwt_settings,
    start_key_refresh,
    stop_key_refresh,
    verify_auth,
)
from soak import client_frame, raw_websocket
from conftest import TIMEOUT, Client, eventually, free_port, make_gateway, refusal, serve
from test_auth import b64, check
from test_js_clients import NodeClient

pytestmark = pytest.mark.anyio

AUDIENCE = "https://api.example.com"
JWKS_PATH = "/.well-known/jwks.json"
FAST_INTERVAL = 0.2  # min_interval for the tests that are not about the pinned 5 s
FAST_TIMEOUT = 1.0


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


CURVES = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
KEYS = {"RS256": rsa_key(), "RS384": rsa_key(), "RS512": rsa_key()} | {
    algorithm: ec.generate_private_key(curve) for algorithm, curve in CURVES.items()
}
ATTACKER = rsa_key()


def pem(key: Any) -> str:
    encoding, private_format = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private_format, serialization.NoEncryption()).decode()


@functools.cache
def signing_key(key: Any, algorithm: str) -> Any:
    """python-jose's key for signing (loading a private key is slow: a flood signs hundreds of tokens)."""
    return jwk.construct(pem(key), algorithm)


def algorithm_of(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return {256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]


def certificate(key: Any) -> str:
    """A self-signed certificate of `key`, base64 DER as in a JWK's x5c."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tenant.example.com")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    builder = builder.serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
    return base64.b64encode(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)).decode()


def public_jwk(key: Any, kid: str | None, algorithm: str | None = "default", **fields: Any) -> dict[str, Any]:
    """The public JWK of `key`, as providers publish it; algorithm=None leaves "alg" out (Microsoft Entra ID does)."""
    published = jwk.construct(pem(key), algorithm_of(key)).public_key().to_dict()
    published.pop("alg")
    if algorithm is not None:
        published["alg"] = algorithm_of(key) if algorithm == "default" else algorithm
    return published | ({"kid": kid} if kid is not None else {}) | {"use": "sig"} | fields


def provider_token(
    key: Any, kid: str | None, user: str = "alice", algorithm: str | None = None, headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A token as an identity provider signs it: its key, its kid, this gateway's audience."""
    now = int(time.time())
    claims = {"sub": user, "aud": AUDIENCE, "iss": "https://login.example.com/", "iat": now, "exp": now + 600} | claims
    headers = ({"kid": kid} if kid is not None else {}) | (headers or {})
    algorithm = algorithm or algorithm_of(key)
    return jwt.encode(claims, signing_key(key, algorithm), algorithm=algorithm, headers=headers)


class Provider:
    """A JWKS endpoint on 127.0.0.1, in threads of its own: the test sets its answer and counts what it is asked.

    `document` is served as JSON (bytes as they are) with `status` and `headers`; with `hang` set it accepts and never
    answers until `released` is set. It can be stopped (connections refused) and started again on the same port.
    """

    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.status = 200
        self.headers: dict[str, str] = {}
        self.hang = False
        self.released = threading.Event()
        self.slow = threading.Event()  # set: answer only once `released` is set (a provider that takes its time)
        self.requests: list[tuple[float, str]] = []  # (time.monotonic(), path) of every request
        self.port = free_port()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{JWKS_PATH}"

    def publish(self, *keys: dict[str, Any]) -> None:
        self.document = {"keys": list(keys)}

    def start(self) -> Provider:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.requests.append((time.monotonic(), self.path))
                if provider.hang or provider.slow.is_set():
                    provider.released.wait(TIMEOUT * 3)
                    if provider.hang:
                        return
                document = provider.document
                body = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(provider.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in provider.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def provider() -> Any:
    provider = Provider().start()
    provider.publish(public_jwk(KEYS["RS256"], "key-1"))
    yield provider
    provider.released.set()
    provider.stop()


def jwks_env(provider: Provider, **env: str) -> dict[str, str]:
    return {"JWT_SECRET": "", "JWT_JWKS_URL": provider.url, "JWT_AUDIENCE": AUDIENCE, **env}


def quicken(settings: JWTSettings, timeout: float = FAST_TIMEOUT) -> JWTSettings:
    """The intervals of a test that is not about the pinned 5 s rate limit (test_the_pinned_5_s_and_8_s_contract is)."""
    assert settings.jwks is not None
    settings.jwks.min_interval, settings.jwks.timeout = FAST_INTERVAL, timeout
    return settings


@contextlib.asynccontextmanager
async def loaded(provider: Provider, fast: bool = True, **env: str) -> AsyncIterator[JWTSettings]:
    """JWKS settings for `provider` with the key refresh running, as the gateway's lifespan runs it."""
    settings = load_jwt_settings(Config(environ=jwks_env(provider, **env)))
    if fast:
        quicken(settings)
    await start_key_refresh(settings)
    try:
        yield settings
    finally:
        stop_key_refresh(settings)


async def user_of(token: str, settings: JWTSettings) -> str:
    return (await verify_auth({"token": token}, settings)).user_id


async def refused(token: Any, settings: JWTSettings) -> str:
    """The detail of the refusal of `token`, which must be "invalid"."""
    with pytest.raises(TokenRefused) as refusal:
        await verify_auth({"token": token}, settings)
    assert refusal.value.reason == "invalid"
    return refusal.value.detail


async def started(gateway: Any) -> None:
    """Wait for the lifespan's first fetch: `serve` yields once the socket listens, before the lifespan has run."""
    await eventually(lambda: "refresh" in gateway.settings.jwt.jwks.tasks)  # start_key_refresh has fetched


def fetches(provider: Provider) -> int:
    return len(provider.requests)


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    """What the gateway logged at `level` or above."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("gateway") and r.levelno >= level]


# ---- one token per key type, documents shaped like real providers' -----------------------------------------


@pytest.mark.parametrize("algorithm", list(KEYS))
async def test_a_token_per_key_type_is_accepted(provider, algorithm):
    provider.publish(*(public_jwk(key, f"kid-{name}", algorithm=name) for name, key in KEYS.items()))
    async with loaded(provider, JWT_ALGORITHMS=",".join(KEYS)) as settings:
        token = provider_token(KEYS[algorithm], f"kid-{algorithm}", algorithm=algorithm)
        assert await user_of(token, settings) == "alice"
        other = "kid-ES256" if algorithm == "RS256" else "kid-RS256"  # another key's kid: refused, signature or not
        assert "no JWKS key" in await refused(provider_token(KEYS[algorithm], other, algorithm=algorithm), settings)


RS, RS_NEXT, EC_KEY = KEYS["RS256"], KEYS["RS384"], KEYS["ES256"]
SHAPES = {
    # Auth0: RS256 keys with their certificate chain; the next signing key is published ahead of its use.
    "auth0": (
        lambda: [
            public_jwk(RS, "auth0-current", x5t=b64(hashlib.sha1(b"1").digest()), x5c=[certificate(RS)]),
            public_jwk(RS_NEXT, "auth0-next", algorithm="RS256", x5c=[certificate(RS_NEXT)]),
        ],
        [(RS, "auth0-current"), (RS_NEXT, "auth0-next")],
        [],
    ),
    # Keycloak: a realm's RS256 signing key beside its RSA-OAEP encryption key, which must never verify anything.
    "keycloak": (
        lambda: [public_jwk(RS, "kc-sig"), public_jwk(RS_NEXT, "kc-enc", algorithm="RSA-OAEP", use="enc")],
        [(RS, "kc-sig")],
        [(RS_NEXT, "kc-enc")],
    ),
    # Google: two RS256 keys, the newer and the older, rotated every few days.
    "google": (
        lambda: [public_jwk(RS, uuid.uuid4().hex), public_jwk(RS_NEXT, "0e345fd7e4a97271dffa991f5a893cd16b8e0827")],
        [(RS_NEXT, "0e345fd7e4a97271dffa991f5a893cd16b8e0827")],
        [],
    ),
    # Microsoft Entra ID: no "alg" at all, x5t and x5c, and an issuer field of its own.
    "entra": (
        lambda: [public_jwk(RS, "entra-1", algorithm=None, x5t="abc", x5c=[certificate(RS)], issuer="https://login")],
        [(RS, "entra-1")],
        [],
    ),
    # An EC key without "alg" (Supabase's and Clerk's newer keys are EC P-256): its curve says ES256.
    "ec-without-alg": (lambda: [public_jwk(EC_KEY, "ec-1", algorithm=None)], [(EC_KEY, "ec-1")], [(RS, "ec-1")]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_documents_shaped_like_real_providers(provider, caplog, shape):
    caplog.set_level(logging.INFO, logger="gateway.auth")
    document, accepted, never = SHAPES[shape]
    provider.publish(*document())
    async with loaded(provider, JWT_ALGORITHMS="RS256,ES256") as settings:
        for key, kid in accepted:
            assert await user_of(provider_token(key, kid, algorithm=algorithm_of(key)), settings) == "alice"
        for key, kid in never:
            assert "no JWKS key" in await refused(provider_token(key, kid), settings)
    if shape == "keycloak":
        assert any("'kc-enc': kty RSA, use enc, alg RSA-OAEP" in line for line in messages(caplog))


async def test_a_token_without_kid_needs_a_one_key_set(provider):
    async with loaded(provider) as settings:
        assert await user_of(provider_token(RS, None), settings) == "alice"
    provider.publish(public_jwk(RS, "key-1"), public_jwk(RS_NEXT, "key-2", algorithm="RS256"))
    async with loaded(provider) as settings:
        assert "no JWKS key for kid None" in await refused(provider_token(RS, None), settings)


# ---- rotation, the rate limit, and the pinned numbers ------------------------------------------------------------


async def test_rotation_end_to_end(provider, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    gateway = make_gateway(**jwks_env(provider))
    quicken(gateway.settings.jwt)
    async with serve(create_app(gateway)) as url:
        await started(gateway)
        assert fetches(provider) == 1
        first = Client()
        await first.connect(url, auth={"token": provider_token(RS, "key-1")})
        provider.publish(public_jwk(RS, "key-1"), public_jwk(RS_NEXT, "key-2", algorithm="RS256"))  # the new key
        second = Client()
        await second.connect(url, auth={"token": provider_token(RS_NEXT, "key-2", user="bob")})
        assert fetches(provider) == 2  # the unknown kid made one fetch
        assert await gateway.sio.get_session(second.sid) == {"user_id": "bob"}
        provider.publish(public_jwk(RS_NEXT, "key-2", algorithm="RS256"))  # the old key retired
        await gateway.settings.jwt.jwks.fetch_soon()
        error = await refusal(url, {"token": provider_token(RS, "key-1")})
        assert error == {"message": "invalid token", "data": {"reason": "invalid"}}
        assert first.sio.connected  # a connection lives on until its token expires
        await first.close()
        await second.close()
    refusals = [line for line in messages(caplog) if line.startswith("refused connection")]
    assert len(refusals) == 1 and "no JWKS key for kid 'key-1'" in refusals[0]
    assert any("JWKS loaded kids ['key-2']" in line for line in messages(caplog))


async def test_a_flood_of_unknown_kids_waits_for_one_shared_fetch(provider):
    async with loaded(provider) as settings:
        for wave in range(3):
            before = fetches(provider)
            tokens = [provider_token(RS, f"made-up-{wave}-{n}") for n in range(200)]
            details = await asyncio.gather(*(refused(token, settings) for token in tokens))
            assert all(detail.startswith("no JWKS key for kid 'made-up-") for detail in details)
            assert fetches(provider) == before + 1
            # Known keys kept working through all of it.
            assert await user_of(provider_token(RS, "key-1"), settings) == "alice"
        times = [at for at, _ in provider.requests]
        assert all(later - earlier >= FAST_INTERVAL * 0.9 for earlier, later in itertools.pairwise(times))


async def test_the_pinned_5_s_and_8_s_contract(provider):
    """The real intervals: a new kid connects within 8 s of appearing; a flood meanwhile costs one fetch per 5 s."""
    gateway = make_gateway(**jwks_env(provider))
    async with serve(create_app(gateway)) as url:
        await started(gateway)
        assert fetches(provider) == 1
        provider.publish(public_jwk(RS, "key-1"), public_jwk(RS_NEXT, "key-2", algorithm="RS256"))
        tokens = [provider_token(RS, f"nope-{n}") for n in range(100)]
        flood = [asyncio.create_task(refused(token, gateway.settings.jwt)) for token in tokens]
        client = Client()
        await client.connect(url, auth={"token": provider_token(RS_NEXT, "key-2")}, wait_timeout=8)
        assert all("no JWKS key" in detail for detail in await asyncio.gather(*flood))
        assert fetches(provider) == 2
        (first, _), (second, _) = provider.requests
        assert second - first >= 4.9  # one fetch per 5 s (the 0.1 s is the two requests' own travel)
        await client.close()


async def test_the_refetch_follows_cache_control_max_age_within_bounds(provider):
    async with loaded(provider) as settings:
        jwks = settings.jwks
        assert jwks.max_age == 300  # without Cache-Control
        for header, expected in [("public, max-age=900, must-revalidate", 900), ("max-age=5", 60),
                                 ("max-age=999999999", 3600), ("no-store", 300)]:
            provider.headers = {"Cache-Control": header}
            await jwks.fetch_soon()
            assert jwks.max_age == expected, header


async def test_failing_fetches_are_retried_and_keys_then_load_without_traffic(provider):
    provider.status = 503
    async with loaded(provider) as settings:
        await eventually(lambda: fetches(provider) >= 3)  # every min_interval while failing
        provider.status = 200
        await eventually(lambda: settings.jwks.problem is None)
        assert await user_of(provider_token(RS, "key-1"), settings) == "alice"


# ---- outages and junk ----------------------------------------------------------------------------------------


async def test_a_node_starting_while_the_provider_is_down_starts_refuses_promptly_and_recovers(provider, caplog):
    caplog.set_level(logging.INFO, logger="gateway")
    provider.stop()
    gateway = make_gateway(**jwks_env(provider))
    quicken(gateway.settings.jwt)
    async with serve(create_app(gateway)) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/ready") as ready:
            assert ready.status == 503
            assert (await ready.json())["reason"].startswith("no JWKS keys: JWKS fetch failing: URLError")
        # Refused in the first step of the check: no wait for a fetch while the last one failed.
        with pytest.raises(TokenRefused) as caught:
            check({"token": provider_token(RS, "key-1")}, gateway.settings.jwt)
        assert caught.value.reason == "invalid" and "JWKS fetch failing" in caught.value.detail
        error = await refusal(url, {"token": provider_token(RS, "key-1")})
        assert error == {"message": "invalid token", "data": {"reason": "invalid"}}
        provider.start()
        await eventually(lambda: gateway.settings.jwt.jwks.problem is None)
        async with http.get(f"{url}/ready") as ready:
            assert (ready.status, await ready.json()) == (200, {"status": "ready"})
        client = Client()
        await client.connect(url, auth={"token": provider_token(RS, "key-1")})
        await client.close()
    failing = [line for line in messages(caplog, logging.WARNING) if "JWKS fetch failing" in line]
    assert len(failing) == 1  # once per change of state, however many fetches failed


async def test_an_outage_mid_run_keeps_the_loaded_keys(provider, caplog):
    caplog.set_level(logging.INFO, logger="gateway.auth")
    async with loaded(provider) as settings:
        jwks = settings.jwks
        provider.stop()
        assert "JWKS fetch failing: URLError" in await refused(provider_token(RS, "unknown"), settings)
        started = jwks.started
        await eventually(lambda: jwks.started > started + 2 * FAST_INTERVAL)  # more failed retries
        assert await user_of(provider_token(RS, "key-1"), settings) == "alice"
        provider.publish(public_jwk(RS, "key-1"), public_jwk(RS_NEXT, "key-2", algorithm="RS256"))
        provider.start()
        await eventually(lambda: jwks.problem is None)
        assert await user_of(provider_token(RS_NEXT, "key-2"), settings) == "alice"
    logged = messages(caplog)
    assert len([line for line in logged if "JWKS fetch failing" in line]) == 1
    assert len([line for line in logged if "JWKS loaded" in line]) == 2  # at start-up, and back with key-2


JUNK = {
    "invalid JSON": b"{'keys': [",
    "an HTML page": b"<html><body>Service Unavailable</body></html>",
    "keys not a list": b'{"keys": {"kty": "RSA"}}',
    "keys a string": b'{"keys": "' + b"k" * 100_000 + b'"}',
    "a list, not an object": b'[{"kty": "RSA"}]',
    "no usable key": json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}).encode(),
    "an empty set": b'{"keys": []}',
    "megabytes": json.dumps({"keys": [public_jwk(RS, "key-1")] * 3000}).encode(),
    "deep nesting": b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "an empty body": b"",
}


@pytest.mark.parametrize("junk", list(JUNK))
async def test_junk_served_mid_run_leaves_the_loaded_keys(provider, caplog, junk):
    caplog.set_level(logging.INFO, logger="gateway.auth")
    async with loaded(provider) as settings:
        jwks = settings.jwks
        provider.document = JUNK[junk]
        assert "JWKS fetch failing" in await refused(provider_token(RS, "unknown"), settings)
        await eventually(lambda: fetches(provider) >= 4)  # failed retries
        assert await user_of(provider_token(RS, "key-1"), settings) == "alice"
        assert list(jwks.keys) == ["key-1"]
        provider.publish(public_jwk(RS, "key-1"))
        await eventually(lambda: jwks.problem is None)
    assert len([line for line in messages(caplog, logging.WARNING) if "JWKS fetch failing" in line]) == 1


async def test_an_error_status_is_a_failed_fetch(provider):
    provider.status = 500
    async with loaded(provider) as settings:
        assert settings.jwks.problem == "JWKS fetch failing: HTTPError: HTTP Error 500: Internal Server Error"


@pytest.mark.parametrize("scheme", ["ftp", "file"])
async def test_a_redirect_away_from_http_is_refused_and_not_followed(provider, scheme):
    """urllib follows a 302 to ftp: or file: by itself; the gateway fetches from http(s) only."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    provider.status, provider.headers = 302, {"Location": f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/keys"}
    async with loaded(provider) as settings:
        assert settings.jwks.problem.startswith("JWKS fetch failing: HTTPError: HTTP Error 302")
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever connected to it
    listener.close()


async def test_a_hanging_provider_never_delays_tokens_of_loaded_keys(provider):
    gateway = make_gateway(**jwks_env(provider))
    quicken(gateway.settings.jwt, timeout=TIMEOUT)  # a hanging fetch stays in flight for the whole test
    jwks = gateway.settings.jwt.jwks
    async with serve(create_app(gateway)) as url:
        await started(gateway)
        provider.hang = True
        waiting = asyncio.create_task(refused(provider_token(RS, "unknown"), gateway.settings.jwt))
        await eventually(lambda: fetches(provider) == 2)  # the unknown kid's fetch hangs
        assert check({"token": provider_token(RS, "key-1")}, gateway.settings.jwt).user_id == "alice"
        client = Client()
        await client.connect(url, auth={"token": provider_token(RS, "key-1", user="carol")})
        assert await gateway.sio.get_session(client.sid) == {"user_id": "carol"}
        await client.close()
        assert not jwks.tasks["fetch"].done() and not waiting.done()
        provider.released.set()  # the connection closes without an answer: a failed fetch, the kid refused
        assert "JWKS fetch failing" in await asyncio.wait_for(waiting, TIMEOUT)


async def test_a_hanging_provider_at_start_up_delays_the_start_by_the_fetch_timeout_only(provider):
    provider.hang = True
    settings = quicken(load_jwt_settings(Config(environ=jwks_env(provider))), timeout=0.5)
    await asyncio.wait_for(start_key_refresh(settings), TIMEOUT)
    try:
        # asyncio's bound or, when the thread's socket gives up first, urllib's own: either says it timed out
        assert settings.jwks.problem in ("JWKS fetch failing: TimeoutError: ", "JWKS fetch failing: TimeoutError: timed out")
        with pytest.raises(TokenRefused):
            check({"token": provider_token(RS, "key-1")}, settings)
    finally:
        stop_key_refresh(settings)


# ---- attacks -----------------------------------------------------------------------------------------------------


def rsa_public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hmac_token(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


VICTIM = {"sub": "victim", "aud": AUDIENCE, "exp": int(time.time()) + 3600}


async def test_alg_confusion_with_the_public_key_as_an_hmac_secret_is_refused_without_a_fetch(provider):
    published = public_jwk(RS, "key-1")
    async with loaded(provider) as settings:
        for secret in [rsa_public_pem(RS), json.dumps(published).encode(), published["n"].encode()]:
            for algorithm in ["HS256", "HS384", "HS512"]:
                token = hmac_token(secret, {"alg": algorithm, "kid": "key-1", "typ": "JWT"}, VICTIM)
                assert f"'alg': '{algorithm}'" in await refused(token, settings)
        assert fetches(provider) == 1


async def test_an_oct_key_in_the_set_is_never_used(provider, caplog):
    caplog.set_level(logging.INFO, logger="gateway.auth")
    secret = b"s" * 32
    oct_keys = [{"kty": "oct", "kid": "shared", "k": b64(secret), "alg": alg} for alg in ("HS256", "RS256")]
    provider.publish(public_jwk(RS, "key-1"), *oct_keys)
    async with loaded(provider) as settings:
        assert await refused(hmac_token(secret, {"alg": "HS256", "kid": "shared"}, VICTIM), settings)
        assert "no JWKS key for kid 'shared'" in await refused(provider_token(RS, "shared"), settings)
        assert list(settings.jwks.keys) == ["key-1"]
    assert any("'shared': kty oct, use sig, alg HS256" in line for line in messages(caplog))


@pytest.mark.parametrize("field", ["jku", "x5u", "jwk", "x5c"])
async def test_header_fields_pointing_at_an_attackers_key_are_never_followed(provider, field):
    attacker = Provider().start()
    try:
        attacker.publish(public_jwk(ATTACKER, "evil"))
        value = {
            "jku": attacker.url, "x5u": attacker.url.replace(JWKS_PATH, "/cert.pem"),
            "jwk": public_jwk(ATTACKER, "key-1"), "x5c": [certificate(ATTACKER)],
        }[field]
        async with loaded(provider) as settings:
            for kid in ["evil", "key-1", None]:  # an unknown kid, the real key's kid, no kid at all
                assert await refused(provider_token(ATTACKER, kid, headers={field: value}), settings)
        assert fetches(attacker) == 0
        assert {path for _, path in provider.requests} == {JWKS_PATH}
    finally:
        attacker.stop()


async def test_alg_none_is_refused_without_a_fetch(provider):
    async with loaded(provider) as settings:
        for algorithm in ["none", "None", "NONE", ""]:
            header = b64(json.dumps({"alg": algorithm, "kid": "key-1"}).encode())
            payload = b64(json.dumps(VICTIM).encode())
            assert await refused(f"{header}.{payload}.", settings)
        assert fetches(provider) == 1


@pytest.mark.parametrize(
    "kid",
    ["../../../../etc/passwd", "' OR '1'='1' --", "key-1'; DROP TABLE keys; --", "kid\x00key-1", "key-1\r\nX: y",
     "%2e%2e%2f", "k" * 5000, "", 1, ["key-1"], {"$ne": None}, True],
)
async def test_a_kid_with_path_or_sql_characters_is_just_an_unknown_kid(provider, caplog, kid):
    caplog.set_level(logging.INFO, logger="gateway")
    async with loaded(provider) as settings:
        token = provider_token(RS, kid)
        await refused(token, settings)
        assert await user_of(provider_token(RS, "key-1"), settings) == "alice"
    assert {path for _, path in provider.requests} == {JWKS_PATH}
    assert token not in caplog.text and token.split(".")[2] not in caplog.text


# ---- the official JavaScript client ---------------------------------------------------------------------------


async def test_the_official_javascript_client_connects_with_a_provider_token(provider):
    gateway = make_gateway(**jwks_env(provider))
    quicken(gateway.settings.jwt)
    async with serve(create_app(gateway)) as url:
        client = await NodeClient.start(url, provider_token(RS, "key-1", user="dana"), "websocket")
        try:
            await client.until("connected")
            await gateway.emit_to_user("dana", "hello", {"from": "gateway"})
            assert await client.until("event") == {"event": "hello", "args": [{"from": "gateway"}]}
        finally:
            await client.close()
        stranger = await NodeClient.start(url, provider_token(ATTACKER, "key-1"), "websocket")
        try:
            error = await stranger.until("connect_error")
            assert error == {"connect_error": "invalid token", "data": {"reason": "invalid"}}
        finally:
            await stranger.close()


async def test_a_connect_checked_longer_than_a_polling_post_may_wait_is_still_refused(provider, monkeypatch):
    """The POST is answered in time, but the check goes on: python-socketio reads a cancelled connect handler as
    an accepted connection, so a forged token waiting for a JWKS fetch must never be cut short."""
    import asgi

    monkeypatch.setattr(asgi, "POST_TIMEOUT", 0.5)
    gateway = make_gateway(**jwks_env(provider))
    quicken(gateway.settings.jwt, timeout=2)  # a fetch that hangs gives up after 2 s
    async with serve(create_app(gateway)) as url, aiohttp.ClientSession() as http:
        await started(gateway)
        provider.hang = True
        async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
            sid = json.loads((await response.text())[1:])["sid"]
        forged = provider_token(ATTACKER, "an-unknown-kid", user="mallory")
        polling = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
        async with http.post(polling, data="40" + json.dumps({"token": forged})) as response:
            assert response.status == 400  # not answered within the POST's bound
        async with http.get(polling) as response:
            answer = await response.text()  # the check ended: the connect_error
        assert answer.startswith("44") and gateway.connection_count("mallory") == 0, answer
        provider.released.set()


async def test_a_session_that_closes_while_its_connect_is_checked_leaves_nothing(provider):
    """A WebSocket's reader waits for the connect handler, so its pongs go unread: the session closes mid-check."""
    gateway = make_gateway(PING_INTERVAL="1", PING_TIMEOUT="1", **jwks_env(provider))
    quicken(gateway.settings.jwt, timeout=4)  # longer than ping interval + timeout
    async with serve(create_app(gateway)) as url:
        await started(gateway)
        provider.slow.set()
        reader, writer = await raw_websocket(url)
        writer.write(client_frame("40" + json.dumps({"token": provider_token(KEYS["RS256"], "rotated-in")})))
        await writer.drain()
        await eventually(lambda: not gateway.sio.eio.sockets)  # closed by its ping timeout while the check waits
        provider.publish(public_jwk(KEYS["RS256"], "key-1"), public_jwk(KEYS["RS256"], "rotated-in"))
        provider.released.set()  # the fetch ends with the token's key: the check passes, on a closed session
        await eventually(lambda: gateway.settings.jwt.jwks.keys.get("rotated-in") is not None)
        await eventually(lambda: not gateway.manager.rooms.get("/") and not getattr(gateway.manager, "pending_connect", {}))
        writer.close()
