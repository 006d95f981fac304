"""Halt files a channel must read as halted: every corrupt shape (contents that mostly
*say* "halted": false, and things at the path that are not a file), for the file
channel's tests and the CLI's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.halt.document import SCHEMA
from adapters.halt.file import MAX_HALT_FILE_BYTES

DEEP = b'{"halted": true, "reason": "x", "history": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


DEEP_CLEAR = b'{"halted": false, "pad": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


GOOD_RECORD = {"action": "halt", "reason": "r", "at": "2026-01-01T00:00:00+00:00"}


def as_json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def history_of(*records: Any) -> bytes:
    return as_json({"schema": SCHEMA, "halted": False, "reason": None, "history": list(records)})


# Contents that must read as halted.  Most of them *say* "halted": false: a reader
# that trusted what it could parse would fail open.
CORRUPT_CONTENTS: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b" \n\t",
    "deeply nested, halted true": DEEP,
    "deeply nested, halted false": DEEP_CLEAR,
    "binary": bytes(range(256)),
    "latin-1, not UTF-8": '{"halted": false, "reason": "é"}'.encode("latin-1"),
    "UTF-16": '{"halted": false}'.encode("utf-16"),
    "UTF-8 BOM": b"\xef\xbb\xbf" + b'{"halted": false}',
    "truncated": b'{"halted": false, "history": [',
    "top level list": b"[]",
    "top level false": b"false",
    "top level null": b"null",
    "halted missing": b'{"reason": null}',
    "halted a string": b'{"halted": "false"}',
    "halted zero": b'{"halted": 0}',
    "halted null": b'{"halted": null}',
    "reason a number": b'{"halted": false, "reason": 5}',
    "reason a list": b'{"halted": true, "reason": ["a"]}',
    "reason a lone surrogate": b'{"halted": true, "reason": "\\ud800"}',
    "duplicate key": b'{"halted": true, "halted": false}',
    "NaN": b'{"halted": false, "x": NaN}',
    "huge integer": b'{"halted": false, "x": ' + b"1" * 5000 + b"}",
    "unknown schema": b'{"schema": "conclave.halt/2", "halted": false}',
    "no schema": b'{"halted": false, "reason": null}',
    "halted without a reason": b'{"schema": "conclave.halt/1", "halted": true}',
    "halted with a blank reason": b'{"schema": "conclave.halt/1", "halted": true, "reason": " "}',
    "history an object": b'{"halted": false, "history": {}}',
    "history item a string": history_of("halt"),
    "history item unknown action": history_of({**GOOD_RECORD, "action": "resume"}),
    "history item without reason": history_of({"action": "halt", "at": GOOD_RECORD["at"]}),
    "history item reason a number": history_of({**GOOD_RECORD, "reason": 1}),
    "history item at a number": history_of({**GOOD_RECORD, "at": 1}),
    "history item at not a date": history_of({**GOOD_RECORD, "at": "yesterday"}),
    "history item approvers a string": history_of({**GOOD_RECORD, "approvers": "ab"}),
    "history item approver a number": history_of({**GOOD_RECORD, "approvers": ["a", 2]}),
    "history item nested deep": history_of({**GOOD_RECORD, "approvers": [[[["a"]]]]}),
    "too large": b'{"halted": false, "pad": "' + b"x" * MAX_HALT_FILE_BYTES + b'"}',
}


def make_file(content: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(content)


def make_dir(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("{}")


def make_fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it for reading would block without O_NONBLOCK


def make_dangling_link(path: Path) -> None:
    path.symlink_to(path.with_name("nowhere.json"))


SHAPES: dict[str, Callable[[Path], object]] = {
    **{name: make_file(content) for name, content in CORRUPT_CONTENTS.items()},
    "a directory": make_dir,
    "a FIFO": make_fifo,
    "a dangling symlink": make_dangling_link,
}


def snapshot(path: Path) -> tuple[bool, bytes | None, list[str]]:
    """What is at the path (is-a-file, bytes) and every name beside it (but the lock's)."""
    is_file = path.is_file() and not path.is_symlink()
    names = sorted(n for n in os.listdir(path.parent) if not n.endswith(".lock"))
    return is_file, path.read_bytes() if is_file else None, names


CLI_SHAPES = ["deeply nested, halted false", "binary", "halted a string", "a directory"]
