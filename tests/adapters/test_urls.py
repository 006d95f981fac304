"""adapters.urls: a secret in any credential position of a URL is never shown."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from adapters.urls import MASK, redact_url
from tests.support.url_secrets import SECRET_LETTERS, SecretURL, urls_with_a_secret


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:s3cret@h:6379/0", "redis://***@h:6379/0"),
        ("redis://:s3cret@h", "redis://***@h"),
        ("redis://token-as-user@h", "redis://***@h"),
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***"),
        (
            "redis://h/0?db=1&PassWord=s3cret&client_name=w",
            "redis://h/0?db=1&PassWord=***&client_name=w",
        ),
        ("redis://h/0?username=admin;password=s3cret", "redis://h/0?username=***;password=***"),
        (
            "https://h/v1?X-Amz-Signature=abc&X-Amz-Credential=def",
            "https://h/v1?X-Amz-Signature=***&X-Amz-Credential=***",
        ),
        ("https://h/v1?pass%77ord=s3cret", "https://h/v1?pass%77ord=***"),
        ("https://h/cb#access_token=s3cret", "https://h/cb#***"),
        ("unix://:s3cret@/run/valkey.sock?db=0", "unix://***@/run/valkey.sock?db=0"),
        # A password holding a raw '/', '?' or '@': hidden up to the last '@'.
        ("redis://u:se/cr?et@h:1", "redis://***@h:1"),
        ("redis://u:se@cret@h:1", "redis://***@h:1"),
        ("redis://h/0?password=se@cret", "redis://***"),
        ("user:s3cret@h:6379", "***@h:6379"),
        # Nothing to hide: an empty value, a bare name, an empty fragment.
        ("redis://h/0?password=&db=1", "redis://h/0?password=&db=1"),
        ("redis://h/0?password#", "redis://h/0?password#"),
    ],
)
def test_credentials_are_shown_as_a_mask_and_the_rest_as_written(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@settings(max_examples=500)
@given(urls_with_a_secret(raw=False))
def test_what_is_shown_does_not_depend_on_the_secret(case: SecretURL) -> None:
    """A percent-encoded secret in any credential position: the redacted text is the
    same whatever the secret, so nothing of it (whole, encoded or in part) can show."""
    shown = redact_url(case.url)
    assert shown == redact_url(case.with_secret("decoy"))
    assert MASK in shown


@settings(max_examples=500)
@given(urls_with_a_secret(raw=True))
def test_a_raw_secret_with_url_delimiters_shows_none_of_its_letters(case: SecretURL) -> None:
    """Written unencoded, a secret may hold '@', '/', '?', '#', '&'...: a URL its client
    would misread.  Its letters (which nothing else in the URL has) still never show."""
    shown = redact_url(case.url)
    assert not set(shown) & set(SECRET_LETTERS), (case.url, shown)
    assert MASK in shown


@pytest.mark.parametrize(
    "url",
    [
        "unix:///run/valkey.sock?p\tassword=s3cret",
        "redis://h:6379/0?passwor\nd=s3cret",
        "redis://h/0?db=0&u\rsername=admin&p\t\nwd=s3cret",
    ],
)
def test_a_tab_or_newline_inside_a_secret_name_still_hides_its_value(url: str) -> None:
    """URL parsers (urllib, so coredis) delete tabs and newlines before reading a URL:
    ``p<TAB>assword=`` is read as ``password=`` and must be hidden as one."""
    assert "s3cret" not in redact_url(url)


def test_every_query_value_can_be_hidden_for_a_url_from_elsewhere() -> None:
    url = "https://u:p@h.example/v1?q=s3cret&key=k#frag"
    assert redact_url(url) == "https://***@h.example/v1?q=s3cret&key=***#***"
    assert redact_url(url, every_query_value=True) == "https://***@h.example/v1?q=***&key=***#***"
