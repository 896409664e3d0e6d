"""The database backup CronJob: off by default, the guide's schedule and retention, straight to
PostgreSQL with the credentials Secret, hardened, and its script run for real against
PostgreSQL: a restorable dump of the keys and usage tables, old dumps pruned."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tests.operator.clusters import by_key, cluster, minimal_body, production_body
from tests.services import PostgresServer

from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, OperandImages, build_all
from gpuproxy_operator.builders.backup import BACKUP_SCRIPT
from gpuproxy_operator.builders.images import DEFAULT_BACKUP_IMAGE
from gpuproxy_proxy.database.migrations import apply_migrations

CREDS = DatabaseCredentials("gpuproxy", "pw")


def built(body: dict[str, Any], images: OperandImages | None = None) -> dict[Any, Any]:
    return by_key(build_all(cluster(body), BuildInputs(CREDS, images=images or OperandImages())))


def test_no_backup_unless_enabled() -> None:
    kinds = {kind for kind, _ in built(minimal_body())}
    assert "CronJob" not in kinds
    assert ("NetworkPolicy", "mini-backup") not in built(minimal_body())


def test_the_cronjob_dumps_straight_from_postgresql_onto_the_users_claim() -> None:
    children = built(production_body())
    job = children[("CronJob", "prod-backup")]
    spec = job["spec"]
    assert (spec["schedule"], spec["timeZone"]) == ("0 2 * * *", "Europe/Berlin")
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == DEFAULT_BACKUP_IMAGE
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    # The database itself, not PgBouncer (transaction pooling would break pg_dump's session).
    assert (env["PGHOST"], env["PGPORT"], env["PGDATABASE"], env["PGSSLMODE"]) == (
        "postgres.aiserve-farm.svc", "5433", "usage", "require")
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "gpuproxy-db", "key": "password"}}
    assert env["PGUSER"] == {"secretKeyRef": {"name": "gpuproxy-db", "key": "username"}}
    assert env["RETENTION_DAYS"] == "14"
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": "gpuproxy-backups"}} in (
        pod["volumes"])
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"]
    assert ctx["runAsNonRoot"]
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    # No PersistentVolumeClaim is built: the dumps must outlive the cluster.
    assert "PersistentVolumeClaim" not in {kind for kind, _ in children}


def test_the_backup_pods_reach_only_the_database_port_and_dns() -> None:
    policy = built(production_body())[("NetworkPolicy", "prod-backup")]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "backup"
    assert policy["ingress"] == []
    ports = [p for rule in policy["egress"] for p in rule["ports"]]
    assert {"protocol": "TCP", "port": 5433} in ports
    assert {(p["protocol"], p["port"]) for p in ports} == {("TCP", 5433), ("UDP", 53),
                                                           ("TCP", 53)}


def test_the_operators_backup_image_applies_unless_the_spec_pins_one() -> None:
    mine = OperandImages(backup="mirror/postgres:18-alpine")
    job = built(production_body(), mine)[("CronJob", "prod-backup")]
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "mirror/postgres:18-alpine"
    body = production_body()
    body["spec"]["database"]["backup"]["image"] = "pinned/pg:16"
    job = built(body, mine)[("CronJob", "prod-backup")]
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "pinned/pg:16"


def _script_env(job: dict[str, Any], pg: PostgresServer, backups: Path) -> dict[str, str]:
    """The container's environment as the kubelet would give it, pointed at the test server."""
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(PGHOST=pg.host, PGPORT=str(pg.port), PGDATABASE=pg.database, PGSSLMODE="disable",
               PGUSER=pg.user, PGPASSWORD=pg.password, BACKUP_DIR=str(backups))
    return {"PATH": f"{pg.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env}


async def _seed(pg: PostgresServer) -> None:
    conn = await asyncpg.connect(pg.dsn)
    try:
        await apply_migrations(conn)
        await conn.execute("INSERT INTO api_keys (id, key_hash, prefix, user_id) VALUES "
                           "(gen_random_uuid(), decode(md5(random()::text), 'hex'), "
                           "'gp_backup', 'u-backup')")
    finally:
        await conn.close()


def test_the_backup_script_writes_a_restorable_dump_and_prunes_old_ones(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    if shutil.which("find") is None or not (postgres_server.bindir / "pg_dump").is_file():
        pytest.skip("pg_dump/find not installed")
    asyncio.run(_seed(postgres_server))
    job = built(production_body())[("CronJob", "prod-backup")]
    backups = tmp_path / "backups"
    backups.mkdir()
    env = _script_env(job, postgres_server, backups)
    old = backups / f"gpuproxy-{postgres_server.database}-20200101T020000Z.dump"
    old.write_bytes(b"old")
    days_ago = time.time() - 20 * 86400  # past the production body's 14 days
    os.utime(old, (days_ago, days_ago))
    unrelated = backups / "notes.txt"
    unrelated.write_text("kept")
    os.utime(unrelated, (days_ago, days_ago))

    run = subprocess.run(["/bin/sh", "-c", BACKUP_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    dumps = sorted(backups.glob(f"gpuproxy-{postgres_server.database}-*.dump"))
    assert len(dumps) == 1, dumps
    assert not old.exists()
    assert unrelated.exists()
    assert not list(backups.glob("*.partial"))
    listing = subprocess.run([str(postgres_server.bindir / "pg_restore"), "--list", str(dumps[0])],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    for table in ("api_keys", "usage_records", "schema_migrations"):
        assert f"TABLE DATA public {table}" in listing, listing


def test_a_failed_dump_leaves_no_file_that_looks_like_a_backup(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    if not (postgres_server.bindir / "pg_dump").is_file():
        pytest.skip("pg_dump not installed")
    job = built(production_body())[("CronJob", "prod-backup")]
    env = _script_env(job, postgres_server, tmp_path)
    env["PGPASSWORD"] = "wrong"
    run = subprocess.run(["/bin/sh", "-c", BACKUP_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode != 0
    assert not list(tmp_path.glob("*.dump"))
