"""URLs with a secret in a credential position, for the redaction properties.

:func:`urls_with_a_secret` draws a URL (any scheme the adapters take) with a secret in
one of the places a URL carries credentials: the userinfo's password, its user, a query
parameter named like a credential (``password=``, ``Api-Key=``, ``X-Amz-Signature=``...),
or the fragment.  Everything around the secret is ASCII; secrets written as they are
(``raw``) are drawn from Greek letters and the URL's own delimiters, so a redaction that
lets any of its letters through shows a character the rest of the URL never has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from urllib.parse import quote

import attrs
from hypothesis import strategies as st

__all__ = [
    "SECRET",
    "SECRET_LETTERS",
    "SecretURL",
    "assert_never_shown",
    "secret_valkey_urls",
    "urls_with_a_secret",
]

#: A password for the end-to-end tests: nothing else a test shows contains it.
SECRET = "Zq7-s3cret-pw"

#: The letters a raw secret is made of: none of them occurs in the rest of the URL.
SECRET_LETTERS = "αβγδεζηθικλμνξοπρστυφχψω"
_DELIMITERS = "@:/?#&;=%+ [].!$'()*,~"

_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "http", "https")
_HOSTS = ("127.0.0.1", "valkey.internal", "[::1]", "cache-7.example.com")
_SECRET_NAMES = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "key",
    "api_key",
    "apikey",
    "x-api-key",
    "auth",
    "credential",
    "X-Amz-Credential",
    "signature",
    "X-Amz-Signature",
    "sig",
    "username",
    "user",
)
_PLAIN_PARAMS = ("db=0", "protocol_version=3", "client_name=worker", "max_connections=8")


@attrs.frozen
class SecretURL:
    """A URL with ``secret`` in it, and how to build the same URL around another secret."""

    secret: str
    build: Callable[[str], str]
    raw: bool  # the secret is written as it is, not percent-encoded

    @property
    def url(self) -> str:
        return self.build(self._written(self.secret))

    def _written(self, secret: str) -> str:
        return secret if self.raw else quote(secret, safe="")

    def with_secret(self, other: str) -> str:
        return self.build(self._written(other))


def _case(name: str, draw: st.DrawFn) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if flip else c.lower() for c, flip in zip(name, flips, strict=True))


@st.composite
def urls_with_a_secret(draw: st.DrawFn, *, raw: bool) -> SecretURL:
    """A URL with a secret in a credential position; ``raw``: written unencoded."""
    if raw:
        secret = draw(st.text(SECRET_LETTERS + _DELIMITERS, min_size=1, max_size=20))
        secret = draw(st.sampled_from(SECRET_LETTERS)) + secret  # at least one letter
    else:
        secret = draw(st.text(min_size=1, max_size=30))
    scheme = draw(st.sampled_from(_SCHEMES))
    host = draw(st.sampled_from(_HOSTS))
    port = draw(st.sampled_from(("", ":6379", ":1", ":8080")))
    path = draw(st.sampled_from(("", "/", "/0", "/v1", "/api/v1")))
    before = draw(st.lists(st.sampled_from(_PLAIN_PARAMS), max_size=2))
    after = draw(st.lists(st.sampled_from(_PLAIN_PARAMS), max_size=2))
    sep = draw(st.sampled_from(("&", ";")))
    plain_query = "?" + "&".join(before) if before else ""
    where = draw(st.sampled_from(("password", "user", "user-of-pair", "query", "fragment")))
    if where == "query" and raw and any(c in secret for c in "&;#"):
        # Raw, those characters end the value: the URL no longer holds this secret.
        where = "fragment"
    tail = f"{host}{port}{path}"
    user = draw(st.sampled_from(("", "default", "worker")))
    secret_name = _case(draw(st.sampled_from(_SECRET_NAMES)), draw)
    fragment_name = draw(st.sampled_from(("", "access_token=", "section-")))

    def build(written: str) -> str:
        if where == "password":
            return f"{scheme}://{user}:{written}@{tail}{plain_query}"
        if where == "user":
            return f"{scheme}://{written}@{tail}{plain_query}"
        if where == "user-of-pair":
            return f"{scheme}://{written}:hunter2@{tail}{plain_query}"
        if where == "query":
            params = [*before, f"{secret_name}={written}", *after]
            return f"{scheme}://{tail}?{sep.join(params)}"
        return f"{scheme}://{tail}{plain_query}#{fragment_name}{written}"

    return SecretURL(secret, build, raw)


def secret_valkey_urls(port: int, password: str = SECRET) -> list[str]:
    """Every way a Valkey URL takes a password (coredis reads them all)."""
    return [
        f"redis://127.0.0.1:{port}/0?password={password}",
        f"redis://127.0.0.1:{port}/0?username=default&password={password}",
        f"redis://default:{password}@127.0.0.1:{port}/0",
        f"redis://:{password}@127.0.0.1:{port}",
    ]


def _record_texts(record: logging.LogRecord) -> Iterable[str]:
    """All a handler could write of ``record``: message, arguments, every extra field
    (any attribute), the exception and stack."""
    yield record.getMessage()
    for value in vars(record).values():
        yield repr(value)
        yield str(value)
    formatter = logging.Formatter()
    if record.exc_info:
        yield formatter.formatException(record.exc_info)
    if record.stack_info:
        yield formatter.formatStack(record.stack_info)


def assert_never_shown(
    secret: str, texts: Iterable[str | None], records: Iterable[logging.LogRecord] = ()
) -> None:
    """``secret`` (as written or percent-encoded) is in none of ``texts`` and no log record."""
    forms = {secret, quote(secret, safe="")}
    everything = [*(t for t in texts if t is not None)]
    for record in records:
        everything.extend(_record_texts(record))
    for text in everything:
        for form in forms:
            assert form not in text, text
