"""Fixtures for proxy-core tests: fake backends and an in-process proxy without Redis/DB/auth."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer, get_port_socket
from tests.proxy.fakes import FakeBackend
from yarl import URL

from gpuproxy_proxy.app import build_app
from gpuproxy_proxy.config import ProxyConfig, Secrets
from gpuproxy_proxy.http.adminlistener import build_admin_api_app
from gpuproxy_proxy.http.frontend import ClientPort

ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
AdminApiFactory = Callable[[TestClient[Any, Any]], Awaitable[TestClient[Any, Any]]]


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


class ProxyTestServer(BaseTestServer):
    """aiohttp's TestServer contract (host, port, make_url, app, close) over the proxy's own
    client port (http/frontend.py), so tests drive the front end production uses."""

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1") -> None:
        super().__init__(host=host)
        self.app = app
        self.client_port = ClientPort(app)

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return self.client_port.runner

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self.runner = self.client_port.runner
        sock = get_port_socket(self.host, self.port or 0, socket.AF_INET)
        self.host, self.port = sock.getsockname()[:2]
        await self.client_port.start(sock)
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.started and not self.closed:
            await self.client_port.close()
            self._root = None
            self.port = None
            self._closed = True


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def factory(config: ProxyConfig, secrets: Secrets | None = None,
                      **kwargs: Any) -> TestClient[Any, Any]:
        app = build_app(config, secrets or Secrets(), **kwargs)
        client: TestClient[Any, Any] = TestClient(ProxyTestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def make_admin_api() -> AsyncIterator[AdminApiFactory]:
    """The admin API's own listener (http/adminlistener.py) over a started proxy's services,
    as a worker serves it on listen.admin_api_port."""
    clients: list[TestClient[Any, Any]] = []

    async def factory(proxy: TestClient[Any, Any]) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(build_admin_api_app(proxy.app),
                                                             host="127.0.0.1"))
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
