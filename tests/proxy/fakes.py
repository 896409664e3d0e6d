"""Fake GPU backends for proxy tests: aiohttp servers on 127.0.0.1 that answer, stream slowly,
fail or hang, and record what they received."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web

Mode = Literal["ok", "fail", "hang", "slow", "close"]


def free_port() -> int:
    """A loopback port nobody listens on (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeBackend:
    name: str
    models: tuple[str, ...] = ("fake-model",)
    mode: Mode = "ok"
    delay: float = 0.0  # answer latency in "slow" mode, per-chunk gap when streaming
    chunks: int = 3
    healthy: bool = True
    seen: list[Seen] = field(default_factory=list)
    # When set, a stream sends its first chunk and then waits for this before finishing.
    gate: asyncio.Event | None = None
    cancelled: int = 0  # handlers cancelled because the proxy closed the connection
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hits(self) -> int:
        return len(self.seen)

    async def start(self) -> FakeBackend:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._inference)
        self._runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": self.healthy}, status=200 if self.healthy else 503)

    async def _models(self, _: web.Request) -> web.Response:
        if self.mode == "fail":
            return web.json_response({"error": "down"}, status=500)
        data = [{"id": m, "object": "model", "owned_by": self.name} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        if self.mode == "fail":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.mode == "close":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        payload: dict[str, Any] = json.loads(body) if body.startswith(b"{") else {}
        if payload.get("stream"):
            return await self._stream(request)
        return web.json_response({
            "id": "cmpl-1", "object": "chat.completion", "backend": self.name,
            "path": request.path, "choices": [{"message": {"content": "hello"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        })

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(self.chunks):
            event = {"backend": self.name, "choices": [{"delta": {"content": f"t{i}"}}],
                     "usage": None}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            if i == 0 and self.gate is not None:
                await self.gate.wait()
            elif self.delay:
                await asyncio.sleep(self.delay)
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": self.chunks,
                                           "total_tokens": 5 + self.chunks}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp


async def start_backends(*names: str, **kwargs: Any) -> list[FakeBackend]:
    return [await FakeBackend(name, **kwargs).start() for name in names]


async def wait_ready(admin: str, proc: asyncio.subprocess.Process, timeout: float = 90) -> None:
    """Wait until a proxy subprocess answers 200 on its admin `/ready` (workers, and their
    database and Redis, can take a while to come up on a loaded machine)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.returncode is None, "proxy exited early"
            try:
                async with http.get(f"{admin}/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "proxy did not become ready"
            await asyncio.sleep(0.1)


class RecordingMeter:
    """Stands in for metering.meter.Meter: keeps every usage record, spools nothing."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def admit(self, *_: Any) -> None:
        return None  # no spool: nothing to hand the request path

    def record(self, rec: Any, ticket: Any = None) -> None:
        self.records.append(rec)
