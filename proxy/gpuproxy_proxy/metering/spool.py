"""The local metering spool of one worker: append-only segment files of checksummed JSON lines
(admitted, progress, settled), each record's lines written before the database sees it, and a
segment deleted once none of its records can still be needed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
SEGMENT_SUFFIX = ".seg"
# A segment is closed at this size or age, so committed ones can be deleted soon.
SEGMENT_BYTES = 4 * 1024 * 1024
SEGMENT_SECONDS = 10.0


# Built once: json.dumps with separators builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode(entry: dict[str, Any]) -> bytes:
    """One line: crc32 of the JSON (8 hex digits), a space, the JSON, a newline."""
    body = _ENCODER.encode(entry).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_lines(data: bytes) -> Iterator[dict[str, Any]]:
    """The intact entries of a segment; a torn last write or a damaged line is skipped."""
    for line in data.split(b"\n"):
        if len(line) < 10 or line[8:9] != b" ":
            continue
        body = line[9:]
        try:
            if int(line[:8], 16) != zlib.crc32(body):
                continue
            entry = json.loads(body)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield entry


class Segment:
    __slots__ = ("closed", "created", "deleted", "fd", "holds", "path", "size", "spilled",
                 "synced", "unflushed")

    def __init__(self, path: Path) -> None:
        self.path = path
        # O_APPEND: each os.write lands whole at the end; the page cache keeps it through a
        # SIGKILL or OOM kill of the process. A node crash loses what the writer's periodic
        # sync (Spool.sync, off the event loop) has not reached yet.
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.created = time.time()
        self.size = 0
        self.synced = -1     # bytes known to be on the disk itself (-1: not even the name)
        self.holds = 0       # records in flight whose latest admitted/progress line is here
        self.unflushed = 0   # settled lines here not yet committed to the database
        self.spilled = 0     # of those, how many were let go from memory (re-read from disk)
        self.closed = False
        self.deleted = False

    def done(self) -> bool:
        return self.closed and self.holds <= 0 and self.unflushed <= 0


class Spool:
    """Segments `<owner>.<seq>.seg` next to `<owner>.lock`, which this process holds with
    flock for as long as it lives: a lock anyone else can take belongs to a dead owner."""

    def __init__(self, directory: Path, worker_index: int = 0,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.owner = f"w{worker_index}-{os.getpid()}-{os.urandom(4).hex()}"
        self._lock_fd = self._lock(directory / (self.owner + LOCK_SUFFIX))
        self._seq = 0
        self.segment_bytes = segment_bytes
        self.segments: deque[Segment] = deque()
        self.bytes = 0
        self.dropped_segments = 0
        self.current = self._open_segment()

    @staticmethod
    def _lock(path: Path) -> int:
        # A replayer may take and unlink a lock file in the instant before it is locked here
        # (it has no segment yet): lock again until the locked file is the one at the path.
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _open_segment(self) -> Segment:
        self._seq += 1
        seg = Segment(self.directory / f"{self.owner}.{self._seq:08d}{SEGMENT_SUFFIX}")
        self.segments.append(seg)
        return seg

    def append(self, line: bytes) -> Segment:
        """Write one line to the current segment (rotating first when it is full or old)."""
        seg = self.current
        if seg.size >= self.segment_bytes or (seg.size and time.time() - seg.created
                                         >= SEGMENT_SECONDS):
            seg = self.rotate()
        assert seg.fd is not None
        written = os.write(seg.fd, line)
        if written != len(line):
            # Disk full mid-line: end it so the next line starts clean (the checksum
            # rejects this one), and start a new segment.
            os.write(seg.fd, b"\n")
            self.rotate()
            raise OSError("short write to the metering spool")
        seg.size += written
        self.bytes += written
        return seg

    def rotate(self) -> Segment:
        old = self.current
        if old.fd is not None:
            os.close(old.fd)
            old.fd = None
        old.closed = True
        self.current = self._open_segment()
        self.collect()
        return self.current

    def tick(self) -> None:
        """Periodic: close an old current segment, delete what is no longer needed."""
        seg = self.current
        if seg.size and time.time() - seg.created >= SEGMENT_SECONDS:
            self.rotate()
        else:
            self.collect()

    def collect(self) -> None:
        for seg in list(self.segments):
            if seg.done():
                self._delete(seg)

    def _delete(self, seg: Segment) -> None:
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None
        seg.deleted = True
        self.segments.remove(seg)
        self.bytes -= seg.size
        seg.path.unlink(missing_ok=True)

    def drop_oldest(self) -> Segment | None:
        """Policy drop_oldest: give up the oldest closed segment (its records keep only their
        in-memory copy, if any). Returns it, or None when only the current one is left."""
        for seg in self.segments:
            if seg is not self.current:
                self._delete(seg)
                self.dropped_segments += 1
                return seg
        return None

    def oldest_seconds(self) -> float:
        for seg in self.segments:
            if seg.size:
                return max(0.0, time.time() - seg.created)
        return 0.0

    def unsynced(self) -> list[tuple[Segment, int]]:
        """Segments written since their last sync, with the size a sync now covers."""
        return [(seg, seg.size) for seg in self.segments if seg.size > seg.synced]

    def sync(self, pending: list[tuple[Segment, int]]) -> None:
        """Blocking (run it in a thread; the caller records what it covered): fdatasync the
        segments, then the directory for their names."""
        for seg, _ in pending:
            try:
                fd = os.open(seg.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # committed and deleted meanwhile
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, seg: Segment) -> list[dict[str, Any]]:
        try:
            return list(decode_lines(seg.path.read_bytes()))
        except FileNotFoundError:
            return []

    def close(self) -> None:
        """Clean shutdown: delete the segments that are done; the rest stay for a replay."""
        self.current.closed = True
        self.collect()
        for seg in self.segments:
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None
        if not self.segments:
            (self.directory / (self.owner + LOCK_SUFFIX)).unlink(missing_ok=True)
        os.close(self._lock_fd)
