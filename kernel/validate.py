"""Checks at the boundary: one place that says what a valid number, duration or name is.

Every part of conclave that takes a setting from a caller or a file checks it here, so a
bad value gets the same clear :class:`~kernel.InvalidRequestError` wherever it enters,
naming the setting and the rule (``"timeout_s must be > 0, got -1"``), and nothing is
changed by a refused call.

Each check comes in two forms:

* a function, ``check_*(value, name, ...)``, that returns the value normalised
  (``float`` for numbers) or raises;
* an attrs validator factory (:func:`number`, :func:`integer`, :func:`text`) for a
  field of a frozen attrs class; it names the field from ``attr.name``.  Wrap it in
  ``attrs.validators.optional`` for a field that may be ``None``.

Booleans are never numbers here (``True`` is an ``int`` to Python, not to a roster).
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from kernel._errors import InvalidRequestError

__all__ = [
    "check_int",
    "check_number",
    "check_seconds",
    "check_text",
    "check_utf8_size",
    "integer",
    "number",
    "text",
    "utf8_size",
    "utf8_text",
]

_Validator = Any  # attrs' validator type is (instance, attribute, value) -> None


def _shown(value: object) -> str:
    if isinstance(value, int) and abs(value).bit_length() > 200:
        return f"an int of {_digits(value)}"  # repr() of a huge int is slow, or refused
    text_ = repr(value)
    return text_ if len(text_) <= 60 else text_[:57] + "..."


def check_number(
    value: object,
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    finite: bool = True,
) -> float:
    """A real number (not a bool, never NaN) within the bounds given, as a float.

    ``above`` is an exclusive lower bound, ``at_least`` and ``at_most`` inclusive ones;
    ``finite=False`` lets infinity through (a timeout of "never").
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {_shown(value)}")
    try:
        number = float(value)  # an int beyond a float's range is not a usable setting
    except OverflowError:
        raise InvalidRequestError(f"{name} is too large, got an int of {_digits(value)}") from None
    if math.isnan(number) or (finite and math.isinf(number)):
        raise InvalidRequestError(f"{name} must be a finite number, got {_shown(value)}")
    if above is not None and not number > above:
        raise InvalidRequestError(f"{name} must be > {above:g}, got {_shown(value)}")
    if at_least is not None and not number >= at_least:
        raise InvalidRequestError(f"{name} must be >= {at_least:g}, got {_shown(value)}")
    if at_most is not None and not number <= at_most:
        raise InvalidRequestError(f"{name} must be <= {at_most:g}, got {_shown(value)}")
    return number


def _digits(value: float) -> str:
    # Only an int overflows a float.  Not repr(): an int of many digits is slow to
    # format, and Python refuses past 4300 digits.
    return f"about {int(abs(int(value)).bit_length() * 0.30103)} digits"


def check_int(value: object, name: str, *, at_least: int | None = None) -> int:
    """An ``int`` (not a bool) a float can hold, at least ``at_least`` if given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an int, got {_shown(value)}")
    if abs(value).bit_length() > 1024:  # beyond any float: no count or limit is that big
        raise InvalidRequestError(f"{name} is too large, got an int of {_digits(value)}")
    if at_least is not None and value < at_least:
        raise InvalidRequestError(f"{name} must be >= {at_least}, got {_shown(value)}")
    return value


def check_seconds(value: object, name: str) -> float:
    """A duration setting: seconds > 0 (infinity allowed: "no limit"), as a float."""
    return check_number(value, name, above=0, finite=False)


def check_text(value: object, name: str) -> str:
    """A non-empty string (whitespace alone is empty)."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequestError(f"{name} must be a non-empty string")
    return value


def utf8_size(value: str, *, beyond: int | None = None) -> int:
    """The length of ``value`` in bytes of UTF-8 (a lone surrogate counts its 3 bytes).

    ASCII text is measured without a copy.  With ``beyond``, text of more than ``beyond``
    characters (so surely more than ``beyond`` bytes) is not encoded either: its length
    in characters is returned, a lower bound that is already over ``beyond``.
    """
    n = len(value)
    if value.isascii() or (beyond is not None and n > beyond):
        return n
    return len(value.encode("utf-8", "surrogatepass"))


def utf8_text(value: str) -> str:
    """``value`` as text UTF-8 can encode: a lone surrogate (which a JSON ``"\\ud800"``
    produces, and output metadata may hold) becomes its escape, ``\\ud800``.  For text
    that leaves the process in UTF-8 (metrics labels, span names), where one such
    character fails the whole scrape or export."""
    if value.isascii():
        return value  # the common case, checked in C without a copy
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8_size(value: str, name: str, limit: int, *, what: str = "") -> int:
    """Refuse ``value`` (a str) if it is more than ``limit`` bytes of UTF-8; its size.

    Text that is surely within (4 bytes a character at most) or surely over (1 byte a
    character at least) the limit is never encoded: a huge input is refused without a
    copy of it.  ``what`` names the limit in the message.
    """
    if len(value) * 4 <= limit:
        return utf8_size(value)
    size = utf8_size(value, beyond=limit)
    if size > limit:
        got = f"at least {size:,}" if size == len(value) and not value.isascii() else f"{size:,}"
        rule = f" ({what})" if what else ""
        raise InvalidRequestError(
            f"{name} must be at most {limit:,} bytes of UTF-8{rule}, got {got}"
        )
    return size


def number(
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    finite: bool = True,
) -> _Validator:
    """attrs validator: :func:`check_number` with these bounds, named by the field."""

    def validate(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        check_number(
            value, attr.name, above=above, at_least=at_least, at_most=at_most, finite=finite
        )

    return validate


def integer(*, at_least: int | None = None) -> _Validator:
    """attrs validator: :func:`check_int`, named by the field."""

    def validate(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        check_int(value, attr.name, at_least=at_least)

    return validate


def text() -> _Validator:
    """attrs validator: :func:`check_text`, named by the field."""

    def validate(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        # Inline fast path: every domain type checks its ids with this, on the hot path.
        if value.__class__ is not str or not value.strip():
            check_text(value, attr.name)

    return validate
