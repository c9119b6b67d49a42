"""The append log of an evolving graph: each update batch is framed, checksummed and fsync'ed before it is published.

A record is ``MAGIC (4 B) | payload length (u64 LE) | CRC-32 of the payload (u32 LE) | payload``. A crash while a
record is written leaves a *torn tail* (a short header, a short payload, or a payload whose checksum does not match
and that ends the file): :meth:`UpdateLog.records` stops before it and :meth:`UpdateLog.recover` cuts it off, so the
next append starts on a record boundary. A bad record followed by more bytes is not a torn write but corruption,
and raises. Used by :class:`gnn.evolving.LiveGraph`; ``pinsage update`` appends to the same file from another
process, serialised by :meth:`UpdateLog.locked` (an ``flock`` on the file, writers only — readers of the graph
never lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"PSU1"
_HEADER = struct.Struct("<4sQI")  # magic, payload length, crc32


class UpdateLogError(ValueError):
    """The log holds a damaged record that is not its last (corruption, not a torn write)."""


class UpdateLog:
    """An append-only file of framed records (see the module docstring).

    Args:
        path: the log file; created (with its folder) when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o644)
            os.fsync(fd)
            os.close(fd)
            _fsync_dir(self.path.parent)  # the new name itself must survive a crash

    # ------------------------------------------------------------------------------------------------ reading

    def records(self, offset: int = 0) -> Iterator[tuple[bytes, int]]:
        """``(payload, end offset)`` of every complete record from ``offset`` on; stops before a torn tail."""
        with self.path.open("rb") as f:
            data = f.read()
        size = len(data)
        pos = offset
        while pos < size:
            end = self._record_end(data, pos)
            if end is None:
                return
            yield data[pos + _HEADER.size : end], end
            pos = end

    def _record_end(self, data: bytes, pos: int) -> int | None:
        """End of the record at ``pos``, None for a torn tail; raises on corruption inside the file."""
        size = len(data)
        if size - pos < _HEADER.size:
            return None
        magic, length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if magic != MAGIC:
            raise UpdateLogError(f"{self.path}: no record starts at byte {pos} (found {magic!r}); the log is "
                                 "corrupt: restore it from a backup or rebuild the graph from the interactions")
        if end > size:
            return None
        if zlib.crc32(data[pos + _HEADER.size : end]) != crc:
            if end == size:
                return None
            raise UpdateLogError(f"{self.path}: the record at byte {pos} fails its checksum and is not the last one; "
                                 "the log is corrupt: restore it from a backup or rebuild the graph")
        return end

    def complete_size(self) -> int:
        """Bytes of the log up to the end of its last complete record."""
        end = 0
        for _payload, record_end in self.records():
            end = record_end
        return end

    def recover(self) -> int:
        """Cut a torn tail off (logged at WARNING); returns the bytes removed. Call with :meth:`locked` held."""
        good = self.complete_size()
        size = self.path.stat().st_size
        if size > good:
            log.warning("%s: dropping a torn record at the end (%d bytes after byte %d)", self.path, size - good, good)
            with self.path.open("r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return size - good

    # ------------------------------------------------------------------------------------------------ writing

    def append(self, payload: bytes) -> int:
        """Write one record and fsync it; returns the log's end offset. After return the record is durable."""
        frame = _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(frame)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer lock across processes (``flock``); readers of the log and of the graph do not take it."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __repr__(self) -> str:
        return f"UpdateLog({str(self.path)!r}, bytes={self.path.stat().st_size})"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
