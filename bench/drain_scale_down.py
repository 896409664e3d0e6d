"""Scale-down under streaming load: how many streams does a drain drop?

Starts an SSE backend (in this process), N gpuproxy processes (the real CLI, each with its own
port and workers) and stream clients spread over them. A simulated endpoints controller polls
every proxy's /ready (like the kubelet's readiness probe) and new connections only go to ready
proxies, as a Service routes them. Then SIGTERM goes to K of the proxies, and the clients keep
going until those have exited. Each client keeps its connection alive between streams and
moves to another ready proxy when an answer says `Connection: close` or the connection is gone;
a request that got no answer at all is retried once elsewhere (what the OpenAI SDK does).

Counted: streams completed, streams truncated (answer begun, not finished: the figure that must
be 0 for streams shorter than the grace period), requests without any answer after the retry,
and the streams in flight on the terminated proxies at SIGTERM. Every process it starts is ended
by its PID in a `finally`; the run is bounded in time.

    .venv/bin/python bench/drain_scale_down.py
    .venv/bin/python bench/drain_scale_down.py --proxies 4 --clients 48 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Scenario:
    proxies: int = 4
    terminate: int = 2
    workers: int = 2
    clients: int = 48  # stream loops, each one stream at a time
    events: int = 20  # per stream
    event_gap_ms: float = 100.0  # 20 x 100 ms: 2 s streams
    warmup_seconds: float = 4.0  # load before SIGTERM
    drain_delay_seconds: float = 3.0
    idle_close_seconds: float = 2.0
    grace_seconds: float = 30.0
    probe_interval_seconds: float = 0.2  # readiness probe + endpoints propagation
    think_max_ms: float = 50.0  # pause between a client's streams
    deadline_seconds: float = 180.0  # the whole run, whatever happens


@dataclass
class Result:
    streams_completed: int = 0
    streams_truncated: int = 0
    no_answer_after_retry: int = 0
    retried: int = 0
    reconnects: int = 0  # a connection refused or found closed before sending: nothing lost
    in_flight_on_terminated_at_sigterm: int = 0
    streams_on_terminated_after_sigterm: int = 0
    terminated_exit_codes: list[int | None] = field(default_factory=list)
    drain_seconds: list[float] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _backend(events: int, gap_s: float) -> tuple[web.AppRunner, int]:
    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(events):
            await resp.write(f'data: {{"i": {i}}}\n\n'.encode())
            await asyncio.sleep(gap_s)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post(CHAT, stream)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@dataclass
class Proxy:
    index: int
    port: int
    admin_port: int
    proc: asyncio.subprocess.Process
    ready: bool = True
    terminated_at: float | None = None
    exited_at: float | None = None


async def _start_proxy(index: int, backend_port: int, sc: Scenario, work: Path) -> Proxy:
    port, admin = _free_port(), _free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "admin_port": admin},
        "workers": sc.workers,
        "backends": [{"name": "gpu", "url": f"http://127.0.0.1:{backend_port}"}],
        "auth": {"enabled": False}, "rate_limits": {"enabled": False},
        "metering": {"enabled": False},
        "health_check": {"interval_seconds": 1.0, "timeout_seconds": 5.0},
        "limits": {"drain_delay_seconds": sc.drain_delay_seconds,
                   "idle_close_seconds": sc.idle_close_seconds,
                   "shutdown_grace_seconds": sc.grace_seconds},
        "logging": {"level": "WARNING"},
    }
    path = work / f"proxy-{index}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with (work / f"proxy-{index}.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    return Proxy(index, port, admin, proc)


async def _is_ready(http: aiohttp.ClientSession, proxy: Proxy) -> bool:
    try:
        async with http.get(f"http://127.0.0.1:{proxy.admin_port}/ready",
                            timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _wait_all_ready(proxies: Sequence[Proxy], within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        for proxy in proxies:
            while not await _is_ready(http, proxy):
                if proxy.proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"proxy {proxy.index} did not become ready")
                await asyncio.sleep(0.1)


async def _endpoints(proxies: Sequence[Proxy], interval: float, stop: asyncio.Event) -> None:
    """The endpoints controller: a proxy takes new connections only while /ready says 200."""
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            states = await asyncio.gather(*(_is_ready(http, p) for p in proxies))
            for proxy, ready in zip(proxies, states, strict=True):
                proxy.ready = ready
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


class Client:
    """One stream loop with its own kept-alive connection to the proxy it last picked."""

    def __init__(self, proxies: Sequence[Proxy], sc: Scenario, result: Result,
                 streaming: dict[int, int]) -> None:
        self.proxies, self.sc, self.result, self.streaming = proxies, sc, result, streaming
        self.proxy: Proxy | None = None
        self.session: aiohttp.ClientSession | None = None

    def _pick(self) -> Proxy:
        ready = [p for p in self.proxies if p.ready] or list(self.proxies)
        return random.choice(ready)  # noqa: S311 - load spreading, not security

    async def _move(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.proxy = self._pick()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))

    async def run(self, stop: asyncio.Event) -> None:
        # Staggered over one stream's length, so the SIGTERM finds streams at every stage
        # (clients that start together would all be finishing at the same moments).
        await asyncio.sleep(random.random() * self.sc.events * self.sc.event_gap_ms / 1000)  # noqa: S311
        try:
            await self._move()
            while not stop.is_set():
                await self._one_stream()
                await asyncio.sleep(random.random() * self.sc.think_max_ms / 1000)  # noqa: S311
        finally:
            if self.session is not None:
                await self.session.close()

    async def _one_stream(self) -> None:
        retried = False
        while True:
            assert self.session is not None
            assert self.proxy is not None
            proxy = self.proxy
            url = f"http://127.0.0.1:{proxy.port}{CHAT}"
            try:
                resp = await self.session.post(url, json={"stream": True})
            except aiohttp.ClientConnectorError:
                self.result.reconnects += 1  # refused: nothing was sent
                await self._move()
                continue
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if retried:
                    self.result.no_answer_after_retry += 1
                    await self._move()
                    return
                self.result.retried += 1
                retried = True
                await self._move()
                continue
            await self._read(resp, proxy)
            if resp.headers.get("Connection", "").lower() == "close":
                await self._move()
            return

    async def _read(self, resp: aiohttp.ClientResponse, proxy: Proxy) -> None:
        if proxy.terminated_at is not None:
            self.result.streams_on_terminated_after_sigterm += 1
        self.streaming[proxy.index] = self.streaming.get(proxy.index, 0) + 1
        events, done = 0, False
        try:
            async with resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                async for line in resp.content:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: "):
                        events += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            done = False
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = ""
        finally:
            self.streaming[proxy.index] -= 1
        if done and events == self.sc.events:
            self.result.streams_completed += 1
        else:
            self.result.streams_truncated += 1
            if len(self.result.truncated_examples) < 5:
                self.result.truncated_examples.append(
                    f"proxy {proxy.index}: {events}/{self.sc.events} events, done={done} {error}")


async def run(sc: Scenario, work: Path | None = None) -> Result:
    """The scenario; every proxy process is killed by PID at the end, whatever happened."""
    own_dir = work is None
    work = Path(tempfile.mkdtemp(prefix="gpuproxy-drain-")) if work is None else work
    result = Result()
    backend, backend_port = await _backend(sc.events, sc.event_gap_ms / 1000)
    proxies: list[Proxy] = []
    stop_load, stop_endpoints = asyncio.Event(), asyncio.Event()
    try:
        async with asyncio.timeout(sc.deadline_seconds):
            proxies = [await _start_proxy(i, backend_port, sc, work) for i in range(sc.proxies)]
            await _wait_all_ready(proxies, 120)
            streaming: dict[int, int] = {}
            endpoints = asyncio.create_task(
                _endpoints(proxies, sc.probe_interval_seconds, stop_endpoints))
            clients = [Client(proxies, sc, result, streaming) for _ in range(sc.clients)]
            loops = [asyncio.create_task(c.run(stop_load)) for c in clients]
            await asyncio.sleep(sc.warmup_seconds)
            victims = proxies[: sc.terminate]
            result.in_flight_on_terminated_at_sigterm = sum(
                streaming.get(p.index, 0) for p in victims)
            for proxy in victims:
                proxy.terminated_at = time.monotonic()
                proxy.proc.send_signal(15)  # SIGTERM, as the kubelet sends it
            for proxy in victims:
                code = await proxy.proc.wait()
                proxy.exited_at = time.monotonic()
                result.terminated_exit_codes.append(code)
                assert proxy.terminated_at is not None
                result.drain_seconds.append(round(proxy.exited_at - proxy.terminated_at, 2))
            await asyncio.sleep(1.0)  # load on the survivors for a moment
            stop_load.set()
            await asyncio.gather(*loops)
            stop_endpoints.set()
            await endpoints
    finally:
        stop_load.set()
        stop_endpoints.set()
        for proxy in proxies:
            if proxy.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proxy.proc.kill()  # by PID; its workers follow (they watch their parent)
                await proxy.proc.wait()
        await backend.cleanup()
        if own_dir:
            for child in work.iterdir():
                child.unlink()
            work.rmdir()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Scenario()
    for name, value in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    sc = Scenario(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(run(sc))
    stream_s = sc.events * sc.event_gap_ms / 1000
    print(f"{sc.proxies} proxies x {sc.workers} workers, {sc.clients} stream clients, "
          f"{stream_s:g} s streams, SIGTERM to {sc.terminate} (drain delay "
          f"{sc.drain_delay_seconds:g} s, idle close {sc.idle_close_seconds:g} s, grace "
          f"{sc.grace_seconds:g} s)")
    print(f"streams in flight on the terminated proxies at SIGTERM: "
          f"{result.in_flight_on_terminated_at_sigterm}")
    print(f"streams completed: {result.streams_completed}")
    print(f"streams dropped or truncated: {result.streams_truncated}")
    print(f"requests without an answer after one retry: {result.no_answer_after_retry} "
          f"(retried: {result.retried}, reconnects: {result.reconnects})")
    print(f"terminated proxies: exit codes {result.terminated_exit_codes}, drained in "
          f"{result.drain_seconds} s")
    for example in result.truncated_examples:
        print("  truncated:", example)
    if args.json:
        args.json.write_text(json.dumps({"scenario": asdict(sc), "result": asdict(result)},
                                        indent=2), encoding="utf-8")
    ok = result.streams_truncated == 0 and result.no_answer_after_retry == 0
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
