"""Coalesces concurrent rate-limit script calls into one Redis pipeline per event-loop turn.

Every request still costs exactly one script execution, but requests arriving together share
one network round trip and one pooled connection. Commands are packed by hand and sent on a
raw pooled connection: redis-py's generic pipeline cost more client CPU than the check itself.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

_MAX_BATCH = 512
_MAX_IN_FLIGHT = 2  # pipelines on the wire at once: one being answered, one being filled

Call = tuple[Sequence[str], Sequence[int], "asyncio.Future[bytes]"]


def pack_evalsha(sha: bytes, keys: Sequence[str], args: Sequence[int]) -> bytes:
    """One EVALSHA command in RESP."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n" % (3 + len(keys) + len(args), len(sha), sha)]
    numkeys = b"%d" % len(keys)
    parts.append(b"$%d\r\n%s\r\n" % (len(numkeys), numkeys))
    for key in keys:
        raw = key.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    for arg in args:
        raw = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class ScriptBatcher:
    def __init__(self, client: aioredis.Redis, script: str, timeout_seconds: float) -> None:
        self._client = client
        self._script = script
        self._timeout = timeout_seconds
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest().encode()
        self._pending: list[Call] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, keys: Sequence[str], args: Sequence[int]) -> asyncio.Future[bytes]:
        """Queue one script call; the future resolves to its reply or the Redis error
        (each batch is bounded by the timeout, so callers need no timer of their own)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending.append((keys, args, future))
        if not self._scheduled and self._in_flight < _MAX_IN_FLIGHT:
            # call_soon: every request handled in this loop turn joins the same batch.
            self._scheduled = True
            loop.call_soon(self._start)
        return future

    def _start(self) -> None:
        self._scheduled = False
        while self._pending and self._in_flight < _MAX_IN_FLIGHT:
            batch = self._pending[:_MAX_BATCH]
            del self._pending[:_MAX_BATCH]
            batch = [c for c in batch if not c[2].done()]  # drop callers that timed out
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._pending and not self._scheduled:
            self._start()

    async def _send(self, batch: list[Call]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._execute(batch)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else ConnectionError("cancelled")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(self, batch: list[Call]) -> list[Any]:
        replies = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in replies):
            # First use, or Redis restarted and lost its script cache: load once, resend all.
            await self._client.script_load(self._script)
            replies = await self._pipeline(batch)
        return replies

    async def _pipeline(self, batch: list[Call]) -> list[Any]:
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(
                b"".join(pack_evalsha(self._sha, keys, args) for keys, args, _ in batch),
                check_health=False,
            )
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # one failed command; the stream stays in sync
                    replies.append(exc)
        except BaseException:
            # A half-read connection cannot be reused: drop it, the pool makes a new one.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return replies

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
