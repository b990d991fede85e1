"""Issue 8, A13: spec paths that are not spec files fail fast with an AttncError naming the file,
without reading without bound and without echoing what is not spec text."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import attnc
from attnc import AttncError

REPO = Path(__file__).resolve().parent.parent
SECRET = "hunter2-do-not-print"


def _refused_in_a_child(path, phrase: str, timeout: float = 60) -> str:
    """attnc.parse(path) in a child process with 1 GiB of address space beyond what the imports
    take and a deadline, so that a regression (blocking on a FIFO, reading /dev/zero or a huge file
    to the end) fails this test instead of hanging it or exhausting the machine's memory."""
    code = (
        "import resource, sys\n"
        "import attnc\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    attnc.parse(sys.argv[1])\n"
        "except attnc.AttncError as err:\n"
        "    print(str(err)); sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    assert result.returncode == 3, f"not an AttncError: {result.stdout[-500:]}{result.stderr[-2000:]}"
    assert phrase in result.stdout and str(path) in result.stdout, result.stdout
    return result.stdout


def _refused(path, phrase: str) -> AttncError:
    start = time.perf_counter()
    with pytest.raises(AttncError) as info:
        attnc.parse(str(path))
    assert time.perf_counter() - start < 2, "not fast"
    err = info.value
    assert phrase in err.message, str(err)
    assert str(path) in str(err), str(err)
    return err


def test_fifo_fails_fast(tmp_path):
    # Opening a FIFO for reading used to block until a writer came: forever.
    fifo = tmp_path / "spec.attn"
    os.mkfifo(fifo)
    _refused_in_a_child(fifo, f"{fifo} is a FIFO (named pipe), not a spec file", timeout=30)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_endless_device_fails_fast(tmp_path):
    # /dev/zero used to be read until memory ran out; a link to it is no different.
    _refused_in_a_child("/dev/zero", "/dev/zero is a character device, not a spec file")
    link = tmp_path / "zero.attn"
    link.symlink_to("/dev/zero")
    _refused_in_a_child(link, "is a character device")


def test_directory(tmp_path):
    _refused(tmp_path, "is a directory")


def test_socket(tmp_path):
    path = tmp_path / "s.attn"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        _refused(path, "is a socket")


def test_huge_file_is_refused_from_its_size(tmp_path):
    # A sparse 8 GiB file: refused from os.stat, before a byte is read; the limit is stated.
    path = tmp_path / "huge.attn"
    with open(path, "wb") as f:
        f.truncate(8 << 30)
    out = _refused_in_a_child(path, "larger than 1048576 bytes (1 MiB)")
    assert f"{8 << 30} bytes" in out


def test_file_just_under_the_limit_is_read(tmp_path):
    path = tmp_path / "big.attn"
    head = "attention a(N) {\n    q, kv = seq(N)\n}\n"
    path.write_text(head + "#" * ((1 << 20) - len(head) - 1) + "\n")
    assert path.stat().st_size == 1 << 20
    assert attnc.parse(str(path)).name == "a"


def test_file_that_grows_past_the_limit_after_stat(tmp_path, monkeypatch):
    # Reading stops at the limit whatever stat said (a growing file, /proc files that report 0).
    path = tmp_path / "grows.attn"
    path.write_bytes(b"#" * ((1 << 20) + 10))
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: os.stat_result((*real(p)[:6], 0, *real(p)[7:])))
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real(path)[:6], 0, *real(path)[7:])))
    err = _refused(path, "larger than 1048576 bytes")
    assert "#" * 20 not in str(err)


@pytest.mark.parametrize("data, where", [
    (b"\x7fELF\x02\x01\x01\x00" + SECRET.encode() + b"\n" * 3, "1:8"),
    (b"attention a(N) {\n  " + SECRET.encode() + b"\x00\n}\n", "2:23"),
], ids=["elf", "nul-in-text"])
def test_binary_file_is_named_not_echoed(tmp_path, data, where):
    path = tmp_path / "blob.attn"
    path.write_bytes(data)
    err = _refused(path, "NUL byte")
    assert str(err).startswith(f"{path}:{where}: error: ")
    assert SECRET not in str(err) and "attention" not in str(err).split("error:", 1)[1]


def test_invalid_utf8_file_is_named_not_echoed(tmp_path):
    path = tmp_path / "latin1.attn"
    path.write_bytes(b"attention a(N) { # " + SECRET.encode() + b" caf\xe9 }\n")
    err = _refused(path, "not valid UTF-8")
    assert SECRET not in str(err)


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    path = tmp_path / "secret.attn"
    path.write_text("attention a(N) { q, kv = seq(N) }")
    path.chmod(0)
    _refused(path, "cannot read")


def test_regular_files_and_links_to_them_still_work(tmp_path):
    from attnc.frontend.source import read_spec_file

    link = tmp_path / "causal.attn"
    link.symlink_to(REPO / "specs" / "causal.attn")
    assert read_spec_file(link) == (REPO / "specs" / "causal.attn").read_text()
    assert attnc.parse(str(link)).name == attnc.parse(str(REPO / "specs" / "causal.attn")).name
    assert attnc.parse(link).name == "causal"  # a PathLike


def test_cli_reports_a_directory_as_an_error(tmp_path, capsys):
    from attnc.cli import main

    assert main(["check", str(tmp_path)]) != 0
    assert f"{tmp_path} is a directory" in capsys.readouterr().err
