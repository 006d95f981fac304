"""Signed approvals, verified by OpenSSH against real keys made by ssh-keygen: every
refusal says which rule, and whose approval."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from adapters.halt import approval
from adapters.halt.approval import (
    ApprovalRefusedError,
    SignatureVerifier,
    SignedStatement,
    approved_signers,
    check_clear_request,
    verify_request,
    verify_signed_halt,
)
from kernel import HaltClearDeniedError, InvalidRequestError, utc_now
from tests.support.ssh_keys import Keyring

HALT_ID = "0f" * 16
REASON = "tool misuse"


@pytest.fixture
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    ring = Keyring(tmp_path_factory.mktemp("keys"))
    ring.trust("alice")
    ring.trust("bob")
    return ring


def verifier(keys: Keyring, *, revoked: bool = False) -> SignatureVerifier:
    return SignatureVerifier(keys.allowed, keys.revoked if revoked else None)


def verified(keys: Keyring, *texts: str) -> list[object]:
    v = verifier(keys)
    return [v.verify(SignedStatement.from_text(t)) for t in texts]


def refusal(keys: Keyring, text: str, *, revoked: bool = False) -> str:
    with pytest.raises(ApprovalRefusedError) as caught:
        verifier(keys, revoked=revoked).verify(SignedStatement.from_text(text))
    return str(caught.value)


def test_two_approvals_from_distinct_trusted_keys_approve_the_halt_they_name(
    keys: Keyring,
) -> None:
    v = verifier(keys)
    signers = [
        v.verify(SignedStatement.from_text(keys.approve(name, HALT_ID, REASON)))
        for name in ("bob", "alice")
    ]
    approved = approved_signers(signers, HALT_ID, REASON)
    assert [s.principal for s in approved] == ["alice", "bob"]
    assert [s.fingerprint for s in approved] == [keys.fingerprint("alice"), keys.fingerprint("bob")]


def test_a_tampered_approval_is_refused_as_not_matching_its_signature(keys: Keyring) -> None:
    text = keys.tamper(keys.approve("alice", HALT_ID, REASON), HALT_ID, "1e" * 16)
    assert "does not match its contents" in refusal(keys, text)


def test_an_approval_signed_by_a_key_not_in_the_allowed_signers_is_refused(
    keys: Keyring,
) -> None:
    text = keys.approve("mallory", HALT_ID, REASON)
    message = refusal(keys, text)
    assert "'mallory'" in message and "not in" in message
    assert keys.fingerprint("mallory") in message


def test_an_approval_naming_someone_else_than_the_keys_owner_is_refused(
    keys: Keyring,
) -> None:
    # bob signs with his own (trusted) key, but writes alice's name in the statement.
    text = keys.approve("alice", HALT_ID, REASON, key_of="bob")
    assert "which the allowed-signers file lists for bob, not alice" in refusal(keys, text)


def test_an_approval_by_a_revoked_key_is_refused(keys: Keyring) -> None:
    keys.revoke("alice")
    text = keys.approve("alice", HALT_ID, REASON)
    assert "is revoked" in refusal(keys, text, revoked=True)
    # bob's key is not revoked by the same list.
    verifier(keys, revoked=True).verify(
        SignedStatement.from_text(keys.approve("bob", HALT_ID, REASON))
    )


def test_a_signature_made_for_another_purpose_is_not_an_approval(
    keys: Keyring, tmp_path: Path
) -> None:
    good = SignedStatement.from_text(keys.approve("alice", HALT_ID, REASON))
    # The same statement signed in git's namespace: a commit signature is no approval.
    work = tmp_path / "git-sig"
    work.write_text(good.statement)
    subprocess.run(
        [keys.binary, "-Y", "sign", "-q", "-f", str(keys.key("alice")), "-n", "git", str(work)],
        check=True,
    )
    other = SignedStatement(good.statement, (work.parent / "git-sig.sig").read_text())
    assert "does not match its contents" in refusal(keys, other.to_text())


def test_an_expired_approval_is_refused(keys: Keyring) -> None:
    long_ago = utc_now() - timedelta(hours=1)
    text = keys.approve("alice", HALT_ID, REASON, issued_at=long_ago)
    signers = verified(keys, text, keys.approve("bob", HALT_ID, REASON))
    with pytest.raises(ApprovalRefusedError, match="approval by 'alice' expired at"):
        approved_signers(signers, HALT_ID, REASON)  # type: ignore[arg-type]


def test_an_approval_issued_in_the_future_is_refused(keys: Keyring) -> None:
    later = utc_now() + timedelta(hours=1)
    text = keys.approve("alice", HALT_ID, REASON, issued_at=later)
    signers = verified(keys, text, keys.approve("bob", HALT_ID, REASON))
    with pytest.raises(ApprovalRefusedError, match="says it was issued in the future"):
        approved_signers(signers, HALT_ID, REASON)  # type: ignore[arg-type]


def test_an_approval_valid_for_longer_than_a_day_is_refused(keys: Keyring) -> None:
    text = keys.approve("alice", HALT_ID, REASON, lifetime=timedelta(days=30))
    signers = verified(keys, text, keys.approve("bob", HALT_ID, REASON))
    with pytest.raises(ApprovalRefusedError, match="valid for longer than"):
        approved_signers(signers, HALT_ID, REASON)  # type: ignore[arg-type]


def test_an_approval_for_an_earlier_halt_does_not_clear_the_current_one(keys: Keyring) -> None:
    earlier = keys.approve("alice", "e" * 32, REASON)
    signers = verified(keys, earlier, keys.approve("bob", HALT_ID, REASON))
    with pytest.raises(ApprovalRefusedError, match="approval by 'alice' is for another halt"):
        approved_signers(signers, HALT_ID, REASON)  # type: ignore[arg-type]


def test_two_approvals_by_one_principal_are_refused(keys: Keyring) -> None:
    signers = verified(
        keys, keys.approve("alice", HALT_ID, REASON), keys.approve("alice", HALT_ID, REASON)
    )
    with pytest.raises(ApprovalRefusedError, match="2 distinct principals, got 1 \\(alice\\)"):
        approved_signers(signers, HALT_ID, REASON)  # type: ignore[arg-type]


def test_one_key_listed_under_two_names_is_one_person(keys: Keyring) -> None:
    keys.trust("alice-2", key_of="alice")
    signers = verified(
        keys,
        keys.approve("alice", HALT_ID, REASON),
        keys.approve("alice-2", HALT_ID, REASON, key_of="alice"),
    )
    with pytest.raises(ApprovalRefusedError, match="one key under different names"):
        approved_signers(signers, HALT_ID, REASON)  # type: ignore[arg-type]


def test_a_signed_halt_is_no_clear_approval(keys: Keyring) -> None:
    signers = verified(
        keys,
        keys.approve("alice", None, REASON, action="halt"),
        keys.approve("bob", HALT_ID, REASON),
    )
    with pytest.raises(ApprovalRefusedError, match="is a signed halt, not a clear approval"):
        approved_signers(signers, HALT_ID, REASON)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text", ["", "not json", "[]", '{"schema": "conclave.approval/1", "statement": 1}']
)
def test_text_that_is_not_an_approval_is_refused(text: str) -> None:
    with pytest.raises(ApprovalRefusedError, match="approval"):
        SignedStatement.from_text(text)


def test_a_channel_with_allowed_signers_refuses_a_clear_by_names(keys: Keyring) -> None:
    with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
        check_clear_request(["alice", "bob"], (), "ok", verifier(keys))
    with pytest.raises(ApprovalRefusedError, match="got 1 approval"):
        check_clear_request((), [keys.approve("alice", HALT_ID, REASON)], "ok", verifier(keys))
    with pytest.raises(HaltClearDeniedError, match="not both"):
        check_clear_request(["alice", "bob"], ["a", "b"], "ok", verifier(keys))


def test_a_channel_without_allowed_signers_cannot_verify_approvals() -> None:
    with pytest.raises(HaltClearDeniedError, match="no allowed-signers file"):
        check_clear_request((), ["a", "b"], "ok", None)
    assert check_clear_request(["bob", "alice"], (), "ok", None).names == ("alice", "bob")


def test_a_signed_halt_verifies_for_its_own_reason_only(keys: Keyring) -> None:
    text = keys.approve("alice", None, REASON, action="halt")
    assert verify_signed_halt(verifier(keys), text, REASON).principal == "alice"
    with pytest.raises(InvalidRequestError, match="not a halt for this reason"):
        verify_signed_halt(verifier(keys), text, "another reason")
    with pytest.raises(InvalidRequestError, match="needs a halt channel with an allowed-signers"):
        verify_signed_halt(None, text, REASON)
    forged = keys.approve("alice", None, REASON, action="halt", key_of="mallory")
    with pytest.raises(InvalidRequestError, match=r"signed halt by 'alice' refused.*nothing was"):
        verify_signed_halt(verifier(keys), forged, REASON)


def test_an_unreadable_allowed_signers_file_refuses_with_its_name(keys: Keyring) -> None:
    text = keys.approve("alice", HALT_ID, REASON)
    missing = SignatureVerifier(keys.dir / "nope")
    with pytest.raises(ApprovalRefusedError, match="cannot read the allowed-signers file"):
        missing.verify(SignedStatement.from_text(text))


def test_a_refusal_is_logged_with_whose_and_why_never_the_signature(
    keys: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    text = keys.approve("alice", HALT_ID, REASON, key_of="mallory")
    with caplog.at_level(logging.WARNING, logger="adapters.halt.approval"):
        refusal(keys, text)
    [record] = [r for r in caplog.records if r.message == "signed statement refused"]
    assert record.__dict__["principal"] == "alice" and "not in" in record.__dict__["why"]
    signature = SignedStatement.from_text(text).signature
    assert all(signature not in r.getMessage() + str(r.__dict__) for r in caplog.records)


def test_an_ssh_keygen_that_hangs_is_a_refusal_within_its_bound(
    keys: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = keys.approve("alice", HALT_ID, REASON)
    hung = tmp_path / "bin"
    hung.mkdir()
    (hung / "ssh-keygen").write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 60\n")
    (hung / "ssh-keygen").chmod(0o755)
    monkeypatch.setenv("PATH", str(hung))
    monkeypatch.setattr(approval, "SSH_KEYGEN_TIMEOUT", 0.2)
    with pytest.raises(HaltClearDeniedError, match=r"ssh-keygen did not answer within 0\.2 s"):
        verifier(keys).verify(SignedStatement.from_text(text))
    (hung / "ssh-keygen").write_text("#!/bin/sh\necho 'unknown option -- Y' >&2\nexit 1\n")
    with pytest.raises(HaltClearDeniedError, match=r"failed to run .*unknown option -- Y"):
        verifier(keys).verify(SignedStatement.from_text(text))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(HaltClearDeniedError, match="ssh-keygen \\(OpenSSH\\) is not installed"):
        verifier(keys).verify(SignedStatement.from_text(text))


def clear_signers(keys: Keyring, *texts: str) -> tuple[approval.Signer, ...]:
    """The signers as a channel verifies a clear: each signature, then who is who."""
    v = verifier(keys)
    return verify_request(v, check_clear_request((), list(texts), "ok", v))


def test_two_keys_of_one_person_listed_under_a_shared_name_are_one_person(
    keys: Keyring,
) -> None:
    # Carol's laptop key is listed under her e-mail and her login, her desktop key under
    # her login: the file itself says both keys are carol's.
    keys.trust("carol@example.com,carol", key_of="carol-laptop")
    keys.trust("carol", key_of="carol-desktop")
    signers = clear_signers(
        keys,
        keys.approve("carol@example.com", HALT_ID, REASON, key_of="carol-laptop"),
        keys.approve("carol", HALT_ID, REASON, key_of="carol-desktop"),
    )
    with pytest.raises(ApprovalRefusedError, match=r"may be one person's.*for 'carol' too"):
        approved_signers(signers, HALT_ID, REASON)


def test_two_keys_listed_under_one_principal_pattern_are_one_person(keys: Keyring) -> None:
    keys.trust("ops-*", key_of="ops-1")
    keys.trust("ops-*", key_of="ops-2")
    signers = clear_signers(
        keys,
        keys.approve("ops-a", HALT_ID, REASON, key_of="ops-1"),
        keys.approve("ops-b", HALT_ID, REASON, key_of="ops-2"),
    )
    with pytest.raises(ApprovalRefusedError, match="may be one person's"):
        approved_signers(signers, HALT_ID, REASON)
    # Two people each listed by their own name still clear, through the same checks.
    both = clear_signers(
        keys, keys.approve("alice", HALT_ID, REASON), keys.approve("bob", HALT_ID, REASON)
    )
    assert [s.principal for s in approved_signers(both, HALT_ID, REASON)] == ["alice", "bob"]


@pytest.mark.parametrize(
    "other", ["Alice", "ALICE", "a\u0301lice"], ids=["capitalised", "upper", "decomposed"]
)
def test_principals_differing_only_by_case_or_unicode_form_are_one_person(
    keys: Keyring, other: str
) -> None:
    keys.trust("\u00e1lice" if "\u0301" in other else "alice", key_of="first")
    keys.trust(other, key_of="second")
    mine = "\u00e1lice" if "\u0301" in other else "alice"
    signers = clear_signers(
        keys,
        keys.approve(mine, HALT_ID, REASON, key_of="first"),
        keys.approve(other, HALT_ID, REASON, key_of="second"),
    )
    with pytest.raises(ApprovalRefusedError, match="2 distinct principals, got 1"):
        approved_signers(signers, HALT_ID, REASON)


def test_an_extra_approval_by_a_person_already_counted_is_refused(keys: Keyring) -> None:
    keys.trust("bob", key_of="bob-2")
    signers = clear_signers(
        keys,
        keys.approve("alice", HALT_ID, REASON),
        keys.approve("bob", HALT_ID, REASON),
        keys.approve("bob", HALT_ID, REASON, key_of="bob-2"),
    )
    with pytest.raises(ApprovalRefusedError, match="by 'bob' and 'bob': one principal"):
        approved_signers(signers, HALT_ID, REASON)


@pytest.mark.parametrize("which", ["allowed-signers", "revocation"])
def test_signer_files_anyone_can_edit_or_replace_are_refused(keys: Keyring, which: str) -> None:
    text = keys.approve("alice", HALT_ID, REASON)
    path = keys.allowed if which == "allowed-signers" else keys.revoked
    path.chmod(0o666)
    with pytest.raises(ApprovalRefusedError, match=rf"the {which} file .* is writable by anyone"):
        verifier(keys, revoked=True).verify(SignedStatement.from_text(text))
    path.chmod(0o644)
    keys.dir.chmod(0o777)  # anyone may rename another file over it
    with pytest.raises(ApprovalRefusedError, match="in a directory anyone can write to"):
        verifier(keys, revoked=True).verify(SignedStatement.from_text(text))
    keys.dir.chmod(0o1777)  # sticky, as /tmp: only the owner may replace it
    assert verifier(keys, revoked=True).verify(SignedStatement.from_text(text)).principal == "alice"
    keys.dir.chmod(0o755)


def test_an_allowed_signers_fifo_is_refused_at_once(
    keys: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(approval, "SSH_KEYGEN_TIMEOUT", 2.0)  # were ssh-keygen to read it
    fifo = tmp_path / "allowed.fifo"
    os.mkfifo(fifo)
    text = keys.approve("alice", HALT_ID, REASON)
    with pytest.raises(ApprovalRefusedError, match=r"allowed\.fifo is not a regular file"):
        SignatureVerifier(fifo).verify(SignedStatement.from_text(text))


def _edited(text: str, **fields: object) -> str:
    """An approval whose statement has ``fields`` changed (its signature left as it was)."""
    signed = json.loads(text)
    signed["statement"] = json.dumps({**json.loads(signed["statement"]), **fields})
    return json.dumps(signed)


@pytest.mark.parametrize(
    "shape",
    [
        "nested outer",
        "nested statement",
        "surrogate signature",
        "nul signature",
        "surrogate principal",
        "nul principal",
        "newline principal",
    ],
)
def test_an_approval_no_tool_could_have_written_is_refused_as_such(
    keys: Keyring, shape: str
) -> None:
    good = keys.approve("alice", HALT_ID, REASON)
    doc = json.loads(good)
    texts = {
        "nested outer": "[" * 30_000 + "]" * 30_000,
        "nested statement": json.dumps({**doc, "statement": "[" * 30_000}),
        "surrogate signature": json.dumps({**doc, "signature": "\ud800"}),
        "nul signature": json.dumps({**doc, "signature": doc["signature"] + "\x00"}),
        "surrogate principal": _edited(good, principal="al\ud800ice"),
        "nul principal": _edited(good, principal="al\x00ice"),
        "newline principal": _edited(good, principal="alice\nbob"),
    }
    both = [texts[shape], keys.approve("bob", HALT_ID, REASON)]
    with pytest.raises(ApprovalRefusedError, match=r"not JSON|malformed|not valid Unicode"):
        verify_request(verifier(keys), check_clear_request((), both, "ok", verifier(keys)))


@pytest.mark.parametrize("shape", ["key twice", "extra field", "other order", "other spelling"])
def test_a_signed_statement_not_exactly_as_approve_writes_it_is_refused(
    keys: Keyring, tmp_path: Path, shape: str
) -> None:
    """What is verified is what is read, and it reads one way only: a statement signed
    with a trusted key but written otherwise (which another reader might read otherwise)
    is refused."""
    canonical = SignedStatement.from_text(keys.approve("alice", HALT_ID, REASON)).statement
    fields = json.loads(canonical)
    body = canonical[1:-1]
    statement = {
        "key twice": "{" + body + ', "halt_id": "' + "1e" * 16 + '"}',
        "extra field": json.dumps({**fields, "note": "ok"}, sort_keys=True),
        "other order": json.dumps(dict(reversed(list(fields.items())))),
        "other spelling": json.dumps(fields, sort_keys=True, indent=1),
    }[shape]
    work = tmp_path / "statement"
    work.write_text(statement)
    alice = str(keys.key("alice"))
    sign = [keys.binary, "-Y", "sign", "-q", "-f", alice, "-n", "conclave-clear", str(work)]
    subprocess.run(sign, check=True)
    signed = SignedStatement(statement, (tmp_path / "statement.sig").read_text())
    with pytest.raises(ApprovalRefusedError, match="statement is malformed"):
        verifier(keys).verify(signed)


def test_an_allowed_signers_link_anyone_can_repoint_is_refused(
    keys: Keyring, tmp_path: Path
) -> None:
    text = keys.approve("alice", HALT_ID, REASON)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    link = open_dir / "allowed_signers"
    link.symlink_to(keys.allowed)  # the file itself is safe; the link is not
    open_dir.chmod(0o777)
    with pytest.raises(ApprovalRefusedError, match="in a directory anyone can write to"):
        SignatureVerifier(link).verify(SignedStatement.from_text(text))
    open_dir.chmod(0o755)
    assert SignatureVerifier(link).verify(SignedStatement.from_text(text)).principal == "alice"


def test_a_pile_of_approvals_is_refused_before_any_is_verified(keys: Keyring) -> None:
    many = [keys.approve("alice", HALT_ID, REASON)] * (approval.MAX_APPROVALS + 1)
    with pytest.raises(ApprovalRefusedError, match="at most 8 signed approvals, got 9"):
        check_clear_request((), many, "ok", verifier(keys))


def test_a_key_whose_allowed_signers_entry_has_lapsed_is_refused_saying_so(keys: Keyring) -> None:
    public = keys.key("carol").with_suffix(".pub").read_text().split()[:2]
    with keys.allowed.open("a") as f:
        f.write(f'carol valid-before="20200101" {" ".join(public)}\n')
    text = keys.approve("carol", HALT_ID, REASON)
    assert "entry there is not valid now" in refusal(keys, text)
