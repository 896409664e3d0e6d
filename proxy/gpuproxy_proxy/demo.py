"""`gpuproxy-proxy --demo`: the proxy in front of built-in simulated GPU backends on loopback.

No Redis, no database: JWT auth with a printed demo token, the in-process rate limiter, three
backends that stream tokens as SSE with OpenAI `usage`. `--self-test` sends a few requests,
prints what came back and exits (0 when every check passed).
"""

from __future__ import annotations

import asyncio
import json
import secrets as pysecrets
import socket
import time
from typing import Any

import aiohttp
import jwt
from aiohttp import web

from gpuproxy_proxy.config import ProxyConfig, Secrets
from gpuproxy_proxy.observability.logging import setup_logging
from gpuproxy_proxy.process.server import Worker, serve_single

_WORDS = ("The", " proxy", " streams", " tokens", " from", " a", " simulated", " GPU", ".")
_TOKEN_DELAY_SECONDS = 0.02


def _demo_backend_app(name: str) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "demo-llama-8b", "object": "model", "owned_by": "gpuproxy-demo"},
            {"id": f"demo-{name}-only", "object": "model", "owned_by": name},
        ]})

    async def completion(request: web.Request) -> web.StreamResponse:
        try:
            body: dict[str, Any] = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "body must be JSON"}}, status=400)
        prompt = json.dumps(body.get("messages") or body.get("prompt") or "")
        prompt_tokens = max(1, len(prompt) // 4)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(_WORDS),
                 "total_tokens": prompt_tokens + len(_WORDS)}
        base = {"id": f"chatcmpl-{pysecrets.token_hex(6)}", "created": int(time.time()),
                "model": body.get("model", "demo-llama-8b"), "system_fingerprint": name}
        if not body.get("stream"):
            await asyncio.sleep(_TOKEN_DELAY_SECONDS * 2)
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "".join(_WORDS)}}],
                "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for word in _WORDS:
            await asyncio.sleep(_TOKEN_DELAY_SECONDS)  # a token's worth of "GPU time"
            event = {**base, "object": "chat.completion.chunk", "usage": None,
                     "choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        await resp.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    async def embeddings(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_post("/v1/completions", completion)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


async def start_demo_backends(count: int = 3) -> tuple[list[web.AppRunner], list[str]]:
    runners, urls = [], []
    for i in range(count):
        runner = web.AppRunner(_demo_backend_app(f"gpu-{i}"), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}")
    return runners, urls


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_config(urls: list[str], port: int, admin_port: int) -> ProxyConfig:
    return ProxyConfig.model_validate({
        "listen": {"host": "127.0.0.1", "port": port, "admin_port": admin_port},
        "backends": [{"name": f"gpu-{i}", "url": url} for i, url in enumerate(urls)],
        "load_balancing": {"strategy": "least_connections"},
        "health_check": {"interval_seconds": 2.0},
        "auth": {"enabled": True},
        "rate_limits": {"enabled": True, "per_ip": 600},
        "redis": None,
        "database": None,
        "limits": {"shutdown_grace_seconds": 5.0},
        "logging": {"level": "WARNING"},
    })


def demo_token(secret: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "demo-user", "iat": now, "exp": now + 24 * 3600}, secret,
                      algorithm="HS256")


async def self_test(base: str, admin: str, token: str) -> list[tuple[str, bool, str]]:
    """A bounded scripted check: a handful of requests, each with a short timeout."""
    results: list[tuple[str, bool, str]] = []
    auth = {"Authorization": f"Bearer {token}"}
    chat = {"model": "demo-llama-8b", "messages": [{"role": "user", "content": "Hello!"}]}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{base}/v1/models", headers=auth) as r:
            ids = [m["id"] for m in (await r.json())["data"]]
            results.append(("GET /v1/models (aggregated)", r.status == 200 and len(ids) == 4,
                            f"{r.status}, models {ids}"))
        async with http.post(f"{base}/v1/chat/completions", json=chat, headers=auth) as r:
            data = await r.json()
            ok = r.status == 200 and "choices" in data
            results.append(("POST /v1/chat/completions", ok,
                            f"{r.status}, backend {data.get('system_fingerprint')}, "
                            f"usage {data.get('usage')}, "
                            f"X-RateLimit-Remaining {r.headers.get('X-RateLimit-Remaining')}"))
        started = time.monotonic()
        async with http.post(f"{base}/v1/chat/completions", json={**chat, "stream": True},
                             headers=auth) as r:
            first = None
            events = 0
            async for line in r.content:
                if line.startswith(b"data:"):
                    events += 1
                    first = first or time.monotonic() - started
            total = time.monotonic() - started
            ok = r.status == 200 and events >= len(_WORDS) and first is not None and first < total
            results.append(("POST /v1/chat/completions stream=true", ok,
                            f"{r.status}, {events} SSE events, first after "
                            f"{(first or 0) * 1000:.0f} ms, done after {total * 1000:.0f} ms"))
        async with http.post(f"{base}/v1/chat/completions", json=chat) as r:
            results.append(("no credentials -> 401", r.status == 401, f"{r.status}"))
        async with http.get(f"{admin}/stats") as r:
            stats = await r.json()
            results.append(("GET admin /stats", r.status == 200 and "connections_active" in stats,
                            f"{r.status}, backends "
                            f"{ {k: v['state'] for k, v in stats['backends'].items()} }"))
        async with http.get(f"{admin}/metrics") as r:
            text = await r.text()
            results.append(("GET admin /metrics", "gpuproxy_requests_total" in text,
                            f"{r.status}, {len(text.splitlines())} lines"))
    return results


async def run_demo(port: int | None, admin_port: int | None, run_self_test: bool) -> int:
    runners, urls = await start_demo_backends()
    if run_self_test:
        port = port or _free_port()
        admin_port = admin_port or _free_port()
    config = demo_config(urls, port or 8080, admin_port or 9090)
    setup_logging(config.logging)
    jwt_secret = pysecrets.token_urlsafe(32)
    token = demo_token(jwt_secret)
    base = f"http://127.0.0.1:{config.listen.port}"
    admin = f"http://127.0.0.1:{config.listen.admin_port}"
    outcome = {"failed": 0}

    async def on_ready(_: Worker) -> None:
        if not run_self_test:
            print(_banner(base, admin, urls, token), flush=True)
            await asyncio.Event().wait()  # serve until SIGTERM / Ctrl-C
        print(f"gpuproxy demo self-test against {base} ({len(urls)} simulated backends)")
        for name, ok, detail in await self_test(base, admin, token):
            outcome["failed"] += 0 if ok else 1
            print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        print("self-test passed" if not outcome["failed"] else "self-test FAILED", flush=True)

    try:
        await serve_single(config, Secrets(jwt_secret=jwt_secret), None, on_ready)
    finally:
        for runner in runners:
            await runner.cleanup()
    return 1 if outcome["failed"] else 0


def _banner(base: str, admin: str, urls: list[str], token: str) -> str:
    return f"""gpuproxy demo: proxy on {base} in front of {len(urls)} simulated GPU backends
admin endpoints: {admin}/stats  {admin}/metrics  {admin}/ready
demo JWT (user demo-user, valid 24h):
  export TOKEN={token}
try a streamed chat completion:
  curl -N {base}/v1/chat/completions -H "Authorization: Bearer $TOKEN" \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "demo-llama-8b", "stream": true,
         "messages": [{{"role": "user", "content": "Hi"}}]}}'
press Ctrl-C to stop"""
