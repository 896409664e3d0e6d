"""Coalesces the rate-limit checks of one event-loop turn into ONE Redis script call.

Every request is still decided atomically on its own (see ratelimit_lua), but requests that
arrive together share one command, one round trip and one reply to parse. The command is
packed by hand and sent on a raw pooled connection: redis-py's generic command path cost more
client CPU than the check itself.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from gpuproxy_proxy.limits.lua import SLIDING_WINDOW_LUA
from gpuproxy_proxy.limits.scopes import Fragments, bulk

_MAX_BATCH = 256
_MAX_IN_FLIGHT = 2  # script calls on the wire at once: one being answered, one being filled

# (scope count, the scopes' RESP fragments (ScopeSet.resp), future of
# (elapsed_ms, [allowed, cur_1, prev_1, ...]))
Reply = tuple[int, list[int]]
Call = tuple[int, Fragments, "asyncio.Future[Reply]"]


def pack_batch(sha: bytes, window_seconds: int, batch: Sequence[Call]) -> bytes:
    """EVALSHA sha numkeys keys... window count (n limits...)... in RESP, from the scope
    sets' pre-encoded fragments."""
    key_count = sum([c[0] for c in batch])
    # ARGV: window, count, and per request its scope count plus one limit per scope.
    head = b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + 2 * key_count + 2 + len(batch))
    parts = [head, bulk(sha), bulk(b"%d" % key_count)]
    parts.extend([c[1][0] for c in batch])
    parts.append(bulk(b"%d" % window_seconds))
    parts.append(bulk(b"%d" % len(batch)))
    parts.extend([c[1][1] for c in batch])
    return b"".join(parts)


def parse_reply(reply: bytes) -> tuple[int, list[list[int]]]:
    elapsed, _, results = reply.partition(b"|")
    return int(elapsed), [[int(v) for v in r.split(b",")] for r in results.split(b";")]


class ScriptBatcher:
    def __init__(
        self, client: aioredis.Redis, window_seconds: int, timeout_seconds: float
    ) -> None:
        self._client = client
        self.window_seconds = window_seconds  # a config reload may change it
        self._timeout = timeout_seconds
        self._sha = hashlib.sha1(SLIDING_WINDOW_LUA.encode(), usedforsecurity=False)
        self._sha_hex = self._sha.hexdigest().encode()
        self._pending: list[Call] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, scope_count: int, resp: Fragments, /) -> asyncio.Future[Reply]:
        """Queue one request's check; the future resolves to its counts or the Redis error
        (each script call is bounded by the timeout, so callers need no timer of their own)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending.append((scope_count, resp, future))
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
            batch = [c for c in batch if not c[2].done()]  # drop callers that went away
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
                elapsed, results = await self._execute(batch)
            if len(results) != len(batch):
                raise ConnectionError(f"rate-limit script answered {len(results)}/{len(batch)}")
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else ConnectionError("cancelled")
            # Calls queued behind a failed one would only wait for the same failure: fail
            # them now so the caller's fallback answers at once.
            waiting, self._pending = [*batch, *self._pending], []
            for _, _, future in waiting:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result((elapsed, result))

    async def _execute(self, batch: list[Call]) -> tuple[int, list[list[int]]]:
        command = pack_batch(self._sha_hex, self.window_seconds, batch)
        try:
            reply = await self._roundtrip(command)
        except NoScriptError:
            # First use, or Redis restarted and lost its script cache. NOSCRIPT means nothing
            # ran, so loading and resending counts every request exactly once.
            await self._client.script_load(SLIDING_WINDOW_LUA)
            reply = await self._roundtrip(command)
        if not isinstance(reply, bytes):
            raise ConnectionError(f"unexpected rate-limit script reply {reply!r}")
        return parse_reply(reply)

    async def _roundtrip(self, command: bytes) -> object:
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(command, check_health=False)
            return await conn.read_response()
        except BaseException as exc:
            if not isinstance(exc, NoScriptError):
                # A half-read connection cannot be reused: drop it, the pool makes a new one.
                await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
