"""``conclave halt``, ``clear`` and ``status``: written once, over :class:`kernel.HaltControl`
(and :class:`kernel.HaltChecker`), for every channel an operator can name: ``--halt-file
PATH`` or ``--valkey URL``.

What differs between the channels is only how one is opened, and how it says *why* it
reads as halted when nobody raised a halt (unreadable, no record yet, unreachable): each
channel's :class:`_Target` says that, and the commands word it the same way for all.
adapters.valkey (and coredis) is imported only when ``--valkey`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import attrs
import trio

from adapters.cli._backend import UsageError, importing_extra
from adapters.cli._display import plain
from adapters.cli._valkey import ValkeySettings
from adapters.cli.approve import sign_halt
from adapters.halt.approval import MAX_APPROVAL_CHARS
from kernel import ConclaveError, HaltChecker, HaltControl, HaltRecord

if TYPE_CHECKING:
    from adapters.halt.file import FileHaltChannel
    from adapters.valkey import ValkeyHaltChannel

__all__ = [
    "check_halt_file",
    "clear_command",
    "halt_command",
    "open_channel",
    "read_files",
    "status_command",
]

EXIT_OK, EXIT_HALTED = 0, 3

#: Why a channel reads as halted when no halt was raised.
_Problem = Literal["unreadable", "no record", "unreachable"]


class _Channel(HaltControl, HaltChecker, Protocol):
    """What the commands need of a channel: the port, the reads, and where a halt over an
    unreadable record kept that record (None if it did not)."""

    @property
    def kept_aside(self) -> object: ...

    async def ahalt(self, reason: str, *, signed: str | None = None) -> bool: ...


@attrs.frozen(slots=True)
class _Reading:
    reason: str | None  # None: not halted
    problem: _Problem | None = None  # None: a real halt (or not halted)
    halt_id: str | None = None  # a real halt's id


@attrs.frozen(slots=True)
class _Target:
    channel: _Channel
    what: str  # "halt file", "halt key": what the channel keeps the halt in
    option: str  # how a command names it, for the hints
    read: Callable[[], Awaitable[_Reading]]


async def check_halt_file(args: argparse.Namespace) -> None:
    """Refuse a ``--halt-file`` whose directory does not exist, unless ``--create`` (for
    the commands that take it) makes it.  Such a path is most likely mistyped: a halt
    written there, or a council watching it, would not meet the other side.  A directory
    that exists but cannot hold the file (a file, say) is the channel's to report: it
    reads as halted and cannot be written."""
    create = getattr(args, "create", False)
    path: Path | None = args.halt_file
    if path is None:
        if create:
            raise UsageError("--create goes with --halt-file (it makes the file's directory)")
        return
    directory = path.parent
    if await trio.to_thread.run_sync(os.path.lexists, directory):
        return
    if create:
        await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
        return
    problem = "does not exist"
    if args.command in ("halt", "clear"):
        problem += "; nothing was written"
    if "create" in args:
        problem += " (--create makes it)"
    raise UsageError(f"--halt-file {plain(str(path))}: {plain(str(directory))} {problem}")


@asynccontextmanager
async def open_channel(args: argparse.Namespace) -> AsyncIterator[_Target]:
    """The channel the command names, open for the duration of the block (with the
    command's ``--allowed-signers`` and ``--revoked``, where it takes them)."""
    await check_halt_file(args)
    allowed: Path | None = getattr(args, "allowed_signers", None)
    revoked: Path | None = getattr(args, "revoked", None)
    if revoked is not None and allowed is None:
        raise UsageError("--revoked goes with --allowed-signers (the keys it revokes from)")
    if args.valkey is None:
        from adapters.halt.file import FileHaltChannel

        file = FileHaltChannel(args.halt_file, allowed_signers=allowed, revoked=revoked)
        yield _Target(file, "halt file", "--halt-file PATH", lambda: _read_file(file))
        return
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyHaltChannel
    settings = ValkeySettings.from_args(args)
    assert settings is not None
    async with ValkeyHaltChannel(
        settings.url, key=settings.halt_key, allowed_signers=allowed, revoked=revoked
    ) as valkey:
        yield _Target(valkey, "halt key", "--valkey URL", lambda: _read_valkey(valkey))


async def _read_file(channel: FileHaltChannel) -> _Reading:
    state = await channel.state()
    if not state.halted:
        return _Reading(None)
    if state.error is not None:
        return _Reading(state.reason, "unreadable")
    return _Reading(state.reason, None, state.halt_id)


async def _read_valkey(channel: ValkeyHaltChannel) -> _Reading:
    await trio.lowlevel.checkpoint()
    state = channel.state  # what the channel read on entering: no further I/O
    if not state.halted:
        return _Reading(None)
    problem: _Problem | None = None
    if not state.connected:
        problem = "unreachable"
    elif state.problem == "no halt record":
        problem = "no record"
    elif state.problem is not None:
        problem = "unreadable"
    return _Reading(state.reason, problem, state.halt_id)


async def halt_command(args: argparse.Namespace) -> int:
    signed = await sign_halt(args)
    async with open_channel(args) as target:
        if await target.channel.ahalt(args.reason, signed=signed):
            print(f"halted: {plain(args.reason)}")
            kept = target.channel.kept_aside
            if kept is not None:
                print(f"the unreadable {target.what} was kept as {kept}")
        else:
            print(f"already halted: {plain(await target.channel.get_halt_reason() or '')}")
    return EXIT_OK


async def clear_command(args: argparse.Namespace) -> int:
    if not args.approver and not args.approval:
        raise UsageError(
            "clear needs --approval FILE twice (signed, from conclave approve) or, on a "
            "channel without --allowed-signers, --approver NAME twice"
        )
    approvals = await read_files(args.approval, "--approval")
    async with open_channel(args) as target:
        cleared = await target.channel.aclear(
            approvers=args.approver, approvals=approvals, reason=args.reason
        )
    print("cleared" if cleared else "not halted; nothing to clear")
    return EXIT_OK


async def read_files(paths: list[Path], option: str) -> list[str]:
    """The texts of ``paths`` (read in a worker thread); a clear error if one cannot be.
    Each is an approval file, so at most :data:`MAX_APPROVAL_CHARS` bytes are read (an
    approval is ASCII JSON): ``/dev/zero`` or a huge file is refused, not read into
    memory, and a FIFO nobody writes to reads as empty instead of hanging the open."""

    def read_one(path: Path) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_APPROVAL_CHARS + 1)
        if len(raw) > MAX_APPROVAL_CHARS:
            raise UsageError(
                f"{option} {plain(str(path))}: larger than {MAX_APPROVAL_CHARS} bytes "
                "(not an approval file)"
            )
        return raw.decode("utf-8")

    def read() -> list[str]:
        texts = []
        for path in paths:
            try:
                texts.append(read_one(path))
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise UsageError(f"{option} {plain(str(path))}: {why}") from None
        return texts

    return await trio.to_thread.run_sync(read)


async def status_command(args: argparse.Namespace) -> int:
    async with open_channel(args) as target:
        reading = await target.read()
        history: tuple[HaltRecord, ...] = ()
        if reading.problem != "unreachable":
            # Lost since the read: the state above is still what the channel read.
            with contextlib.suppress(ConclaveError):
                history = await target.channel.ahistory()
    if reading.reason is None:
        print("not halted")
    else:
        print(f"HALTED: {plain(reading.reason)}")
        if reading.problem == "no record":
            print(
                f"  two approvers clear it: conclave clear {target.option} "
                "--approver A --approver B --reason TEXT"
            )
        elif reading.problem == "unreadable":
            print(
                f"  `conclave halt {target.option}` rewrites it as a readable halt; "
                "then it can be cleared"
            )
    for record in history[-5:]:
        names = [plain(name) for name in record.approvers]
        if record.fingerprints:  # signed: the names were verified against these keys
            names = [f"{n} [{plain(k)}]" for n, k in zip(names, record.fingerprints, strict=False)]
        who = f" by {', '.join(names)}" if names else ""
        print(f"  {record.at.isoformat()} {record.action}{who}: {plain(record.reason)}")
    if args.valkey is not None:  # the cluster's own section (adapters.cli._budget)
        from adapters.cli._budget import cluster_status

        for line in await cluster_status(args.valkey, args.valkey_key_prefix):
            print(line)
    return EXIT_HALTED if reading.reason is not None else EXIT_OK
