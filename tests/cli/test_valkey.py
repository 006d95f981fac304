"""``conclave halt|clear|status|deliberate --valkey URL`` as an operator runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support import ROOT
from tests.support.url_secrets import SECRET, assert_never_shown, secret_valkey_urls
from tests.support.valkey_server import ValkeyServer


def conclave(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapters.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.fixture
def url() -> Iterator[str]:
    """A new server: its halt key does not exist yet (its capacity 'conclave' is known
    unused, so it admits without the recovery grace a new name otherwise waits)."""
    with ValkeyServer() as server:
        server.seed_capacity()
        yield server.url


def test_a_new_server_is_halted_until_two_approvers_clear_it(url: str) -> None:
    status = conclave("status", "--valkey", url)
    assert status.returncode == 3
    assert status.stdout.startswith("HALTED: no halt record at conclave:halt")
    assert "conclave clear --valkey URL --approver A --approver B" in status.stdout
    run = conclave("deliberate", "--valkey", url, "--agents", "3", "--latency-ms", "1")
    assert run.returncode == 3 and "halted before starting: no halt record" in run.stderr

    one = conclave("clear", "--valkey", url, "--approver", "alice", "--reason", "r")
    assert one.returncode == 2 and "2 distinct approvers" in one.stderr
    both = ["--approver", "alice", "--approver", "bob"]
    cleared = conclave("clear", "--valkey", url, *both, "--reason", "first deployment")
    assert cleared.returncode == 0 and cleared.stdout == "cleared\n"
    run = conclave(
        "deliberate", "--valkey", url, "--shared-capacity", "72", "--agents", "72", "--quiet"
    )
    assert run.returncode == 0, run.stderr
    assert "72/72 succeeded" in run.stdout and "cluster 0/72 in use" in run.stdout
    oversize = conclave("deliberate", "--valkey", url, "--shared-capacity", "10", "--agents", "11")
    assert oversize.returncode == 2
    assert "FR10: shared capacity exhausted: 11 requested > 10" in oversize.stderr

    halted = conclave("halt", "--valkey", url, "--reason", "audit")
    assert halted.returncode == 0 and halted.stdout == "halted: audit\n"
    again = conclave("halt", "--valkey", url, "--reason", "second")
    assert again.returncode == 0 and again.stdout == "already halted: audit\n"
    status = conclave("status", "--valkey", url)
    assert status.returncode == 3
    lines = status.stdout.splitlines()
    assert lines[0] == "HALTED: audit"
    assert re.search(r"clear by alice, bob: first deployment$", lines[1])
    assert re.search(r"halt: audit$", lines[2])
    assert lines[3].startswith("cluster: ")  # then the cluster's own section


def test_bad_valkey_usage_is_one_line_and_exit_2(url: str) -> None:
    for args in (
        ["deliberate", "--shared-capacity", "5"],
        ["deliberate", "--valkey", url, "--shared-capacity", "0"],
        ["status", "--valkey", "http://127.0.0.1:1"],
        ["status", "--halt-file", "/tmp/x", "--valkey", url],
        ["halt", "--valkey", "redis://127.0.0.1:1", "--reason", "x"],
    ):
        proc = conclave(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("conclave: ") and len(proc.stderr.splitlines()) == 1
    unreachable = conclave("status", "--valkey", "redis://127.0.0.1:1")
    assert unreachable.returncode == 3 and "unreachable" in unreachable.stdout


@pytest.fixture
def locked_server() -> Iterator[ValkeyServer]:
    """A server that only a client with :data:`SECRET` may use (its default capacity name
    known unused: no recovery grace)."""
    with ValkeyServer(password=SECRET) as server:
        server.seed_capacity()
        yield server


@pytest.mark.parametrize("form", [0, 2])  # ?password=..., and user:password@
def test_a_password_in_the_url_never_shows_in_the_cli_output(
    locked_server: ValkeyServer, form: int
) -> None:
    """status, clear, deliberate (with its structured logs on stderr) and halt, on a
    server that answers, one that refuses a wrong password, and one that is gone."""
    url = secret_valkey_urls(locked_server.port)[form]
    wrong_password = SECRET[::-1]
    logs = ["--log-level", "debug"]
    runs = [
        conclave("status", "--valkey", url),
        conclave("clear", "--valkey", url, "--approver", "a", "--approver", "b", "--reason", "r"),
        conclave("deliberate", "--valkey", url, "--shared-capacity", "2", "--agents", "3"),
        conclave("deliberate", "--valkey", url, "--shared-capacity", "2", "--agents", "2", *logs),
        conclave("halt", "--valkey", url, "--reason", "audit"),
    ]
    assert [run.returncode for run in runs] == [3, 0, 2, 0, 0], [r.stderr for r in runs]
    assert "no halt record at conclave:halt on redis://" in runs[0].stdout  # the URL is shown
    assert "FR10: shared capacity exhausted" in runs[2].stderr
    wrong = secret_valkey_urls(locked_server.port, wrong_password)[form]
    refused = [
        conclave("status", "--valkey", wrong),
        conclave("deliberate", "--valkey", wrong, "--shared-capacity", "2", *logs),
    ]
    locked_server.stop()
    gone = [
        conclave("status", "--valkey", url),
        conclave("halt", "--valkey", url, "--reason", "x"),
        conclave("deliberate", "--valkey", url, "--agents", "2", *logs),
    ]
    assert [run.returncode for run in refused + gone] == [3, 3, 3, 2, 3]
    assert all("unreachable" in run.stdout for run in (refused[0], gone[0]))
    for secret in (SECRET, wrong_password):
        texts = [text for run in runs + refused + gone for text in (run.stdout, run.stderr)]
        assert_never_shown(secret, texts)


def test_a_corrupt_halt_key_is_reported_and_repaired_like_a_corrupt_halt_file(url: str) -> None:
    import coredis
    import trio

    async def corrupt() -> None:
        async with coredis.Redis.from_url(url, decode_responses=False) as client:
            await client.set("conclave:halt", b'{"schema": "conclave.halt/1", "halted": true}')

    trio.run(corrupt)
    status = conclave("status", "--valkey", url)
    assert status.returncode == 3
    assert status.stdout.startswith("HALTED: halt key conclave:halt corrupt, unreadable")
    assert "`conclave halt --valkey URL` rewrites it as a readable halt" in status.stdout
    both = ["--approver", "a", "--approver", "b"]
    clear = conclave("clear", "--valkey", url, *both, "--reason", "r")
    assert clear.returncode == 2 and "unreadable" in clear.stderr
    halt = conclave("halt", "--valkey", url, "--reason", "operator rewrites it")
    assert halt.returncode == 0, halt.stderr
    assert halt.stdout.startswith("halted: operator rewrites it\n")
    assert "the unreadable halt key was kept as conclave:halt:corrupt:" in halt.stdout
    assert conclave("status", "--valkey", url).stdout.startswith("HALTED: operator rewrites it\n")


def test_the_key_prefix_namespaces_the_halt_and_the_shared_capacity() -> None:
    with ValkeyServer() as server:
        server.seed_capacity("blue")
        url, blue = server.url, ["--valkey-key-prefix", "blue"]
        both = ["--approver", "alice", "--approver", "bob"]
        cleared = conclave("clear", "--valkey", url, *blue, *both, "--reason", "blue is ready")
        assert cleared.returncode == 0, cleared.stderr
        # The default namespace is untouched: still no halt record there.
        assert conclave("status", "--valkey", url).returncode == 3
        assert conclave("status", "--valkey", url, *blue).returncode == 0
        run = conclave(
            "deliberate", "--valkey", url, *blue, "--shared-capacity", "5", "--lease", "2.5",
            "--agents", "5", "--overflow", "queue", "--quiet",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "5/5 succeeded" in run.stdout and "cluster 0/5 in use" in run.stdout
        keys = set(server.command("KEYS", "*").decode("utf-8", "replace").split("\r\n"))
        assert {"blue:halt", "blue:epoch", "blue:capacity"} <= keys
        assert not any(k.startswith("conclave:") and k != "conclave:epoch" for k in keys), keys
        halted = conclave("halt", "--valkey", url, *blue, "--reason", "blue audit")
        assert halted.returncode == 0
        run = conclave("deliberate", "--valkey", url, *blue, "--agents", "2")
        assert run.returncode == 3 and "blue audit" in run.stderr


def test_a_bad_lease_or_key_prefix_is_a_usage_error_and_nothing_runs() -> None:
    with ValkeyServer() as server:
        server.seed_capacity()
        for args, message in (
            (["--lease", "0"], "--lease: must be 0.1 to 3600 seconds, got 0"),
            (["--lease", "nan"], "--lease: must be 0.1 to 3600 seconds, got nan"),
            (["--lease", "1e9"], "--lease: must be 0.1 to 3600 seconds, got 1e9"),
            (["--lease", "ten"], "--lease: not a number of seconds: 'ten'"),
            (["--valkey-key-prefix", "a b"], "--valkey-key-prefix: a key prefix is 1 to 150"),
            (["--valkey-key-prefix", "x" * 151], "--valkey-key-prefix: a key prefix is 1 to 150"),
        ):
            run = conclave("deliberate", "--valkey", server.url, "--shared-capacity", "5", *args)
            assert run.returncode == 2 and message in run.stderr, run.stderr
            assert run.stderr.startswith("conclave: ") and len(run.stderr.splitlines()) == 1
        assert server.command("DBSIZE") == b":1\r\n"  # only the seeded epoch: nothing ran


def test_lease_and_key_prefix_without_what_they_configure_are_refused() -> None:
    for args, message in (
        (["--lease", "5"], "--lease is the shared capacity's: it needs --shared-capacity N"),
        (["--valkey-key-prefix", "blue"], "--valkey-key-prefix needs --valkey URL"),
    ):
        run = conclave("deliberate", "--agents", "2", *args)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert run.stdout == ""
