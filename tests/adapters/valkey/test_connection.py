"""adapters.valkey's connection helpers: URLs, secrets, failures, cancellation."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings

from adapters.valkey._connection import (
    StoreError,
    check_url,
    describe,
    reraise_cancellation,
    store_call,
)
from kernel import InvalidRequestError
from tests.support.url_secrets import SECRET_LETTERS, SecretURL, urls_with_a_secret


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("valkey://h:1", "redis://h:1"),
        ("valkeys://u:p@h:1", "rediss://u:p@h:1"),
        ("unix:///run/valkey.sock", "unix:///run/valkey.sock"),
    ],
)
def test_urls_are_normalised_for_the_client(url: str, expected: str) -> None:
    assert check_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:1", "redis://", "redis://h:port", "unix://", 42, "  "])
def test_bad_urls_are_refused(url: object) -> None:
    with pytest.raises(InvalidRequestError):
        check_url(url)


@settings(max_examples=300)
@given(urls_with_a_secret(raw=True))
def test_a_refused_url_never_shows_its_secret(case: SecretURL) -> None:
    """Raw delimiters in a password make a URL its client would misread (a port that is
    not a number, no host...); the refusal names the URL without any of the secret."""
    try:
        check_url(case.url)
    except InvalidRequestError as exc:
        assert not set(str(exc)) & set(SECRET_LETTERS), str(exc)


def test_a_cancellation_beside_a_connection_error_is_re_raised_alone() -> None:
    """Tearing a subscription down while being cancelled raises both; only the
    cancellation may go up (the connection error would crash a clean exit)."""
    mixed = BaseExceptionGroup(
        "teardown", [ExceptionGroup("inner", [ConnectionError("lost")]), KeyboardInterrupt()]
    )
    with pytest.raises(BaseExceptionGroup) as caught:
        reraise_cancellation(mixed)
    assert [type(e) for e in caught.value.exceptions] == [KeyboardInterrupt]
    with pytest.raises(KeyboardInterrupt):
        reraise_cancellation(KeyboardInterrupt())
    reraise_cancellation(ExceptionGroup("only errors", [ConnectionError("lost")]))
    reraise_cancellation(ConnectionError("lost"))


async def test_a_call_that_fails_or_hangs_is_a_store_error() -> None:
    async def refused() -> None:
        raise ExceptionGroup("pool", [ConnectionError("Unable to establish a connection")])

    with pytest.raises(StoreError, match="ConnectionError: Unable to establish"):
        await store_call(refused, 1.0)
    with pytest.raises(StoreError, match=r"no answer within 0\.01 s"):
        await store_call(trio.sleep_forever, 0.01)
    assert describe(ValueError("x" * 500)).endswith("...")
