"""The JWT check itself (auth.py), without a server: every kind of bad token, and properties over all inputs."""

from __future__ import annotations

import base64
import json
import sys
import time
import unicodedata
from typing import Any

import pytest
from conftest import SECRET, token
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jose import jwt
from starlette.config import Config

from auth import MAX_TOKEN_BYTES, Identity, TokenRefused, load_jwt_settings, verify_auth

HS = load_jwt_settings(Config(environ={"JWT_SECRET": SECRET}))
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE_PEM = RSA_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
RSA_PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
RS = load_jwt_settings(Config(environ={"JWT_PUBLIC_KEY": RSA_PUBLIC_PEM, "JWT_AUDIENCE": "gw"}))  # RS256 by default


def jwt_settings(**env: str):
    return load_jwt_settings(Config(environ={"JWT_SECRET": SECRET, **env}))


def signed(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def check(auth: Any, settings=HS) -> Identity:
    """verify_auth with a secret or a PEM key, which never waits: its coroutine must finish in its first step."""
    coroutine = verify_auth(auth, settings)
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    coroutine.close()
    raise AssertionError("verify_auth waited, with a static key")


def verify_token(token: Any, settings=HS) -> Identity:
    return check({"token": token}, settings)


def user_of(auth: Any, settings=HS) -> str | None:
    """The user id `auth` authenticates, or None when it is refused."""
    try:
        return check(auth, settings).user_id
    except TokenRefused:
        return None


def reason(token: Any, settings=HS) -> str:
    with pytest.raises(TokenRefused) as refused:
        verify_token(token, settings)
    return refused.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], algorithm: str = "none") -> str:
    header = b64(json.dumps({"alg": algorithm, "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


def now() -> int:
    return int(time.time())


def test_valid_token_gives_the_user_id_and_expiry():
    identity = verify_token(token("alice", ttl=60), HS)
    assert identity.user_id == "alice"
    assert now() + 55 <= identity.expires_at <= now() + 61


def test_expired_token_is_refused_as_expired():
    assert reason(signed({"sub": "alice", "exp": now() - 60})) == "expired"


def test_token_expired_within_leeway_is_accepted():
    assert verify_token(signed({"sub": "alice", "exp": now() - 5}), HS).user_id == "alice"
    assert reason(signed({"sub": "alice", "exp": now() - 5}), jwt_settings(JWT_LEEWAY="0")) == "expired"


def test_token_without_exp_is_refused():
    assert reason(signed({"sub": "alice"})) == "invalid"


def test_nbf_in_the_future_is_refused():
    assert reason(signed({"sub": "alice", "exp": now() + 600, "nbf": now() + 300})) == "invalid"
    assert verify_token(signed({"sub": "alice", "exp": now() + 600, "nbf": now() + 5}), HS).user_id == "alice"


def test_iat_in_the_future_is_refused():
    assert reason(signed({"sub": "alice", "exp": now() + 600, "iat": now() + 300})) == "invalid"
    assert reason(signed({"sub": "alice", "exp": now() + 600, "iat": [1]})) == "invalid"


@pytest.mark.parametrize("sub", [None, 42, "", ["alice"], {"id": 1}, "a" * 257, "bad\nid", "bad\x00id", "x\u2028y"])
def test_user_claim_that_is_not_a_valid_user_id_is_refused(sub):
    claims = {"exp": now() + 60} | ({} if sub is None else {"sub": sub})
    assert reason(signed(claims)) == "invalid"


def test_longest_user_id_and_unicode_are_accepted():
    assert verify_token(token("a" * 256), HS).user_id == "a" * 256
    assert verify_token(token("Zoë 👩‍💻"), HS).user_id == "Zoë 👩‍💻"


def test_custom_user_claim():
    settings = jwt_settings(JWT_USER_CLAIM="uid")
    assert verify_token(signed({"uid": "7", "sub": "other", "exp": now() + 60}), settings).user_id == "7"
    assert reason(signed({"sub": "7", "exp": now() + 60}), settings) == "invalid"


def test_audience_and_issuer_must_match_when_configured():
    settings = jwt_settings(JWT_AUDIENCE="gateway", JWT_ISSUER="https://login.example.com")
    good = {"sub": "a", "exp": now() + 60, "aud": "gateway", "iss": "https://login.example.com"}
    assert verify_token(signed(good), settings).user_id == "a"
    assert reason(signed(good | {"aud": "other"}), settings) == "invalid"
    assert reason(signed(good | {"iss": "https://evil.example.com"}), settings) == "invalid"
    assert reason(signed({k: v for k, v in good.items() if k != "aud"}), settings) == "invalid"
    assert reason(signed({k: v for k, v in good.items() if k != "iss"}), settings) == "invalid"


def test_audience_in_token_is_ignored_when_not_configured():
    assert verify_token(signed({"sub": "a", "exp": now() + 60, "aud": "anything"}), HS).user_id == "a"


def test_audience_claim_names_the_claim_that_carries_the_audience():
    # Amazon Cognito's access tokens carry the app client in client_id and have no aud; its ID tokens have aud.
    settings = jwt_settings(JWT_AUDIENCE="app-client", JWT_AUDIENCE_CLAIM="client_id")
    access = {"sub": "u1", "exp": now() + 60, "client_id": "app-client", "token_use": "access"}
    assert verify_token(signed(access), settings).user_id == "u1"
    assert reason(signed(access | {"client_id": "another-client"}), settings) == "invalid"
    assert reason(signed({"sub": "u1", "exp": now() + 60, "aud": "app-client"}), settings) == "invalid"


def test_the_refusal_says_which_check_failed():
    with pytest.raises(TokenRefused) as refused:
        verify_token(signed({"sub": "a", "exp": now() + 60, "aud": "other"}), jwt_settings(JWT_AUDIENCE="gw"))
    assert refused.value.detail == "token's aud is not 'gw'"


@pytest.mark.parametrize(
    "header", [{"crit": ["exp"]}, {"b64": False, "crit": ["b64"]}, {"crit": []}, {"crit": "b64"}, {"crit": None}]
)
def test_a_correctly_signed_token_whose_header_has_crit_is_refused(header):
    # RFC 7515 4.1.11: a recipient must refuse a token naming an extension it does not understand; it knows none.
    claims = {"sub": "alice", "exp": now() + 60}
    assert verify_token(jwt.encode(claims, SECRET, headers={"kid": "any", "typ": "JWT"})).user_id == "alice"
    assert reason(jwt.encode(claims, SECRET, headers=header)) == "invalid"
    assert reason(jwt.encode(claims | {"aud": "gw"}, RSA_PRIVATE_PEM, "RS256", headers=header), RS) == "invalid"


def test_token_signed_with_another_secret_is_refused():
    assert reason(token("alice", secret="another-secret-" + "y" * 40)) == "invalid"


def test_alg_none_is_refused():
    assert reason(unsigned({"sub": "alice", "exp": now() + 60})) == "invalid"
    assert reason(unsigned({"sub": "alice", "exp": now() + 60}, algorithm="None")) == "invalid"


def test_disallowed_hmac_algorithm_is_refused():
    assert reason(signed({"sub": "alice", "exp": now() + 60}, algorithm="HS512")) == "invalid"
    assert verify_token(signed({"sub": "a", "exp": now() + 60}, algorithm="HS512"), jwt_settings(JWT_ALGORITHMS="HS512"))


def test_rs256_token_is_accepted_with_the_public_key_for_its_audience_only():
    claims = {"sub": "r", "exp": now() + 60}
    assert verify_token(signed(claims | {"aud": "gw"}, RSA_PRIVATE_PEM, "RS256"), RS).user_id == "r"
    assert reason(signed(claims | {"aud": "other"}, RSA_PRIVATE_PEM, "RS256"), RS) == "invalid"
    assert reason(signed(claims, RSA_PRIVATE_PEM, "RS256"), RS) == "invalid"


def test_hs256_signed_with_the_rsa_public_key_is_refused_when_rs256_is_configured():
    # The classic key-confusion attack: HMAC over the token with the public key text as the secret.
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "mallory", "exp": now() + 60}).encode())
    mac = hmac.new(RSA_PUBLIC_PEM.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert reason(f"{header}.{payload}.{b64(mac)}", RS) == "invalid"


def test_es256_public_key_setup():
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = load_jwt_settings(Config(environ={"JWT_PUBLIC_KEY": public.decode(), "JWT_AUDIENCE": "gw"}))
    assert settings.algorithms == ("ES256",)  # the default for an EC key
    claims = {"sub": "e", "exp": now() + 60, "aud": "gw"}
    assert verify_token(signed(claims, private.decode(), "ES256"), settings).user_id == "e"
    assert reason(signed(claims, RSA_PRIVATE_PEM, "RS256"), settings) == "invalid"


def test_public_key_can_be_a_file_path(tmp_path):
    path = tmp_path / "key.pem"
    path.write_text(RSA_PUBLIC_PEM)
    environ = {"JWT_PUBLIC_KEY": str(path), "JWT_ALGORITHMS": "RS256,RS512", "JWT_AUDIENCE": "*"}
    settings = load_jwt_settings(Config(environ=environ))  # "*": tokens for any audience, or none
    assert verify_token(signed({"sub": "p", "exp": now() + 60}, RSA_PRIVATE_PEM, "RS512"), settings).user_id == "p"


def test_token_of_100_kb_is_refused_before_decoding():
    huge = token("alice") + "A" * 100_000
    assert reason(huge) == "invalid"
    assert reason("a." + "b" * MAX_TOKEN_BYTES + ".c") == "invalid"


@pytest.mark.parametrize("value", [123, ["a.b.c"], {"token": "x"}, b"a.b.c", 1.5, True])
def test_token_of_another_type_is_refused(value):
    assert reason(value) == "invalid"


@pytest.mark.parametrize("value", ["", "abc", "a.b", "a.b.c.d", "...", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30."])
def test_malformed_token_is_refused(value):
    assert reason(value) == "invalid"


def test_missing_token_is_refused_as_missing():
    assert reason(None) == "missing"
    with pytest.raises(TokenRefused) as refused:
        check({}, HS)
    assert refused.value.reason == "missing"


@pytest.mark.parametrize("auth", ["a.b.c", ["token"], 42])
def test_auth_payload_that_is_not_an_object_is_refused(auth):
    with pytest.raises(TokenRefused) as refused:
        check(auth, HS)
    assert refused.value.reason == "invalid"


def test_a_token_gives_its_user_and_anything_else_is_refused():
    assert user_of({"token": token("bob")}) == "bob"
    assert user_of({"token": "nope"}) is None
    assert user_of(None) is None


# ---- properties over all inputs ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
anything = json_values | st.binary() | st.tuples(st.integers(), st.text()) | st.builds(object)


@settings(max_examples=300)
@given(auth=anything)
def test_verify_auth_raises_only_token_refused_on_any_auth_payload(auth):
    assert user_of(auth) is None or isinstance(user_of(auth), str)


@settings(max_examples=300)
@given(token_text=st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*"))
def test_verify_auth_refuses_any_token_string(token_text):
    assert user_of({"token": token_text}) is None


claim_sets = st.dictionaries(
    st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss", "jti", "x"]), json_values, max_size=6
)


@settings(max_examples=300)
@given(claims=claim_sets)
def test_signed_claims_give_the_claimed_user_or_nothing(claims):
    result = user_of({"token": signed(claims)})
    assert result is None or result == claims["sub"]
    if result is not None:  # then every rule held
        assert isinstance(claims["exp"], (int, float)) and claims["exp"] >= now() - HS.leeway - 1


def jose_decode(token: str, settings) -> dict[str, Any] | None:
    """python-jose's own jwt.decode, with the options the gateway used before it checked the claims itself."""
    options = {"require_exp": True, "require_aud": settings.audience is not None, "leeway": settings.leeway}
    options |= {"require_iss": settings.issuer is not None, "verify_aud": settings.audience is not None}
    try:
        return jwt.decode(token, SECRET, ["HS256"], options, settings.audience, settings.issuer)
    except Exception:
        return None


VALID = {"sub": "alice", "exp": now() + 600}
REGISTERED_CLAIMS = ["sub", "exp", "nbf", "iat", "aud", "iss", "jti"]
near_now = st.integers(min_value=-100, max_value=100).map(lambda seconds: now() + seconds)
claim_values = st.sampled_from(["gw", "https://login", ["gw"], ["gw", 1], ["other"], 1.5]) | near_now | json_values


@settings(max_examples=1000)
@given(
    claims=st.dictionaries(st.sampled_from([*REGISTERED_CLAIMS, "at_hash", "uid", "x"]), claim_values, max_size=3),
    base=st.sampled_from([{}, VALID, {"uid": "bob", "exp": now() + 600}]),
    env=st.sampled_from([{}, {"JWT_AUDIENCE": "gw"}, {"JWT_ISSUER": "https://login"}, {"JWT_USER_CLAIM": "uid"}]),
)
@example(claims={"aud": ["gw", 1]}, base=VALID, env={"JWT_AUDIENCE": "gw"})
@example(claims={"iss": "https://evil"}, base=VALID, env={"JWT_ISSUER": "https://login"})
@example(claims={"nbf": now() + 60}, base=VALID, env={})
@example(claims={"at_hash": "x"}, base=VALID, env={})
@example(claims={"jti": 1}, base=VALID, env={})
def test_no_claims_pass_that_python_joses_jwt_decode_refuses(claims, base, env):
    settings = jwt_settings(**env)
    token = signed(base | claims)
    jose = jose_decode(token, settings)
    ours = user_of({"token": token}, settings)
    if ours is not None:
        assert jose is not None and ours == jose[settings.user_claim]


def test_the_user_id_character_rule_is_exactly_unicodes_control_surrogate_and_separator_categories():
    from auth import FORBIDDEN_IN_USER_ID

    forbidden = {"Cc", "Cs", "Zl", "Zp"}
    for code in range(sys.maxunicode + 1):
        c = chr(code)
        assert (FORBIDDEN_IN_USER_ID.search(c) is not None) == (unicodedata.category(c) in forbidden), hex(code)


@settings(max_examples=200)
@given(user_id=st.text(min_size=1, max_size=256), ttl=st.integers(min_value=60, max_value=10**6))
def test_any_valid_user_id_round_trips(user_id, ttl):
    from auth import is_valid_user_id

    expected = user_id if is_valid_user_id(user_id) else None
    assert user_of({"token": token(user_id, ttl=ttl)}) == expected


@settings(max_examples=100)
@given(
    claims=claim_sets,
    algorithm=st.sampled_from(["none", "None", "NONE", "HS256", "HS384", "HS512", "RS256"]),
    forged_with=st.sampled_from(["wrong-secret", "public-key", "none"]),
)
def test_any_forged_token_is_refused(claims, algorithm, forged_with):
    claims = {"sub": "victim", "exp": now() + 600, **claims}
    if forged_with == "none":
        forged = unsigned(claims, algorithm)
    elif forged_with == "public-key":
        forged = unsigned(claims, "HS256")[:-1] + b64(b"\x00" * 32)
    else:
        forged = signed(claims, "wrong-secret-" + "z" * 40, algorithm if algorithm.startswith("HS") else "HS256")
    assert user_of({"token": forged}, HS) is None
    assert user_of({"token": forged}, RS) is None
