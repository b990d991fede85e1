"""Reading a spec file: regular files only, bounded, and never echoing what is not spec text."""
from __future__ import annotations

import os
import stat

from ..errors import AttncError, Span
from .parser import MAX_SOURCE_BYTES, decode

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_spec_file(path: "str | os.PathLike") -> str:
    """The text of the spec file at `path`, or an AttncError naming the file.

    Only regular files are opened (a FIFO would block, /dev/zero never ends), at most
    MAX_SOURCE_BYTES are read, and a binary file is refused without quoting its bytes.
    """
    name = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    try:
        _check_kind(name, os.stat(path))  # before opening: opening a device or FIFO may block
        # O_NONBLOCK: should the path have been swapped for a FIFO since, open must not wait.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise AttncError(f"no such spec file: {name}",
                         hint="pass a path to a .attn file or the spec's source text") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise AttncError(f"cannot read {name!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        _check_kind(name, os.fstat(fd))  # what was opened, not what was there a moment ago
        chunks, size = [], 0
        while size <= MAX_SOURCE_BYTES:  # bounded even if the file grows or lies about its size
            chunk = os.read(fd, MAX_SOURCE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise AttncError(f"cannot read {name!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_SOURCE_BYTES:
        raise _too_large(name)  # it grew past the limit after os.stat, or is a /proc-like file
    if b"\x00" in data:
        # Binary data: say where, but do not print the line (no source is attached).
        at = data.index(b"\x00")
        line = data.count(b"\n", 0, at) + 1
        col = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise AttncError(f"spec contains a NUL byte; {name} looks like a binary file, not a spec",
                         Span(line, col, line, col + 1), filename=name, hint="a spec is UTF-8 text")
    return decode(data, name)  # invalid UTF-8: a located error that does not quote the bytes


def _check_kind(name: str, st: os.stat_result) -> None:
    for test, what in _KINDS:
        if test(st.st_mode):
            raise AttncError(f"{name} is {what}, not a spec file")
    if not stat.S_ISREG(st.st_mode):
        raise AttncError(f"{name} is not a regular file")
    if st.st_size > MAX_SOURCE_BYTES:
        raise _too_large(name, st.st_size)


def _too_large(name: str, size: int | None = None) -> AttncError:
    what = f"{size} bytes, " if size is not None else ""
    return AttncError(f"{name} is {what}larger than {MAX_SOURCE_BYTES} bytes (1 MiB), the limit for a spec file")
