"""Scraping /stats of several pods at once: good answers, garbage, errors, timeouts, unready
and finished pods."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from gpuproxy_operator.autoscaling.policy import PodSample
from gpuproxy_operator.autoscaling.scrape import scrape

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IPS = ["127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"]


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str | None
    ready: bool = True
    phase: str = "Running"
    terminating: bool = False
    deletion_cost: str | None = None


async def ok(_: web.Request) -> web.Response:
    return web.json_response({"connections_active": 42, "workers": 2})


async def garbage(_: web.Request) -> web.Response:
    return web.json_response({"connections_active": "many"})


async def failing(_: web.Request) -> web.Response:
    return web.Response(status=500)


async def slow(_: web.Request) -> web.Response:
    await asyncio.sleep(3600)  # far beyond any timeout: only the timeout ends this scrape
    return web.json_response({"connections_active": 1})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    with socket.socket() as s:
        s.bind((IPS[0], 0))
        chosen: int = s.getsockname()[1]
    runners = []
    for ip, handler in zip(IPS, (ok, garbage, failing, slow), strict=True):
        app = web.Application()
        app.router.add_get("/stats", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, ip, chosen).start()
        runners.append(runner)
    yield chosen
    for runner in runners:
        await runner.cleanup()


async def test_each_pod_is_read_on_its_own(port: int) -> None:
    pods = [Pod("good", IPS[0]), Pod("garbage", IPS[1]), Pod("error", IPS[2]),
            Pod("slow", IPS[3]), Pod("starting", "127.0.0.10", ready=False),
            Pod("pending", None, ready=False), Pod("done", IPS[0], phase="Succeeded"),
            Pod("leaving", IPS[0], terminating=True)]
    async with aiohttp.ClientSession() as session:
        # The product default: long enough for the in-process pods on a loaded machine.
        result = await scrape(session, pods, port, per_pod_timeout=2.0)
    # Finished and terminating pods are not counted at all; unready ones are, as not ready.
    assert result.samples == (
        PodSample("good", 42), PodSample("garbage", None), PodSample("error", None),
        PodSample("slow", None), PodSample("starting", None, ready=False),
        PodSample("pending", None, ready=False))
    assert result.errors == {
        "garbage": "/stats unreadable: no non-negative integer connections_active in /stats",
        "error": "/stats unreadable: HTTP 500",
        "slow": "/stats timed out after 2s",
        "starting": "not ready",
        "pending": "no IP yet",
    }
