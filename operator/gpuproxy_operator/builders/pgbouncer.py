"""PgBouncer in transaction pooling mode: pgbouncer.ini ConfigMap, userlist Secret,
Deployment and Service, with the guide's pool settings."""

from __future__ import annotations

import base64
import re
from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster, InvalidSpecError
from gpuproxy_operator.builders.common import (
    Manifest,
    container_security_context,
    metadata,
    pod_security_context,
    resources,
    selector,
    service_port,
    stable_hash,
    tmp_mount,
    tmp_volume,
    with_spec_hash,
)
from gpuproxy_operator.builders.inputs import DatabaseCredentials
from gpuproxy_operator.builders.proxy_config import PGBOUNCER_PORT
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION, child_name

# The postgres user of the Alpine-based pgbouncer images.
PGBOUNCER_UID = 70
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


def pgbouncer_ini(cluster: GpuProxyCluster) -> str:
    db = cluster.spec.database
    host = _ini_safe(cluster, "host", db.host)
    name = _ini_safe(cluster, "database", db.database)
    pb = cluster.spec.pgbouncer
    settings: list[tuple[str, str | int]] = [
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
    lines = [
        "[databases]",
        f"{name} = host={host} port={db.port} dbname={name}",
        "",
        "[pgbouncer]",
        *(f"{key} = {value}".rstrip() for key, value in settings),
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


def _secret_data(
    cluster: GpuProxyCluster, credentials: DatabaseCredentials | None
) -> dict[str, str]:
    if credentials is None:
        return {}
    source = f"Secret {cluster.metadata.namespace}/{cluster.spec.database.credentials_secret}"
    raw = userlist(credentials, source).encode("utf-8")
    return {USERLIST_FILE: base64.b64encode(raw).decode("ascii")}


def build_pgbouncer_configmap(cluster: GpuProxyCluster) -> Manifest:
    name = child_name(cluster.metadata.name, "pgbouncer")
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(cluster, name, "pgbouncer", cluster.spec.pgbouncer.image),
        "data": {INI_FILE: pgbouncer_ini(cluster)},
    })


def build_pgbouncer_secret(
    cluster: GpuProxyCluster, credentials: DatabaseCredentials | None
) -> Manifest | None:
    if credentials is None:
        return None
    name = child_name(cluster.metadata.name, "pgbouncer")
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(cluster, name, "pgbouncer", cluster.spec.pgbouncer.image),
        "type": "Opaque",
        "data": _secret_data(cluster, credentials),
    })


def build_pgbouncer_service(cluster: GpuProxyCluster) -> Manifest:
    name = child_name(cluster.metadata.name, "pgbouncer")
    return with_spec_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(cluster, name, "pgbouncer", cluster.spec.pgbouncer.image),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(cluster, "pgbouncer"),
            "ports": [service_port("pgbouncer", PGBOUNCER_PORT, "pgbouncer")],
        },
    })


def _tcp_probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "tcpSocket": {"port": "pgbouncer"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _pod_spec(cluster: GpuProxyCluster) -> dict[str, Any]:
    pb = cluster.spec.pgbouncer
    name = child_name(cluster.metadata.name, "pgbouncer")
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(PGBOUNCER_UID),
        "containers": [
            {
                "name": "pgbouncer",
                "image": pb.image,
                "imagePullPolicy": "IfNotPresent",
                # Bypass the image's entrypoint, which would generate its own config.
                "command": ["pgbouncer", f"{CONFIG_DIR}/{INI_FILE}"],
                "ports": [
                    {"name": "pgbouncer", "containerPort": PGBOUNCER_PORT, "protocol": "TCP"}
                ],
                "resources": resources(pb.resources),
                "startupProbe": _tcp_probe(2, 30),
                "livenessProbe": _tcp_probe(10, 3),
                "readinessProbe": _tcp_probe(5, 2),
                "securityContext": container_security_context(PGBOUNCER_UID),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "userlist", "mountPath": AUTH_DIR, "readOnly": True},
                    tmp_mount(),
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "userlist", "secret": {"secretName": name, "defaultMode": 0o440}},
            tmp_volume(),
        ],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector(cluster, "pgbouncer")},
            }
        ],
    }


def build_pgbouncer_deployment(
    cluster: GpuProxyCluster, credentials: DatabaseCredentials | None
) -> Manifest:
    """The config hash covers pgbouncer.ini and the userlist, so a password rotation rolls."""
    pb = cluster.spec.pgbouncer
    name = child_name(cluster.metadata.name, "pgbouncer")
    config_hash = stable_hash({
        INI_FILE: pgbouncer_ini(cluster),
        USERLIST_FILE: _secret_data(cluster, credentials),
    })
    pod_labels = metadata(cluster, name, "pgbouncer", pb.image)["labels"]
    return with_spec_hash({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(cluster, name, "pgbouncer", pb.image),
        "spec": {
            "replicas": pb.replicas,
            "selector": {"matchLabels": selector(cluster, "pgbouncer")},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": _pod_spec(cluster),
            },
        },
    })
