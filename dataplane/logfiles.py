"""Bounded JSON-lines logs: writing with rotation, following across rotation, reading from the end.

Every record file a lab writes (the proxy's L7 records, the pods' request logs; the agent's
kernel flow records follow the same scheme) is one JSON object per line, appended whole. Past a
size cap the file is renamed to `NAME.1` (replacing the previous one) and a new `NAME` begins,
so a lab that runs for days keeps at most two files of each kind. The cap is
L7LAB_LOG_ROTATE_BYTES (bytes, default 64 MiB) for every such log.

Readers never load whole files to find where to start: `last_lines_offset` reads blocks
backwards from the end, `time_offset` bisects on the records' `time` field, and
`FollowedFile` follows a file by inode, finishing the renamed `NAME.1` before it starts the
new `NAME`, so no record is lost or read twice across a rotation (a reader that sleeps through
two rotations loses the file between them). All reads go through `_pread`.

`BoundedStderr` keeps a long-running process's own stderr log under the same cap.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROTATE_ENV = "L7LAB_LOG_ROTATE_BYTES"
DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024
BLOCK = 64 * 1024
MAX_LINE = 16 * 1024 * 1024  # a "line" longer than this is not a record: skipped, never held whole
REQUEST_LOG = "requests.jsonl"


def rotate_bytes() -> int:
    """The size cap of every lab log: L7LAB_LOG_ROTATE_BYTES, or 64 MiB if unset or not a
    positive integer."""
    try:
        value = int(os.environ.get(ROTATE_ENV, DEFAULT_ROTATE_BYTES))
    except ValueError:
        return DEFAULT_ROTATE_BYTES
    return value if value > 0 else DEFAULT_ROTATE_BYTES


def request_log(lab_dir: Path, endpoint_dir: str) -> Path:
    """Where the server of one pod or world host logs the requests it received: `endpoint_dir`
    is the endpoint's namespace name without the lab's prefix (e.g. "pod.shop.backend"). The
    directory is the server's own (it runs unprivileged and rotates the log there)."""
    return lab_dir / endpoint_dir / REQUEST_LOG


def previous(path: Path) -> Path:
    """The rotated file of `path` (`NAME.1`)."""
    return path.with_name(path.name + ".1")


class RotatingLog:
    """Appends whole lines to `name`; before a line would take the file past `max_bytes` the
    file becomes `name.1` and a new one begins. `dir_fd` makes `name` relative to an open
    directory (a pod server holds one of its own log directory, opened before its view of
    the lab's files is hidden). One write per line: a reader never sees a line torn by rotation."""

    def __init__(self, name: str | os.PathLike[str], max_bytes: int | None = None, dir_fd: int | None = None) -> None:
        self.name = os.fspath(name)
        self.max_bytes = max_bytes if max_bytes is not None else rotate_bytes()
        self.dir_fd = dir_fd
        self._fd: int | None = self._open()
        self.size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)

    def write_line(self, text: str) -> None:
        if self._fd is None:
            return
        data = text.encode("utf-8", "replace") + b"\n"
        if self.size > 0 and self.size + len(data) > self.max_bytes:
            self.rotate()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def rotate(self) -> None:
        """NAME -> NAME.1 (replacing it), then a fresh NAME."""
        assert self._fd is not None
        os.replace(self.name, self.name + ".1", src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        fd = self._open()
        os.close(self._fd)
        self._fd, self.size = fd, os.fstat(fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BoundedStderr(io.TextIOBase):
    """sys.stderr of a long-running process whose stderr (fd 2) is a log file: before a write
    would take the file past the cap it is rotated (NAME -> NAME.1, a new NAME on fd 2) or,
    where the process may not rename it (a confined pod server cannot see its directory),
    emptied. Install with `bound_stderr()`; a process whose stderr is not a file keeps its own."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes if max_bytes is not None else rotate_bytes()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            size = os.fstat(2).st_size
            if size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
            os.write(2, data)
        return len(text)

    def _rotate(self) -> None:
        try:
            path = os.readlink("/proc/self/fd/2")
            os.replace(path, path + ".1")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            os.dup2(fd, 2)
            os.close(fd)
        except OSError:
            os.ftruncate(2, 0)  # O_APPEND: the next write lands at the start


def bound_stderr(max_bytes: int | None = None) -> None:
    """Keep this process's stderr log under the cap, if its stderr is a regular file."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.fstat(2).st_mode):
            sys.stderr = BoundedStderr(max_bytes)


# --------------------------------------------------------------------------- reading


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Every read of a log goes through here (tests count the bytes)."""
    return os.pread(fd, size, offset)


def _open_read(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


@dataclass
class Position:
    """Where a reader stands: the file (by inode) and the byte offset of the next line."""

    inode: int
    offset: int


def lines_from(fd: int, offset: int) -> Iterator[tuple[bytes, int]]:
    """Complete lines of an open file from `offset` (a line start), each with the offset just
    after it; stops at a line still being written (no newline yet)."""
    pending = b""
    start = offset
    while True:
        block = _pread(fd, BLOCK, offset)
        if not block:
            return
        offset += len(block)
        pending += block
        at = 0
        while True:
            cut = pending.find(b"\n", at)
            if cut < 0:
                break
            start += cut + 1 - at
            yield pending[at:cut + 1], start
            at = cut + 1
        pending = pending[at:]
        if len(pending) > MAX_LINE:  # no record is this long: skip it up to its end
            start += len(pending)
            pending = b""


def _line_start_before(fd: int, end: int, floor: int = 0) -> int:
    """Offset of the start of the line that holds byte `end - 1` (reading back in blocks)."""
    pos = end - 1
    while pos > floor:
        low = max(floor, pos - BLOCK)
        cut = _pread(fd, pos - low, low).rfind(b"\n")
        if cut >= 0:
            return low + cut + 1
        pos = low
    return floor


def _line_start_at_or_after(fd: int, offset: int) -> int:
    """Offset of the first line that starts at or after `offset`."""
    if offset == 0:
        return 0
    pos = offset - 1
    while True:
        block = _pread(fd, BLOCK, pos)
        if not block:
            return pos
        cut = block.find(b"\n")
        if cut >= 0:
            return pos + cut + 1
        pos += len(block)


def complete_end(fd: int) -> int:
    """Offset just after the last complete line (a last line without its newline is still
    being written)."""
    size = os.fstat(fd).st_size
    if size == 0 or _pread(fd, 1, size - 1) == b"\n":
        return size
    return _line_start_before(fd, size)


def last_lines_offset(fd: int, count: int) -> tuple[int, int]:
    """Offset where the last `count` complete lines of the file begin, and how many complete
    lines that is (fewer when the file has fewer). Reads only the blocks that hold them."""
    end = complete_end(fd)
    if end == 0 or count <= 0:
        return end, 0
    found = 0  # newlines found before the last line's own: each starts one more line
    pos = end - 1
    while pos > 0:
        low = max(0, pos - BLOCK)
        block = _pread(fd, pos - low, low)
        stop = len(block)
        while (cut := block.rfind(b"\n", 0, stop)) >= 0:
            found += 1
            if found == count:
                return low + cut + 1, count
            stop = cut
        pos = low
    return 0, found + 1


def record_time(line: bytes) -> float | None:
    try:
        value = json.loads(line).get("time")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _first_timed(fd: int, offset: int) -> tuple[float | None, int]:
    """The first line at or after line start `offset` that carries a time: (time, its start);
    (None, end) when there is none."""
    for line, after in lines_from(fd, offset):
        when = record_time(line)
        if when is not None:
            return when, after - len(line)
        offset = after
    return None, offset


def time_offset(fd: int, since: float) -> int:
    """Offset of the first line whose `time` is >= `since`, found by bisection over the file:
    records are appended in time order (near enough: a reader still filters by time). Reads a
    few blocks per step, O(log size) steps, then at most about a block forward."""
    low, high = 0, complete_end(fd)  # every timed line starting before `low` is older than `since`
    while high - low > BLOCK:
        mid = (low + high) // 2
        when, at = _first_timed(fd, _line_start_at_or_after(fd, mid))
        if when is None or when >= since:
            high = mid
        else:
            low = _line_start_at_or_after(fd, at + 1)
    for line, after in lines_from(fd, low):
        when = record_time(line)
        if when is not None and when >= since:
            return after - len(line)
    return complete_end(fd)


class FollowedFile:
    """Reads new complete lines of `path` across rotations: when `path` is a new file, the rest
    of the old one (now `path.1`) comes first. Starts at the beginning of `path.1` (then
    `path`) unless positioned with `start_at_last` / `start_at_time`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.position: Position | None = None

    def _start(self, place: Any) -> None:
        """Position by `place(fd) -> offset or None`, tried on `path` then on `path.1`."""
        current = _open_read(self.path)
        if current is None:
            return
        try:
            offset = place(current, None)
            if offset is None:
                older = _open_read(previous(self.path))
                if older is not None:
                    try:
                        old_offset = place(older, 0)
                        if old_offset is not None:
                            self.position = Position(os.fstat(older).st_ino, old_offset)
                            return
                    finally:
                        os.close(older)
                offset = 0
            self.position = Position(os.fstat(current).st_ino, offset)
        finally:
            os.close(current)

    def start_at_last(self, count: int) -> None:
        """Position at the last `count` lines of path.1 + path."""
        wanted = [count]

        def place(fd: int, fallback: int | None) -> int | None:
            offset, found = last_lines_offset(fd, wanted[0])
            if found >= wanted[0] or fallback is not None:
                return offset
            wanted[0] -= found
            return None

        self._start(place)

    def start_at_time(self, since: float) -> None:
        """Position at the first record with time >= `since` in path.1 + path."""

        def place(fd: int, fallback: int | None) -> int | None:
            first, _ = _first_timed(fd, 0)
            if fallback is None and (first is None or first > since):
                return None  # the older file may hold records after `since`
            offset = time_offset(fd, since)
            return offset if fallback is None or offset < complete_end(fd) else None

        self._start(place)

    def read(self) -> Iterator[bytes]:
        """New complete lines since the last call (a line still being written waits)."""
        current = _open_read(self.path)
        if current is None:
            return
        try:
            inode = os.fstat(current).st_ino
            pos = self.position
            if pos is None or pos.inode != inode:
                # Never read, or rotated since: first what is left of the old file.
                older = _open_read(previous(self.path))
                if older is not None:
                    try:
                        old_inode = os.fstat(older).st_ino
                        # old_inode == inode: rotated between our two opens; what we hold is it.
                        if old_inode != inode and (pos is None or pos.inode == old_inode):
                            for line, after in lines_from(older, pos.offset if pos is not None else 0):
                                self.position = Position(old_inode, after)
                                yield line
                    finally:
                        os.close(older)
                pos = Position(inode, 0)
            elif os.fstat(current).st_size < pos.offset:
                pos = Position(inode, 0)  # truncated in place: start over
            self.position = pos
            for line, after in lines_from(current, pos.offset):
                self.position = Position(inode, after)
                yield line
        finally:
            os.close(current)


def json_lines(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Parsed records; a torn line (after a crash) or a non-object is skipped."""
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                yield record


def read_all(path: Path) -> list[dict[str, Any]]:
    """Every record of `path.1` then `path` (for tests and small logs)."""
    return list(json_lines(FollowedFile(path).read()))
