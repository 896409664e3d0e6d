"""Fixtures for proxy-core tests: fake backends and an in-process proxy without Redis/DB/auth."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.app import build_app
from gpuproxy_proxy.config import ProxyConfig, Secrets

ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def proxy_config(fakes: list[FakeBackend], **overrides: Any) -> ProxyConfig:
    """A config for tests: no auth, no Redis, no database, fast health checks.

    Checks run often, but their timeouts are generous: on a loaded machine a fake backend may
    answer late, and that must not eject it or cut a parked stream. Tests about a timeout set
    their own small one."""
    data: dict[str, Any] = {
        "backends": [{"name": b.name, "url": b.url} for b in fakes],
        "auth": {"enabled": False},
        "rate_limits": {"enabled": False},
        "metering": {"enabled": False},
        "health_check": {"interval_seconds": 0.2, "timeout_seconds": 5.0,
                         "unhealthy_threshold": 2, "ejection_seconds": 0.5},
        "upstream": {"connect_timeout_seconds": 10.0, "read_timeout_seconds": 30.0},
        "load_balancing": {"strategy": "round_robin"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ProxyConfig.model_validate(data)


@pytest.fixture
async def backends() -> AsyncIterator[list[FakeBackend]]:
    started: list[FakeBackend] = []
    yield started
    for backend in started:
        await backend.stop()


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def factory(config: ProxyConfig, secrets: Secrets | None = None,
                      **kwargs: Any) -> TestClient[Any, Any]:
        app = build_app(config, secrets or Secrets(), **kwargs)
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that run the CLI in-process: its root log handler writes to this test's captured
    stderr, which is closed afterwards, so later tests' log records would fail to print."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
