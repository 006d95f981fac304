"""``conclave approve``: sign an approval to clear the current halt, with your own SSH key;
and the signing half of ``conclave halt --sign-key``.

An approver runs it on their own machine (their key never leaves it); it reads the halt
now recorded on the channel (its id and reason) and signs a statement naming exactly
that halt, valid for ``--expires`` (15 minutes by default).  Two approvals from two
people, given to ``conclave clear --approval A --approval B --allowed-signers FILE``,
clear that halt and no other.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import trio

from adapters._atomic import write_atomically
from adapters.cli._backend import UsageError
from adapters.cli._display import plain
from adapters.cli._valkey import add_key_prefix_option
from adapters.halt.approval import (
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    HaltStatement,
    reason_hash,
    sign,
)
from kernel import utc_now

__all__ = ["add_approve_parser", "approve_command", "lifetime", "sign_halt", "signing_options"]

_UNITS = {"s": 1, "m": 60, "h": 3600}


def lifetime(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``: how long an approval is valid (at most a day)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smh])\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration like 15m, 90s or 2h: {text!r}")
    value = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if not timedelta(0) < value <= MAX_LIFETIME:
        most = MAX_LIFETIME.total_seconds() / 3600
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {most:g}h")
    return value


def signing_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--key``/``--sign-key`` and ``--principal``: who signs, with which key (``approve``
    names its signer by the login name unless told: the SPEC's ``approve --key K`` works)."""
    name = "--key" if required else "--sign-key"
    p.add_argument(
        name,
        dest="sign_key",
        type=Path,
        required=required,
        metavar="PRIVATE_KEY",
        help="your SSH private key (or its .pub, to sign with the key in ssh-agent)",
    )
    p.add_argument(
        "--principal",
        default=getpass.getuser() if required else None,
        help="your name as the allowed-signers file lists it"
        + (" (default: your login name)" if required else ""),
    )


def add_approve_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("approve", help="sign an approval to clear the current halt")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--halt-file", type=Path)
    where.add_argument("--valkey", metavar="URL", help="a halt shared on a Valkey/Redis server")
    add_key_prefix_option(p)
    signing_options(p, required=True)
    p.add_argument(
        "--expires",
        type=lifetime,
        default=DEFAULT_LIFETIME,
        metavar="DURATION",
        help="how long the approval is valid: 90s, 15m (default), 2h; at most 24h",
    )
    p.add_argument("--out", type=Path, help="write the approval here (default: stdout)")


async def approve_command(args: argparse.Namespace) -> int:
    from adapters.cli._halt import open_channel  # the commands share one way to open

    async with open_channel(args) as target:
        reading = await target.read()
    if reading.reason is None:
        raise UsageError("not halted: there is no halt to approve clearing")
    if reading.halt_id is None:
        raise UsageError(
            f"the {target.what} does not hold a readable halt ({plain(reading.reason)}); "
            f"raise one (conclave halt {target.option} --reason TEXT), then approve it"
        )
    now = utc_now()
    statement = HaltStatement(
        "clear",
        reading.halt_id,
        reason_hash(reading.reason),
        _principal(args.principal),
        now,
        now + args.expires,
    )
    signed = await trio.to_thread.run_sync(sign, statement, args.sign_key)
    text = signed.to_text()
    if args.out is None:
        sys.stdout.write(text)
    else:
        await trio.to_thread.run_sync(write_atomically, args.out, text.encode())
    print(
        f"approval by {plain(statement.principal)} to clear halt {plain(reading.halt_id)} "
        f"({plain(reading.reason)}), valid until {statement.expires_at.isoformat()}"
        + (f", written to {plain(str(args.out))}" if args.out is not None else ""),
        file=sys.stderr,
    )
    return 0


async def sign_halt(args: argparse.Namespace) -> str | None:
    """``conclave halt --sign-key KEY --principal P``: the signed halt's text (None when
    not signing).  Valid for a few minutes: it says who halted, at this moment."""
    key, principal = getattr(args, "sign_key", None), getattr(args, "principal", None)
    if key is None and principal is None:
        return None
    if key is None or principal is None:
        raise UsageError("a signed halt needs both --sign-key and --principal")
    if getattr(args, "allowed_signers", None) is None:
        raise UsageError(
            "--sign-key needs --allowed-signers: a signature is recorded only once verified"
        )
    now = utc_now()
    statement = HaltStatement(
        "halt", None, reason_hash(args.reason), _principal(principal), now, now + DEFAULT_LIFETIME
    )
    signed = await trio.to_thread.run_sync(sign, statement, key)
    return signed.to_text()


def _principal(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise UsageError("--principal: one name without spaces, as in the allowed-signers file")
    return text
