"""Process model: connection cap with idle eviction (in process) and the real CLI as a
subprocess: graceful drain on SIGTERM during streams, N workers with one aggregated admin port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port, wait_ready

from gpuproxy_proxy.process.server import Worker, reuseport_socket


async def _until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll `check` until it is truthy; generous deadline, short interval."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def _open_idle(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _request(port: int, body: bytes = b"{}") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    data = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    return data


@pytest.fixture
async def worker_factory() -> AsyncIterator[Any]:
    workers: list[Worker] = []

    async def start(config: Any) -> tuple[Worker, int]:
        worker = Worker(config, __import__("gpuproxy_proxy.config").config.Secrets())
        sock = reuseport_socket("127.0.0.1", 0, 128)
        await worker.start(sock)
        workers.append(worker)
        return worker, sock.getsockname()[1]

    yield start
    for worker in workers:
        await worker.drain()


async def test_connection_cap_evicts_idle_connections_first(
    backends: list[FakeBackend], worker_factory: Any
) -> None:
    backends.append(await FakeBackend("a").start())
    worker, port = await worker_factory(proxy_config(
        backends, limits={"max_connections_per_worker": 2}))
    idle = [await _open_idle(port) for _ in range(2)]
    await _until(lambda: worker.runtime.connections_active == 2, "idle connections not accepted")
    answer = await _request(port)  # over the cap: an idle connection makes room
    assert answer.startswith(b"HTTP/1.1 200")
    closed = [await asyncio.wait_for(r.read(), timeout=30) == b"" for r, _ in idle]
    assert any(closed)
    for _, writer in idle:
        writer.close()


async def test_connection_cap_refuses_when_nothing_is_idle(
    backends: list[FakeBackend], worker_factory: Any
) -> None:
    gate = asyncio.Event()
    backends.append(await FakeBackend("a", gate=gate).start())
    worker, port = await worker_factory(proxy_config(
        backends, limits={"max_connections_per_worker": 2}))
    busy = [asyncio.create_task(_request(port, b'{"stream": true}')) for _ in range(2)]
    await _until(lambda: backends[0].hits >= 2, "streams did not reach the backend")
    refused = await _request(port)
    assert refused.startswith(b"HTTP/1.1 503")
    head, _, body = refused.partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    assert error["type"] == "overloaded"
    assert error["request_id"]
    assert f"X-Request-ID: {error['request_id']}".encode() in head
    assert worker.runtime.connections_rejected == 1
    gate.set()
    for task in busy:
        assert b"data: [DONE]" in await task


async def _raw(port: int, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send `data` as is; the answer's head and its JSON error."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)["error"]


async def test_errors_aiohttp_answers_itself_are_json_with_a_request_id(
    backends: list[FakeBackend], worker_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpuproxy_proxy.routes import PIPELINE

    backends.append(await FakeBackend("a").start())
    worker, port = await worker_factory(proxy_config(backends))
    head, error = await _raw(port, b"GARBAGE\r\n\r\n")  # refused by the HTTP parser
    assert head.split(b"\r\n")[0].endswith(b"400 Bad Request")
    assert error["type"] == "invalid_request_error"
    assert f"X-Request-ID: {error['request_id']}".encode() in head

    async def crash(request: Any, route: str) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(worker.app[PIPELINE], "handle", crash)
    head, error = await _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                   b"X-Request-ID: rid-7\r\nContent-Length: 0\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b"500 Internal Server Error")
    assert (error["type"], error["request_id"]) == ("internal_error", "rid-7")
    assert b"X-Request-ID: rid-7" in head


# --- the real CLI as a subprocess --------------------------------------------------------

async def _start_cli(tmp_path: Path, backends: list[FakeBackend], workers: int,
                     **overrides: Any) -> tuple[asyncio.subprocess.Process, int, int]:
    port, admin_port = free_port(), free_port()
    config = proxy_config(backends, listen={"host": "127.0.0.1", "port": port,
                                            "admin_port": admin_port}, **overrides)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(path),
        "--workers", str(workers), env=env, stderr=asyncio.subprocess.PIPE)
    await wait_ready(f"http://127.0.0.1:{admin_port}", proc)
    return proc, port, admin_port


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_sigterm_during_streams_lets_them_finish(tmp_path: Path,
                                                       backends: list[FakeBackend]) -> None:
    backends.append(await FakeBackend("slow", chunks=8, delay=0.25).start())
    # The drain delay must cover seeing /ready turn 503 and one more request (a loaded machine
    # can take seconds for that); the grace period only bounds how long the streams may run.
    proc, port, admin_port = await _start_cli(
        tmp_path, backends, workers=1,
        limits={"shutdown_grace_seconds": 60, "drain_delay_seconds": 5.0})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as http:
            responses = [await http.post(url, json={"stream": True}) for _ in range(3)]
            for resp in responses:
                assert (await resp.content.readline()).startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while True:  # draining is reported as not ready
                async with http.get(f"http://127.0.0.1:{admin_port}/ready") as ready:
                    if ready.status == 503:
                        break
                assert time.monotonic() < deadline, "never reported not ready"
                await asyncio.sleep(0.02)
            # During the drain delay requests are still served, asking clients to reconnect.
            async with http.post(url, json={}) as late:
                assert late.status == 200
                assert late.headers["Connection"] == "close"
            deadline = time.monotonic() + 30
            while True:  # then the listener closes
                try:
                    async with http.post(url, json={}, headers={"Connection": "close"}):
                        pass
                except aiohttp.ClientConnectionError:
                    break
                assert time.monotonic() < deadline, "listener was not closed"
                await asyncio.sleep(0.05)
            for resp in responses:  # the streams that were running all complete
                rest = await resp.read()
                assert rest.rstrip().endswith(b"data: [DONE]")
                assert rest.count(b"data: ") == 9  # tokens t1..t7, usage, [DONE]
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
    finally:
        await _stop(proc)


async def test_workers_share_port_and_admin_reports_the_sum(
    tmp_path: Path, backends: list[FakeBackend]
) -> None:
    backends.append(await FakeBackend("a").start())
    proc, port, admin_port = await _start_cli(tmp_path, backends, workers=2)
    admin = f"http://127.0.0.1:{admin_port}"
    idle: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     json={}, headers={"Connection": "close"}) as resp:
                    assert resp.status == 200
            for _ in range(12):
                idle.append(socket.create_connection(("127.0.0.1", port)))
            deadline = time.monotonic() + 60
            while True:
                async with http.get(f"{admin}/stats") as resp:
                    stats = await resp.json()
                if stats["connections_active"] == 12:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.1)
            assert stats["workers"] == 2
            assert stats["gc_max_pause_ms"] >= 0.0
            pids = {w["pid"] for w in stats["per_worker"]}
            assert len(pids) == 2
            assert stats["backends"]["a"]["healthy_workers"] == 2
            async with http.get(f"{admin}/metrics") as resp:
                text = await resp.text()
            assert "gpuproxy_connections_active 12.0" in text
            total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("gpuproxy_requests_total{"))
            assert total == 20
        for sock in idle:
            sock.close()
        # A crashed worker is replaced; the pod keeps serving meanwhile.
        os.kill(sorted(pids)[0], signal.SIGKILL)
        deadline = time.monotonic() + 90  # restart delay + a Python start on a loaded machine
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"{admin}/stats") as resp:
                    stats = await resp.json()
                now_pids = {w["pid"] for w in stats["per_worker"]}
                if len(now_pids) == 2 and now_pids != pids:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.2)
            await wait_ready(admin, proc)
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
    finally:
        for sock in idle:
            sock.close()
        await _stop(proc)


async def test_demo_self_test_exits_zero() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_proxy.cli", "--demo", "--self-test",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, (out + err).decode()
    assert b"self-test passed" in out
    assert b"stream=true" in out


@pytest.mark.usefixtures("restore_logging")
def test_invalid_config_names_the_field(tmp_path: Path) -> None:
    from gpuproxy_proxy.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"backends": [{"name": "x", "url": "not a url"}]}))
    assert main(["--config", str(path)]) == 2


def test_gc_monitor_times_collections() -> None:
    import gc

    from prometheus_client import generate_latest

    from gpuproxy_proxy.observability.metrics import ProxyMetrics
    from gpuproxy_proxy.process.gcwatch import GcMonitor

    metrics = ProxyMetrics()
    monitor = GcMonitor(metrics)
    monitor.install()
    try:
        gc.collect()
    finally:
        monitor.uninstall()
    gc.collect()  # not counted any more
    assert monitor.collections == 1
    assert monitor.snapshot()["max_pause_ms"] >= 0.0
    text = generate_latest(metrics.registry).decode()
    assert 'gpuproxy_gc_pause_milliseconds_count{generation="2"} 1.0' in text


@pytest.mark.parametrize("argv", [
    ["--config", "proxy.yaml", "--workers", "0"],
    ["--config", "proxy.yaml", "--workers", "-2"],
    ["--demo", "--port", "0"],
    ["--demo", "--admin-port", "70000"],
])
def test_numeric_flags_out_of_range_name_the_flag(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from gpuproxy_proxy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {argv[-2]}:" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_busy_port_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpuproxy_proxy.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "proxy.yaml"
        path.write_text(yaml.safe_dump({"listen": {"host": "127.0.0.1", "port": port}}))
        assert main(["--config", str(path)]) == 1
    assert "change listen.port" in capsys.readouterr().err


async def test_client_hangup_cancels_the_upstream_request(
    backends: list[FakeBackend], worker_factory: Any
) -> None:
    hang = await FakeBackend("hang", mode="hang").start()
    backends.append(hang)
    worker, port = await worker_factory(proxy_config(backends))
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await _until(lambda: hang.hits, "the request did not reach the backend")
    assert worker.runtime.in_flight == 1
    writer.close()  # the client gives up before the backend answered
    await _until(lambda: hang.cancelled and not worker.runtime.in_flight,
                 "upstream request was not cancelled")
    assert worker.runtime.pool.by_name["hang"].in_flight == 0


async def test_client_hangup_mid_stream_closes_the_upstream_connection(
    backends: list[FakeBackend], worker_factory: Any
) -> None:
    from gpuproxy_proxy.upstream.forward import UPSTREAM_POOLS

    gate = asyncio.Event()  # never set: the stream would go on until the backend is told
    stream = await FakeBackend("stream", gate=gate).start()
    backends.append(stream)
    worker, port = await worker_factory(proxy_config(backends))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n"
                 b"\r\n{\"stream\": true}")
    assert b"data: " in await asyncio.wait_for(reader.readuntil(b"\n\n"), timeout=30)
    pool = worker.app[UPSTREAM_POOLS].pool("127.0.0.1", stream.port, False)
    assert pool.total == 1
    writer.close()  # the client gives up mid-stream
    await _until(lambda: not pool.total and not worker.runtime.in_flight,
                 "upstream connection was kept after the hang-up")
    assert not pool.idle  # closed, not handed back to the pool half-read
    assert not gate.is_set()


async def test_idle_keepalive_connection_holds_no_request(
    backends: list[FakeBackend], worker_factory: Any
) -> None:
    import gc

    from gpuproxy_proxy.http.request import Request

    backends.append(await FakeBackend("a").start())
    worker, port = await worker_factory(proxy_config(backends))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await asyncio.wait_for(reader.readuntil(b"}}"), timeout=30)

    def requests_alive() -> list[Request]:
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, Request) and o.app is worker.app]

    # The handler may still be finishing after the last response byte: poll, do not sleep.
    await _until(lambda: not requests_alive(), "an idle connection still holds its request")
    assert worker.runtime.connections_active == 1  # still open, idle, keep-alive
    writer.close()
