"""No credential reaches the ConfigMap, the pod spec or NOTES.txt: a URL-valued config key that
carries one, in any form the gateway reads (gateway/config.py `mask_url`), is refused at
render time with the way to pass it from a Secret, and the message never repeats it."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from gateway.config import mask_url

from .rendering import NAMESPACE, RELEASE, gateway_config, parse_manifests, refusal

SECRET = "S3cr3tValue"
REDIS = {"redis": {"enabled": False}, "replicaCount": 1}

# Every form of credential the gateway honours (and `mask_url` hides) in a store URL.
STORE_URLS_WITH_A_CREDENTIAL = [
    f"redis://:{SECRET}@redis:6379/0",
    f"redis://default:{SECRET}@redis:6379/0",
    f"rediss://:{SECRET}/with@slash@redis:6380/0",
    f"redis://redis:6379/0?password={SECRET}",
    f"redis://redis:6379/0?db=0&Password={SECRET}",
    f"redis+sentinel://s1:26379/mymaster?sentinel_password={SECRET}",
    f"rediss://redis:6380/0?ssl_password={SECRET}",
    f"rediss://redis:6380/0?ssl_keyfile=/k&ssl_password={SECRET}",
    f"redis://redis:6379/0?pass%77ord={SECRET}",
    f"redis+cluster://n1:6379,n2:6379?auth_token={SECRET}",
]
HTTP_URLS_WITH_A_CREDENTIAL = [
    f"https://user:{SECRET}@idp.example/keys",
    f"https://{SECRET}@idp.example/keys",
    f"https://idp.example/keys?access_token={SECRET}",
    f"https://idp.example/keys?api_key={SECRET}",
    f"https://idp.example/keys?client_secret={SECRET}",
    f"https://idp.example/keys?X-Amz-Signature={SECRET}",
    f"https://idp.example/keys?sv=1&sig={SECRET}",
]
UPSTREAMS_WITH_A_CREDENTIAL = [
    f"http://user:{SECRET}@orders:8000",
    f"http://{SECRET}@orders:8000",
    f"https://user:{SECRET}@orders.example/v1",
]


def provider(**fields: Any) -> dict[str, Any]:
    return {"name": "corp", "issuer": "https://idp.example/", "audiences": ["a"], **fields}


def assert_refused_without_echo(chart: helm.Chart, values: dict[str, Any], *words: str) -> str:
    message = refusal(chart, values)
    assert SECRET not in message, "the refusal repeats the secret"
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("url", STORE_URLS_WITH_A_CREDENTIAL)
def test_a_store_url_with_a_credential_is_refused_pointing_at_the_secret(
    chart: helm.Chart, url: str
) -> None:
    values = {"config": {"store": {"url": url}}}
    assert_refused_without_echo(
        chart, values, "config.store.url", "secrets.storeUrl.existingSecret"
    )


@pytest.mark.parametrize("url", HTTP_URLS_WITH_A_CREDENTIAL)
def test_a_jwks_uri_with_a_credential_is_refused_pointing_at_a_secret_env(
    chart: helm.Chart, url: str
) -> None:
    values = {"config": {"providers": [provider(), provider(name="b", jwks_uri=url)]}}
    assert_refused_without_echo(
        chart, values, "config.providers[1].jwks_uri", "IDLEGATE_PROVIDERS__1__JWKS_URI", "Secret"
    )


@pytest.mark.parametrize("url", HTTP_URLS_WITH_A_CREDENTIAL)
def test_a_discovery_issuer_with_a_credential_is_refused(chart: helm.Chart, url: str) -> None:
    """Discovery fetches below the issuer, credentials and all."""
    values = {"config": {"providers": [provider(issuer=url, discovery=True)]}}
    assert_refused_without_echo(chart, values, "config.providers[0].issuer", "Secret")
    many = {"config": {"providers": [provider(issuer=["https://a/", url], discovery=True)]}}
    assert_refused_without_echo(
        chart, many, "config.providers[0].issuer[1]", "IDLEGATE_PROVIDERS__0__ISSUER__1"
    )


@pytest.mark.parametrize("url", UPSTREAMS_WITH_A_CREDENTIAL)
def test_an_upstream_with_a_credential_is_refused(chart: helm.Chart, url: str) -> None:
    routes = [{"prefix": "/a/", "upstream": "http://a:80"}, {"prefix": "/b/", "upstream": url}]
    assert_refused_without_echo(
        chart,
        {"config": {"routes": routes}},
        "config.routes[1].upstream",
        "IDLEGATE_ROUTES__1__UPSTREAM",
    )


def test_a_credential_url_in_a_plain_extra_env_value_is_refused(chart: helm.Chart) -> None:
    env = [{"name": "IDLEGATE_STORE__URL", "value": f"redis://:{SECRET}@redis:6379/0"}]
    assert_refused_without_echo(chart, {"extraEnv": env}, "extraEnv", "secretKeyRef")


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"store": {"url": "redis://redis:6379/0?client_name=gw&socket_timeout=1"}}},
        {"config": {"store": {"url": "redis://default@redis:6379/0"}}},  # ACL user, no password
        {"config": {"store": {"url": "rediss://r:6380/0?ssl_check_hostname=false&ssl_keyfile="}}},
        {"config": {"providers": [provider(jwks_uri="https://idp.example/keys?tenant=t1")]}},
        {"config": {"providers": [provider(issuer="internal-batch", hmac_secret_env="H")]},
         "secrets": {"hmac": [{"env": "H", "existingSecret": "hmac", "key": "k"}]}},
        {"config": {"routes": [{"prefix": "/api/", "upstream": "http://orders:8000/v1"}]}},
        {"extraEnv": [{"name": "IDLEGATE_PROVIDERS__0__JWKS_URI",
                       "valueFrom": {"secretKeyRef": {"name": "idp", "key": "jwks-uri"}}}]},
    ],
)  # fmt: skip
def test_urls_without_a_credential_still_render(chart: helm.Chart, values: dict[str, Any]) -> None:
    manifests = parse_manifests(chart.render(values, name=RELEASE, namespace=NAMESPACE))
    assert gateway_config(manifests)


def test_the_documented_way_out_renders_the_credential_free_url_and_the_secret_env(
    chart: helm.Chart,
) -> None:
    values = {
        "config": {"providers": [provider(jwks_uri="https://idp.example/keys")]},
        "extraEnv": [
            {
                "name": "IDLEGATE_PROVIDERS__0__JWKS_URI",
                "valueFrom": {"secretKeyRef": {"name": "idp", "key": "jwks-uri"}},
            }
        ],
    }
    manifests = parse_manifests(chart.render(values, name=RELEASE, namespace=NAMESPACE))
    assert gateway_config(manifests)["providers"][0]["jwks_uri"] == "https://idp.example/keys"


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis:6379/0?client_name=gw",
        "rediss+cluster://n1:6379,n2:6379?ssl_check_hostname=false",
        "redis://default@redis:6379/0",
    ],
)
def test_notes_show_a_credential_free_store_url_unchanged(chart: helm.Chart, url: str) -> None:
    """NOTES.txt prints the store URL through the chart's mask (a second lock behind the
    refusal): a URL without a credential comes out as given."""
    rendered = chart.render({"config": {"store": {"url": url}}}, name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    assert f"  {url}\n" in notes


# Option names around the gateway's credential list, to hold the chart to `mask_url`.
OPTION_NAMES = [
    "password", "PASSWORD", "sentinel_password", "ssl_password", "passwd", "pwd", "pass",
    "secret", "client_secret", "token", "auth_token", "key", "api_key", "ssl_keyfile", "sig",
    "signature", "X-Amz-Signature", "credential", "credentials", "auth", "authorization",
    "pass%77ord", "db", "client_name", "socket_timeout", "ssl_check_hostname", "keyspace",
    "protocol", "health_check_interval",
]  # fmt: skip


@pytest.mark.parametrize("name", OPTION_NAMES)
@pytest.mark.parametrize(
    "template", ["redis://redis:6379/0?{}=v", "https://idp.example/keys?a=1&{}=v"]
)
def test_every_url_the_gateway_masks_is_refused(
    chart: helm.Chart, name: str, template: str
) -> None:
    """What the gateway treats as a credential when it prints a URL, the chart keeps out of
    the ConfigMap; what it shows as is, the chart renders."""
    url = template.format(name)
    values = (
        {"config": {"store": {"url": url}}}
        if url.startswith("redis")
        else {"config": {"providers": [provider(jwks_uri=url)]}}
    )
    if mask_url(url) != url:
        assert "credential" in refusal(chart, values)
    else:
        assert parse_manifests(chart.render(values, name=RELEASE, namespace=NAMESPACE))
