"""Store URL query options are checked offline, as check-config and serve build the store:
an option the store would not honour, a TLS option without TLS, a value redis-py or ssl
refuses, an option twice: a `store.url:` problem with the password masked, never a TypeError
or RedisError from the first connection."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import Store as StoreConfig
from gateway.store.factory import StoreConfigError, open_store
from gateway.store.redis import RedisStore


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://:s3cret@h:6379/0?bogus_option=1", "unknown option 'bogus_option'"),
        ("redis://:s3cret@h:6379/0?protocol=3", "unknown option 'protocol'"),
        ("redis://:s3cret@h:6379/0?client_name=x", "unknown option 'client_name'"),
        ("redis://:s3cret@h:6379/0?ssl_cert_reqs=required", "'ssl_cert_reqs' needs TLS: rediss://"),
        ("redis://:s3cret@h:6379/0?ssl_ca_certs=/ca.pem", "'ssl_ca_certs' needs TLS: rediss://"),
        ("redis://:s3cret@h:6379/0?socket_timeout=5", "'socket_timeout' is not supported"),
        ("redis://:s3cret@h:6379/0?max_connections=5", "'max_connections' is not supported"),
        ("redis://:s3cret@h:6379/0?health_check_interval=1", "is not supported"),
        ("redis://:s3cret@h:6379/0?db=1&db=2", "option 'db' is given twice"),
        ("redis://:s3cret@h:6379/0?db=", "option 'db' has no value"),
        ("redis://:s3cret@h:6379/0?bogus", "option 'bogus' has no value"),
        ("redis://:s3cret@h:6379/?db=x", "Invalid value for 'db'"),
        ("redis://:s3cret@h:6379/0?password=other", "two passwords"),
        ("rediss://:s3cret@h:6379/0?ssl_cert_reqs=bogus", "none, optional or required"),
        ("rediss://:s3cret@h:6379/0?ssl_check_hostname=maybe", "true or false"),
        ("rediss://:s3cret@h/0?ssl_cert_reqs=none&ssl_check_hostname=true", "needs the cert"),
        ("rediss://:s3cret@h:6379/0?ssl_min_version=5", "TLS settings cannot be used"),
        ("rediss://:s3cret@h:6379/0?ssl_ciphers=BOGUS", "TLS settings cannot be used"),
        ("rediss://:s3cret@h:6379/0?ssl_include_verify_flags=x", "ssl_include_verify_flags"),
        ("rediss://:s3cret@h:6379/0?ssl_ca_data=garbage", "TLS settings cannot be used"),
        ("rediss://:s3cret@h:6379/0?sentinel_password=x", "unknown option 'sentinel_password'"),
        ("redis+sentinel://:s3cret@s/m?sentinel_password=a&sentinel_password=b", "given twice"),
        ("rediss+cluster://:s3cret@n1?ssl_cert_reqs=none&ssl_cert_reqs=required", "given twice"),
    ],
)
def test_store_url_options_the_store_cannot_honour_are_a_store_url_problem(
    url: str, message: str
) -> None:
    with pytest.raises(StoreConfigError) as refused:
        open_store(StoreConfig(url=url))
    text = str(refused.value)
    assert text.startswith("store.url: ") and message in text
    assert "s3cret" not in text and ":***@" in text


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0",
        "redis://h:6379/0?db=0",
        "redis://h:6379?db=3",
        "redis://u@h:6379/0?password=s3cret",
        "redis://h:6379/0?username=u&password=s3cret",
        "rediss://:s3cret@h:6380/0?ssl_cert_reqs=none",
        "rediss://h:6380/0?ssl_check_hostname=false",
        "rediss://h:6380/0?ssl_cert_reqs=optional&ssl_check_hostname=False",
        "rediss://h:6380/0?ssl_min_version=771",  # TLS 1.2
    ],
)
def test_store_url_options_the_store_honours_are_accepted(url: str) -> None:
    store = open_store(StoreConfig(url=url))
    assert isinstance(store, RedisStore)
    asyncio.run(store.close())
