"""PgBouncer's files: pgbouncer.ini with the guide's pool settings (transaction pooling) and the
userlist built from the database credentials."""

from __future__ import annotations

import base64
import re

from gpuproxy_operator.api.cluster import GpuProxyCluster, InvalidSpecError
from gpuproxy_operator.builders.inputs import DatabaseCredentials
from gpuproxy_operator.builders.proxy_config import PGBOUNCER_PORT

CONFIG_DIR = "/etc/pgbouncer"
AUTH_DIR = "/etc/pgbouncer-auth"
INI_FILE = "pgbouncer.ini"
USERLIST_FILE = "userlist.txt"
INI_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _ini_safe(cluster: GpuProxyCluster, field: str, value: str) -> str:
    """[databases] values are unquoted connection-string words: keep them to safe chars."""
    if not INI_SAFE.match(value):
        raise InvalidSpecError(
            f"GpuProxyCluster {cluster.metadata.namespace}/{cluster.metadata.name}",
            [(f"spec.database.{field}",
              f"{value!r} cannot be written to pgbouncer.ini; use only letters, digits, "
              "'_', '-' and '.'")],
        )
    return value


def pgbouncer_settings(cluster: GpuProxyCluster) -> list[tuple[str, str | int]]:
    """The [pgbouncer] section, in file order."""
    db = cluster.spec.database
    pb = cluster.spec.pgbouncer
    return [
        ("listen_addr", "0.0.0.0"),
        ("listen_port", PGBOUNCER_PORT),
        # No unix socket: the read-only root filesystem has nowhere to put it.
        ("unix_socket_dir", ""),
        ("auth_type", "scram-sha-256"),
        ("auth_file", f"{AUTH_DIR}/{USERLIST_FILE}"),
        ("pool_mode", pb.pool_mode),
        ("max_client_conn", pb.max_client_conn),
        ("default_pool_size", pb.default_pool_size),
        ("reserve_pool_size", pb.reserve_pool_size),
        ("reserve_pool_timeout", pb.reserve_pool_timeout_seconds),
        ("server_lifetime", pb.server_lifetime_seconds),
        ("server_idle_timeout", pb.server_idle_timeout_seconds),
        ("server_connect_timeout", pb.server_connect_timeout_seconds),
        ("query_timeout", pb.query_timeout_seconds),
        ("query_wait_timeout", pb.query_wait_timeout_seconds),
        ("max_db_connections", pb.max_db_connections),
        ("max_user_connections", pb.max_user_connections),
        ("server_tls_sslmode", db.ssl_mode),
        # asyncpg/psycopg send it; PgBouncer would otherwise refuse the connection.
        ("ignore_startup_parameters", "extra_float_digits"),
        ("log_connections", 0),
        ("log_disconnections", 0),
        ("log_pooler_errors", 1),
    ]


def pgbouncer_ini(cluster: GpuProxyCluster) -> str:
    db = cluster.spec.database
    host = _ini_safe(cluster, "host", db.host)
    name = _ini_safe(cluster, "database", db.database)
    lines = [
        "[databases]",
        f"{name} = host={host} port={db.port} dbname={name}",
        "",
        "[pgbouncer]",
        *(f"{key} = {value}".rstrip() for key, value in pgbouncer_settings(cluster)),
    ]
    return "\n".join(lines) + "\n"


def _quote(source: str, field: str, value: str) -> str:
    if any(ch in value for ch in "\r\n\0"):
        raise InvalidSpecError(source, [(
            f"data.{field}",
            "must not contain a line break or NUL character (PgBouncer's userlist.txt is "
            "line-based); change it in the Secret",
        )])
    return '"' + value.replace('"', '""') + '"'


def userlist(credentials: DatabaseCredentials, source: str = "database credentials") -> str:
    """One `"user" "password"` line; PgBouncer escapes a double quote by doubling it.
    `source` names the Secret in errors."""
    user = _quote(source, "username", credentials.username)
    password = _quote(source, "password", credentials.password)
    return f"{user} {password}\n"


def userlist_secret_data(
    cluster: GpuProxyCluster, credentials: DatabaseCredentials | None
) -> dict[str, str]:
    if credentials is None:
        return {}
    source = f"Secret {cluster.metadata.namespace}/{cluster.spec.database.credentials_secret}"
    raw = userlist(credentials, source).encode("utf-8")
    return {USERLIST_FILE: base64.b64encode(raw).decode("ascii")}
