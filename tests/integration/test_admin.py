"""The admin port as an operator uses it: metrics, health, readiness, revocation API."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import aiohttp
import pytest
from conftest import GatewayFactory, RedisServer
from harness import AUDIENCE, ISSUER, Upstream
from jwks_server import JwksServer, claims, rsa_key

CONTRACT_METRICS = {
    "idlegate_requests_total": {"route", "decision", "reason"},
    "idlegate_request_duration_seconds_bucket": {"route", "le"},
    "idlegate_upstream_duration_seconds_bucket": {"route", "le"},
    "idlegate_store_duration_seconds_bucket": {"op", "le"},
    "idlegate_jwks_keys": {"provider"},
    "idlegate_in_flight_requests": set(),
    "idlegate_build_info": {"version"},
    "idlegate_token_idle_gap_seconds_bucket": {"le"},
}


def parse_metrics(text: str) -> dict[str, list[dict[str, str]]]:
    samples: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        assert match, line
        labels = dict(re.findall(r'([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples.setdefault(match.group(1), []).append(labels)
    return samples


async def test_metrics_have_contract_names_and_bounded_route_labels(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer
):
    gw = await gateways(store_url=redis_server.url)
    await gw.get("/api/orders/1", gw.token())
    for i in range(20):  # raw paths must never become label values
        await gw.get(f"/api/orders/{i}?x={i}", "garbage")
        await gw.get(f"/unrouted/{i}")
    async with aiohttp.ClientSession() as http, http.get(gw.admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        samples = parse_metrics(await response.text())
    for name, labels in CONTRACT_METRICS.items():
        assert name in samples, name
        assert all(set(s) == labels for s in samples[name]), (name, samples[name][:2])
    # The registry is the process's: other tests' route prefixes may be there too, but no
    # label may come from this test's raw paths.
    routes = {s["route"] for s in samples["idlegate_requests_total"]}
    assert {"/api/", "none"} <= routes
    assert not [r for r in routes if "orders" in r or "unrouted" in r or "?" in r], routes
    reasons = {s["reason"] for s in samples["idlegate_requests_total"]}
    assert {"ok", "malformed_token", "no_route"} <= reasons
    les = {s["le"] for s in samples["idlegate_request_duration_seconds_bucket"]}
    assert "0.00025" in les
    assert "30.0" in les
    ops = {s["op"] for s in samples["idlegate_store_duration_seconds_bucket"]}
    assert "check_and_touch" in ops


def sample_value(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_a_scrape_shows_every_request_so_far_and_those_in_flight(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer
):
    """The request path batches its histograms and keeps in-flight as a plain counter; a
    scrape must still see exactly what happened until then, with no lag."""
    gw = await gateways(store_url=redis_server.url)

    async def scrape() -> str:
        async with aiohttp.ClientSession() as http, http.get(gw.admin_url + "/metrics") as r:
            return await r.text()

    before = await scrape()
    token = gw.token()
    for _ in range(7):
        assert (await gw.get("/api/orders/1", token)).status == 200
    slow = asyncio.create_task(gw.get("/api/slow?s=1.5", token))
    for _ in range(250):  # until the upstream holds it
        if len(upstream.received) == 8:
            break
        await asyncio.sleep(0.02)
    during = await scrape()
    await slow
    after = await scrape()

    def moved(name: str, text: str, **labels: str) -> float:
        return sample_value(text, name, **labels) - sample_value(before, name, **labels)

    count = "idlegate_request_duration_seconds_count"
    assert moved(count, during, route="/api/") == 7
    assert moved("idlegate_upstream_duration_seconds_count", during, route="/api/") == 7
    assert moved("idlegate_store_duration_seconds_count", during, op="check_and_touch") == 8
    assert moved("idlegate_token_idle_gap_seconds_count", during) == 8
    assert sample_value(during, "idlegate_in_flight_requests") == 1
    assert moved(count, after, route="/api/") == 8
    assert sample_value(after, "idlegate_in_flight_requests") == 0


async def test_health_and_readiness(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer
):
    gw = await gateways(store_url=redis_server.url)
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.admin_url + "/healthz") as response:
            assert response.status == 200
        async with http.get(gw.admin_url + "/readyz") as response:
            assert response.status == 200
        redis_server.stop()
        async with http.get(gw.admin_url + "/readyz") as response:
            assert response.status == 503
            assert "store" in (await response.json())["reason"]
        async with http.get(gw.admin_url + "/healthz") as response:
            assert response.status == 200
        redis_server.start()
        async with http.get(gw.admin_url + "/readyz") as response:
            assert response.status == 200
        gw.gateway.draining = True
        async with http.get(gw.admin_url + "/readyz") as response:
            assert response.status == 503
            assert (await response.json())["reason"] == "draining"
        gw.gateway.draining = False


async def test_not_ready_until_every_provider_has_keys(
    gateways: GatewayFactory, upstream: Upstream
):
    async with JwksServer([rsa_key("k")]) as idp:
        idp.fail(500)
        gw = await gateways(
            providers=[
                {
                    "name": "idp",
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "algorithms": ["RS256"],
                    "jwks_uri": idp.jwks_uri,
                }
            ]
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.admin_url + "/readyz") as response:
                assert response.status == 503
                reason = (await response.json())["reason"]
                assert "idp" in reason and "HTTP 500" in reason  # why, not only which
            idp.recover()
            await gw.gateway.rings["idp"].lookup_or_refresh("k")
            async with http.get(gw.admin_url + "/readyz") as response:
                assert response.status == 200


async def test_admin_api_is_404_without_a_token_file(gateways: GatewayFactory):
    gw = await gateways()
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.admin_url + "/admin/revoke", json={"jti": "x"}) as response:
            assert response.status == 404
        async with http.get(gw.admin_url + "/admin/tokens/x") as response:
            assert response.status == 404


async def test_revocation_api(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer, tmp_path: Path
):
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-admin-token\n")
    gw = await gateways(store_url=redis_server.url, admin={"token_file": str(token_file)})
    good = {"Authorization": "Bearer s3cret-admin-token"}
    token = gw.token(jti="j-77", sub="bob", sid="sess-1")
    assert (await gw.get("/api/x", token)).status == 200
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            async with http.post(
                gw.admin_url + "/admin/revoke", json={"jti": "j-77"}, headers=headers
            ) as response:
                assert response.status == 401
        for body in ({}, {"jti": "a", "sub": "b"}, {"jti": 5}, {"nope": "x"}):
            async with http.post(
                gw.admin_url + "/admin/revoke", json=body, headers=good
            ) as response:
                assert response.status == 400
        async with http.get(gw.admin_url + "/admin/tokens/j-77", headers=good) as response:
            status = await response.json()
        assert status["last_activity"] == gw.clock.now()
        assert status["idle_remaining_seconds"] == 900
        assert status["revoked"] is False
        async with http.post(
            gw.admin_url + "/admin/revoke", json={"jti": "j-77"}, headers=good
        ) as response:
            assert response.status == 204
        async with http.get(gw.admin_url + "/admin/tokens/j-77", headers=good) as response:
            assert (await response.json())["revoked"] is True
    refused = await gw.get("/api/x", token)
    assert refused.status == 401
    assert (await refused.json())["reason"] == "revoked"


async def test_revoke_by_sub_covers_tokens_issued_up_to_now_plus_leeway(
    gateways: GatewayFactory, upstream: Upstream, tmp_path: Path
):
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    gw = await gateways(admin={"token_file": str(token_file)})
    before = gw.token(sub="carol")
    now = gw.clock.now()
    # Issued by an IdP whose clock is 29 s ahead: accepted (leeway 30 s), so it must be covered.
    ahead = gw.token(sub="carol", iat=now + 29, exp=now + 600)
    assert (await gw.get("/api/x", ahead)).status == 200
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gw.admin_url + "/admin/revoke",
            json={"sub": "carol"},
            headers={"Authorization": "Bearer t0ken"},
        ) as response,
    ):
        assert response.status == 204
    assert (await gw.get("/api/x", before)).status == 401
    refused = await gw.get("/api/x", ahead)
    assert (refused.status, (await refused.json())["reason"]) == (401, "revoked")
    gw.clock.advance(31)  # type: ignore[attr-defined]
    # A token issued after the revocation (beyond leeway) is a new login: accepted.
    after = gw.token(sub="carol")
    assert (await gw.get("/api/x", after)).status == 200
    gw.clock.advance(629 - 31)  # type: ignore[attr-defined]
    # `ahead` stays refused up to its exp + leeway: the revocation's horizon outlives it.
    assert (await (await gw.get("/api/x", ahead)).json())["reason"] == "revoked"
    assert (await gw.get("/api/x", gw.token(sub="dave"))).status == 200


OTHER_ISSUER = "https://other-issuer.test/"


@pytest.fixture(params=["memory", "redis"])
def any_store(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


async def test_two_issuers_equal_jti_are_two_tokens(
    gateways: GatewayFactory, upstream: Upstream, key_file: Path, tmp_path: Path, any_store: str
):
    """A token is its issuer and its id together: one issuer's token cannot keep the other's
    alive, and a revocation naming an issuer (or provider) hits only that issuer's token."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    main = {
        "name": "main",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "public_key_file": str(key_file),
    }
    other = {**main, "name": "other", "issuer": OTHER_ISSUER}
    gw = await gateways(
        store_url=any_store,
        admin={"token_file": str(token_file)},
        providers=[main, other],
        policy={"idle_timeout": "5m"},
    )
    now = gw.clock.now()

    def token_of(issuer: str, jti: str, sub: str = "alice") -> str:
        return gw.key.sign(claims(issuer, AUDIENCE, ttl=600, now=now, jti=jti, sub=sub))

    ours, theirs = token_of(ISSUER, "same"), token_of(OTHER_ISSUER, "same")
    assert (await gw.get("/api/x", ours)).status == 200
    gw.clock.advance(200)  # type: ignore[attr-defined]
    assert (await gw.get("/api/x", ours)).status == 200
    gw.clock.advance(200)  # theirs never used: idle since its iat, 400 s > 5 min
    refused = await gw.get("/api/x", theirs)
    assert (await refused.json())["reason"] == "idle_timeout"
    assert (await gw.get("/api/x", ours)).status == 200

    headers = {"Authorization": "Bearer t0ken"}
    now = gw.clock.now()
    a, b = token_of(ISSUER, "r"), token_of(OTHER_ISSUER, "r")
    a_sub, b_sub = token_of(ISSUER, "s1", sub="bob"), token_of(OTHER_ISSUER, "s2", sub="bob")
    for token in (a, b, a_sub, b_sub):
        assert (await gw.get("/api/x", token)).status == 200
    async with aiohttp.ClientSession() as http:

        async def revoke(body: dict[str, str], status: int = 204) -> None:
            async with http.post(
                gw.admin_url + "/admin/revoke", json=body, headers=headers
            ) as response:
                assert response.status == status, await response.text()

        async def view(query: str) -> tuple[int, dict[str, object]]:
            async with http.get(
                gw.admin_url + "/admin/tokens/r" + query, headers=headers
            ) as response:
                return response.status, await response.json()

        await revoke({"jti": "r", "provider": "main"})
        assert (await gw.get("/api/x", a)).status == 401
        assert (await gw.get("/api/x", b)).status == 200
        status, ambiguous = await view("")
        assert status == 400 and "issuer" in str(ambiguous["message"])
        assert (await view("?provider=main"))[1]["revoked"] is True
        status, theirs_view = await view(f"?issuer={OTHER_ISSUER}")
        assert (status, theirs_view["revoked"], theirs_view["issuer"]) == (200, False, OTHER_ISSUER)
        assert theirs_view["last_activity"] == gw.clock.now()
        for bad in (
            {"jti": "r", "issuer": "https://nobody/"},
            {"jti": "r", "provider": "nobody"},
            {"jti": "r", "issuer": ISSUER, "provider": "main"},
            {"jti": "r", "extra": "x"},
        ):
            await revoke(bad, 400)
        # Neither named: the safe reading, every trusted issuer's token of that id.
        await revoke({"jti": "r"})
        assert (await gw.get("/api/x", b)).status == 401
        await revoke({"sub": "bob", "issuer": OTHER_ISSUER})
        assert (await gw.get("/api/x", a_sub)).status == 200
        assert (await gw.get("/api/x", b_sub)).status == 401


async def _raw_admin_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """One request written byte for byte on a socket, the whole response read back."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_a_non_utf8_admin_bearer_is_401_not_500(
    gateways: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Raw bytes (0xff, a lone UTF-8 continuation byte) in the bearer: refused like any wrong
    token, no traceback; the admin token itself still works when sent as raw bytes."""
    token_file = tmp_path / "admin.token"
    token_file.write_bytes(b"t0ken-\xc3\xa9\n")  # non-ASCII bytes are a valid file, too
    gw = await gateways(admin={"token_file": str(token_file)})
    for bearer in (b"\xff\xfe", b"t0ken-\xff", b"\x80", b"t0ken-\xc3"):
        response = await _raw_admin_request(
            gw.admin_url,
            b"POST /admin/revoke HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer "
            + bearer
            + b"\r\nContent-Type: application/json\r\n",
            b'{"jti": "j-1"}',
        )
        assert response.startswith(b"HTTP/1.1 401 "), response[:200]
        assert b'Bearer realm="idlegate-admin"' in response
    response = await _raw_admin_request(
        gw.admin_url,
        b"POST /admin/revoke HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer t0ken-\xc3\xa9\r\n"
        b"Content-Type: application/json\r\n",
        b'{"jti": "j-1"}',
    )
    assert response.startswith(b"HTTP/1.1 204 "), response[:200]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_two_authorization_headers_are_refused(gateways: GatewayFactory, tmp_path: Path):
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    gw = await gateways(admin={"token_file": str(token_file)})
    response = await _raw_admin_request(
        gw.admin_url,
        b"GET /admin/tokens/x HTTP/1.1\r\nHost: admin\r\n"
        b"Authorization: Bearer t0ken\r\nAuthorization: Bearer t0ken\r\n",
    )
    assert response.startswith(b"HTTP/1.1 401 "), response[:200]


async def test_revocations_and_unauthorized_calls_are_audit_logged(
    gateways: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """One `idlegate.audit` line per revocation: kind, value, peer, ISO-8601 UTC time; never the
    admin token. Unauthorized calls are logged too, at most one line per 10 s with a count."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-admin-token")
    gw = await gateways(admin={"token_file": str(token_file)})
    caplog.set_level(logging.INFO, logger="idlegate.audit")
    good = {"Authorization": "Bearer s3cret-admin-token"}
    async with aiohttp.ClientSession() as http:
        for body in ({"jti": "j-9"}, {"sub": "mallory\r\nforged line"}, {"sid": "s-1"}):
            async with http.post(gw.admin_url + "/admin/revoke", json=body, headers=good) as r:
                assert r.status == 204
        for _ in range(3):
            async with http.post(
                gw.admin_url + "/admin/revoke",
                json={"jti": "j-9"},
                headers={"Authorization": "Bearer guess"},
            ) as r:
                assert r.status == 401
        gw.clock.advance(11)  # type: ignore[attr-defined]
        async with http.get(gw.admin_url + "/admin/tokens/x") as r:
            assert r.status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "idlegate.audit"]
    at = "2027-01-15T08:00:00.000Z"  # the injected clock: 1_800_000_000
    of = f'of issuer(s) ["{ISSUER}"] from 127.0.0.1 at {at}'
    short = "(refused until 2027-01-15T08:16:00.000Z)"  # max_token_lifetime + 2 * leeway
    assert lines == [
        f'admin: revoked jti="j-9" {of} {short}',
        f'admin: revoked sub="mallory\\r\\nforged line" {of} {short}',
        f'admin: revoked sid="s-1" {of} (refused until 2027-01-16T08:00:00.000Z)',
        'admin: unauthorized POST "/admin/revoke" from 127.0.0.1: wrong admin token',
        'admin: unauthorized GET "/admin/tokens/x" from 127.0.0.1: no Authorization header'
        " (2 more since the last such line)",
    ]
    assert all("s3cret" not in r.getMessage() for r in caplog.records)


async def test_a_rotated_admin_token_file_takes_effect_and_a_broken_one_keeps_the_last(
    gateways: GatewayFactory, tmp_path: Path
):
    token_file = tmp_path / "admin.token"
    token_file.write_text("first-token")
    gw = await gateways(admin={"token_file": str(token_file)})

    async def status(token: str) -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                gw.admin_url + "/admin/tokens/x", headers={"Authorization": f"Bearer {token}"}
            ) as response,
        ):
            return response.status

    assert await status("first-token") == 200
    rotated = tmp_path / "rotated"
    rotated.write_text("second-token\n")
    rotated.replace(token_file)  # as a Secret volume update does: a new file, atomically
    assert await status("second-token") == 200
    assert await status("first-token") == 401
    token_file.write_text("")  # a bad rotation: fail closed to the last good token
    assert await status("second-token") == 200
    token_file.unlink()
    assert await status("second-token") == 200
    assert await status("") == 401


async def test_revoke_by_the_token_itself_covers_tokens_without_jti(
    gateways: GatewayFactory, upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A token with no jti (Auth0, authentik) is identified by its digest: the operator revokes
    it by handing over the token, which is never logged; an Entra token by its uti."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    gw = await gateways(admin={"token_file": str(token_file)})
    headers = {"Authorization": "Bearer t0ken"}
    leaked, sibling = gw.token(jti=None), gw.token(jti=None, nonce="n2")
    entra = gw.token(jti=None, uti="AbCdEf-uti")
    for token in (leaked, sibling, entra):
        assert (await gw.get("/api/x", token)).status == 200
    async with aiohttp.ClientSession() as http:
        for body in ({"token": leaked}, {"jti": "AbCdEf-uti"}):
            async with http.post(
                gw.admin_url + "/admin/revoke", json=body, headers=headers
            ) as response:
                assert response.status == 204
        for bad in ({"token": "not-a-jwt"}, {"token": 5}, {"token": leaked, "jti": "x"}):
            async with http.post(
                gw.admin_url + "/admin/revoke", json=bad, headers=headers
            ) as response:
                assert response.status == 400
                assert leaked not in await response.text()
    assert (await (await gw.get("/api/x", leaked)).json())["reason"] == "revoked"
    assert (await (await gw.get("/api/x", entra)).json())["reason"] == "revoked"
    assert (await gw.get("/api/x", sibling)).status == 200
    assert leaked not in caplog.text and leaked.split(".")[2] not in caplog.text


async def test_a_provider_with_several_issuers_is_one_revocation_and_an_ambiguous_lookup(
    gateways: GatewayFactory, upstream: Upstream, key_file: Path, tmp_path: Path
):
    """Entra multi-tenant: revoking by provider covers every listed tenant; looking a token
    up by provider alone cannot name one token, so it is a 400 (not a 500)."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    tenants = ["https://login.test/t1/v2.0", "https://login.test/t2/v2.0"]
    provider = {
        "name": "entra",
        "issuer": tenants,
        "audiences": [AUDIENCE],
        "public_key_file": str(key_file),
    }
    gw = await gateways(admin={"token_file": str(token_file)}, providers=[provider])
    now = gw.clock.now()
    tokens = [gw.key.sign(claims(t, AUDIENCE, now=now, jti=None, uti="u-1")) for t in tenants]
    for token in tokens:
        assert (await gw.get("/api/x", token)).status == 200
    headers = {"Authorization": "Bearer t0ken"}
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gw.admin_url + "/admin/tokens/u-1?provider=entra", headers=headers
        ) as response:
            assert response.status == 400
            assert "issuer" in (await response.json())["message"]
        async with http.get(
            gw.admin_url + "/admin/tokens/u-1", params={"issuer": tenants[1]}, headers=headers
        ) as response:
            assert response.status == 200
            assert (await response.json())["last_activity"] == now
        async with http.post(
            gw.admin_url + "/admin/revoke",
            json={"jti": "u-1", "provider": "entra"},
            headers=headers,
        ) as response:
            assert response.status == 204
    for token in tokens:
        assert (await (await gw.get("/api/x", token)).json())["reason"] == "revoked"
