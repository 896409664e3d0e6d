"""Worker heartbeats: one byte down a pipe from the worker's event loop (no HTTP, and it stops
exactly when that loop stops running); the supervisor reads them and judges each worker slot
ok, starting, draining, hung, down or crash-looping."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SERVING = b"R"
DRAINING = b"D"

# A worker's first beat comes after its start (imports, services, sockets): give it this long
# at least, however short the heartbeat timeout.
START_ALLOWANCE_SECONDS = 60.0
# This many exits within the window make a slot crash-looping (/health fails).
CRASHLOOP_EXITS = 3
CRASHLOOP_WINDOW_SECONDS = 120.0


def beat_interval(timeout: float) -> float:
    """Several beats per timeout, so one late beat never looks like a hang."""
    return min(1.0, max(0.05, timeout / 5))


async def send_beats(fd: int, state: Callable[[], bytes],
                     hang_after: Callable[[], float]) -> None:
    """Worker side, until cancelled; `hang_after` (the heartbeat timeout) is read live."""
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                os.write(fd, state())
            except BlockingIOError:
                pass  # the supervisor is behind; the pipe holds plenty of beats already
            except BrokenPipeError:
                return  # the supervisor is gone; watch_parent ends this worker
            await asyncio.sleep(beat_interval(hang_after()))
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class WorkerSlot:
    """Supervisor side: one worker index and the process currently filling it."""

    index: int
    pid: int | None = None
    spawned_at: float = 0.0
    last_beat: float | None = None
    last_state: bytes = b""
    restarts: int = 0
    hang_kills: int = 0
    last_exit: int | None = None
    exits: deque[float] = field(default_factory=deque)
    _fd: int | None = None

    def open_pipe(self) -> int:
        """A fresh pipe for the next process; returns the write end to hand to the child."""
        self.close_pipe()
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._fd = read_fd
        asyncio.get_running_loop().add_reader(read_fd, self._on_readable)
        return write_fd

    def close_pipe(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the worker exited (or closed its end): nothing more will come
            self.close_pipe()
            return
        self.last_beat = asyncio.get_running_loop().time()
        self.last_state = data[-1:]

    def started(self, pid: int, now: float) -> None:
        self.pid, self.spawned_at = pid, now
        self.last_beat, self.last_state = None, b""

    def exited(self, code: int | None, now: float) -> None:
        self.pid, self.last_exit = None, code
        self.exits.append(now)
        while self.exits and self.exits[0] < now - CRASHLOOP_WINDOW_SECONDS:
            self.exits.popleft()

    def overdue(self, now: float, timeout: float) -> bool:
        """Running, but silent for longer than allowed."""
        if self.pid is None:
            return False
        if self.last_beat is None:
            return now - self.spawned_at > max(timeout, START_ALLOWANCE_SECONDS)
        return now - self.last_beat > timeout

    def state(self, now: float, timeout: float) -> str:
        """ok / draining / starting / down / hung, or crashloop: not serving after several
        recent exits (a replacement that beats again clears it at once)."""
        if self.pid is not None and self.last_beat is not None:
            if self.overdue(now, timeout):
                return "hung"
            return "draining" if self.last_state == DRAINING else "ok"
        recent = sum(1 for t in self.exits if t >= now - CRASHLOOP_WINDOW_SECONDS)
        if recent >= CRASHLOOP_EXITS:
            return "crashloop"
        if self.pid is None:
            return "down"
        return "hung" if self.overdue(now, timeout) else "starting"

    def snapshot(self, now: float, timeout: float) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "state": self.state(now, timeout),
            "heartbeat_age_seconds": None if self.last_beat is None
            else round(now - self.last_beat, 3),
            "restarts": self.restarts,
            "hang_kills": self.hang_kills,
            "recent_exits": len(self.exits),
            "last_exit_code": self.last_exit,
        }
