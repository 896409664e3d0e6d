"""PgBouncer: pgbouncer.ini pinned to the guide's pool settings, the userlist Secret's quoting,
two spread pods with a disruption budget, and a Deployment that reloads (rather than rolls) on a
pool-setting or password change."""

from __future__ import annotations

import base64
import configparser
from typing import Any

import pytest
from tests.operator.clusters import CREDENTIALS, by_key, cluster, minimal_body, production_body

from gpuproxy_operator.api.cluster import InvalidSpecError
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.common import Manifest
from gpuproxy_operator.builders.pgbouncer import userlist
from gpuproxy_operator.builders.pgbouncer_reload import RUN_SCRIPT
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION

# The guide's [pgbouncer] section ("CRITICAL for 100k connections" and below), except the pool
# sizes: two pods, each 190 + reserve 50 = 240, and 2 x 240 = 480 < 500 - 3 reserved slots.
GUIDE_POOL_SETTINGS = {
    "pool_mode": "transaction",
    "max_client_conn": "100000",
    "default_pool_size": "190",
    "reserve_pool_size": "50",
    "reserve_pool_timeout": "5",
    "server_lifetime": "1800",
    "server_idle_timeout": "300",
    "server_connect_timeout": "15",
    "query_timeout": "0",
    "query_wait_timeout": "120",
    "max_db_connections": "240",
    "max_user_connections": "240",
    "log_connections": "0",
    "log_disconnections": "0",
    "log_pooler_errors": "1",
}


def _objects(
    body: dict[str, Any], creds: DatabaseCredentials | None = CREDENTIALS
) -> dict[tuple[str, str], Manifest]:
    return by_key(build_all(cluster(body), BuildInputs(database_credentials=creds)))


def _ini(body: dict[str, Any]) -> configparser.ConfigParser:
    name = body["metadata"]["name"]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(_objects(body)[("ConfigMap", f"{name}-pgbouncer")]["data"]["pgbouncer.ini"])
    return parser


def test_default_ini_has_the_guides_pool_settings() -> None:
    section = dict(_ini(minimal_body())["pgbouncer"])
    assert {k: section[k] for k in GUIDE_POOL_SETTINGS} == GUIDE_POOL_SETTINGS


def test_ini_listener_auth_and_tls() -> None:
    section = dict(_ini(minimal_body())["pgbouncer"])
    assert section["listen_addr"] == "0.0.0.0"
    assert section["listen_port"] == "6432"
    assert section["unix_socket_dir"] == ""
    assert section["auth_type"] == "scram-sha-256"
    assert section["auth_file"] == "/etc/pgbouncer-auth/userlist.txt"
    assert section["server_tls_sslmode"] == "prefer"
    assert section["ignore_startup_parameters"] == "extra_float_digits"


def test_ini_databases_point_at_the_users_postgres() -> None:
    ini = _ini(production_body())
    assert dict(ini["databases"]) == {
        "usage": "host=postgres.aiserve-farm.svc port=5433 dbname=usage"
    }
    assert ini["pgbouncer"]["server_tls_sslmode"] == "require"


def test_ini_follows_spec_overrides() -> None:
    body = minimal_body()
    body["spec"]["pgbouncer"] = {
        "poolMode": "session", "maxClientConn": 5000, "defaultPoolSize": 40,
        "reservePoolSize": 4, "reservePoolTimeoutSeconds": 2, "serverLifetimeSeconds": 600,
        "serverIdleTimeoutSeconds": 60, "serverConnectTimeoutSeconds": 3,
        "queryTimeoutSeconds": 30, "queryWaitTimeoutSeconds": 10, "maxDbConnections": 80,
        "maxUserConnections": 90,
    }
    section = dict(_ini(body)["pgbouncer"])
    assert {k: section[k] for k in GUIDE_POOL_SETTINGS if not k.startswith("log_")} == {
        "pool_mode": "session", "max_client_conn": "5000", "default_pool_size": "40",
        "reserve_pool_size": "4", "reserve_pool_timeout": "2", "server_lifetime": "600",
        "server_idle_timeout": "60", "server_connect_timeout": "3", "query_timeout": "30",
        "query_wait_timeout": "10", "max_db_connections": "80", "max_user_connections": "90",
    }


@pytest.mark.parametrize(
    ("user", "password", "line"),
    [
        ("gpuproxy", "plain", '"gpuproxy" "plain"\n'),
        ("gpuproxy", 's3cr"et pw', '"gpuproxy" "s3cr""et pw"\n'),
        ('we"ird', '""', '"we""ird" """"""\n'),
        ("u", "pässwörd\\", '"u" "pässwörd\\"\n'),
    ],
)
def test_userlist_quotes_and_escapes(user: str, password: str, line: str) -> None:
    assert userlist(DatabaseCredentials(user, password)) == line


@pytest.mark.parametrize("password", ["two\nlines", "cr\rhere", "nul\0byte"])
def test_userlist_rejects_line_breaks_naming_the_secret(password: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        build_all(cluster(minimal_body()),
                  BuildInputs(database_credentials=DatabaseCredentials("gpuproxy", password)))
    assert info.value.obj == "Secret default/gpuproxy-db"
    [(path, reason)] = info.value.problems
    assert path == "data.password"
    assert "must not contain a line break" in reason


@pytest.mark.parametrize(
    ("field", "value"), [("database", "my db"), ("host", "pg;x"), ("database", "a=b")]
)
def test_unsafe_database_names_are_rejected_naming_the_field(field: str, value: str) -> None:
    body = minimal_body()
    body["spec"]["database"][field] = value
    with pytest.raises(InvalidSpecError) as info:
        build_all(cluster(body), BuildInputs())
    assert info.value.obj == "GpuProxyCluster default/mini"
    assert info.value.problems[0][0] == f"spec.database.{field}"


def test_credentials_repr_hides_the_password() -> None:
    assert "s3cr" not in repr(CREDENTIALS)
    assert "gpuproxy" in repr(CREDENTIALS)


def test_secret_holds_the_userlist_base64() -> None:
    secret = _objects(minimal_body())[("Secret", "mini-pgbouncer")]
    assert secret["type"] == "Opaque"
    assert set(secret["data"]) == {"userlist.txt"}
    assert base64.b64decode(secret["data"]["userlist.txt"]).decode() == (
        '"gpuproxy" "s3cr""et pw"\n'
    )
    assert ("Secret", "mini-pgbouncer") not in _objects(minimal_body(), creds=None)


def _pgbouncer_template(body: dict[str, Any], creds: DatabaseCredentials | None) -> Any:
    name = body["metadata"]["name"]
    return _objects(body, creds)[("Deployment", f"{name}-pgbouncer")]["spec"]["template"]


def test_password_rotation_changes_the_userlist_but_rolls_no_pod() -> None:
    body = minimal_body()
    rotated = DatabaseCredentials("gpuproxy", "rotated")
    # The userlist changes (the kubelet updates the mounted file; the entrypoint reloads)...
    secrets = [_objects(body, c)[("Secret", "mini-pgbouncer")]["data"]
               for c in (CREDENTIALS, rotated)]
    assert secrets[0] != secrets[1]
    # ...while neither PgBouncer's nor the proxy's pod template does.
    assert _pgbouncer_template(body, CREDENTIALS) == _pgbouncer_template(body, rotated)
    proxy = [
        _objects(body, creds)[("Deployment", "mini-proxy")]["spec"]["template"]
        for creds in (CREDENTIALS, rotated)
    ]
    assert proxy[0] == proxy[1]


@pytest.mark.parametrize("pgbouncer", [
    {"defaultPoolSize": 100}, {"maxClientConn": 5000, "resources": {"limits": {"cpu": "1"}}},
    {"poolMode": "session"}, {"serverLifetimeSeconds": 60, "queryWaitTimeoutSeconds": 5},
])
def test_reloadable_settings_change_the_ini_but_not_the_config_hash(
    pgbouncer: dict[str, Any]
) -> None:
    body = minimal_body()
    changed = minimal_body()
    changed["spec"]["pgbouncer"] = pgbouncer
    assert _ini(body) != _ini(changed)
    before, after = (_pgbouncer_template(b, CREDENTIALS)["metadata"]["annotations"]
                     for b in (body, changed))
    assert before[CONFIG_HASH_ANNOTATION] == after[CONFIG_HASH_ANNOTATION]


def test_start_only_settings_and_the_entrypoint_change_the_config_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gpuproxy_operator.builders.pgbouncer_reload as reload

    body = minimal_body()
    before = _pgbouncer_template(body, CREDENTIALS)["metadata"]["annotations"]
    monkeypatch.setattr(reload, "pgbouncer_settings",
                        lambda c: [("listen_port", 7432), ("default_pool_size", 1)])
    moved = _pgbouncer_template(body, CREDENTIALS)["metadata"]["annotations"]
    assert moved[CONFIG_HASH_ANNOTATION] != before[CONFIG_HASH_ANNOTATION]
    monkeypatch.undo()
    monkeypatch.setattr(reload, "RUN_SCRIPT", RUN_SCRIPT + "# changed\n")
    rescripted = _pgbouncer_template(body, CREDENTIALS)["metadata"]["annotations"]
    assert rescripted[CONFIG_HASH_ANNOTATION] != before[CONFIG_HASH_ANNOTATION]


def test_deployment_runs_two_spread_pgbouncers_through_the_reloading_entrypoint() -> None:
    objs = _objects(production_body())
    dep = objs[("Deployment", "prod-pgbouncer")]
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 70
    [c] = pod["containers"]
    assert c["command"] == ["/bin/sh", "/etc/pgbouncer/run-pgbouncer.sh",
                            "/etc/pgbouncer/pgbouncer.ini", "/etc/pgbouncer-auth/userlist.txt"]
    assert c["ports"] == [{"name": "pgbouncer", "containerPort": 6432, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "pgbouncer"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {path: m["name"] for path, m in mounts.items()} == {
        "/etc/pgbouncer": "config", "/etc/pgbouncer-auth": "userlist", "/tmp": "tmp"}
    # Whole volumes: a subPath mount would never see the kubelet's updates.
    assert not [m for m in c["volumeMounts"] if "subPath" in m]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "prod-pgbouncer"
    assert volumes["userlist"]["secret"]["secretName"] == "prod-pgbouncer"
    assert "items" not in volumes["userlist"]["secret"]
    configmap = objs[("ConfigMap", "prod-pgbouncer")]["data"]
    assert configmap["run-pgbouncer.sh"] == RUN_SCRIPT
    match = {"matchLabels": dep["spec"]["selector"]["matchLabels"]}
    assert pod["affinity"] == {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
            "labelSelector": match, "topologyKey": "kubernetes.io/hostname"}}]}}
    assert pod["topologySpreadConstraints"] == [{
        "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": match}]
    svc = objs[("Service", "prod-pgbouncer")]["spec"]
    assert svc["ports"] == [{"name": "pgbouncer", "port": 6432, "targetPort": "pgbouncer",
                             "protocol": "TCP"}]
    assert svc["selector"]["app.kubernetes.io/component"] == "pgbouncer"


def test_disruption_budget_keeps_one_pgbouncer_serving() -> None:
    objs = _objects(minimal_body())
    pdb = objs[("PodDisruptionBudget", "mini-pgbouncer")]
    assert pdb["apiVersion"] == "policy/v1"
    # maxUnavailable, not minAvailable: a single replica must not block node drains.
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": objs[("Deployment", "mini-pgbouncer")]["spec"]["selector"][
            "matchLabels"]},
    }
