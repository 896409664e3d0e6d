"""Exact usage on every response shape, through a real proxy process into PostgreSQL (through
PgBouncer): streams with and without the client asking for usage, a backend that ignores
stream_options, JSON bodies chunked over 1 MiB, with a length over 64 KiB, with usage first,
embeddings, legacy completions, and answers without usage (estimated, flagged)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import free_port
from tests.proxy.procs import ProxyProcess, start_proxy

pytestmark = [pytest.mark.services, pytest.mark.asyncio(loop_scope="module")]

TEXTS = ("Hello", " wor", "ld!")
PROMPT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]}
# The estimate of PROMPT (metering/estimate.py): 40 + 4 ("user") characters -> 11, + 3.
PROMPT_ESTIMATE = 14
BIG_TEXT = "lorem ipsum " * 100_000  # 1.2 MB


def usage(prompt: int, completion: int | None = None) -> dict[str, int]:
    out = {"prompt_tokens": prompt, "total_tokens": prompt + (completion or 0)}
    if completion is not None:
        out["completion_tokens"] = completion
    return out


@dataclass
class ShapeBackend:
    """Answers each request in the shape its X-Test-Shape header names; keeps what it got."""

    seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> ShapeBackend:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/{tail:.*}", self.answer)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen[request.headers["X-Request-ID"]] = body
        shape = request.headers["X-Test-Shape"]
        if body.get("stream"):
            asked = (body.get("stream_options") or {}).get("include_usage") is True
            return await self.stream(request, asked and shape != "ignore-options")
        if shape == "chunked-big":
            return await self.chunked(request, {"id": "c", "choices": [
                {"message": {"content": BIG_TEXT}}], "usage": usage(21, 300_000)})
        if shape == "usage-first":
            return await self.chunked(request, {"usage": usage(22, 30_000), "choices": [
                {"message": {"content": BIG_TEXT[:300_000]}}]})
        if shape == "length-big":
            doc = {"choices": [{"message": {"content": BIG_TEXT[:100_000]}}],
                   "usage": usage(23, 10_000)}
            return web.Response(body=json.dumps(doc).encode(), content_type="application/json")
        if shape == "embeddings":
            return web.json_response({"object": "list", "data": [
                {"object": "embedding", "index": 0, "embedding": [0.25] * 4096}],
                "usage": usage(24)})
        if shape == "completions":
            return web.json_response({"object": "text_completion",
                                      "choices": [{"text": "done"}], "usage": usage(25, 1)})
        # "no-usage": what some servers answer
        return web.json_response({"choices": [{"message": {"content": "abcdefghij"}}]})

    async def chunked(self, request: web.Request, doc: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)  # no length: sent chunked
        data = json.dumps(doc).encode()
        for i in range(0, len(data), 50_000):
            await resp.write(data[i:i + 50_000])
        await resp.write_eof()
        return resp

    async def stream(self, request: web.Request, with_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        legacy = request.path == "/v1/completions"
        for text in TEXTS:
            choice = {"index": 0, "text": text} if legacy else {
                "index": 0, "delta": {"content": text}}
            await resp.write(b"data: %s\n\n" % json.dumps({"id": "s", "choices": [choice]},
                                                          separators=(",", ":")).encode())
        final = b"data: %s\n\n" % json.dumps({"id": "s", "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
        tail = b"data: [DONE]\n\n"
        if with_usage:
            # As vLLM: a last chunk without choices; sent in two writes, cut mid-event.
            event = b'data: {"id":"s","choices":[],"usage":%s}\n\n' % json.dumps(
                usage(26, len(TEXTS))).encode()
            final, tail = final + event[:30], event[30:] + tail
        await resp.write(final)
        await resp.write(tail)
        await resp.write_eof()
        return resp


@dataclass
class Setup:
    proxy: ProxyProcess
    backend: ShapeBackend
    dsn: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory,
                pgbouncer_server: Any) -> AsyncIterator[Setup]:
    backend = await ShapeBackend().start()
    tmp = tmp_path_factory.mktemp("exact-usage")
    port, admin = free_port(), free_port()
    config = proxy_config(
        [], backends=[{"name": "shapes", "url": f"http://127.0.0.1:{backend.port}"}],
        listen={"host": "127.0.0.1", "port": port, "admin_port": admin},
        database={"host": pgbouncer_server.host, "port": pgbouncer_server.port,
                  "database": pgbouncer_server.database, "sslmode": "disable"},
        metering={"enabled": True, "flush_interval_seconds": 0.1})
    env = {"GPUPROXY_DB_USER": pgbouncer_server.user,
           "GPUPROXY_DB_PASSWORD": pgbouncer_server.password}
    proxy = await start_proxy(tmp / "proxy.yaml", config, tmp / "proxy.log", env)
    try:
        yield Setup(proxy, backend, pgbouncer_server.dsn)
    finally:
        await proxy.stop()
        assert backend.runner is not None
        await backend.runner.cleanup()


async def call(setup: Setup, path: str, shape: str,
               body: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    rid = f"usage-{shape}-{uuid.uuid4().hex[:12]}"
    async with aiohttp.ClientSession() as http, http.post(
        setup.proxy.url + path, json=body, timeout=aiohttp.ClientTimeout(total=60),
        headers={"X-Request-ID": rid, "X-Test-Shape": shape},
    ) as resp:
        assert resp.status == 200, await resp.text()
        return rid, await resp.read(), dict(resp.headers)


async def record(setup: Setup, rid: str) -> asyncpg.Record:
    """The usage record of `rid`, once written (the proxy flushes every 0.1 s)."""
    deadline = time.monotonic() + 60
    conn = await asyncpg.connect(setup.dsn, statement_cache_size=0)
    try:
        while True:
            row = await conn.fetchrow(
                "SELECT route, status, prompt_tokens, completion_tokens, total_tokens, "
                "estimated, bytes_out FROM usage_records WHERE request_id = $1", rid)
            if row is not None:
                return row
            assert time.monotonic() < deadline, f"no usage record for {rid}"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def tokens(row: asyncpg.Record) -> tuple[Any, ...]:
    return (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"],
            row["estimated"])


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


async def test_stream_usage_asked_by_the_client_is_kept(setup: Setup) -> None:
    rid, body, _ = await call(setup, "/v1/chat/completions", "sse", {
        **PROMPT, "stream": True, "stream_options": {"include_usage": True}})
    assert b'"usage"' in events(body)[-2]
    assert setup.backend.seen[rid]["stream_options"] == {"include_usage": True}
    assert tokens(await record(setup, rid)) == (26, 3, 29, False)


async def test_stream_usage_asked_for_the_client_is_removed(setup: Setup) -> None:
    rid, body, _ = await call(setup, "/v1/chat/completions", "sse", {**PROMPT, "stream": True})
    forwarded = setup.backend.seen[rid]
    assert forwarded["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in forwarded.items() if k != "stream_options"} == {
        **PROMPT, "stream": True}
    got = events(body)
    assert b'"usage"' not in body
    assert len(got) == len(TEXTS) + 2  # the tokens, the finish chunk, [DONE]
    assert got[-1] == b"data: [DONE]"
    row = await record(setup, rid)
    assert tokens(row) == (26, 3, 29, False)
    assert row["bytes_out"] == len(body)


async def test_stream_from_a_backend_ignoring_stream_options_is_estimated(
        setup: Setup) -> None:
    before = await estimated_tokens(setup)
    rid, body, _ = await call(setup, "/v1/chat/completions", "ignore-options",
                              {**PROMPT, "stream": True})
    assert setup.backend.seen[rid]["stream_options"] == {"include_usage": True}
    assert events(body)[-1] == b"data: [DONE]"
    # 3 text chunks of 12 characters: at least one token each.
    assert tokens(await record(setup, rid)) == (PROMPT_ESTIMATE, 3, PROMPT_ESTIMATE + 3, True)
    assert await estimated_tokens(setup) == before + PROMPT_ESTIMATE + 3


async def test_legacy_completions_stream_and_json(setup: Setup) -> None:
    rid, body, _ = await call(setup, "/v1/completions", "sse",
                              {"model": "m", "prompt": "hi", "stream": True})
    assert b'"usage"' not in body
    assert tokens(await record(setup, rid)) == (26, 3, 29, False)
    rid, body, _ = await call(setup, "/v1/completions", "completions",
                              {"model": "m", "prompt": "hi"})
    assert "stream_options" not in setup.backend.seen[rid]  # not streamed: sent as it was
    assert tokens(await record(setup, rid)) == (25, 1, 26, False)


async def test_chunked_json_over_one_mib_with_usage_at_the_end(setup: Setup) -> None:
    rid, body, headers = await call(setup, "/v1/chat/completions", "chunked-big", PROMPT)
    assert "Content-Length" not in headers
    assert json.loads(body)["choices"][0]["message"]["content"] == BIG_TEXT
    row = await record(setup, rid)
    assert tokens(row) == (21, 300_000, 300_021, False)
    assert row["bytes_out"] == len(body) > 1024 * 1024


async def test_json_with_a_length_over_64_kib(setup: Setup) -> None:
    rid, body, headers = await call(setup, "/v1/chat/completions", "length-big", PROMPT)
    assert int(headers["Content-Length"]) == len(body) > 64 * 1024
    assert tokens(await record(setup, rid)) == (23, 10_000, 10_023, False)


async def test_json_with_usage_at_the_start(setup: Setup) -> None:
    rid, body, _ = await call(setup, "/v1/chat/completions", "usage-first", PROMPT)
    assert len(body) > 300_000
    assert tokens(await record(setup, rid)) == (22, 30_000, 30_022, False)


async def test_embeddings(setup: Setup) -> None:
    rid, body, _ = await call(setup, "/v1/embeddings", "embeddings",
                              {"model": "m", "input": "abc"})
    assert len(body) > 16 * 1024
    assert tokens(await record(setup, rid)) == (24, None, 24, False)


async def test_answers_without_usage_are_estimated(setup: Setup) -> None:
    rid, _, _ = await call(setup, "/v1/chat/completions", "no-usage", PROMPT)
    # "abcdefghij": 10 characters -> 3 tokens.
    assert tokens(await record(setup, rid)) == (PROMPT_ESTIMATE, 3, PROMPT_ESTIMATE + 3, True)
    rid, _, _ = await call(setup, "/v1/embeddings", "no-usage",
                           {"model": "m", "input": ["a" * 8, "b" * 9]})
    assert tokens(await record(setup, rid)) == (5, None, 5, True)


async def estimated_tokens(setup: Setup) -> float:
    async with aiohttp.ClientSession() as http, http.get(setup.proxy.admin + "/metrics") as r:
        text = await r.text()
    prefix = 'gpuproxy_tokens_estimated_total{route="chat_completions"} '
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))
