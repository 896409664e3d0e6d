"""The database backup: a CronJob running `pg_dump` of the whole database (API keys, usage
records, migrations) onto the user's PersistentVolumeClaim, pruning dumps past the retention,
and the NetworkPolicy that lets its pods reach only PostgreSQL and DNS."""

from __future__ import annotations

from typing import Any

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import (
    Manifest,
    container_security_context,
    metadata,
    pod_security_context,
    resources,
    selector,
    tmp_mount,
    tmp_volume,
    with_spec_hash,
)
from gpuproxy_operator.builders.images import backup_image
from gpuproxy_operator.builders.network_policies import DNS_PORTS
from gpuproxy_operator.naming import child_name

# An unprivileged uid; fsGroup makes the claim's files writable for it.
BACKUP_UID = 65532
BACKUP_DIR = "/backups"
# A dump is written under a temporary name and renamed when complete, so a failed or cut run
# never leaves a file that looks like a backup (nor counts toward retention).
BACKUP_SCRIPT = """set -eu
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="$BACKUP_DIR/gpuproxy-$PGDATABASE-$stamp.dump"
pg_dump --format=custom --compress=6 --no-owner --no-privileges --file="$out.partial"
mv "$out.partial" "$out"
echo "backup written: $out ($(wc -c < "$out") bytes)"
find "$BACKUP_DIR" -maxdepth 1 -name "gpuproxy-$PGDATABASE-*.dump" -mtime +"$RETENTION_DAYS" \\
  -print -delete
find "$BACKUP_DIR" -maxdepth 1 -name "gpuproxy-$PGDATABASE-*.dump.partial" -mmin +1440 \\
  -print -delete
"""


def _env(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    db = cluster.spec.database
    secret = db.credentials_secret

    def from_secret(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}

    # Straight to PostgreSQL, not through PgBouncer: in transaction pooling pg_dump's
    # session (its snapshot and SET commands) would span server connections.
    return [
        {"name": "PGHOST", "value": db.host},
        {"name": "PGPORT", "value": str(db.port)},
        {"name": "PGDATABASE", "value": db.database},
        {"name": "PGSSLMODE", "value": db.ssl_mode},
        from_secret("PGUSER", "username"),
        from_secret("PGPASSWORD", "password"),
        {"name": "BACKUP_DIR", "value": BACKUP_DIR},
        {"name": "RETENTION_DAYS", "value": str(db.backup.retention_days)},
    ]


def build_backup_cronjob(cluster: GpuProxyCluster) -> Manifest | None:
    backup = cluster.spec.database.backup
    if not backup.enabled or backup.claim_name is None:
        return None
    name = child_name(cluster.metadata.name, "backup")
    image = backup_image(cluster)
    pod_labels = metadata(cluster, name, "backup", image)["labels"]
    container = {
        "name": "pg-dump",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", BACKUP_SCRIPT],
        "env": _env(cluster),
        "resources": resources(backup.resources),
        "securityContext": container_security_context(BACKUP_UID),
        "volumeMounts": [{"name": "backups", "mountPath": BACKUP_DIR}, tmp_mount()],
    }
    pod_spec = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(BACKUP_UID),
        "containers": [container],
        "volumes": [
            {"name": "backups", "persistentVolumeClaim": {"claimName": backup.claim_name}},
            tmp_volume(),
        ],
    }
    spec: dict[str, Any] = {
        "schedule": backup.schedule,
        # Never two dumps at once; a run missed by more than an hour (operator or control
        # plane down at 02:00) is skipped rather than started at a busy time.
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 3600,
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {
            "metadata": {"labels": pod_labels},
            "spec": {
                "backoffLimit": 2,
                "activeDeadlineSeconds": 6 * 3600,
                "ttlSecondsAfterFinished": 7 * 86400,
                "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
            },
        },
    }
    if backup.time_zone is not None:
        spec["timeZone"] = backup.time_zone
    return with_spec_hash({
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata(cluster, name, "backup", image),
        "spec": spec,
    })


def build_backup_network_policy(cluster: GpuProxyCluster) -> Manifest | None:
    """Backup pods take no connections and open only the database's port (by port: the
    database may live anywhere) and DNS, like PgBouncer's."""
    backup = cluster.spec.database.backup
    if not backup.enabled or backup.claim_name is None:
        return None
    name = child_name(cluster.metadata.name, "backup")
    return with_spec_hash({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(cluster, name, "backup", backup_image(cluster)),
        "spec": {
            "podSelector": {"matchLabels": selector(cluster, "backup")},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [
                {"ports": [{"protocol": "TCP", "port": cluster.spec.database.port}]},
                {"ports": DNS_PORTS},
            ],
        },
    })
