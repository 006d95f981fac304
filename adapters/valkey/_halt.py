"""CT-11 across machines: a halt every process sharing a Valkey (or Redis) server obeys.

Durable, because the halt is a key; instant, because every change is published and each
process listens.  Publish/subscribe alone loses messages (a process that subscribes
late, or reconnects, missed what was said meanwhile), so a process reads the key every
time it (re)subscribes, after every message, and every ``refresh_interval`` seconds.

**Fail-closed.**  This process counts as halted unless it is subscribed *and* the key,
read since, is a well-formed document that says ``"halted": false``.  A lost connection,
a missing key (a new server, or one that restarted without its data), a key of another
type, a value that is too large, or not a halt document (:mod:`adapters.halt.document`, the
rules the file channel reads by too): halted, with
a reason that says which, until the key is read again and says otherwise.  A first
deployment therefore starts halted, and two approvers clear it once
(``conclave clear --valkey URL ...``); so does a server that lost its data.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Collection, Sequence
from contextlib import AsyncExitStack
from typing import Any

import attrs
import trio

from adapters.halt.approval import (
    ApprovalRefusedError,
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
    encode_record,
    encode_signed_clears,
    new_halt_id,
    parse_document,
    parse_record,
)
from adapters.urls import redact_url
from adapters.valkey._connection import (
    BackgroundClient,
    Client,
    StoreError,
    ValkeyUnavailableError,
    backoff,
    check_name,
    check_timeout,
    check_url,
    describe,
    reraise_cancellation,
    store_call,
    to_int,
)
from adapters.valkey._lua import HALT, HALT_CLEAR, HALT_READ
from kernel import (
    HaltClearDeniedError,
    HaltRecord,
    InvalidRequestError,
    check_halt_reason,
    utc_now,
)

__all__ = ["HaltChannelState", "ValkeyHaltChannel"]

log = logging.getLogger("adapters.valkey")

#: A halt key larger than this reads as corrupt (halted) without being fetched (the
#: document only: the history is a list beside it).
MAX_HALT_BYTES = 64 * 1024
#: The history keeps this many records, dropping the oldest.
MAX_HISTORY = 1000
#: The key's state before the first read: halted, but not known to be unreadable.
_NOT_READ = "not read yet"


@attrs.frozen(slots=True)
class HaltChannelState:
    """What this process knows of the halt.

    ``reason`` is None only when not halted.  ``connected`` is True while the channel is
    subscribed and has read the key since.  ``problem`` says why this reads as halted
    without anyone having raised a halt (unreachable, no halt record, an unreadable
    key); None for a real halt, or when not halted.
    """

    halted: bool
    reason: str | None
    connected: bool
    problem: str | None = None
    halt_id: str | None = None  # the halt's id, when the key holds a readable halt


@attrs.frozen(slots=True)
class _KeyState:
    halted: bool
    reason: str | None
    problem: str | None = None
    halt_id: str | None = None
    signed_clears: SignedClears | None = None  # signer files every clear is checked against


class ValkeyHaltChannel(BackgroundClient):
    """A halt channel on a Valkey or Redis server, for ``async with``.

    A :class:`~kernel.HaltChecker` with ``wait_halted`` (:class:`~kernel.HaltWaiter`),
    ``halted_now()`` (:class:`~kernel.HaltProbe`) and ``on_halt`` (:class:`~kernel.
    HaltNotifier`), and a :class:`~kernel.HaltControl` (``halt``, ``clear`` and
    ``history`` are ``async``; ``ahalt``, ``aclear``, ``ahistory`` the same): the reads
    answer from this process's last known state, which a
    background task keeps current (within milliseconds of a change anywhere).

    Writing needs the network, so :meth:`halt` and :meth:`clear` are ``async``; the
    synchronous probe, :meth:`halted_now`, never does I/O.  An application that must
    halt from synchronous code raises its in-process :class:`~kernel.HaltSwitch` (which
    the kernel obeys at once, wired with this channel through
    :class:`~kernel.DualChannelHaltChecker`) and then awaits :meth:`halt` here so every
    other process stops too.

    Entering connects, subscribes and reads the key (bounded by ``timeout``); an
    unreachable server does not make entering fail: the channel reads as halted and
    keeps reconnecting (backing off up to 1 s between attempts).  Outside the block the
    channel reads as halted.

    Args:
        url: ``redis://``, ``rediss://``, ``valkey://``, ``valkeys://`` or ``unix://``.
        key: the halt key; its history is ``<key>:history``, its events channel
            ``<key>:events``.
        timeout: how long one call to the server may take (seconds).
        refresh_interval: how often the key is re-read when nothing is published (seconds);
            also how soon a silently dead connection is noticed.
        allowed_signers: an OpenSSH allowed-signers file: then a clear takes signed
            approvals only (:mod:`adapters.halt.approval`), and a halt may be signed.
        revoked: with ``allowed_signers``, a revocation list whose keys are refused.
    """

    def __init__(
        self,
        url: str,
        *,
        key: str = "conclave:halt",
        timeout: float = 2.0,
        refresh_interval: float = 1.0,
        allowed_signers: str | os.PathLike[str] | None = None,
        revoked: str | os.PathLike[str] | None = None,
    ) -> None:
        self._url = check_url(url)
        self.verifier = signature_verifier(allowed_signers, revoked)
        self.url = redact_url(self._url)
        self.key = check_name(key, "key")
        self.timeout = check_timeout(timeout, "timeout")
        self.refresh_interval = check_timeout(refresh_interval, "refresh_interval")
        self._history_key = f"{self.key}:history"
        self._events = f"{self.key}:events"
        #: Where the last :meth:`halt` over an unreadable key kept it (or None).
        self.kept_aside: str | None = None
        super().__init__()
        self._listeners: list[Callable[[str], None]] = []
        self._key_state = _KeyState(True, _NOT_READ, _NOT_READ)
        self._connected = False
        self._lost_why = "not connected"
        self._state = HaltChannelState(True, self._unreachable_reason(), False, "not connected")
        self._halted_event = trio.Event()
        self._halted_event.set()
        self._cleared_event = trio.Event()
        self._read_event = trio.Event()

    def __repr__(self) -> str:
        return f"<ValkeyHaltChannel {self.url} key={self.key!r} halted={self._state.halted}>"

    # ------------------------------------------------------------ lifecycle

    async def _start(self, client: Client, stack: AsyncExitStack) -> None:
        self._halt_script = client.register_script(HALT)
        self._clear_script = client.register_script(HALT_CLEAR)
        self._read_script = client.register_script(HALT_READ)
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        await self._nursery.start(self._watch)

    def _after_close(self) -> None:
        self._connected = False
        self._lost_why = "closed"
        self._recompute()

    # ------------------------------------------------------------ reading (HaltChecker)

    @property
    def state(self) -> HaltChannelState:
        """This process's view now (no I/O)."""
        return self._state

    def halted_now(self) -> bool:
        """Halted as far as this process knows right now (no I/O): the kernel's probe."""
        return self._state.halted

    async def is_halted(self) -> bool:
        await trio.lowlevel.checkpoint()
        return self._state.halted

    async def get_halt_reason(self) -> str | None:
        await trio.lowlevel.checkpoint()
        return self._state.reason

    async def wait_halted(self) -> str:
        """Return the reason as soon as this process counts as halted (at once if it does)."""
        while True:
            event = self._halted_event
            state = self._state
            if state.halted:
                await trio.lowlevel.checkpoint()
                assert state.reason is not None
                return state.reason
            await event.wait()

    async def wait_cleared(self) -> None:
        """Return once this process no longer counts as halted (at once if it does not):
        a service that stays up waits here to resume after two approvers clear a halt."""
        while True:
            event = self._cleared_event
            if not self._state.halted:
                await trio.lowlevel.checkpoint()
                return
            await event.wait()

    async def wait_read(self) -> None:
        """Return after this process's next successful read of the key (after a
        reconnect, say: then :attr:`state` is what the server says, not a guess)."""
        await self._read_event.wait()

    def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(reason)`` whenever this process comes to count as halted (see
        :class:`~kernel.HaltNotifier`); returns the unregister call.  It runs in the
        channel's task, before the kernel's watcher would wake: it must be quick."""
        self._listeners.append(listener)

        def unregister() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unregister

    async def history(self) -> tuple[HaltRecord, ...]:
        """The halt history on the server, oldest first (records that cannot be read are
        skipped and logged).  Raises :class:`ValkeyUnavailableError` if unreachable."""
        client = self._require_open()
        key = self._history_key
        try:
            kind = await store_call(lambda: client.type(key), self.timeout)
            if kind not in ("list", b"list"):
                if kind not in ("none", b"none"):
                    log.error("halt history unreadable", extra={"halt_key": key})
                return ()
            raw = await store_call(lambda: client.lrange(key, 0, -1), self.timeout)
        except StoreError as exc:
            raise ValkeyUnavailableError(f"cannot read {key} on {self.url}: {exc}") from None
        records = []
        for item in raw:
            try:
                records.append(parse_record(item if isinstance(item, bytes) else b""))
            except CorruptHaltDocument:
                log.error("halt history record unreadable; skipped", extra={"halt_key": key})
        return tuple(records)

    # ------------------------------------------------------------ writing

    async def halt(self, reason: str, *, signed: str | None = None) -> bool:
        """Raise the halt for every process on the server; True if this call raised it
        (the first reason is kept; False if it was already raised).

        ``signed``: the text of a signed halt, verified against the allowed-signers file
        first (:class:`~kernel.InvalidRequestError`, nothing written, if it does not
        verify); the history then says who halted.

        Over an unreadable key this always writes a valid halted document; the unreadable
        value is kept under ``<key>:corrupt:<UTC time>`` (see :attr:`kept_aside`).  This
        process counts as halted before it returns.  Raises :class:`ValkeyUnavailableError`
        if the server cannot be reached: then nothing was written (this process still
        reads as halted: it cannot reach the channel).
        """
        reason = check_halt_reason(reason)
        self._require_open()
        signer = None
        if signed is not None:
            verifier = self.verifier
            signer = await trio.to_thread.run_sync(
                lambda: verify_signed_halt(verifier, signed, reason)
            )
        halt_id = new_halt_id()
        stamp = _stamp()
        aside = f"{self.key}:corrupt:{stamp}"
        keys = [self.key, self._history_key, aside, f"{self._history_key}:corrupt:{stamp}"]
        for _ in range(3):
            # The signer files the key records (as last read) are kept for good; the
            # script refuses (3) if the key records others than this process read.
            recorded = self._key_state.signed_clears
            if signer is not None:
                try:
                    check_signer_files(recorded, self.verifier, f"halt key {self.key}", signed=True)
                except HaltClearDeniedError as exc:
                    raise InvalidRequestError(f"{exc} (nothing was written)") from None
            files = signer_files(recorded, self.verifier)
            args: list[Any] = [
                encode_document(True, reason, halt_id=halt_id, signed_clears=files),
                encode_record(halt_record(reason, halt_id, signer)),
                self._events,
                MAX_HISTORY,
                MAX_HALT_BYTES,
                b"1"
                if self._key_state.problem not in (None, "no halt record", _NOT_READ)
                else b"0",
                b"" if recorded is None else json.dumps(encode_signed_clears(recorded)).encode(),
            ]
            try:
                call = functools.partial(self._halt_script, keys=keys, args=args)
                done = to_int(await store_call(call, self.timeout), "halt")
                if done != 3:
                    break
                await self._refresh()
            except StoreError as exc:
                raise ValkeyUnavailableError(
                    f"CT-11: {_cannot('raise the halt', self.url, exc)}; nothing was written"
                ) from None
        else:
            raise ValkeyUnavailableError(
                f"CT-11: the signer files recorded at {self.key} keep changing; nothing was written"
            )
        self.kept_aside = aside if done == 2 else None
        if done:
            # Halted here at once, without waiting for our own message (never wrongly:
            # a clear after this is read by the watcher, which re-reads the key).
            self._set_key_state(_KeyState(True, reason, None, halt_id, files))
            log.critical(
                "halt raised",
                extra={"halt_channel": "valkey", "halt_key": self.key, "halt_reason": reason},
            )
            if self.kept_aside is not None:
                log.error(
                    "unreadable halt key replaced by a halted one",
                    extra={"halt_key": self.key, "kept_as": self.kept_aside},
                )
        return done > 0

    async def clear(
        self, *, approvers: Collection[str] = (), reason: str, approvals: Sequence[str] = ()
    ) -> bool:
        """Clear the halt: two distinct approvers and a reason, as for ``HaltSwitch`` --
        or, on a channel with an allowed-signers file, two signed ``approvals`` (the
        texts of approval files) from distinct principals for the current halt.

        True if a halt (or a missing halt record: the first clear of a new server) was
        cleared, False if there was nothing to clear.  Every process resumes once its
        subscription delivers the change (milliseconds).  Raises
        :class:`~kernel.HaltClearDeniedError`, having changed nothing, if the approvers
        or approvals do not qualify, the key is unreadable (halt first, which rewrites
        it, then clear), the halt changed while clearing, or the server cannot be
        reached.  Signed approvals name a halt, so a missing halt record is cleared by
        names only: with an allowed-signers file, raise a halt first, then approve it.
        """
        request = check_clear_request(approvers, approvals, reason, self.verifier)
        self._require_open()
        verifier = self.verifier
        # The signatures first (ssh-keygen, in a thread); which halt they approve is
        # checked against the key read after, and the write is a compare-and-set on
        # that read: a halt raised meanwhile is not cleared.
        signers = await trio.to_thread.run_sync(lambda: verify_request(verifier, request))
        try:
            kind, raw = await self._read_raw()
        except StoreError as exc:
            raise HaltClearDeniedError(f"CT-11: {_cannot('clear', self.url, exc)}") from None
        halt_id: str | None = None
        recorded: SignedClears | None = None
        if kind == "none":
            if signers:
                raise ApprovalRefusedError(
                    f"CT-11: there is no halt record at {self.key}: signed approvals name "
                    "a halt; raise one (conclave halt --valkey ...), approve it, then clear"
                )
            expected = b""
        else:
            state = self._interpret(kind, raw)
            if state.problem is not None:
                raise HaltClearDeniedError(
                    f"CT-11: cannot clear: {state.reason}; raise the halt again "
                    "(conclave halt --valkey ...) to rewrite it, then clear"
                )
            if not state.halted:
                return False
            recorded = state.signed_clears
            check_signer_files(
                recorded, self.verifier, f"halt key {self.key}", signed=bool(signers)
            )
            expected, halt_id = raw, state.halt_id
        if halt_id is None:
            record = HaltRecord("clear", reason, utc_now(), request.names)
        else:
            record = clear_record(reason, halt_id, state.reason or "", request.names, signers)
        keys = [self.key, self._history_key, f"{self._history_key}:corrupt:{_stamp()}"]
        args: list[Any] = [
            expected,
            encode_document(False, None, signed_clears=signer_files(recorded, self.verifier)),
            encode_record(record),
            self._events,
            MAX_HISTORY,
        ]
        try:
            done = to_int(
                await store_call(lambda: self._clear_script(keys=keys, args=args), self.timeout),
                "clear",
            )
        except StoreError as exc:
            raise HaltClearDeniedError(f"CT-11: {_cannot('clear', self.url, exc)}") from None
        if not done:
            raise HaltClearDeniedError(
                "CT-11: the halt changed while it was being cleared (a new halt?); "
                "read the status and clear again"
            )
        log.warning(
            "halt cleared",
            extra={
                "halt_channel": "valkey",
                "halt_key": self.key,
                "approvers": list(record.approvers),
            },
        )
        return True

    # HaltControl: the async calls above under the port's names (on this channel the
    # plain names are async already; HaltSwitch's and the file's are not).
    ahalt = halt
    aclear = clear
    ahistory = history

    # ------------------------------------------------------------ the watcher

    async def _watch(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe, read the key, then follow: each message, and every
        ``refresh_interval`` of silence, re-reads it.  On any failure: halted, back off,
        start again.  ``started`` after the first attempt, whatever its outcome."""
        client = self._client
        assert client is not None
        started = False
        attempt = 0
        while True:
            try:
                async with client.pubsub(
                    channels=[self._events],
                    ignore_subscribe_messages=True,
                    retry_policy=None,  # we reconnect ourselves: a reconnect must re-read
                    subscription_timeout=self.timeout,
                    max_idle_seconds=max(1.0, self.refresh_interval),
                ) as subscription:
                    await self._refresh()
                    attempt = 0
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        message = None
                        with trio.move_on_after(self.refresh_interval):
                            message = await subscription.get_message()
                        if message is not None and message["type"] == "message":
                            self._on_message(message["data"])
                        await self._refresh()
            except BaseException as exc:
                reraise_cancellation(exc)
                self._lost(describe(exc))
            if not started:
                started = True
                task_status.started()
            await trio.sleep(backoff(attempt))
            attempt += 1

    def _on_message(self, data: object) -> None:
        """A published document: a halt applies at once; anything else waits for the
        read that follows every message."""
        try:
            doc = parse_document(data if isinstance(data, bytes) else str(data).encode())
        except CorruptHaltDocument:
            return
        if doc.halted:
            self._set_key_state(_KeyState(True, doc.reason, None, doc.halt_id))

    async def _read_raw(self) -> tuple[str, bytes]:
        """(type of the key, its value if a string of sane size) -- one atomic read."""
        reply: object = await store_call(
            # Read-only (EVALSHA_RO): a worker whose server user may only read the halt
            # key can run it (a plain EVALSHA declares its keys written).
            lambda: self._read_script(keys=[self.key], args=[MAX_HALT_BYTES], readonly=True),
            self.timeout,
        )
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
            raise StoreError("unexpected reply to the halt read")
        kind = reply[0].decode("ascii", "replace")
        value = reply[1] if kind == "string" and len(reply) > 1 else b""
        return kind, value if isinstance(value, bytes) else b""

    async def _refresh(self) -> None:
        kind, raw = await self._read_raw()
        self._connected = True
        self._set_key_state(self._interpret(kind, raw))
        self._read_event.set()
        self._read_event = trio.Event()

    def _interpret(self, kind: str, raw: bytes) -> _KeyState:
        if kind == "none":
            why = (
                f"no halt record at {self.key} on {self.url} (a new server, or one that "
                "lost its data); treated as halted until two approvers clear it"
            )
            return _KeyState(True, why, "no halt record")
        if kind == "toolarge":
            problem = f"larger than {MAX_HALT_BYTES} bytes"
        elif kind != "string":
            problem = f"it is a {kind}, not a string"
        else:
            try:
                doc = parse_document(raw)
            except CorruptHaltDocument as exc:
                problem = str(exc)
            else:
                return _KeyState(doc.halted, doc.reason, None, doc.halt_id, doc.signed_clears)
        why = f"halt key {self.key} corrupt, unreadable ({problem}); treated as halted"
        return _KeyState(True, why, problem)

    # ------------------------------------------------------------ state

    def _unreachable_reason(self) -> str:
        return f"halt channel {self.url} unreachable ({self._lost_why}); treated as halted"

    def _lost(self, why: str) -> None:
        if self._connected or why != self._lost_why:
            log.error(
                "halt channel unreachable; treated as halted",
                extra={"halt_url": self.url, "problem": why},
            )
        self._connected = False
        self._lost_why = why
        self._recompute()

    def _set_key_state(self, key_state: _KeyState) -> None:
        if key_state.problem is not None and key_state != self._key_state:
            log.error(
                "halt key unreadable or missing; treated as halted",
                extra={"halt_key": self.key, "problem": key_state.problem},
            )
        self._key_state = key_state
        self._recompute()

    def _recompute(self) -> None:
        if not self._connected:
            new = HaltChannelState(True, self._unreachable_reason(), False, "unreachable")
        else:
            k = self._key_state
            new = HaltChannelState(
                k.halted, k.reason if k.halted else None, True, k.problem, k.halt_id
            )
        old, self._state = self._state, new
        if new.halted and not old.halted:
            assert new.reason is not None
            self._halted_event.set()
            self._cleared_event = trio.Event()
            log.warning("halted", extra={"halt_channel": "valkey", "halt_reason": new.reason})
            for listener in list(self._listeners):
                try:
                    listener(new.reason)
                except Exception:
                    # One broken listener must not keep the halt from the others.
                    log.exception("halt listener raised; ignored", extra={"halt_channel": "valkey"})
        elif old.halted and not new.halted:
            self._cleared_event.set()
            self._halted_event = trio.Event()
            log.warning("halt lifted", extra={"halt_channel": "valkey"})

    def _require_open(self) -> Client:
        if self._client is None:
            raise RuntimeError(
                "a ValkeyHaltChannel is used inside 'async with ValkeyHaltChannel(url) as ...'"
            )
        return self._client


def _cannot(what: str, url: str, exc: StoreError) -> str:
    """Why ``what`` failed: the server refused this user (ACL), or could not be reached."""
    text = str(exc)
    if "AuthorizationError" in text or "NOPERM" in text:
        return f"the server at {url} refused to {what} for this user ({text})"
    return f"cannot reach {url} to {what}: {text}"


def _stamp() -> str:
    return utc_now().strftime("%Y%m%dT%H%M%S.%fZ")
