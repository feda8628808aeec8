"""Start-up validation: each bad GATEWAY_* value stops the start with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, SECRET
from test_auth import RSA_PRIVATE_PEM, RSA_PUBLIC_PEM

from gateway import Settings


JWKS = "https://login.example.com/.well-known/jwks.json"


def settings_error(**env: str) -> str:
    with pytest.raises(ValueError) as error:
        Settings({f"GATEWAY_{k}": v for k, v in env.items()})
    return str(error.value)


@pytest.mark.parametrize(
    "env, names",
    [
        ({}, "GATEWAY_JWT_SECRET"),
        ({"JWT_SECRET": SECRET, "JWT_PUBLIC_KEY": RSA_PUBLIC_PEM}, "exactly one"),
        ({"JWT_SECRET": "too-short"}, "GATEWAY_JWT_SECRET must be at least 32 bytes"),
        ({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": "none"}, "GATEWAY_JWT_ALGORITHMS: 'none'"),
        ({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": "HS256,RS256"}, "GATEWAY_JWT_ALGORITHMS: 'RS256'"),
        ({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": " , "}, "GATEWAY_JWT_ALGORITHMS: ''"),
        ({"JWT_PUBLIC_KEY": RSA_PUBLIC_PEM, "JWT_ALGORITHMS": "HS256"}, "GATEWAY_JWT_ALGORITHMS: 'HS256'"),
        ({"JWT_PUBLIC_KEY": RSA_PUBLIC_PEM, "JWT_ALGORITHMS": "RS256,ES256"}, "GATEWAY_JWT_ALGORITHMS: 'ES256'"),
        ({"JWT_PUBLIC_KEY": RSA_PUBLIC_PEM, "JWT_ALGORITHMS": "ES256"}, "GATEWAY_JWT_ALGORITHMS: 'ES256'"),
        ({"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnonsense\n", "JWT_ALGORITHMS": "RS256"}, "neither a PEM public"),
        ({"JWT_PUBLIC_KEY": RSA_PRIVATE_PEM, "JWT_ALGORITHMS": "RS256"}, "a private key is refused"),
        ({"JWT_PUBLIC_KEY": "/no/such/file.pem", "JWT_ALGORITHMS": "RS256"}, "GATEWAY_JWT_PUBLIC_KEY is neither"),
        ({"JWT_JWKS_URL": JWKS, "JWT_SECRET": SECRET}, "exactly one"),
        ({"JWT_JWKS_URL": JWKS, "JWT_PUBLIC_KEY": RSA_PUBLIC_PEM}, "exactly one"),
        ({"JWT_JWKS_URL": JWKS, "JWT_ALGORITHMS": "HS256"}, "GATEWAY_JWT_ALGORITHMS: 'HS256'"),
        ({"JWT_JWKS_URL": JWKS, "JWT_ALGORITHMS": "RS256,HS512", "JWT_AUDIENCE": "gw"}, "GATEWAY_JWT_ALGORITHMS: 'HS512'"),
        ({"JWT_JWKS_URL": JWKS, "JWT_ALGORITHMS": "none", "JWT_AUDIENCE": "gw"}, "GATEWAY_JWT_ALGORITHMS: 'none'"),
        ({"JWT_JWKS_URL": "ftp://login.example.com/jwks", "JWT_AUDIENCE": "gw"}, "GATEWAY_JWT_JWKS_URL must be"),
        ({"JWT_JWKS_URL": "file:///etc/passwd", "JWT_AUDIENCE": "gw"}, "GATEWAY_JWT_JWKS_URL must be"),
        ({"JWT_JWKS_URL": "login.example.com/jwks", "JWT_AUDIENCE": "gw"}, "GATEWAY_JWT_JWKS_URL must be"),
        ({"JWT_JWKS_URL": JWKS}, "GATEWAY_JWT_AUDIENCE is required"),
        ({"JWT_PUBLIC_KEY": RSA_PUBLIC_PEM}, "GATEWAY_JWT_AUDIENCE is required"),
        ({"JWT_PUBLIC_KEY": RSA_PUBLIC_PEM, "JWT_ALGORITHMS": "RS256"}, "GATEWAY_JWT_AUDIENCE is required"),
        ({"JWT_SECRET": SECRET, "JWT_LEEWAY": "soon"}, "GATEWAY_JWT_LEEWAY"),
        ({"JWT_SECRET": SECRET, "JWT_LEEWAY": "-1"}, "GATEWAY_JWT_LEEWAY"),
        ({"JWT_SECRET": SECRET, "JWT_LEEWAY": "nan"}, "GATEWAY_JWT_LEEWAY"),
        ({"JWT_SECRET": SECRET, "JWT_LEEWAY": "86400"}, "GATEWAY_JWT_LEEWAY"),
        ({"JWT_SECRET": SECRET, "JWT_USER_CLAIM": " "}, "GATEWAY_JWT_USER_CLAIM"),
        ({"JWT_SECRET": SECRET, "CORS_ORIGINS": "example.com"}, "GATEWAY_CORS_ORIGINS: 'example.com'"),
        ({"JWT_SECRET": SECRET, "CORS_ORIGINS": "https://a.example/path"}, "GATEWAY_CORS_ORIGINS"),
        ({"JWT_SECRET": SECRET, "MAX_MESSAGE_BYTES": "big"}, "GATEWAY_MAX_MESSAGE_BYTES"),
        ({"JWT_SECRET": SECRET, "MAX_MESSAGE_BYTES": "100"}, "GATEWAY_MAX_MESSAGE_BYTES"),
        ({"JWT_SECRET": SECRET, "MAX_CONNECTIONS_PER_USER": "0"}, "GATEWAY_MAX_CONNECTIONS_PER_USER must be between"),
        ({"JWT_SECRET": SECRET, "PING_INTERVAL": "often"}, "GATEWAY_PING_INTERVAL"),
        ({"JWT_SECRET": SECRET, "MAX_QUEUED_MESSAGES": "5"}, "GATEWAY_MAX_QUEUED_MESSAGES must be between"),
        ({"JWT_SECRET": SECRET, "PING_TIMEOUT": "0"}, "GATEWAY_PING_TIMEOUT must be between"),
        ({"JWT_SECRET": SECRET, "PUBLISH_KEY": "k" * 31}, "GATEWAY_PUBLISH_KEY must be at least 32"),
        ({"JWT_SECRET": SECRET, "PUBLISH_KEY": "clé-" * 10}, "GATEWAY_PUBLISH_KEY must be at least 32 ASCII"),
        ({"JWT_SECRET": SECRET, "PUBLISH_MAX_BYTES": "10"}, "GATEWAY_PUBLISH_MAX_BYTES must be between"),
        ({"JWT_SECRET": SECRET, "REDIS_URL": "http://localhost:6379"}, "GATEWAY_REDIS_URL must start with redis://"),
        ({"JWT_SECRET": SECRET, "REDIS_URL": "localhost:6379"}, "GATEWAY_REDIS_URL must start with redis://"),
        ({"JWT_SECRET": SECRET, "TRANSPORTS": "websocket,carrier-pigeon"}, "GATEWAY_TRANSPORTS"),
        ({"JWT_SECRET": SECRET, "TRANSPORTS": ","}, "GATEWAY_TRANSPORTS"),
    ],
)
def test_bad_setting_is_refused_with_a_message_naming_it(env, names):
    assert names in settings_error(**env)


def test_a_missing_audience_says_how_to_opt_out():
    error = settings_error(JWT_JWKS_URL=JWKS)
    assert "GATEWAY_JWT_AUDIENCE_CLAIM" in error and "or * to accept any audience" in error


def test_jwks_settings_default_to_rs256_and_accept_the_audience_opt_outs():
    settings = Settings({"GATEWAY_JWT_JWKS_URL": JWKS, "GATEWAY_JWT_AUDIENCE": "*"}).jwt
    assert settings.algorithms == ("RS256",) and settings.audience is None and settings.jwks.url == JWKS
    environ = {"JWT_JWKS_URL": JWKS, "JWT_AUDIENCE": "app-client", "JWT_AUDIENCE_CLAIM": "client_id"}
    settings = Settings({f"GATEWAY_{k}": v for k, v in environ.items()} | {"GATEWAY_JWT_ALGORITHMS": "RS256,ES256"}).jwt
    assert (settings.algorithms, settings.audience, settings.audience_claim) == (("RS256", "ES256"), "app-client", "client_id")


def test_secret_never_appears_in_errors_or_repr():
    settings = Settings({"GATEWAY_JWT_SECRET": SECRET})
    assert SECRET not in repr(settings)
    assert SECRET not in settings_error(JWT_SECRET=SECRET, JWT_ALGORITHMS="RS256")


def test_redis_password_never_appears_in_errors_or_repr():
    password = "s3cret-redis-password"
    assert password not in settings_error(JWT_SECRET=SECRET, REDIS_URL=f"http://user:{password}@host")
    settings = Settings({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_REDIS_URL": f"rediss://:{password}@host:6380/0"})
    assert settings.redis_url.startswith("rediss://") and password not in repr(settings)
    assert settings.redis_channel == "socket-gateway"


def test_cors_origins_are_parsed():
    assert Settings({"GATEWAY_JWT_SECRET": SECRET}).cors_origins is None
    assert Settings({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_CORS_ORIGINS": "*"}).cors_origins == "*"
    parsed = Settings({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_CORS_ORIGINS": "https://a.example, http://b:8080/"})
    assert parsed.cors_origins == ["https://a.example", "http://b:8080"]


def start_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "uvicorn", "asgi:app", "--port", "0"],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "env, line",
    [
        ({}, "gateway: bad configuration: set exactly one of GATEWAY_JWT_SECRET"),
        ({"GATEWAY_JWT_SECRET": "short"}, "gateway: bad configuration: GATEWAY_JWT_SECRET must be at least 32 bytes"),
    ],
)
def test_uvicorn_refuses_to_start_with_one_clear_line(env, line):
    result = start_with(env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(line)


def test_mint_token_command_prints_a_token_the_gateway_accepts():
    from test_auth import user_of

    from auth import load_jwt_settings
    from starlette.config import Config

    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "auth.py", "token", "alice", "--ttl", "60"],
        cwd=ROOT,
        env=clean | {"GATEWAY_JWT_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert user_of({"token": result.stdout.strip()}, load_jwt_settings(Config(environ={"JWT_SECRET": SECRET}))) == "alice"


@pytest.mark.parametrize(
    "env", [{}, {"GATEWAY_JWT_JWKS_URL": JWKS, "GATEWAY_JWT_AUDIENCE": "gw"}, {"GATEWAY_JWT_PUBLIC_KEY": RSA_PUBLIC_PEM}]
)
def test_mint_token_command_without_a_secret_says_tokens_come_from_the_provider(env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "auth.py", "token", "alice"], cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "gateway: signing needs GATEWAY_JWT_SECRET; with a JWKS URL, tokens come from your identity provider"
    )


def test_a_process_that_configured_logging_keeps_its_configuration():
    """The README says the gateway leaves a host application's logging alone: its levels and handlers too."""
    script = (
        "import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)\n"
        "logging.getLogger('engineio').setLevel(logging.INFO); logging.getLogger('socketio').setLevel(logging.DEBUG)\n"
        "import gateway\n"
        "print(logging.getLogger('engineio').level, logging.getLogger('socketio').level, logging.getLogger().level,"
        " len(logging.getLogger().handlers))"
    )
    env = {"GATEWAY_JWT_SECRET": SECRET, "PATH": os.environ["PATH"]}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split()[-4:] == ["20", "10", "10", "1"]
