"""Real SSH keys for the signed-approval tests, made by ``ssh-keygen`` in a temporary
directory: people with keys, an allowed-signers file, a revocation list, and approvals
signed the way ``conclave approve`` signs them.

Without ssh-keygen the tests skip; under CI (``CI=1`` or ``CONCLAVE_REQUIRE_TOOLS=1``)
they fail: OpenSSH is on every machine we deploy to, so a missing one is a broken set-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from adapters.halt.approval import HaltStatement, SignedStatement, reason_hash, sign
from kernel import utc_now

__all__ = ["Keyring", "require_ssh_keygen"]


def require_ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if found is None:
        why = "ssh-keygen (OpenSSH) is not installed"
        if os.environ.get("CI") == "1" or os.environ.get("CONCLAVE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{why}: required under CI (apt-get install openssh-client)")
        pytest.skip(why)
    return found


class Keyring:
    """People and their keys in ``directory``; ``allowed`` lists those :meth:`trust`ed."""

    def __init__(self, directory: Path) -> None:
        self.binary = require_ssh_keygen()
        self.dir = directory
        self.allowed = directory / "allowed_signers"
        self.allowed.write_text("")
        self.revoked = directory / "revoked_keys"
        self.revoked.write_text("")

    def key(self, name: str) -> Path:
        """``name``'s private key (made on first use)."""
        path = self.dir / f"id_{name}"
        if not path.exists():
            subprocess.run(
                [self.binary, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
                check=True,
            )
        return path

    def fingerprint(self, name: str) -> str:
        out = subprocess.run(
            [self.binary, "-l", "-f", str(self.key(name))], capture_output=True, check=True
        ).stdout.decode()
        return out.split()[1]

    def trust(self, principal: str, key_of: str | None = None) -> None:
        """List ``principal`` in the allowed-signers file with ``key_of``'s key (their own
        by default), for the ``conclave-clear`` namespace."""
        public = (self.key(key_of or principal).with_suffix(".pub")).read_text().split()
        line = f'{principal} namespaces="conclave-clear" {public[0]} {public[1]}\n'
        with self.allowed.open("a") as f:
            f.write(line)

    def revoke(self, name: str) -> None:
        with self.revoked.open("a") as f:
            f.write(self.key(name).with_suffix(".pub").read_text())

    def approve(
        self,
        principal: str,
        halt_id: str | None,
        reason: str,
        *,
        key_of: str | None = None,
        action: str = "clear",
        issued_at: datetime | None = None,
        lifetime: timedelta = timedelta(minutes=15),
    ) -> str:
        """The text of an approval signed with ``key_of``'s key (``principal``'s own by
        default), as ``conclave approve`` writes it."""
        issued = issued_at or utc_now()
        statement = HaltStatement(
            "halt" if action == "halt" else "clear",
            halt_id,
            reason_hash(reason),
            principal,
            issued,
            issued + lifetime,
        )
        return sign(statement, self.key(key_of or principal)).to_text()

    @staticmethod
    def tamper(text: str, old: str, new: str) -> str:
        """The approval with its signed statement edited (the signature left as it was)."""
        signed = SignedStatement.from_text(text)
        assert old in signed.statement
        return SignedStatement(signed.statement.replace(old, new), signed.signature).to_text()
