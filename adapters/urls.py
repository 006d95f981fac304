"""Redaction of a URL's credentials, wherever a URL is shown: messages, ``repr``, logs,
the CLI.  The one place that knows which parts of a URL can carry a secret.

A URL carries credentials in three places, and all three are hidden:

- the userinfo (``user:password@``), user and password alike: everything from after
  ``//`` to the **last** ``@`` of the text.  A raw ``@`` can only end a userinfo or sit
  in a query or a path; taking the last one also hides a password that holds a raw
  ``/``, ``?``, ``#`` or ``@`` (a URL its client would misread, and whose error message
  still shows it), at the cost of hiding the host of the rare URL with an ``@`` in its
  path or query;
- the value of every query parameter whose name looks like a credential
  (:data:`SECRET_NAME_PARTS`: ``password=``, ``username=``, ``api_key=``,
  ``X-Amz-Signature=``...), matched case-insensitively after percent-decoding the
  name; parameters are split on ``&`` and ``;``;
- the fragment, whole (OAuth puts access tokens there).

Each hidden run becomes ``***``.  What is left (scheme, host, port, path, other query
parameters) is shown as written.  Redaction never raises: it works on the text, so a
URL too broken to parse is redacted by the same rules.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

__all__ = ["MASK", "SECRET_NAME_PARTS", "redact_url"]

#: What a hidden part of a URL is shown as.
MASK = "***"

#: A query parameter whose name (lower-cased, percent-decoded) contains one of these
#: has its value hidden.  Broad on purpose: hiding a harmless value costs nothing.
SECRET_NAME_PARTS = (
    "pass",  # password, passwd, passphrase
    "pwd",
    "secret",
    "token",
    "key",  # api_key, apikey, x-api-key, access_key
    "auth",  # auth, authorization, oauth_token
    "cred",  # credential, x-amz-credential
    "sig",  # sig, signature, x-amz-signature
    "user",  # user, username
    "login",
    "session",
    "cookie",
    "private",
    "bearer",
    "jwt",
)

_SCHEME_AND_SLASHES = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_PARAM = re.compile(r"[^&;]+")
# What urllib.parse deletes from anywhere in a URL before parsing it.
_DELETED_BY_PARSERS = str.maketrans("", "", "\t\r\n")


def redact_url(url: str, *, every_query_value: bool = False) -> str:
    """``url`` with its userinfo, secret-named query values and fragment shown as ``***``.

    ``every_query_value=True`` hides every query value, whatever its name: for a URL that
    came from elsewhere (a server's redirect ``Location``), whose names say nothing.
    """
    shown: list[str] = []
    rest = 0  # where the text not yet copied or hidden starts
    hidden = _userinfo(url) + _secret_query_values(url, every_query_value) + _fragment(url)
    for start, stop in sorted(hidden):
        if shown and start <= rest:  # overlaps or touches the run just hidden
            rest = max(rest, stop)
            continue
        shown += [url[rest:start], MASK]
        rest = stop
    shown.append(url[rest:])
    return "".join(shown)


def _userinfo(url: str) -> list[tuple[int, int]]:
    """Everything from after ``scheme://`` (or the start) to the last ``@``."""
    at = url.rfind("@")
    if at < 0:
        return []
    scheme = _SCHEME_AND_SLASHES.match(url)
    start = scheme.end() if scheme else 0
    return [(start, at)] if at > start else []


def _fragment(url: str) -> list[tuple[int, int]]:
    hash_at = url.find("#")
    return [(hash_at + 1, len(url))] if 0 <= hash_at < len(url) - 1 else []


def _secret_query_values(url: str, every: bool = False) -> list[tuple[int, int]]:
    hash_at = url.find("#")
    end = hash_at if hash_at >= 0 else len(url)
    query_at = url.find("?", 0, end)
    if query_at < 0:
        return []
    spans = []
    for param in _PARAM.finditer(url, query_at + 1, end):
        name, equals, value = param.group().partition("=")
        if equals and value and (every or _looks_secret(name)):
            start = param.start() + len(name) + 1
            spans.append((start, param.end()))
    return spans


def _looks_secret(name: str) -> bool:
    decoded = unquote_plus(name.translate(_DELETED_BY_PARSERS)).lower()
    return any(part in decoded for part in SECRET_NAME_PARTS)
