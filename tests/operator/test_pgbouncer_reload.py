"""The PgBouncer entrypoint with the real pgbouncer: a password rotated the way the kubelet
updates a Secret volume is accepted without a restart, pool settings reload too, SIGTERM reaches
pgbouncer itself, and the settings a reload cannot change are exactly the ones hashed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import asyncpg
import pytest
from tests.operator.clusters import cluster, minimal_body
from tests.operator.rendered_pgbouncer import PgBouncerPod
from tests.services import LOOPBACK, PostgresServer

from gpuproxy_operator.builders import DatabaseCredentials
from gpuproxy_operator.builders.pgbouncer_config import pgbouncer_settings
from gpuproxy_operator.builders.pgbouncer_reload import NO_RELOAD_SETTINGS

pytestmark = pytest.mark.services

ROLE = "rotating_role"
OLD, NEW = 'old "pw" 1', "new 'pw' 2"
# Generous: a loaded CI machine may take a while; a healthy run reloads in ~1 s.
RELOAD_DEADLINE_SECONDS = 60.0


def _psql(pg: PostgresServer, sql: str) -> None:
    pg.run_tool([str(pg.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                 "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", pg.superuser,
                 "-d", "postgres", "-c", sql])


def _set_password(pg: PostgresServer, password: str) -> None:
    _psql(pg, f"ALTER ROLE {ROLE} PASSWORD '{password.replace(chr(39), chr(39) * 2)}'")


@pytest.fixture
def role(postgres_server: PostgresServer) -> Iterator[str]:
    _psql(postgres_server, f"DROP ROLE IF EXISTS {ROLE}")
    _psql(postgres_server, f"CREATE ROLE {ROLE} LOGIN PASSWORD 'x'")
    _set_password(postgres_server, OLD)
    yield ROLE
    _psql(postgres_server, f"DROP ROLE IF EXISTS {ROLE}")


@pytest.fixture
def pod(postgres_server: PostgresServer, role: str) -> Iterator[PgBouncerPod]:
    pod = PgBouncerPod(postgres_server, DatabaseCredentials(role, OLD))
    try:
        pod.server.start()
        yield pod
    finally:
        pod.close()


async def _connect(pod: PgBouncerPod, password: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=LOOPBACK, port=pod.port, user=ROLE, password=password,
                                 database=pod.postgres.database, statement_cache_size=0,
                                 timeout=10)


async def _logs_in(pod: PgBouncerPod, password: str) -> bool:
    try:
        conn = await _connect(pod, password)
    except (asyncpg.InvalidPasswordError, asyncpg.ProtocolViolationError):
        return False
    await conn.close()
    return True


def _watchers(pod: PgBouncerPod) -> list[int]:
    """PIDs of our entrypoint's watcher (a sh running run-pgbouncer.sh) still alive."""
    script = str(pod.config.path("run-pgbouncer.sh"))
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if script.encode() in argv:
            out.append(int(pid))
    return out


async def test_rotated_password_is_accepted_without_a_restart(pod: PgBouncerPod) -> None:
    pid = pod.server.pid
    assert pid is not None
    # exec: the process the kubelet signals is pgbouncer itself, not a shell.
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "pgbouncer"
    assert await _logs_in(pod, OLD)
    before = await _connect(pod, OLD)  # a client connected across the rotation
    try:
        assert await before.fetchval("SELECT 1") == 1
        # The rotation: PostgreSQL first, then the operator rewrites the userlist Secret and
        # the kubelet swaps the mounted files.
        _set_password(pod.postgres, NEW)
        pod.project(DatabaseCredentials(ROLE, NEW), {})
        started = time.monotonic()
        while not await _logs_in(pod, NEW):
            assert time.monotonic() - started < RELOAD_DEADLINE_SECONDS, pod.server.log_tail()
            await asyncio.sleep(0.2)
        assert not await _logs_in(pod, OLD)
        assert pod.server.running  # reloaded, not restarted
        assert pod.server.pid == pid
        assert await before.fetchval("SELECT 2") == 2  # the old client was not dropped
    finally:
        await before.close()
    log = pod.server.log_path.read_text(errors="replace")
    assert log.count("sending SIGHUP (reload)") == 1  # one change, one reload
    assert log.count("got SIGHUP") == 1
    assert NEW not in log
    assert OLD not in log


async def test_pool_settings_reload_and_sigterm_stops_pgbouncer_and_watcher(
    pod: PgBouncerPod,
) -> None:
    pid = pod.server.pid
    log = pod.server.log_path
    assert log.read_text().count("got SIGHUP") == 0
    pod.project(DatabaseCredentials(ROLE, OLD), {"defaultPoolSize": 7, "maxDbConnections": 9})
    started = time.monotonic()
    while log.read_text().count("got SIGHUP") < 1:
        assert time.monotonic() - started < RELOAD_DEADLINE_SECONDS, pod.server.log_tail()
        await asyncio.sleep(0.2)
    # Projecting identical content again is no change: no second reload.
    pod.project(DatabaseCredentials(ROLE, OLD), {"defaultPoolSize": 7, "maxDbConnections": 9})
    await asyncio.sleep(3)
    assert log.read_text().count("got SIGHUP") == 1
    assert pod.server.pid == pid
    assert await _logs_in(pod, OLD)
    assert _watchers(pod)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # what the kubelet sends
    started = time.monotonic()
    while pod.server.running or _watchers(pod):
        assert time.monotonic() - started < RELOAD_DEADLINE_SECONDS, "still running"
        await asyncio.sleep(0.2)


def _show_config(pod: PgBouncerPod, password: str) -> dict[str, str]:
    """SHOW CONFIG from the admin console: key -> changeable (yes/no)."""
    psql = pod.postgres.bindir / "psql"
    out = subprocess.run(
        [str(psql), "-X", "-A", "-t", "-F", "|", "-h", LOOPBACK, "-p", str(pod.port),
         "-U", ROLE, "-d", "pgbouncer", "-c", "SHOW CONFIG"],
        env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True,
        check=True, timeout=30,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    return {row[0]: row[-1] for row in rows}


def test_hashed_settings_are_the_ones_pgbouncer_cannot_reload(
    postgres_server: PostgresServer, role: str
) -> None:
    pod = PgBouncerPod(postgres_server, DatabaseCredentials(role, OLD),
                       extra_settings=f"admin_users = {role}\n")
    try:
        pod.server.start()
        changeable = _show_config(pod, OLD)
    finally:
        pod.close()
    assert set(changeable.values()) == {"yes", "no"}
    fixed = {key for key, value in changeable.items() if value == "no"}
    # Every start-only setting this PgBouncer knows is in our list...
    assert fixed <= NO_RELOAD_SETTINGS | {"conffile", "service_name"}
    # ...and every setting of our list that it knows is start-only.
    assert {k for k in NO_RELOAD_SETTINGS if k in changeable} <= fixed
    rendered = {key for key, _ in pgbouncer_settings(cluster(minimal_body()))}
    assert rendered <= set(changeable), rendered - set(changeable)
    assert rendered & fixed == {"listen_addr", "listen_port", "unix_socket_dir"}
