"""The rendered pgbouncer.ini + userlist and redis.conf run in the real servers: every
directive is accepted, and a password with quotes logs in through PgBouncer."""

from __future__ import annotations

import base64
import shutil
import socket
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from tests.operator.clusters import by_key, cluster, minimal_body
from tests.services import (
    LOOPBACK,
    ManagedServer,
    PostgresServer,
    free_port,
    make_workdir,
    service_account,
    write_file,
)
from tests.tools import find_executable

from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.common import Manifest

pytestmark = pytest.mark.services

# A login role whose name and password need PgBouncer's "" escaping (and SQL quoting).
ROLE = 'gp"user'
PASSWORD = "p\"w 'x\\ y"


class ConfiguredServer(ManagedServer):
    """A server started from a config file the builders rendered."""

    def __init__(self, name: str, argv: list[str], workdir: Path, port: int, run_as: Any) -> None:
        self.name = name
        super().__init__(workdir, port, run_as)
        self.argv = argv

    def command(self) -> list[str]:
        return self.argv

    def is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


def _replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} not found exactly once in:\n{text}"
    return text.replace(old, new)


def _objects(body: dict[str, Any], creds: DatabaseCredentials | None) -> dict[
    tuple[str, str], Manifest
]:
    return by_key(build_all(cluster(body), BuildInputs(database_credentials=creds)))


def _create_role(pg: PostgresServer) -> None:
    sql_role = '"' + ROLE.replace('"', '""') + '"'
    sql_password = "'" + PASSWORD.replace("'", "''") + "'"
    pg.run_tool([
        str(pg.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
        "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", pg.superuser, "-d", "postgres",
        "-c", f"DROP ROLE IF EXISTS {sql_role}",
        "-c", f"CREATE ROLE {sql_role} LOGIN PASSWORD {sql_password}",
    ])  # fmt: skip


async def test_rendered_pgbouncer_serves_the_database(postgres_server: PostgresServer) -> None:
    _create_role(postgres_server)
    body = minimal_body()
    body["spec"]["database"].update(host=LOOPBACK, port=postgres_server.port,
                                    database=postgres_server.database, sslMode="disable")
    objs = _objects(body, DatabaseCredentials(ROLE, PASSWORD))
    ini = objs[("ConfigMap", "mini-pgbouncer")]["data"]["pgbouncer.ini"]
    userlist = base64.b64decode(objs[("Secret", "mini-pgbouncer")]["data"]["userlist.txt"])

    run_as = service_account()
    workdir = make_workdir("gpuproxy-rendered-pgb-", run_as)
    port = free_port()
    # Only the container-specific paths and the listener change; every setting stays.
    ini = _replace(ini, "listen_addr = 0.0.0.0", f"listen_addr = {LOOPBACK}")
    ini = _replace(ini, "listen_port = 6432", f"listen_port = {port}")
    ini = _replace(ini, "/etc/pgbouncer-auth/userlist.txt", str(workdir / "userlist.txt"))
    write_file(workdir / "userlist.txt", userlist.decode(), run_as)
    write_file(workdir / "pgbouncer.ini", ini, run_as)
    binary = find_executable("pgbouncer", provider="Debian package pgbouncer")
    server = ConfiguredServer(
        "pgbouncer", [str(binary), str(workdir / "pgbouncer.ini")], workdir, port, run_as
    )
    try:
        server.start()
        # An unknown or invalid setting is logged as a WARNING/ERROR at startup.
        log = server.log_path.read_text(errors="replace")
        assert "WARNING" not in log, log
        assert "ERROR" not in log, log
        # Transaction pooling: no server-side prepared statement cache across transactions.
        try:
            conn = await asyncpg.connect(
                host=LOOPBACK, port=port, user=ROLE, password=PASSWORD,
                database=postgres_server.database, statement_cache_size=0,
            )
        except asyncpg.PostgresError as exc:
            pytest.fail(f"login through PgBouncer failed: {exc!r}\n{server.log_tail()}")
        try:
            assert await conn.fetchval("SELECT current_user") == ROLE
        finally:
            await conn.close()
        # PgBouncer 1.18 reports a failed SCRAM exchange as a protocol violation.
        with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.ProtocolViolationError)):
            await asyncpg.connect(host=LOOPBACK, port=port, user=ROLE, password="wrong",
                                  database=postgres_server.database, statement_cache_size=0)
    finally:
        server.terminate()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("persistence", [False, True], ids=["cache-only", "persistent"])
def test_rendered_redis_conf_runs_in_redis_server(persistence: bool) -> None:
    body = minimal_body()
    body["spec"]["redis"] = {"persistence": persistence}
    conf = _objects(body, None)[("ConfigMap", "mini-redis")]["data"]["redis.conf"]
    workdir = make_workdir("gpuproxy-rendered-redis-", None)
    port = free_port()
    conf = _replace(conf, "bind 0.0.0.0", f"bind {LOOPBACK}")
    conf = _replace(conf, "port 6379", f"port {port}")
    conf = _replace(conf, "dir /data", f"dir {workdir}")
    (workdir / "redis.conf").write_text(conf)
    binary = find_executable("redis-server", provider="Debian package redis-server")
    # The same argv shape as the StatefulSet's (with the password already expanded).
    argv = [str(binary), str(workdir / "redis.conf"), "--requirepass", "pa ss"]
    server = ConfiguredServer("redis-server", argv, workdir, port, None)
    try:
        server.start()
        client = redis.Redis(host=LOOPBACK, port=port, password="pa ss", decode_responses=True)
        try:
            assert client.ping()
            config = client.config_get("*")
            assert config["maxmemory"] == str(1024**3)
            assert config["maxmemory-policy"] == "allkeys-lru"
            assert config["tcp-backlog"] == "65535"
            assert config["timeout"] == "300"
            assert config["io-threads"] == "4"
            # On: the password, not only the NetworkPolicy, keeps other clients out.
            assert config["protected-mode"] == "yes"
            assert config["appendonly"] == "no"
            assert config["save"] == ("900 1 300 10 60 10000" if persistence else "")
        finally:
            client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=LOOPBACK, port=port, password="wrong").ping()
    finally:
        server.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
