"""Signed halt statements: a clear approved by a person's SSH key, not by a typed name.

An *approval* is a small statement -- "I, <principal>, approve clearing halt <id> (whose
reason hashes to <sha256>), from <issued> until <expires>" -- signed with the approver's
own SSH key by OpenSSH (``ssh-keygen -Y sign``, namespace :data:`NAMESPACE`), on their
own machine.  A channel configured with an OpenSSH allowed-signers file verifies it with
``ssh-keygen -Y verify`` (and a revocation list, ``-r``): no cryptography is written here,
only the statement and the rules.  A *signed halt* is the same statement with
``"action": "halt"`` and no halt id (the halt does not exist yet): it lets the history
say who halted.

The approval file (what ``conclave approve`` writes, and ``aclear(approvals=...)``
takes as text) is JSON: ``{"schema": "conclave.approval/1", "statement": "<the signed
bytes, as text>", "signature": "-----BEGIN SSH SIGNATURE-----..."}``.  The statement is
kept as the exact text that was signed, so nothing is re-encoded before verifying.

ssh-keygen is a subprocess: these calls block (milliseconds), and the channels run them
in a worker thread (:func:`averify`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import unicodedata
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from itertools import combinations
from pathlib import Path
from typing import Literal

import attrs

from adapters.halt.document import SignedClears
from kernel import (
    HaltClearDeniedError,
    HaltRecord,
    InvalidRequestError,
    check_clear_approvers,
    utc_now,
)

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_APPROVALS",
    "MAX_APPROVAL_CHARS",
    "MAX_LIFETIME",
    "NAMESPACE",
    "ApprovalRefusedError",
    "ClearRequest",
    "HaltStatement",
    "SignatureVerifier",
    "SignedStatement",
    "Signer",
    "approved_signers",
    "check_clear_request",
    "check_signer_files",
    "clear_record",
    "halt_record",
    "reason_hash",
    "sign",
    "signature_verifier",
    "signer_files",
    "verify_request",
    "verify_signed_halt",
]

log = logging.getLogger("adapters.halt.approval")

#: The ssh-keygen signature namespace: a signature made for anything else (git commits,
#: files) is not an approval.
NAMESPACE = "conclave-clear"
SCHEMA = "conclave.approval/1"
#: How long an approval is valid unless the approver says otherwise.
DEFAULT_LIFETIME = timedelta(minutes=15)
#: The longest an approval may be valid: a longer one is a standing permission, not a
#: decision about one halt.
MAX_LIFETIME = timedelta(hours=24)
#: How far in the future an approval may say it was issued (clocks of two machines).
CLOCK_SKEW = timedelta(minutes=5)
#: An approval file is a few hundred characters; anything far larger is not one.
MAX_APPROVAL_CHARS = 64 * 1024
#: The most approvals one clear takes: each pair is checked for being one person's
#: (ssh-keygen, twice a pair), so a pile of them must not keep a clear busy for hours.
MAX_APPROVALS = 8
#: One ssh-keygen call may take this long (seconds) before it counts as failed.
SSH_KEYGEN_TIMEOUT = 20.0


class ApprovalRefusedError(HaltClearDeniedError):
    """A signed statement that does not qualify; the message says which rule and whose."""


@attrs.frozen(slots=True)
class HaltStatement:
    """What an approver signs.  ``halt_id`` is None for a signed halt (the halt it raises
    has no id yet)."""

    action: Literal["clear", "halt"]
    halt_id: str | None
    reason_sha256: str
    principal: str
    issued_at: datetime
    expires_at: datetime

    def payload(self) -> str:
        """The exact text that is signed (sorted keys: one text per statement)."""
        return json.dumps(
            {
                "schema": SCHEMA,
                "action": self.action,
                "halt_id": self.halt_id,
                "reason_sha256": self.reason_sha256,
                "principal": self.principal,
                "issued_at": self.issued_at.isoformat(),
                "expires_at": self.expires_at.isoformat(),
            },
            sort_keys=True,
        )


@attrs.frozen(slots=True)
class SignedStatement:
    """A statement's signed text and its OpenSSH signature (armored)."""

    statement: str
    signature: str

    def to_text(self) -> str:
        doc = {"schema": SCHEMA, "statement": self.statement, "signature": self.signature}
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_text(cls, text: str) -> SignedStatement:
        """Parse an approval file's text; :class:`ApprovalRefusedError` if it is not one."""
        if len(text) > MAX_APPROVAL_CHARS:
            raise ApprovalRefusedError(
                f"CT-11: an approval is larger than {MAX_APPROVAL_CHARS} characters (not one)"
            )
        try:
            doc = json.loads(text)
        except Exception:  # whatever the parser raised: RecursionError for deep nesting too
            raise ApprovalRefusedError(
                "CT-11: an approval is not JSON (not an approval file)"
            ) from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ApprovalRefusedError(f"CT-11: an approval is not a {SCHEMA} document")
        statement, signature = doc.get("statement"), doc.get("signature")
        if not isinstance(statement, str) or not isinstance(signature, str):
            raise ApprovalRefusedError("CT-11: an approval lacks its statement or signature")
        if not _sendable(statement) or not _sendable(signature):
            # JSON can smuggle lone surrogates and NULs, which no signed bytes hold (and
            # which ssh-keygen's stdin and arguments cannot carry).
            raise ApprovalRefusedError(
                "CT-11: an approval holds text that is not valid Unicode or a NUL character"
            )
        return cls(statement, signature)

    def claimed(self) -> HaltStatement:
        """The statement as written (not yet verified)."""
        try:
            doc = json.loads(self.statement)
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
                raise ValueError
            action = doc["action"]
            if action not in ("clear", "halt"):
                raise ValueError
            halt_id = doc["halt_id"]
            if halt_id is not None and not isinstance(halt_id, str):
                raise ValueError
            texts = [doc[k] for k in ("reason_sha256", "principal", "issued_at", "expires_at")]
            if not all(isinstance(t, str) and t for t in texts):
                raise ValueError
            if not texts[1].isprintable() or any(c.isspace() for c in texts[1]):
                raise ValueError  # a principal is one printable name, as allowed-signers lists
            issued, expires = (datetime.fromisoformat(t) for t in texts[2:])
            if issued.tzinfo is None or expires.tzinfo is None:
                raise ValueError
            claimed = HaltStatement(action, halt_id, texts[0], texts[1], issued, expires)
            if claimed.payload() != self.statement:
                # Exactly as conclave approve writes it: no key twice, no extra field, no
                # other order or spelling that another reader might take differently.
                raise ValueError
        except Exception:  # whatever the parser raised: RecursionError for deep nesting too
            raise ApprovalRefusedError(
                "CT-11: an approval's statement is malformed (not written by conclave approve)"
            ) from None
        return claimed


@attrs.frozen(slots=True)
class Signer:
    """A verified signature: the statement, its principal's key fingerprint, and the
    other approvals' principals that the allowed-signers file lists this key for too
    (``aliases``: then those approvals may be this person's)."""

    statement: HaltStatement
    fingerprint: str
    aliases: frozenset[str] = frozenset()

    @property
    def principal(self) -> str:
        return self.statement.principal


def _sendable(text: str) -> bool:
    """Text that is valid Unicode without NUL: what a file, a pipe and argv can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def reason_hash(reason: str) -> str:
    return hashlib.sha256(reason.encode("utf-8")).hexdigest()


def _ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if found is None:
        raise HaltClearDeniedError(
            "CT-11: ssh-keygen (OpenSSH) is not installed: signed approvals cannot be made "
            "or verified"
        )
    return found


def _run(args: Sequence[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            [_ssh_keygen(), *args],
            input=stdin,
            capture_output=True,
            timeout=SSH_KEYGEN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HaltClearDeniedError(
            f"CT-11: ssh-keygen did not answer within {SSH_KEYGEN_TIMEOUT:g} s"
        ) from None


def sign(statement: HaltStatement, key: str | os.PathLike[str]) -> SignedStatement:
    """Sign ``statement`` with the private key at ``key`` (or, given a ``.pub``, the
    matching key in ssh-agent).  Blocking: a key with a passphrase asks for it on the
    terminal, as ssh-keygen always does."""
    key_path = Path(key)
    payload = statement.payload()
    with tempfile.TemporaryDirectory(prefix="conclave-sign-") as tmp:
        message = Path(tmp) / "statement"
        message.write_text(payload, encoding="utf-8")
        try:
            # stdin/stderr are the terminal's, so ssh-keygen can ask for a passphrase.
            done = subprocess.run(
                [
                    _ssh_keygen(),
                    "-Y",
                    "sign",
                    "-q",
                    "-f",
                    str(key_path),
                    "-n",
                    NAMESPACE,
                    str(message),
                ],
                stdout=subprocess.DEVNULL,
                timeout=600,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise InvalidRequestError("ssh-keygen -Y sign did not finish") from None
        sig = message.with_name("statement.sig")
        if done.returncode != 0 or not sig.is_file():
            raise InvalidRequestError(f"ssh-keygen could not sign with {key_path} (see above)")
        return SignedStatement(payload, sig.read_text(encoding="ascii"))


class SignatureVerifier:
    """Verifies signed statements against an OpenSSH allowed-signers file and, if given,
    a revocation list (a KRL or a file of public keys, as ``ssh-keygen -Y verify -r``
    takes).  Both files are read at every verification: an edit (a revoked key, a new
    approver) applies to the next clear."""

    def __init__(
        self,
        allowed_signers: str | os.PathLike[str],
        revoked: str | os.PathLike[str] | None = None,
    ) -> None:
        self.allowed_signers = Path(allowed_signers)
        self.revoked = None if revoked is None else Path(revoked)
        #: What a document this channel writes first records, for every later clear.
        self.files = SignedClears(
            os.path.abspath(self.allowed_signers),
            None if self.revoked is None else os.path.abspath(self.revoked),
        )

    def __repr__(self) -> str:
        return f"<SignatureVerifier {str(self.allowed_signers)!r}>"

    def verify(self, signed: SignedStatement) -> Signer:
        """The verified statement, or :class:`ApprovalRefusedError` saying why not
        (blocking: runs ssh-keygen)."""
        claimed = signed.claimed()
        self._check_files()
        with tempfile.TemporaryDirectory(prefix="conclave-verify-") as tmp:
            sig = Path(tmp) / "statement.sig"
            sig.write_text(signed.signature, encoding="utf-8")
            payload = signed.statement.encode("utf-8")
            checks = ["-f", str(self.allowed_signers), "-I", claimed.principal, "-n", NAMESPACE]
            checks += ["-s", str(sig)]
            revoked = ["-r", str(self.revoked)] if self.revoked is not None else []
            done = _run(["-Y", "verify", *checks, *revoked], payload)
            if done.returncode == 0:
                return Signer(claimed, _fingerprint(done.stdout))
            if done.returncode != 255:  # 255: "did not verify"; else it did not run as asked
                raise ApprovalRefusedError(
                    f"CT-11: ssh-keygen -Y verify failed to run (OpenSSH 8.2 or later is "
                    f"needed): {_stderr(done)}"
                )
            # Refused: say why, in the order a reader would look.
            why = self._why(claimed.principal, sig, payload, checks)
            log.warning(
                "signed statement refused",
                extra={"principal": claimed.principal, "action": claimed.action, "why": why},
            )
            what = "approval" if claimed.action == "clear" else "signed halt"
            raise ApprovalRefusedError(f"CT-11: {what} by {claimed.principal!r} refused: {why}")

    def _check_files(self) -> None:
        """Refuse files that do not say who may approve: unreadable, not a regular file
        (a FIFO would hang ssh-keygen), or open to anyone's edits -- writable by all, or
        in a directory where anyone may replace them (as sshd's StrictModes refuses an
        authorized_keys anyone can write: whoever can add a key can clear alone)."""
        for what, path in (("allowed-signers", self.allowed_signers), ("revocation", self.revoked)):
            if path is None:
                continue
            try:
                mode = os.stat(path).st_mode
                # The link's directory and the file's: anyone who may rename in either
                # may put another file (or link) in its place.
                folders = [os.stat(d).st_mode for d in {path.parent, _real(path).parent}]
                readable = os.access(path, os.R_OK)
            except OSError:
                readable = False
            if not readable:
                raise ApprovalRefusedError(f"CT-11: cannot read the {what} file {path}")
            if not stat.S_ISREG(mode):
                raise ApprovalRefusedError(f"CT-11: the {what} file {path} is not a regular file")
            if mode & stat.S_IWOTH:
                raise ApprovalRefusedError(
                    f"CT-11: the {what} file {path} is writable by anyone (chmod o-w): "
                    "anyone could add a key and clear alone"
                )
            if any(f & stat.S_IWOTH and not f & stat.S_ISVTX for f in folders):
                raise ApprovalRefusedError(
                    f"CT-11: the {what} file {path} is in a directory anyone can write to: "
                    "anyone could replace it and clear alone"
                )

    def lists_key_for(self, signed: SignedStatement, principal: str) -> bool:
        """Whether the allowed-signers file lists the key that signed ``signed`` for
        ``principal`` too (blocking: runs ssh-keygen).  ssh-keygen answers, so every
        form of listing counts: a second line, a name list, a pattern, a certificate."""
        with tempfile.TemporaryDirectory(prefix="conclave-verify-") as tmp:
            sig = Path(tmp) / "statement.sig"
            sig.write_text(signed.signature, encoding="utf-8")
            checks = ["-f", str(self.allowed_signers), "-I", principal, "-n", NAMESPACE]
            done = _run(["-Y", "verify", *checks, "-s", str(sig)], signed.statement.encode())
        if done.returncode not in (0, 255):
            raise ApprovalRefusedError(
                f"CT-11: ssh-keygen -Y verify failed to run: {_stderr(done)}"
            )
        return done.returncode == 0

    def _why(self, principal: str, sig: Path, payload: bytes, checks: list[str]) -> str:
        intact = _run(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig)], payload)
        if intact.returncode != 0:
            return (
                "its signature does not match its contents (tampered, or not signed "
                f"for {NAMESPACE})"
            )
        key = _fingerprint(intact.stdout)
        found = _run(
            ["-Y", "find-principals", "-f", str(self.allowed_signers), "-s", str(sig)], b""
        )
        owners = found.stdout.decode("utf-8", "replace").split()
        if not owners:
            return (
                f"it is signed by key {key}, which is not in {self.allowed_signers} "
                "(or its entry there is not valid now: valid-after/valid-before)"
            )
        if principal not in owners:
            whose = ", ".join(owners)
            return (
                f"it is signed by key {key}, which the allowed-signers file lists for "
                f"{whose}, not {principal}"
            )
        if self.revoked is not None and _run(["-Y", "verify", *checks], payload).returncode == 0:
            return f"key {key} is revoked ({self.revoked})"
        refused = _run(["-Y", "verify", *checks], payload)
        return f"ssh-keygen -Y verify refused it ({_stderr(refused)})"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _fingerprint(stdout: bytes) -> str:
    """The key fingerprint ssh-keygen reports ('... with ED25519 key SHA256:...')."""
    text = stdout.decode("utf-8", "replace").strip()
    return text.rsplit(" key ", 1)[-1] if " key " in text else "unknown"


def _stderr(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stderr.decode("utf-8", "replace").strip()[:200] or f"exit {done.returncode}"


def approved_signers(
    signers: Sequence[Signer], halt_id: str, reason: str, now: datetime | None = None
) -> tuple[Signer, ...]:
    """The signers, if they approve clearing exactly this halt now: each a clear approval
    for ``halt_id`` and this ``reason``, issued and not expired; two distinct principals
    with two distinct keys.  Else :class:`ApprovalRefusedError`."""
    now = now or utc_now()
    for signer in signers:
        check_current(signer.statement, now)
        s = signer.statement
        if s.action != "clear":
            raise ApprovalRefusedError(
                f"CT-11: the statement signed by {s.principal!r} is a signed halt, "
                "not a clear approval"
            )
        if s.halt_id != halt_id:
            raise ApprovalRefusedError(
                f"CT-11: the approval by {s.principal!r} is for another halt ({s.halt_id}), "
                f"not the current one ({halt_id}): an approval clears only the halt it names; "
                "approve the current halt (conclave approve)"
            )
        if s.reason_sha256 != reason_hash(reason):
            raise ApprovalRefusedError(
                f"CT-11: the approval by {s.principal!r} names another reason than the "
                "current halt's"
            )
    return distinct_signers(signers)


def check_current(statement: HaltStatement, now: datetime) -> None:
    """Refuse a statement that has expired, is not yet issued, or is valid for too long."""
    who = statement.principal
    if statement.expires_at <= now:
        raise ApprovalRefusedError(
            f"CT-11: the approval by {who!r} expired at {statement.expires_at.isoformat()}"
        )
    if statement.issued_at > now + CLOCK_SKEW:
        raise ApprovalRefusedError(
            f"CT-11: the approval by {who!r} says it was issued in the future "
            f"({statement.issued_at.isoformat()})"
        )
    if statement.expires_at - statement.issued_at > MAX_LIFETIME:
        raise ApprovalRefusedError(
            f"CT-11: the approval by {who!r} is valid for longer than "
            f"{MAX_LIFETIME.total_seconds() / 3600:g} h"
        )


def _person(principal: str) -> str:
    """A principal as a person: names that differ only by case or Unicode form
    ('Alice', 'alice', a composed and a decomposed accent) are one name."""
    return unicodedata.normalize("NFKC", principal).casefold()


def distinct_signers(signers: Sequence[Signer]) -> tuple[Signer, ...]:
    """Two-person rule for signatures: every two approvals come from two people -- two
    principals (not differing only by case or Unicode form), two keys (one key listed
    under two names is one person), and neither key listed for the other's principal
    too (two keys of one person under a shared name or pattern)."""
    people = {_person(s.principal) for s in signers}
    if len(people) < 2:
        named = ", ".join(sorted({s.principal for s in signers})) or "none"
        raise ApprovalRefusedError(
            f"CT-11: clearing a halt needs signed approvals from 2 distinct principals, got "
            f"{len(people)} ({named})"
        )
    if len({s.fingerprint for s in signers}) < 2:
        raise ApprovalRefusedError(
            "CT-11: the approvals are signed by one key under different names: one person"
        )
    for a, b in combinations(signers, 2):
        if _person(a.principal) == _person(b.principal):
            raise ApprovalRefusedError(
                f"CT-11: two approvals are by {a.principal!r} and {b.principal!r}: one "
                "principal (names that differ only by case or Unicode form are one)"
            )
        if a.fingerprint == b.fingerprint:
            raise ApprovalRefusedError(
                f"CT-11: the approvals by {a.principal!r} and {b.principal!r} are signed "
                "by one key under different names: one person"
            )
        for one, other in ((a, b), (b, a)):
            if other.principal in one.aliases:
                raise ApprovalRefusedError(
                    f"CT-11: the approvals by {a.principal!r} and {b.principal!r} may be "
                    f"one person's: the allowed-signers file lists {one.principal!r}'s key "
                    f"{one.fingerprint} for {other.principal!r} too"
                )
    return tuple(sorted(signers, key=lambda s: s.principal))


@attrs.frozen(slots=True)
class ClearRequest:
    """A clear asked for: by typed names (a channel without an allowed-signers file) or
    by signed approvals (one with it), never both."""

    names: tuple[str, ...] = ()
    signed: tuple[SignedStatement, ...] = ()


def check_clear_request(
    approvers: Collection[str],
    approvals: Sequence[str],
    reason: str,
    verifier: SignatureVerifier | None,
) -> ClearRequest:
    """Check a clear's form before anything is read or run; refuse what this channel
    does not take (names where signatures are required, signatures it cannot verify)."""
    if isinstance(approvals, str | bytes):
        raise HaltClearDeniedError("CT-11: approvals must be a list of approval texts")
    if approvers and approvals:
        raise HaltClearDeniedError(
            "CT-11: a clear is by approver names or signed approvals, not both"
        )
    if verifier is None:
        if approvals:
            raise HaltClearDeniedError(
                "CT-11: this halt channel has no allowed-signers file, so it cannot verify "
                "signed approvals (configure allowed_signers / --allowed-signers)"
            )
        return ClearRequest(names=check_clear_approvers(approvers, reason))
    if not approvals:
        raise HaltClearDeniedError(
            "CT-11: this halt channel requires signed approvals (it has an allowed-signers "
            "file): a clear by approver names is refused; each approver runs conclave approve"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise HaltClearDeniedError("CT-11: clearing a halt needs a non-empty reason")
    if len(approvals) > MAX_APPROVALS:
        raise ApprovalRefusedError(
            f"CT-11: a clear takes at most {MAX_APPROVALS} signed approvals, got {len(approvals)}"
        )
    if len(approvals) < 2:
        raise ApprovalRefusedError(
            f"CT-11: clearing a halt needs signed approvals from 2 distinct principals, got "
            f"{len(approvals)} approval"
        )
    return ClearRequest(signed=tuple(SignedStatement.from_text(t) for t in approvals))


def verify_request(verifier: SignatureVerifier | None, request: ClearRequest) -> tuple[Signer, ...]:
    """The request's signatures verified (blocking: ssh-keygen); none for a clear by names."""
    if not request.signed:
        return ()
    assert verifier is not None
    signers = [verifier.verify(s) for s in request.signed]
    # Principals are names, not people: one person's two keys may be listed under a
    # shared name (``alice@example.com,alice`` and ``alice``) or pattern (``ali*``).
    # Whether a key may also speak for another approval's principal is OpenSSH's answer.
    for i, signer in enumerate(signers):
        others = {
            o.principal
            for o in signers
            if _person(o.principal) != _person(signer.principal)
            and o.fingerprint != signer.fingerprint
        }
        aliases = frozenset(
            p for p in sorted(others) if verifier.lists_key_for(request.signed[i], p)
        )
        signers[i] = attrs.evolve(signer, aliases=aliases)
    return tuple(signers)


def verify_signed_halt(
    verifier: SignatureVerifier | None, text: str, reason: str, now: datetime | None = None
) -> Signer:
    """A signed halt's signer (blocking: ssh-keygen), or :class:`InvalidRequestError`
    saying why not, before anything is written."""
    if verifier is None:
        raise InvalidRequestError(
            "CT-11: a signed halt needs a halt channel with an allowed-signers file to "
            "verify it (nothing was written: halt unsigned if it cannot wait)"
        )
    try:
        signer = verifier.verify(SignedStatement.from_text(text))
        check_current(signer.statement, now or utc_now())
    except ApprovalRefusedError as exc:
        raise InvalidRequestError(f"{exc} (nothing was written)") from None
    s = signer.statement
    if s.action != "halt" or s.reason_sha256 != reason_hash(reason):
        raise InvalidRequestError(
            f"CT-11: the statement signed by {s.principal!r} is not a halt for this reason "
            "(nothing was written)"
        )
    return signer


def signature_verifier(
    allowed_signers: str | os.PathLike[str] | None, revoked: str | os.PathLike[str] | None
) -> SignatureVerifier | None:
    """A channel's verifier, from its settings (None: the channel takes typed names)."""
    if allowed_signers is None:
        if revoked is not None:
            raise InvalidRequestError("revoked needs allowed_signers (the keys it revokes from)")
        return None
    if not isinstance(allowed_signers, str | os.PathLike) or not str(allowed_signers).strip():
        raise InvalidRequestError("allowed_signers must be a path")
    return SignatureVerifier(allowed_signers, revoked)


def signer_files(
    recorded: SignedClears | None, verifier: SignatureVerifier | None
) -> SignedClears | None:
    """The signer files the next document records: those it records already, for good
    (an operator's choice of flags must not change them), with this channel's revocation
    list added if it records none (that only refuses more); else this channel's."""
    if verifier is None:
        return recorded
    if recorded is None or (recorded.revoked is None and _same_signers(recorded, verifier)):
        return verifier.files
    return recorded


def _same_signers(recorded: SignedClears, verifier: SignatureVerifier) -> bool:
    """Whether ``verifier`` checks against the recorded files: the same allowed signers,
    and the recorded revocation list if there is one."""
    mine = verifier.files
    return mine.allowed_signers == recorded.allowed_signers and (
        recorded.revoked is None or mine.revoked == recorded.revoked
    )


def check_signer_files(
    recorded: SignedClears | None,
    verifier: SignatureVerifier | None,
    where: str,
    *,
    signed: bool,
) -> None:
    """Where a document records signer files (a tool with an allowed-signers file wrote
    it), refuse a clear by names, and signatures verified against other files: one
    operator could otherwise clear alone by leaving ``--allowed-signers`` out, or by
    giving a file of their own (or leaving ``--revoked`` out)."""
    if recorded is None:
        return
    if not signed:
        raise HaltClearDeniedError(
            f"CT-11: {where} requires signed approvals, verified against "
            f"{recorded.allowed_signers}: a clear by approver names is refused; each "
            "approver runs conclave approve, then clear with --allowed-signers"
        )
    if verifier is None or not _same_signers(recorded, verifier):
        given = "none" if verifier is None else _describe(verifier.files)
        raise ApprovalRefusedError(
            f"CT-11: {where} verifies signatures against {_describe(recorded)}, not "
            f"{given}: signatures checked against other signer files are refused"
        )


def _describe(files: SignedClears) -> str:
    revoked = f" with revocation list {files.revoked}" if files.revoked else ""
    return f"{files.allowed_signers}{revoked}"


def halt_record(reason: str, halt_id: str, signer: Signer | None) -> HaltRecord:
    """A halt's history record; a signed halt names who raised it, and their key."""
    if signer is None:
        return HaltRecord("halt", reason, utc_now(), halt_id=halt_id)
    return HaltRecord(
        "halt", reason, utc_now(), (signer.principal,), (signer.fingerprint,), halt_id
    )


def clear_record(
    reason: str,
    halt_id: str,
    halt_reason: str,
    names: tuple[str, ...],
    signers: Sequence[Signer],
) -> HaltRecord:
    """The record of clearing halt ``halt_id`` (whose reason is ``halt_reason``): by
    ``names``, or by ``signers`` once they approve exactly this halt, now
    (:class:`ApprovalRefusedError` if they do not)."""
    if not signers:
        return HaltRecord("clear", reason, utc_now(), names, halt_id=halt_id)
    approved = approved_signers(signers, halt_id, halt_reason)
    principals = tuple(s.principal for s in approved)
    keys = tuple(s.fingerprint for s in approved)
    return HaltRecord("clear", reason, utc_now(), principals, keys, halt_id)
