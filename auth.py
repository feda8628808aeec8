"""JWT checks for the gateway: the settings they need, the check itself, and a token minting tool."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jws, jwt
from jose.backends.base import Key
from starlette.config import Config

logger = logging.getLogger("gateway.auth")

MAX_TOKEN_BYTES = 8 * 1024
MAX_USER_ID_LENGTH = 256
MIN_SECRET_BYTES = 32
MAX_LEEWAY_SECONDS = 300
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512")  # python-jose has no PS*
EC_ALGORITHMS = ("ES256", "ES384", "ES512")


@dataclass(frozen=True)
class JWTSettings:
    """How tokens are checked; built once at start-up by `load_jwt_settings`."""

    keys: dict[str, Key]  # algorithm -> verification key, one entry per allowed algorithm
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 10
    user_claim: str = "sub"
    secret: str | None = None  # kept only so that `python auth.py token` can mint for HMAC setups

    def __repr__(self) -> str:  # never print key material
        return f"JWTSettings(algorithms={list(self.keys)}, audience={self.audience!r}, issuer={self.issuer!r})"


class TokenRefused(Exception):
    """A token that must not open a connection; `reason` is "missing", "invalid" or "expired"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: float  # unix seconds, from the token's exp


def load_jwt_settings(config: Config) -> JWTSettings:
    """Read and validate the GATEWAY_JWT_* variables; raise ValueError naming the bad one."""
    secret = config("JWT_SECRET", default=None) or None
    public_key = config("JWT_PUBLIC_KEY", default=None) or None
    if (secret is None) == (public_key is None):
        raise ValueError(
            "set exactly one of GATEWAY_JWT_SECRET (HMAC) or GATEWAY_JWT_PUBLIC_KEY (RSA/EC public key, PEM or path)"
        )
    algorithms = [a.strip() for a in config("JWT_ALGORITHMS", default="HS256").split(",") if a.strip()]
    if not algorithms:
        raise ValueError("GATEWAY_JWT_ALGORITHMS is empty")
    if secret is not None:
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"GATEWAY_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        family = HMAC_ALGORITHMS
        key_material = secret
    else:
        key_material = _read_public_key(public_key)
        family = _public_key_family(key_material)
    variable = "GATEWAY_JWT_SECRET" if secret is not None else "GATEWAY_JWT_PUBLIC_KEY"
    for algorithm in algorithms:
        if algorithm not in family:
            raise ValueError(
                f"GATEWAY_JWT_ALGORITHMS: {algorithm!r} is not allowed with {variable}; "
                f"use only {', '.join(family)} (one family, never 'none')"
            )
    keys = {algorithm: jwk.construct(key_material, algorithm) for algorithm in algorithms}
    leeway = config("JWT_LEEWAY", cast=float, default=10)
    if not (math.isfinite(leeway) and 0 <= leeway <= MAX_LEEWAY_SECONDS):
        raise ValueError(f"GATEWAY_JWT_LEEWAY must be between 0 and {MAX_LEEWAY_SECONDS} seconds, got {leeway}")
    user_claim = config("JWT_USER_CLAIM", default="sub").strip()
    if not user_claim:
        raise ValueError("GATEWAY_JWT_USER_CLAIM is empty")
    return JWTSettings(
        keys=keys,
        audience=config("JWT_AUDIENCE", default=None) or None,
        issuer=config("JWT_ISSUER", default=None) or None,
        leeway=leeway,
        user_claim=user_claim,
        secret=secret,
    )


def _public_key_family(pem: str) -> tuple[str, ...]:
    """The algorithms a PEM public key can verify; a private key, or anything else, is refused."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except Exception:
        raise ValueError("GATEWAY_JWT_PUBLIC_KEY is not a PEM public key (a private key is refused too)") from None
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGORITHMS
    raise ValueError(f"GATEWAY_JWT_PUBLIC_KEY is a {type(key).__name__}; only RSA and EC keys are supported")


def _read_public_key(value: str) -> str:
    if "-----BEGIN" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError("GATEWAY_JWT_PUBLIC_KEY is neither PEM text nor the path of a readable file")
    return path.read_text()


# Every character of Unicode categories Cc (controls), Cs (surrogates), Zl and Zp (line and paragraph separators):
# one regex search instead of a category lookup per character (tests/test_auth.py checks every code point).
FORBIDDEN_IN_USER_ID = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


def is_valid_user_id(user_id: Any) -> bool:
    """A user id is a non-empty string of at most 256 characters with no control characters."""
    return (
        isinstance(user_id, str)
        and 0 < len(user_id) <= MAX_USER_ID_LENGTH
        and FORBIDDEN_IN_USER_ID.search(user_id) is None
    )


def verify_token(token: Any, settings: JWTSettings) -> Identity:
    """Check one token; return who it belongs to or raise `TokenRefused`. Never raises anything else."""
    if token is None:
        raise TokenRefused("missing", "no token")
    if not isinstance(token, str):
        raise TokenRefused("invalid", f"token is a {type(token).__name__}, not a string")
    if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "replace")) > MAX_TOKEN_BYTES:
        raise TokenRefused("invalid", f"token longer than {MAX_TOKEN_BYTES} bytes")
    if token.count(".") != 2:
        raise TokenRefused("invalid", "token is not three dot-separated segments")
    try:
        # With one algorithm allowed, jws.verify refuses any other itself; with several, the header picks the key.
        algorithm = next(iter(settings.keys)) if len(settings.keys) == 1 else jwt.get_unverified_header(token).get("alg")
        if algorithm not in settings.keys:
            raise TokenRefused("invalid", f"algorithm {str(algorithm)[:20]!r} is not allowed")
        claims = json.loads(jws.verify(token, settings.keys[algorithm], algorithms=[algorithm]))
    except TokenRefused:
        raise
    except Exception as exc:  # python-jose raises non-JOSE errors on odd input too
        raise TokenRefused("invalid", f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(claims, dict):
        raise TokenRefused("invalid", "the claims are not a JSON object")
    return _identity_from_claims(claims, settings)


def _identity_from_claims(claims: dict[str, Any], settings: JWTSettings) -> Identity:
    """Check the registered claims as python-jose's jwt.decode would, and the gateway's own rules.

    python-jose checks the signature (`jws.verify`); its jwt.decode would then spend twice that time on these
    few comparisons. tests/test_auth.py checks that no claims pass here that jwt.decode refuses.
    """
    now = time.time()
    exp = claims.get("exp")
    if not _is_number(exp):
        raise TokenRefused("invalid", "exp is missing or not a number")
    if exp < now - settings.leeway:
        raise TokenRefused("expired", "token expired")
    for name in ("nbf", "iat"):
        if name in claims and not _is_number(claims[name]):
            raise TokenRefused("invalid", f"{name} is not a number")
        if claims.get(name, 0) > now + settings.leeway:
            raise TokenRefused("invalid", f"{name} is in the future")
    if settings.audience is not None:
        audiences = [claims["aud"]] if isinstance(claims.get("aud"), str) else claims.get("aud")
        if not isinstance(audiences, list) or settings.audience not in audiences or not all(
            isinstance(audience, str) for audience in audiences
        ):
            raise TokenRefused("invalid", "token is not for this audience")
    if settings.issuer is not None and claims.get("iss") != settings.issuer:
        raise TokenRefused("invalid", "token is from another issuer")
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise TokenRefused("invalid", f"{name} is not a string")
    if "at_hash" in claims:  # python-jose refuses it without the access token, which a connection does not carry
        raise TokenRefused("invalid", "at_hash cannot be checked")
    user_id = claims.get(settings.user_claim)
    if not is_valid_user_id(user_id):
        raise TokenRefused("invalid", f"claim {settings.user_claim!r} is not a valid user id")
    return Identity(user_id=user_id, expires_at=float(exp))


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def verify_auth(auth: Any, settings: JWTSettings) -> Identity:
    """Check the `auth` payload of a Socket.IO CONNECT packet (expected: {"token": "<JWT>"})."""
    if auth is None:
        raise TokenRefused("missing", "no auth payload")
    if not isinstance(auth, dict):
        raise TokenRefused("invalid", f"auth is a {type(auth).__name__}, not an object")
    return verify_token(auth.get("token"), settings)


def authenticate(auth: Any, settings: JWTSettings | None = None) -> dict[str, str] | None:
    """Return {"user_id": ...} for a valid `auth` payload, None for anything else."""
    try:
        return {"user_id": verify_auth(auth, settings or jwt_settings_from_env()).user_id}
    except TokenRefused:
        return None


def jwt_settings_from_env() -> JWTSettings:
    return load_jwt_settings(Config(environ=os.environ, env_prefix="GATEWAY_"))


def mint_token(user_id: str, secret: str, ttl: float = 3600, algorithm: str = "HS256", **claims: Any) -> str:
    """Sign a token for `user_id` with an HMAC secret (for trying the gateway out and for tests)."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + int(ttl), **claims}, secret, algorithm=algorithm)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python auth.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="print a token for USER_ID signed with GATEWAY_JWT_SECRET")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    args = parser.parse_args(argv)
    try:
        settings = jwt_settings_from_env()
    except ValueError as exc:
        sys.exit(f"gateway: {exc}")
    if settings.secret is None:
        sys.exit("gateway: minting needs GATEWAY_JWT_SECRET; with a public key, tokens come from your issuer")
    if not is_valid_user_id(args.user_id):
        sys.exit(f"gateway: {args.user_id!r} is not a valid user id")
    extra = {k: v for k, v in (("aud", settings.audience), ("iss", settings.issuer)) if v}
    if settings.user_claim != "sub":
        extra[settings.user_claim] = args.user_id
    print(mint_token(args.user_id, settings.secret, args.ttl, next(iter(settings.keys)), **extra))


if __name__ == "__main__":
    main()
