"""Liveness from worker heartbeats (real supervisor and workers): a stopped (hung) worker is
killed and replaced while the other worker's connections carry on; a killed one is restarted;
one that keeps crashing fails /health until it comes back. And the states /health and /ready
derive from heartbeats, without processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import ProxyProcess, RawConnection, start_proxy

from gpuproxy_proxy.process.heartbeat import CRASHLOOP_EXITS, START_ALLOWANCE_SECONDS
from gpuproxy_proxy.process.supervisor import Supervisor

CHAT = "/v1/chat/completions"
# Short for a test, yet several seconds: a loaded machine must not look like a hang.
HEARTBEAT_TIMEOUT = 4.0


async def _start(tmp_path: Path, backends: list[FakeBackend]) -> ProxyProcess:
    backends.append(await FakeBackend("a").start())
    config = proxy_config(
        backends, workers=2,
        listen={"host": "127.0.0.1", "port": free_port(), "admin_port": free_port()},
        limits={"worker_heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT})
    return await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log")


def _pids(stats: dict[str, Any]) -> dict[int, int]:
    """Worker index -> pid, from the supervisor's view."""
    return {w["index"]: w["pid"] for w in stats["process"]["workers"]}


async def test_stopped_worker_is_replaced_and_other_connections_survive(
    tmp_path: Path, backends: list[FakeBackend]
) -> None:
    proxy = await _start(tmp_path, backends)
    conns: list[RawConnection] = []
    hung: int | None = None
    try:
        # Keep-alive connections on both workers (the kernel spreads them; open until it did).
        stats: dict[str, Any] = {}
        for _ in range(40):
            conn = await RawConnection.open("127.0.0.1", proxy.port)
            assert (await conn.request("POST", CHAT, b"{}")).status == 200
            conns.append(conn)
            stats = await proxy.stats()
            counts = {w["pid"]: w["connections_active"] for w in stats["per_worker"]}
            if len(conns) >= 6 and len(counts) == 2 and min(counts.values()) >= 2:
                break
        assert sum(counts.values()) == len(conns), counts
        assert min(counts.values()) >= 1, counts
        pids = _pids(stats)
        hung, other = pids[0], pids[1]
        os.kill(hung, signal.SIGSTOP)  # alive, but its event loop no longer runs
        stopped_at = time.monotonic()
        stats = await proxy.wait_for(lambda s: _pids(s)[0] not in (hung, None),
                                     "the stopped worker was never replaced")
        assert time.monotonic() - stopped_at >= HEARTBEAT_TIMEOUT * 0.9
        assert _pids(stats)[1] == other  # the other worker was not touched
        workers = {w["index"]: w for w in stats["process"]["workers"]}
        assert (workers[0]["hang_kills"], workers[0]["restarts"]) == (1, 1)
        assert workers[0]["last_exit_code"] == -signal.SIGKILL
        assert any("sent no heartbeat" in line["msg"] for line in proxy.log_lines())
        # The other worker's connections all still work; the stopped one's were closed.
        survived = 0
        for conn in conns:
            try:
                answer = await conn.request("POST", CHAT, b"{}", timeout=30)
            except (OSError, asyncio.IncompleteReadError):
                continue
            assert answer.status == 200
            survived += 1
        assert survived == counts[other]
        await proxy.wait_for(lambda s: s["ready"] and s["health"], "never ready again")
    finally:
        if hung is not None:  # if it is still stopped, let it die normally
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        for conn in conns:
            conn.close()
        await proxy.stop()


async def test_killed_worker_is_restarted(tmp_path: Path, backends: list[FakeBackend]) -> None:
    proxy = await _start(tmp_path, backends)
    try:
        before = _pids(await proxy.stats())
        os.kill(before[1], signal.SIGKILL)
        stats = await proxy.wait_for(lambda s: _pids(s)[1] not in (before[1], None)
                                     and s["ready"], "the killed worker was not restarted")
        workers = {w["index"]: w for w in stats["process"]["workers"]}
        assert workers[1]["restarts"] == 1
        assert workers[1]["last_exit_code"] == -signal.SIGKILL
        assert workers[1]["hang_kills"] == 0
        assert _pids(stats)[0] == before[0]
        assert (await proxy.get("/health"))[0] == 200
    finally:
        await proxy.stop()


async def test_crash_looping_worker_fails_health_until_it_recovers(
    tmp_path: Path, backends: list[FakeBackend]
) -> None:
    proxy = await _start(tmp_path, backends)
    path = tmp_path / "proxy.yaml"
    good = path.read_text(encoding="utf-8")
    try:
        # A worker restarted now reads a file it refuses (exit 2): it cannot come back.
        path.write_text("workers: [not, a, number]\n", encoding="utf-8")
        os.kill(_pids(await proxy.stats())[1], signal.SIGKILL)
        await proxy.wait_for(lambda s: s["health"] is False, "health never failed")
        status, body = await proxy.get("/health")
        assert status == 503
        assert body["status"] == "failing"
        assert body["failing_workers"] == [{"index": 1, "state": "crashloop"}]
        assert (await proxy.get("/ready"))[0] == 503  # a worker short
        # The other worker serves meanwhile.
        conn = await RawConnection.open("127.0.0.1", proxy.port)
        try:
            assert (await conn.request("POST", CHAT, b"{}")).status == 200
        finally:
            conn.close()
        path.write_text(good, encoding="utf-8")  # fixed: the next restart succeeds
        await proxy.wait_for(lambda s: s["health"] and s["ready"], "never recovered",
                             timeout=120)
    finally:
        await proxy.stop()


async def test_health_and_readiness_from_heartbeat_states(tmp_path: Path) -> None:
    from gpuproxy_proxy.config import ProxyConfig

    timeout = 10.0
    config = ProxyConfig.model_validate(
        {"limits": {"worker_heartbeat_timeout_seconds": timeout}})
    supervisor = Supervisor(config, tmp_path / "proxy.yaml", workers=2)
    try:
        now = asyncio.get_running_loop().time()
        a, b = supervisor.slots
        a.started(101, now)
        b.started(102, now)
        assert supervisor.health()[0] is True  # starting is not failing...
        assert supervisor.readiness()[0] is False  # ...nor serving
        a.last_beat = b.last_beat = now
        a.last_state = b.last_state = b"R"
        assert supervisor.readiness()[0] is True
        b.last_beat = now - timeout - 1  # silent for longer than the timeout
        ok, body = supervisor.health()
        assert not ok
        assert body["failing_workers"] == [{"index": 1, "state": "hung"}]
        assert supervisor.readiness()[0] is False
        b.started(103, now)  # replaced; a new worker has its start allowance
        assert b.state(now + START_ALLOWANCE_SECONDS - 1, timeout) == "starting"
        assert b.state(now + START_ALLOWANCE_SECONDS + 1, timeout) == "hung"
        for i in range(CRASHLOOP_EXITS):
            b.exited(1, now + i)
        assert b.state(now + CRASHLOOP_EXITS, timeout) == "crashloop"
        assert supervisor.health()[0] is False
        supervisor.draining = True  # never fail liveness during a drain
        assert supervisor.health()[0] is True
        assert supervisor.readiness()[0] is False
        b.started(104, now)
        b.last_beat, b.last_state = now, b"R"
        supervisor.draining = False
        assert supervisor.health()[0] is True  # beating again clears the crash loop
    finally:
        for slot in supervisor.slots:
            slot.close_pipe()
        supervisor.dir.rmdir()
