"""The verified-token cache: bounded, never trusted past exp, dropped when the key goes."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from jwks_server import SigningKey, claims

from gateway import config as config_module
from gateway.clock import ManualClock
from gateway.reasons import Reason, Refusal
from gateway.store.base import KeyHasher
from gateway.tokens.extract import check_token68
from gateway.tokens.keys import KeyRing
from gateway.tokens.verify import Verifier, claim_at, granted_scopes, identity_headers, token_id

ISSUER = "https://issuer.test/"


async def make_verifier(
    key_file: Path, clock: ManualClock, cache_size: int, algorithms: tuple[str, ...] = ("RS256",)
) -> Verifier:
    config = config_module.from_data(
        {
            "providers": [
                {
                    "name": "main",
                    "issuer": ISSUER,
                    "audiences": ["api"],
                    "algorithms": list(algorithms),
                    "public_key_file": str(key_file),
                }
            ],
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1"}],
        },
        environ={},
    )
    ring = KeyRing(config.providers[0], None, {}, clock=clock)
    await ring.start()
    return Verifier(config, {"main": ring}, KeyHasher(b"k"), clock, cache_size=cache_size)


async def test_cache_never_holds_more_than_its_size(
    key_file: Path, signing_key: SigningKey, clock: ManualClock
):
    verifier = await make_verifier(key_file, clock, cache_size=3)
    tokens = [signing_key.sign(claims(ISSUER, "api", now=clock.now())) for _ in range(10)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier._cache) == 3
    assert set(verifier._cache) == set(tokens[-3:])  # the oldest went first


async def test_a_cached_token_is_refused_and_forgotten_once_expired(
    key_file: Path, signing_key: SigningKey, clock: ManualClock
):
    verifier = await make_verifier(key_file, clock, cache_size=10)
    token = signing_key.sign(claims(ISSUER, "api", ttl=60, now=clock.now()))
    await verifier.verify(token)
    clock.advance(60 + 30)  # exp + leeway
    with pytest.raises(Refusal) as refused:
        await verifier.verify(token)
    assert refused.value.reason is Reason.EXPIRED
    assert token not in verifier._cache


@pytest.mark.parametrize("junk", ["!", " ", "%2e", "\u00e9"])
async def test_only_token68_strings_can_verify_so_a_cache_hit_needs_no_syntax_check(
    key_file: Path, signing_key: SigningKey, clock: ManualClock, junk: str
):
    """The pipeline checks the token68 syntax on a cache miss only (`extract.check_token68`):
    sound because whatever verifies, and so whatever the cache holds, is token68."""
    verifier = await make_verifier(key_file, clock, cache_size=10)
    token = signing_key.sign(claims(ISSUER, "api", now=clock.now()))
    await verifier.verify(token)
    assert check_token68(token) == token
    header, payload, signature = token.split(".")
    for bent in (f"{header}{junk}.{payload}.{signature}", f"{header}.{payload}.{signature}{junk}"):
        with pytest.raises(Refusal):
            check_token68(bent)
        with pytest.raises(Refusal) as refused:
            await verifier.verify(bent)
        assert refused.value.reason is Reason.MALFORMED_TOKEN
        assert bent not in verifier._cache


# -- claim shapes of real IdPs (pure helpers) ---------------------------------------------


def test_claim_at_prefers_the_exact_name_then_walks_the_dotted_path():
    claims = {
        "https://orders.example.com/roles": ["admin"],
        "realm_access": {"roles": ["a", "b"]},
        "resource_access": {"orders-api": {"roles": ["c"]}},
    }
    assert claim_at(claims, "https://orders.example.com/roles") == ["admin"]
    assert claim_at(claims, "realm_access.roles") == ["a", "b"]
    assert claim_at(claims, "resource_access.orders-api.roles") == ["c"]
    assert claim_at(claims, "realm_access.missing") is None
    assert claim_at(claims, "realm_access.roles.0") is None  # no indexing into lists


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scp": "Orders.Read Orders.Write"}, {"Orders.Read", "Orders.Write"}),  # Entra
        ({"scp": ["openid", "orders.read"]}, {"openid", "orders.read"}),  # Okta
        (
            {"scope": "read:orders", "permissions": ["write:orders"]},
            {"read:orders", "write:orders"},
        ),
        ({"scope": ["a", 5, None]}, {"a"}),  # only strings count
        ({"scope": {"a": 1}, "permissions": "x y"}, {"x", "y"}),
    ],
)
def test_scopes_come_from_scope_scp_and_permissions_in_either_shape(
    claims: dict[str, object], scopes: set[str]
):
    assert granted_scopes(claims) == frozenset(scopes)


def test_identity_headers_follow_dotted_paths_and_skip_what_is_no_text():
    claims = {
        "sub": "alice",
        "realm_access": {"roles": ["a", "b"]},
        "tid": "tenant-1",
        "groups": [{"id": 1}],
        "evil": "x\r\nX-Injected: 1",
    }
    wanted = {
        "X-Roles": "realm_access.roles",
        "X-Tenant": "tid",
        "X-Groups": "groups",
        "X-Evil": "evil",
        "X-Absent": "realm_access.nothing",
    }
    assert identity_headers(claims, wanted) == {"X-Roles": "a b", "X-Tenant": "tenant-1"}


@pytest.mark.parametrize("value", ["a\x85X-Admin: 1", "x\u2028y", "x\u2029y", "x\x9fy", "t\x0bb"])
def test_a_claim_holding_a_line_break_of_any_kind_is_no_identity_header(value: str):
    """C1 controls (NEL) and Unicode line separators break lines for an upstream that decodes
    header values as Latin-1 or splits them with `str.splitlines()`."""
    assert value.splitlines() != [value] or "\x9f" in value
    assert identity_headers({"sub": value}, {"X-Auth-Subject": "sub"}) == {}
    assert identity_headers({"sub": "caf\u00e9 \u00fcber"}, {"X-Auth-Subject": "sub"}) == {
        "X-Auth-Subject": "caf\u00e9 \u00fcber"
    }


@pytest.mark.parametrize("value", [" admin ", "admin ", " admin", ["", "admin"]])
def test_a_claim_the_upstream_would_read_without_its_spaces_is_no_identity_header(value: object):
    """HTTP parsers take a field value's leading and trailing spaces off: `" admin "` would
    reach the upstream as `admin`, an identity the gateway neither decided on nor revokes."""
    wanted = {"X-Auth-Subject": "sub", "X-Groups": "groups"}
    assert identity_headers({"sub": value, "groups": value}, wanted) == {}
    inner = identity_headers({"sub": "ad min", "groups": ["a", "b"]}, wanted)
    assert inner == {"X-Auth-Subject": "ad min", "X-Groups": "a b"}


def test_token_id_tries_claims_in_order_and_digest_is_keyed_per_signature():
    hasher = KeyHasher(b"k")
    names = ["jti", "uti", "digest"]
    assert token_id({"jti": "j", "uti": "u"}, "sig", names, hasher) == ("jti", "j")
    assert token_id({"uti": "u"}, "sig", names, hasher) == ("uti", "u")
    name, one = token_id({}, "sig-1", names, hasher)
    assert name == "digest" and one is not None and one.startswith("digest:")
    assert token_id({}, "sig-2", names, hasher)[1] != one
    assert token_id({}, "sig-1", names, KeyHasher(b"other"))[1] != one
    assert token_id({}, "sig-1", ["jti", "uti"], hasher) == (None, None)


def test_the_token_id_header_falls_back_to_the_id_the_token_is_tracked_by():
    """Entra (`uti`), Auth0 and authentik (`digest`) mint no jti: the upstream still gets one."""
    wanted = {"X-Auth-Token-Id": "jti", "X-Auth-Subject": "sub"}
    no_jti = {"sub": "alice", "uti": "u-1"}
    assert identity_headers(no_jti, wanted, "u-1") == {
        "X-Auth-Token-Id": "u-1",
        "X-Auth-Subject": "alice",
    }
    assert identity_headers({"jti": "j-1"}, wanted, "j-1") == {"X-Auth-Token-Id": "j-1"}
    assert identity_headers({"sub": "alice"}, wanted) == {"X-Auth-Subject": "alice"}
    # An empty jti is skipped by token_id: the header is the id it fell back to.
    assert identity_headers({"jti": ""}, wanted, "digest:x") == {"X-Auth-Token-Id": "digest:x"}
    # Never a jti the token is not tracked by (token_id [uti, ...] picked the uti).
    assert identity_headers({"jti": "j", "uti": "u"}, wanted, "u") == {"X-Auth-Token-Id": "u"}
    assert identity_headers({"jti": "j"}, wanted, None) == {}


@pytest.mark.parametrize("empty", ["sub", "jti", "sid"])
async def test_an_empty_id_claim_is_the_same_absent_id_in_the_log_and_upstream(
    key_file: Path, signing_key: SigningKey, clock: ManualClock, empty: str
):
    """`sub: ""` names no subject and `jti: ""` no id (token_id skips it): what the access log
    shows (the VerifiedToken) and the identity headers say the same."""
    verifier = await make_verifier(key_file, clock, cache_size=10)
    payload = claims(ISSUER, "api", now=clock.now(), sid="s-1")
    payload[empty] = ""
    verified = await verifier.verify(signing_key.sign(payload))
    identity = verified.identity
    assert verified.jti is not None
    assert identity.get("X-Auth-Token-Id") == verified.jti
    assert identity.get("X-Auth-Subject") == verified.sub
    if empty == "jti":
        assert verified.jti.startswith("digest:") and verified.token_id_claim == "digest"
    if empty == "sub":
        assert verified.sub is None and verified.sub_key is None
    if empty == "sid":
        assert verified.sid is None and verified.sid_key is None


@pytest.mark.parametrize("alg", ["PS256", "RS256"])
async def test_an_rsa_signature_of_any_length_but_the_modulus_is_bad_however_openssl_reads_it(
    key_file: Path, signing_key: SigningKey, clock: ManualClock, alg: str
):
    """About one PS* signature in 256 starts with a zero byte, and OpenSSL's PSS check accepts
    it with that byte left out: one token, two texts, two `digest` ids (a revocation of one
    would not be one of the other). Every length but the modulus's is refused (RFC 8017)."""
    verifier = await make_verifier(key_file, clock, cache_size=10, algorithms=(alg,))
    for _attempt in range(4000):  # PSS is randomised: one in 256 on average
        token = signing_key.sign(claims(ISSUER, "api", now=clock.now()), alg=alg)
        header, payload, signature = token.split(".")
        raw = base64.urlsafe_b64decode(signature + "==")
        if raw[0] == 0 or alg == "RS256":
            break
    assert alg == "RS256" or raw[0] == 0, "no PS256 signature with a leading zero byte came up"
    await verifier.verify(token)  # the token itself is good
    for bent in (raw[1:], b"\0" + raw):
        text = base64.urlsafe_b64encode(bent).rstrip(b"=").decode()
        with pytest.raises(Refusal) as refused:
            await verifier.verify(f"{header}.{payload}.{text}")
        assert refused.value.reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "extra",
    [
        {"cnf": {"jkt": "x"}},
        {"cnf": {"x5t#S256": "x"}},
        {"cnf": None},
        {"typ": "ID"},
        {"typ": "logout"},
        {"at_hash": "x"},
        {"c_hash": "x"},
        {"s_hash": "x"},
    ],
)
async def test_bound_tokens_and_id_tokens_are_refused_at_verification_and_never_cached(
    key_file: Path, signing_key: SigningKey, clock: ManualClock, extra: dict[str, object]
):
    verifier = await make_verifier(key_file, clock, cache_size=10)
    token = signing_key.sign(claims(ISSUER, "api", now=clock.now(), **extra))
    for _ in range(2):
        with pytest.raises(Refusal) as refused:
            await verifier.verify(token)
        assert refused.value.reason is Reason.WRONG_TYPE
    assert len(verifier._cache) == 0


@pytest.mark.parametrize("extra", [{"typ": "Bearer"}, {"nonce": "n"}, {"typ": 1}])
async def test_bearer_access_tokens_with_a_typ_claim_or_nonce_verify(
    key_file: Path, signing_key: SigningKey, clock: ManualClock, extra: dict[str, object]
):
    verifier = await make_verifier(key_file, clock, cache_size=10)
    await verifier.verify(signing_key.sign(claims(ISSUER, "api", now=clock.now(), **extra)))
