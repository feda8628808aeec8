"""JWT checks for the gateway: the settings, the keys (a secret, a PEM key or a JWKS URL), the check, a minting tool."""

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard
from urllib.error import HTTPError

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jws, jwt
from jose.backends.base import Key
from starlette.config import Config

logger = logging.getLogger("gateway.auth")
MAX_TOKEN_BYTES = 8 * 1024
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512")  # python-jose has no PS*
EC_ALGORITHMS = ("ES256", "ES384", "ES512")


@dataclass(frozen=True)
class JWTSettings:
    algorithms: tuple[str, ...]
    keys: dict[str, Key] = field(repr=False)  # algorithm -> key, for a secret or a PEM key
    jwks: "KeySet | None" = None  # the keys of GATEWAY_JWT_JWKS_URL instead
    audience: str | None = None  # None: not checked (none set with a secret, or "*")
    audience_claim: str = "aud"
    issuer: str | None = None
    leeway: float = 10
    user_claim: str = "sub"


class TokenRefused(Exception):
    """A token that must not open a connection; `reason` is "missing", "invalid" or "expired"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class Identity(NamedTuple):
    user_id: str
    expires_at: float  # unix seconds, from the token's exp


def load_jwt_settings(config: Config) -> JWTSettings:
    """Read and validate the GATEWAY_JWT_* variables; raise ValueError naming the bad one."""
    given = {name: v for name in ("SECRET", "PUBLIC_KEY", "JWKS_URL") if (v := config(f"JWT_{name}", default=""))}
    if len(given) != 1:
        raise ValueError("set exactly one of GATEWAY_JWT_SECRET, GATEWAY_JWT_PUBLIC_KEY or GATEWAY_JWT_JWKS_URL")
    [(source, value)] = given.items()
    material, family = _key_source(source, value)
    algorithms = tuple(a.strip() for a in config("JWT_ALGORITHMS", default=family[0]).split(",") if a.strip())
    if bad := [algorithm for algorithm in algorithms or [""] if algorithm not in family]:
        raise ValueError(f"GATEWAY_JWT_ALGORITHMS: {bad[0]!r} is not one of {'/'.join(family)} for this key")
    audience: str | None = config("JWT_AUDIENCE", default="")
    if not audience and source != "SECRET":  # provider keys sign for many apps
        raise ValueError(
            "GATEWAY_JWT_AUDIENCE is required with a public key or JWKS URL: your provider's audience "
            "for this gateway (see GATEWAY_JWT_AUDIENCE_CLAIM for Cognito), or * to accept any audience"
        )
    if not (0 <= (leeway := config("JWT_LEEWAY", cast=float, default=10)) <= 300):  # NaN is refused too
        raise ValueError(f"GATEWAY_JWT_LEEWAY must be between 0 and 300 seconds, got {leeway}")
    if not (user_claim := config("JWT_USER_CLAIM", default="sub").strip()):
        raise ValueError("GATEWAY_JWT_USER_CLAIM is empty")
    keys = {a: jwk.construct(material, a) for a in algorithms} if material else {}
    jwks = KeySet(value, algorithms) if source == "JWKS_URL" else None
    audience = None if audience in ("", "*") else audience
    audience_claim = config("JWT_AUDIENCE_CLAIM", default="").strip() or "aud"
    issuer = config("JWT_ISSUER", default="") or None
    return JWTSettings(algorithms, keys, jwks, audience, audience_claim, issuer, leeway, user_claim)


def _key_source(source: str, value: str) -> tuple[str | None, tuple[str, ...]]:
    """GATEWAY_JWT_<source>'s key (PEM text for a path, None for a URL) and the algorithms it allows."""
    if source == "SECRET" and len(value.encode()) < 32:
        raise ValueError("GATEWAY_JWT_SECRET must be at least 32 bytes")
    if source == "JWKS_URL" and not value.startswith(("https://", "http://")):
        raise ValueError("GATEWAY_JWT_JWKS_URL must be an https:// or http:// URL")
    if source != "PUBLIC_KEY":
        return (value, HMAC_ALGORITHMS) if source == "SECRET" else (None, RSA_ALGORITHMS + EC_ALGORITHMS)
    try:
        pem = value if "-----BEGIN" in value else Path(value).read_text()
        key = serialization.load_pem_public_key(pem.encode())
    except Exception:
        neither = "neither a PEM public key nor the path of a file holding one (a private key is refused)"
        raise ValueError(f"GATEWAY_JWT_PUBLIC_KEY is {neither}") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ValueError(f"GATEWAY_JWT_PUBLIC_KEY is a {type(key).__name__}; only RSA and EC keys are supported")
    return pem, RSA_ALGORITHMS if isinstance(key, rsa.RSAPublicKey) else EC_ALGORITHMS


class HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a provider's redirects to https (to http only from http): never to ftp: or file:, nor down to http."""

    def redirect_request(self, request: Any, fp: Any, code: int, msg: str, headers: Any, url: str) -> Any:
        if not url.startswith(("https://", "http://" if request.full_url.startswith("http://") else "https://")):
            raise HTTPError(url, code, "redirect refused: only to https, or to http from http", headers, fp)
        return super().redirect_request(request, fp, code, msg, headers, url)


OPENER = urllib.request.build_opener(HTTPOnlyRedirects)


class KeySet:
    """The signing keys published at a JWKS URL, by kid then algorithm, and the fetches that keep them current."""

    def __init__(self, url: str, algorithms: tuple[str, ...]) -> None:
        self.url, self.algorithms, self.keys = url, algorithms, dict[Any, dict[str, Key]]()
        self.problem: str | None = "not fetched yet"  # why the last fetch failed; None after one that succeeded
        self.min_interval, self.timeout, self.max_bytes = 5.0, 3.0, 256 * 1024  # 5 + 3 s: the longest a new kid waits
        self.max_age, self.started = 300.0, float("-inf")  # started: time.monotonic() when the last fetch began
        self.tasks: dict[str, asyncio.Task[None]] = {}  # the fetch under way, the refresh loop

    async def key(self, kid: Any, algorithm: str) -> Key:
        """The key of a kid and alg; an unknown kid waits for a fetch begun after it came, unless the last failed."""
        asked = time.monotonic()
        while (keys := self._find(kid)) is None and self.problem is None and self.started < asked:
            await asyncio.shield(self.fetch_soon())  # if this client leaves, the fetch goes on for the others
        if keys is None or algorithm not in keys:
            raise TokenRefused("invalid", f"no JWKS key for kid {kid!r:.64}, {algorithm}: {self.problem or 'ok'}")
        return keys[algorithm]

    def _find(self, kid: Any) -> dict[str, Key] | None:  # a token without kid may use the key of a one-key set only
        return (next(iter(self.keys.values())) if len(self.keys) == 1 else None) if kid is None else self.keys.get(kid)

    def fetch_soon(self) -> asyncio.Task[None]:  # the fetch under way, or one that begins min_interval after the last
        if (fetch := self.tasks.get("fetch")) is None or fetch.done():
            fetch = self.tasks["fetch"] = asyncio.create_task(self._fetch())
        return fetch

    async def _fetch(self) -> None:
        await asyncio.sleep(self.started + self.min_interval - time.monotonic())
        self.started, kids, problem, skipped = time.monotonic(), self.keys.keys(), None, list[str]()
        try:  # after a timeout the thread still ends by its socket timeouts; the loaded keys stay meanwhile
            self.keys, self.max_age, skipped = await asyncio.wait_for(asyncio.to_thread(self._download), self.timeout)
        except Exception as exc:
            problem = f"JWKS fetch failing: {type(exc).__name__}: {str(exc)[:300]}"
        if problem != self.problem or self.keys.keys() != kids:  # log once per change of state
            message = problem or f"JWKS loaded kids {list(self.keys)}, skipped {skipped}, next in {self.max_age:g} s"
            logger.log(logging.WARNING if problem else logging.INFO, "%s: %s", self.url, message)
        self.problem = problem

    def _download(self) -> tuple[dict[Any, dict[str, Key]], float, list[str]]:
        """GET the set (in `timeout` and `max_bytes`): its usable keys, how long to keep them, the keys skipped."""
        deadline, body, keys, skipped = time.monotonic() + self.timeout, b"", dict[Any, dict[str, Key]](), []
        request = urllib.request.Request(self.url, headers={"User-Agent": "socket-gateway"})  # CDNs may refuse urllib
        with OPENER.open(request, timeout=self.timeout) as response:
            while chunk := response.read1(64 * 1024):
                if len(body := body + chunk) > self.max_bytes or time.monotonic() > deadline:
                    raise ValueError(f"document larger than {self.max_bytes} bytes or slower than {self.timeout} s")
        for entry in entries if isinstance(entries := json.loads(body)["keys"], list) else ():
            kid = entry.get("kid") if isinstance(entry, dict) else None
            try:
                kty, use, alg = entry["kty"], entry.get("use", "sig"), entry.get("alg")
                family = {"RSA": "RS", "EC": "ES"}.get(kty)
                usable = [a for a in ([alg] if alg else self.algorithms) if a in self.algorithms and a[:2] == family]
                if use != "sig" or kid in keys or not usable:
                    raise ValueError(f"kty {kty}, use {use}, alg {alg}{', a repeated kid' if kid in keys else ''}")
                keys[kid] = {a: jwk.construct(entry, a).public_key() for a in usable}
            except Exception as exc:  # a parse error is only named: its message could quote the key
                skipped.append(f"{kid!r:.64}: {exc if type(exc) is ValueError else type(exc).__name__}")
        if not keys:
            raise ValueError(f"no usable key in 'keys' (a {type(entries).__name__}); skipped {skipped}")
        max_age = re.search(r"max-age=(\d{1,9})", response.headers.get("Cache-Control", ""))  # held within 1 min..1 h
        return keys, min(max(float(max_age[1]), 60), 3600) if max_age else 300, skipped

    async def refresh_forever(self) -> None:
        while True:  # refetch after max-age while fetches succeed, every min_interval once one failed
            await asyncio.sleep(self.min_interval)
            if self.problem or time.monotonic() > self.started + self.max_age:
                await self.fetch_soon()


async def start_key_refresh(settings: JWTSettings) -> None:
    """Lifespan start: with a JWKS URL, fetch the keys (waiting at most the fetch timeout) and keep them current."""
    if jwks := settings.jwks:
        await jwks.fetch_soon()
        jwks.tasks["refresh"] = asyncio.create_task(jwks.refresh_forever())


def stop_key_refresh(settings: JWTSettings) -> None:
    for task in settings.jwks.tasks.values() if settings.jwks else ():
        task.cancel()


def key_problem(settings: JWTSettings) -> str | None:
    """Why no token can be checked now (for readiness), or None."""
    return f"no JWKS keys: {settings.jwks.problem}" if settings.jwks and not settings.jwks.keys else None


# Every character of Unicode categories Cc (controls), Cs (surrogates), Zl and Zp (line and paragraph separators):
# one regex search instead of a category lookup per character (tests/test_auth.py checks every code point).
FORBIDDEN_IN_USER_ID = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


def is_valid_user_id(user_id: Any) -> TypeGuard[str]:
    return isinstance(user_id, str) and 0 < len(user_id) <= 256 and not FORBIDDEN_IN_USER_ID.search(user_id)


async def verify_auth(auth: Any, settings: JWTSettings) -> Identity:
    """Who sent this CONNECT `auth` ({"token": "<JWT>"}), else `TokenRefused`; only a JWKS fetch is ever awaited."""
    if (token := auth.get("token") if isinstance(auth, dict) else auth) is None:
        raise TokenRefused("missing", "no token")
    if not (isinstance(auth, dict) and isinstance(token, str)) or len(token.encode(errors="replace")) > MAX_TOKEN_BYTES:
        raise TokenRefused("invalid", f"auth is not {{'token': '<JWT>'}} with at most {MAX_TOKEN_BYTES} bytes")
    try:  # the header's jku, x5u, jwk and x5c are never read: the keys come from the settings only
        header = jws.get_unverified_header(token)
        # crit: the gateway understands no extension, so RFC 7515 (4.1.11) has it refuse every token that names one
        if "crit" in header or (algorithm := header.get("alg")) not in settings.algorithms:
            raise TokenRefused("invalid", f"header {str({k: header.get(k) for k in ('alg', 'crit')})[:80]} refused")
        key = await jwks.key(header.get("kid"), algorithm) if (jwks := settings.jwks) else settings.keys[algorithm]
        return _identity_from_claims(json.loads(jws.verify(token, key, algorithms=[algorithm])), settings)
    except TokenRefused:
        raise
    except Exception as exc:  # python-jose raises non-JOSE errors on odd input too
        raise TokenRefused("invalid", f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _identity_from_claims(claims: dict[str, Any], settings: JWTSettings) -> Identity:
    """The claims checks of python-jose's jwt.decode at half its cost (tests/test_auth.py compares), and our own."""
    for name in ("exp", *{"nbf", "iat"} & claims.keys()):  # finite numbers: no bool, no int too large for a float
        if not (type(claims.get(name)) in (int, float) and abs(claims[name]) < 1e308):
            raise TokenRefused("invalid", f"{name} is missing or not a number")
    if claims["exp"] < (now := time.time()) - settings.leeway:
        raise TokenRefused("expired", "token expired")
    if max(claims.get("nbf", 0), claims.get("iat", 0)) > now + settings.leeway:
        raise TokenRefused("invalid", "nbf or iat is in the future")
    auds = [aud] if isinstance(aud := claims.get(settings.audience_claim), str) else aud
    if settings.audience and not (isinstance(auds, list) and settings.audience in auds and {*map(type, auds)} == {str}):
        raise TokenRefused("invalid", f"token's {settings.audience_claim} is not {settings.audience!r}")
    if settings.issuer is not None and claims.get("iss") != settings.issuer:
        raise TokenRefused("invalid", "token is from another issuer")
    if "at_hash" in claims or any(name in claims and not isinstance(claims[name], str) for name in ("sub", "jti")):
        raise TokenRefused("invalid", "sub or jti is not a string, or at_hash (which needs the access token) is set")
    if not is_valid_user_id(user_id := claims.get(settings.user_claim)):
        raise TokenRefused("invalid", f"claim {settings.user_claim!r} is not a valid user id")
    return Identity(user_id, float(claims["exp"]))


def mint_token(user_id: str, secret: str, ttl: float = 3600, algorithm: str = "HS256", **claims: Any) -> str:
    """Sign a token for `user_id` with an HMAC secret (for trying the gateway out and for tests)."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + int(ttl), **claims}, secret, algorithm=algorithm)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python auth.py", description=__doc__)
    command = parser.add_subparsers(dest="command", required=True).add_parser("token", help="print a signed token")
    command.add_argument("user_id")
    command.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    args = parser.parse_args(argv)
    if not (secret := os.environ.get("GATEWAY_JWT_SECRET")):
        sys.exit("gateway: signing needs GATEWAY_JWT_SECRET; with a JWKS URL, tokens come from your identity provider")
    try:
        settings = load_jwt_settings(Config(environ=os.environ, env_prefix="GATEWAY_"))
        if not is_valid_user_id(args.user_id):
            raise ValueError(f"{args.user_id!r} is not a valid user id")
    except ValueError as exc:
        sys.exit(f"gateway: {exc}")
    claims = {settings.audience_claim: settings.audience, "iss": settings.issuer, settings.user_claim: args.user_id}
    print(mint_token(args.user_id, secret, args.ttl, settings.algorithms[0], **{k: v for k, v in claims.items() if v}))


if __name__ == "__main__":
    main()
