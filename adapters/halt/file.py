"""A durable, cross-process halt channel: a small JSON file.

Any process that can write the file can halt every deliberation that reads it, and the
halt survives restarts (it is sticky until cleared by two approvers).  Writes are atomic
(temp file, fsync, rename, fsync of the directory) and serialized across processes with
an advisory lock, so two processes halting at once keep the first reason and lose no
history.  Reads run in a worker thread, so polling never blocks the trio loop; ``halt``
and ``clear`` write at once, like ``HaltSwitch``'s, and ``ahalt``/``aclear`` write from a
worker thread.

**Fail-closed.**  Only two things read as "not halted": no file at the path, or a
well-formed document (:mod:`adapters.halt.document`, the rules the Valkey channel reads by
too) whose ``halted`` is ``false``.  Anything else at the path -- bytes that are not UTF-8
JSON, JSON nested too deeply to parse, a wrong type at any level, a missing or unknown
schema, halted without a reason, a duplicated key, an empty file, a file larger than
:data:`MAX_HALT_FILE_BYTES`, a directory, a FIFO, a dangling symlink, a file that cannot
be opened -- reads as **halted**, with a reason that says the file is corrupt or
unreadable (logged once per distinct problem).  Reading never raises.

**Repairing.**  :meth:`FileHaltChannel.halt` always writes a valid halted document, also
over an unreadable file: the unreadable entry is kept beside it as
``<name>.corrupt-<UTC timestamp>`` for forensics, and the new history starts with this
halt (the old one could not be read).  :meth:`FileHaltChannel.clear` refuses an
unreadable file (you cannot clear what you cannot read): halt first, then clear.

File format::

    {"schema": "conclave.halt/1", "halted": true, "reason": "...", "updated_at": "...Z",
     "history": [{"action": "halt", "reason": "...", "at": "...", "approvers": []}, ...]}
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import attrs
import trio

from adapters._atomic import write_atomically
from adapters.halt.approval import (
    ClearRequest,
    Signer,
    check_clear_request,
    check_signer_files,
    clear_record,
    halt_record,
    signature_verifier,
    signer_files,
    verify_request,
    verify_signed_halt,
)
from adapters.halt.document import (
    CorruptHaltDocument,
    SignedClears,
    encode_document,
    new_halt_id,
    parse_document,
)
from kernel import (
    NO_REASON,
    HaltClearDeniedError,
    HaltRecord,
    InvalidRequestError,
    check_halt_reason,
    utc_now,
)
from kernel.validate import check_seconds

__all__ = ["MAX_HALT_FILE_BYTES", "FileHaltChannel", "HaltFileState"]

log = logging.getLogger("adapters.halt.file")

#: A halt file larger than this reads as corrupt (halted).  Writers keep the history
#: under it by dropping the oldest records (about 20 000 fit).
MAX_HALT_FILE_BYTES = 4 * 1024 * 1024

_MAX_PROBLEM_CHARS = 300  # an exception's text in a reason is cut to this


@attrs.frozen(slots=True)
class HaltFileState:
    """What the file says: halted or not, why, its history -- or why it is unreadable.

    ``error`` is None for a readable file; otherwise it says what is wrong, ``halted``
    is True and ``history`` is empty (nothing of an unreadable file is trusted).
    """

    halted: bool
    reason: str | None
    history: tuple[HaltRecord, ...] = ()
    error: str | None = None
    halt_id: str | None = None  # the current halt's id (None when not halted, unreadable)
    signed_clears: SignedClears | None = None  # signer files every clear is checked against


class FileHaltChannel:
    """A :class:`~kernel.HaltChecker` (with ``wait_halted``) and a
    :class:`~kernel.HaltControl`, backed by a JSON file.

    Reads (``is_halted``, ``get_halt_reason``, ``wait_halted``, ``ahistory``) run in a
    worker thread.  ``halt`` and ``clear`` are synchronous like ``HaltSwitch``'s;
    ``ahalt`` and ``aclear`` (the port) do the same write from a worker thread.  A
    missing file means "not halted"; a missing *directory* is created on the first write.

    Args:
        path: the halt file.
        poll_interval: how often ``wait_halted`` re-reads the file (seconds).
        lock_timeout: how long a write waits for the advisory lock (seconds) if another
            process holds it.  Past it, ``halt`` writes anyway (a halt never waits on a
            stuck process; the only risk is a lost history record) and ``clear`` raises
            :class:`~kernel.HaltClearDeniedError`.
        allowed_signers: an OpenSSH allowed-signers file: then a clear takes signed
            approvals only (:mod:`adapters.halt.approval`), and a halt may be signed.
        revoked: with ``allowed_signers``, a revocation list (KRL or public keys) whose
            keys are refused.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        poll_interval: float = 0.05,
        *,
        lock_timeout: float = 5.0,
        allowed_signers: str | os.PathLike[str] | None = None,
        revoked: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.verifier = signature_verifier(allowed_signers, revoked)
        self.poll_interval = check_seconds(poll_interval, "poll_interval")
        self.lock_timeout = check_seconds(lock_timeout, "lock_timeout")
        #: Where the last :meth:`halt` over an unreadable file kept that file (or None).
        self.kept_aside: Path | None = None
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"<FileHaltChannel {str(self.path)!r}>"

    # ------------------------------------------------------------ reading

    def read_state(self) -> HaltFileState:
        """Read the file now (blocking; use from a thread or outside trio).  Never raises."""
        try:
            raw = self._read_bytes()
            if raw is None:
                return self._ok(HaltFileState(False, None))
            doc = parse_document(raw)
            return self._ok(
                HaltFileState(
                    doc.halted, doc.reason, doc.history, None, doc.halt_id, doc.signed_clears
                )
            )
        except CorruptHaltDocument as exc:
            return self._unreadable(f"corrupt halt file {self.path}: {exc}")
        except OSError as exc:
            return self._unreadable(f"cannot read {self.path}: {exc.strerror or exc}")
        except Exception as exc:
            # Fail-closed whatever the parser raised: RecursionError (deep nesting),
            # UnicodeDecodeError, JSONDecodeError, int-size limits, MemoryError's kin...
            return self._unreadable(f"corrupt halt file {self.path}: {type(exc).__name__}: {exc}")

    def _read_bytes(self) -> bytes | None:
        """The file's bytes, or None if there is nothing at the path.  Only a regular
        file up to MAX_HALT_FILE_BYTES is read; O_NONBLOCK so a FIFO cannot hang us."""
        fd = self._open()
        if fd is None:
            return None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                what = "it is a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise CorruptHaltDocument(what)
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_HALT_FILE_BYTES:
                chunk = os.read(fd, MAX_HALT_FILE_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > MAX_HALT_FILE_BYTES:
            raise CorruptHaltDocument(f"larger than {MAX_HALT_FILE_BYTES} bytes")
        return b"".join(chunks)

    def _open(self) -> int | None:
        """A read-only descriptor of the file at the path, or None if there is none."""
        for _ in range(2):
            try:
                return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                try:
                    link = stat.S_ISLNK(os.lstat(self.path).st_mode)
                except FileNotFoundError:
                    return None  # nothing there
                if link and not os.path.exists(self.path):
                    raise CorruptHaltDocument("it is a dangling symbolic link") from None
                # Something appeared between the open and the look (another process's
                # atomic rename): open again rather than call it corrupt.
        raise CorruptHaltDocument("the path keeps changing under the reader")

    def _ok(self, state: HaltFileState) -> HaltFileState:
        if self._last_error is not None:
            log.warning("halt file readable again", extra={"halt_file": str(self.path)})
            self._last_error = None
        return state

    def _unreadable(self, why: str) -> HaltFileState:
        why = why if len(why) <= _MAX_PROBLEM_CHARS else why[: _MAX_PROBLEM_CHARS - 3] + "..."
        if why != self._last_error:  # log each new problem once, not on every poll
            log.error(
                "halt file unreadable; treated as halted",
                extra={"halt_file": str(self.path), "problem": why},
            )
            self._last_error = why
        return HaltFileState(True, f"halt file unreadable ({why}); treated as halted", error=why)

    async def state(self) -> HaltFileState:
        # Abandoned if cancelled: a read stuck in a hung filesystem (a hard NFS mount)
        # must not hold the caller past its read deadline.  Reading changes nothing, so
        # the thread may finish on its own, later.
        return await trio.to_thread.run_sync(self.read_state, abandon_on_cancel=True)

    async def is_halted(self) -> bool:
        return (await self.state()).halted

    async def get_halt_reason(self) -> str | None:
        return (await self.state()).reason

    async def wait_halted(self) -> str:
        while True:
            state = await self.state()
            if state.halted:
                return state.reason or NO_REASON
            await trio.sleep(self.poll_interval)

    async def ahistory(self) -> tuple[HaltRecord, ...]:
        """The file's history, oldest first (empty if unreadable), read in a worker thread."""
        return (await self.state()).history

    @property
    def history(self) -> tuple[HaltRecord, ...]:
        """:meth:`ahistory`, read now (blocking: outside trio, or from a thread)."""
        return self.read_state().history

    # ------------------------------------------------------------ writing

    def halt(self, reason: str, *, signed: str | None = None) -> bool:
        """Raise the halt now; True if this call wrote it (the first reason is kept).

        ``signed``: the text of a signed halt (``conclave halt --sign-key``); verified
        against the allowed-signers file first, the history then says who halted.  One
        that does not verify raises :class:`~kernel.InvalidRequestError` and writes
        nothing.

        Synchronous, like :meth:`HaltSwitch.halt <kernel.HaltSwitch.halt>`: the file is
        written (and fsynced) before it returns, which takes a few milliseconds.  From a
        trio task that must not block even that long, use :meth:`ahalt`.

        Over an unreadable file this always writes a valid halted document and returns
        True; the unreadable entry is kept beside it (see :attr:`kept_aside`).  Raises
        ``OSError`` only if the file cannot be written at all.
        """
        return self._halt_signed_now(check_halt_reason(reason), signed)

    def clear(
        self, *, approvers: Collection[str] = (), reason: str, approvals: Sequence[str] = ()
    ) -> bool:
        """Clear the halt now: two distinct approvers and a reason, as for ``HaltSwitch``
        -- or, on a channel with an allowed-signers file, two signed ``approvals`` (the
        texts of approval files) from distinct principals for the current halt; True if
        a halt was cleared, False if there was none.

        Raises :class:`~kernel.HaltClearDeniedError` (an approval that does not qualify:
        :class:`~adapters.halt.approval.ApprovalRefusedError`), having changed nothing,
        if the approvers or approvals do not qualify, the file is unreadable (halt first,
        which rewrites it, then clear) or its lock cannot be taken.
        """
        request = check_clear_request(approvers, approvals, reason, self.verifier)
        return self._clear_request_now(request, reason)

    # The HaltControl port: the same writes, from a worker thread.  Not abandoned when
    # cancelled: a halt (or clear) that was asked for is written, whatever happens to
    # the caller.

    async def ahalt(self, reason: str, *, signed: str | None = None) -> bool:
        """:meth:`halt`, with the disk write (and ssh-keygen) in a worker thread."""
        reason = check_halt_reason(reason)
        return await trio.to_thread.run_sync(self._halt_signed_now, reason, signed)

    async def aclear(
        self, *, approvers: Collection[str] = (), reason: str, approvals: Sequence[str] = ()
    ) -> bool:
        """:meth:`clear`, with ssh-keygen and the disk write in a worker thread."""
        request = check_clear_request(approvers, approvals, reason, self.verifier)
        return await trio.to_thread.run_sync(self._clear_request_now, request, reason)

    def _halt_signed_now(self, reason: str, signed: str | None) -> bool:
        signer = None if signed is None else verify_signed_halt(self.verifier, signed, reason)
        return self._halt_now(reason, signer)

    def _halt_now(self, reason: str, signer: Signer | None = None) -> bool:
        with self._locked(required=False):
            state = self.read_state()
            if state.halted and state.error is None:
                return False
            if signer is not None:
                try:
                    check_signer_files(
                        state.signed_clears, self.verifier, str(self.path), signed=True
                    )
                except HaltClearDeniedError as exc:
                    raise InvalidRequestError(f"{exc} (nothing was written)") from None
            halt_id = new_halt_id()
            record = halt_record(reason, halt_id, signer)
            history = [*state.history, record]
            files = signer_files(state.signed_clears, self.verifier)
            data = _encode(True, reason, history, self.path, halt_id, files)
            if state.error is None:
                write_atomically(self.path, data)
            else:
                self._replace_unreadable(data, state.error)
        log.critical(
            "halt raised",
            extra={"halt_channel": "file", "halt_file": str(self.path), "halt_reason": reason},
        )
        return True

    def _clear_request_now(self, request: ClearRequest, reason: str) -> bool:
        # The signatures first, outside the lock (ssh-keygen takes milliseconds, a halt
        # must not wait on it); which halt they approve is checked under the lock, against
        # what the file says then.
        signers = verify_request(self.verifier, request)
        return self._clear_now(request.names, signers, reason)

    def _clear_now(self, names: tuple[str, ...], signers: tuple[Signer, ...], reason: str) -> bool:
        with self._locked(required=True):
            state = self.read_state()
            if state.error is not None:
                raise HaltClearDeniedError(
                    f"CT-11: cannot clear {self.path}: it is unreadable ({state.error}); "
                    "raise the halt again (conclave halt) to rewrite it, then clear"
                )
            if not state.halted:
                return False
            check_signer_files(
                state.signed_clears, self.verifier, str(self.path), signed=bool(signers)
            )
            assert state.halt_id is not None and state.reason is not None
            record = clear_record(reason, state.halt_id, state.reason, names, signers)
            approvers = record.approvers
            history = [*state.history, record]
            files = signer_files(state.signed_clears, self.verifier)
            write_atomically(self.path, _encode(False, None, history, self.path, None, files))
        log.warning(
            "halt cleared",
            extra={
                "halt_channel": "file",
                "halt_file": str(self.path),
                "approvers": list(approvers),
            },
        )
        return True

    def _replace_unreadable(self, data: bytes, problem: str) -> None:
        """Write ``data`` over an unreadable entry, keeping that entry aside.

        A regular file is hard-linked aside, then replaced atomically: the path never
        stops reading as halted.  Anything else (a directory, a FIFO, a symlink) cannot
        be replaced by a rename, so it is renamed aside and the new file, already
        written and fsynced under a temporary name, is renamed in right after; between
        those two renames (microseconds) the path is empty and would read "not halted".
        If the entry cannot be kept, the halt is written anyway.
        """
        aside = self._aside_name()
        self.kept_aside = None
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is None or stat.S_ISREG(mode):
            if mode is not None:
                try:
                    os.link(self.path, aside, follow_symlinks=False)
                    self.kept_aside = aside
                except OSError as exc:
                    log.error(
                        "could not keep the unreadable halt file",
                        extra={"halt_file": str(self.path), "error": exc.strerror or str(exc)},
                    )
            write_atomically(self.path, data)
        else:
            staged = self.path.with_name(f".{self.path.name}.replacing")
            write_atomically(staged, data)
            os.rename(self.path, aside)
            os.replace(staged, self.path)
            self.kept_aside = aside
            _fsync_dir(self.path.parent)
        log.error(
            "unreadable halt file replaced by a halted one",
            extra={
                "halt_file": str(self.path),
                "problem": problem,
                "kept_as": str(self.kept_aside) if self.kept_aside else None,
            },
        )

    def _aside_name(self) -> Path:
        stamp = utc_now().strftime("%Y%m%dT%H%M%S.%fZ")
        candidate = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while os.path.lexists(candidate):
            candidate = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        return candidate

    @contextlib.contextmanager
    def _locked(self, *, required: bool) -> Iterator[None]:
        """An advisory lock on a sibling file, so read-modify-write is one step.

        Waits up to ``lock_timeout``.  If the lock cannot be had (held by a stuck
        process, or the lock file unusable), a ``required`` caller gets
        HaltClearDeniedError and any other proceeds unlocked, with an error logged.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock = _open_lock(lock_path)
        except OSError as exc:
            why = (
                "it is a symbolic link (not followed)"
                if exc.errno == errno.ELOOP
                else exc.strerror or str(exc)
            )
            self._no_lock(required, f"cannot open {lock_path}: {why}")
            yield
            return
        try:
            if not _flock(lock, self.lock_timeout):
                self._no_lock(required, f"{lock_path} held for more than {self.lock_timeout} s")
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)

    def _no_lock(self, required: bool, why: str) -> None:
        if required:
            raise HaltClearDeniedError(f"CT-11: cannot clear {self.path}: {why}")
        log.error(
            "halt file lock unavailable; writing without it",
            extra={"halt_file": str(self.path), "problem": why},
        )


def _open_lock(path: Path) -> int:
    """The lock file, opened (created 0600 if missing) without following a symbolic link:
    a link planted there would make us create or open its target.  ``O_NONBLOCK``: a FIFO
    planted there cannot hang us.  Its mode is left alone if it exists (never widened)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


def _flock(fd: int, timeout: float) -> bool:
    """Take an exclusive flock within ``timeout`` seconds (blocking; from a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)  # a lock holder writes for milliseconds; poll gently


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the document


def _encode(
    halted: bool,
    reason: str | None,
    history: list[HaltRecord],
    path: Path,
    halt_id: str | None = None,
    signed_clears: SignedClears | None = None,
) -> bytes:
    """The document, keeping it under MAX_HALT_FILE_BYTES by dropping the oldest records
    (the newest, which this write adds, is always kept)."""
    dropped = 0
    while True:
        data = encode_document(
            halted,
            reason,
            history[dropped:],
            halt_id=halt_id,
            signed_clears=signed_clears,
            indent=2,
        )
        if len(data) <= MAX_HALT_FILE_BYTES or dropped >= len(history) - 1:
            break
        dropped += max(1, (len(history) - dropped) // 10)
        dropped = min(dropped, len(history) - 1)
    if dropped:
        log.warning(
            "halt file history trimmed to fit",
            extra={"halt_file": str(path), "records_dropped": dropped},
        )
    return data
