"""The proxy's secrets as files: one Secret volume per secret under /etc/gpuproxy/secrets, and the
paths the proxy config's `secret_files` names. Mounted without subPath, so the kubelet replaces
the files on a rotation and the proxy re-reads them without a restart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuproxy_operator.api.base import SecretKeyRef
from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.redis_auth import redis_password_ref

SECRETS_DIR = "/etc/gpuproxy/secrets"
# Owner and group read only; the pod's fsGroup makes the proxy's group own the files.
SECRET_FILE_MODE = 0o440


@dataclass(frozen=True)
class SecretMount:
    """One Secret volume: `files` maps a proxy `secret_files` field to (Secret key, file name)."""

    volume: str
    secret: str
    files: dict[str, tuple[str, str]]

    @property
    def directory(self) -> str:
        return f"{SECRETS_DIR}/{self.volume.removeprefix('secret-')}"


def _single(volume: str, field: str, ref: SecretKeyRef, file_name: str) -> SecretMount:
    return SecretMount(volume, ref.name, {field: (ref.key, file_name)})


def secret_mounts(cluster: GpuProxyCluster) -> list[SecretMount]:
    """Each secret the spec references, in a fixed order (the pod template must be stable)."""
    spec = cluster.spec
    auth = spec.proxy.auth
    mounts: list[SecretMount] = []
    if auth.jwt_secret_ref is not None:
        mounts.append(_single("secret-jwt", "jwt_secret", auth.jwt_secret_ref, "secret"))
    if auth.admin_token_secret_ref is not None:
        mounts.append(_single("secret-admin", "admin_token", auth.admin_token_secret_ref, "token"))
    mounts.append(SecretMount("secret-db", spec.database.credentials_secret, {
        "db_user": ("username", "username"), "db_password": ("password", "password"),
    }))
    redis_ref = redis_password_ref(cluster)
    if redis_ref is not None:
        mounts.append(_single("secret-redis", "redis_password", redis_ref, "password"))
    return mounts


def secret_files(cluster: GpuProxyCluster) -> dict[str, str]:
    """The proxy config's `secret_files` section: field -> path of the mounted file."""
    return {field: f"{m.directory}/{file_name}"
            for m in secret_mounts(cluster) for field, (_, file_name) in m.files.items()}


def tls_mount(cluster: GpuProxyCluster) -> SecretMount | None:
    """The client port's kubernetes.io/tls Secret (cert-manager's layout), if any. Only the
    operator's spec names it: its content is never read here, so a renewal changes no pod
    template and restarts nothing (the proxy polls the files, http/tls.py)."""
    tls = cluster.spec.proxy.tls
    if tls is None:
        return None
    return SecretMount("secret-tls", tls.secret_name, {
        "cert_file": ("tls.crt", "tls.crt"), "key_file": ("tls.key", "tls.key"),
    })


def tls_files(cluster: GpuProxyCluster) -> dict[str, str] | None:
    """The proxy config's `listen.tls` section."""
    mount, tls = tls_mount(cluster), cluster.spec.proxy.tls
    if mount is None or tls is None:
        return None
    files = {field: f"{mount.directory}/{file_name}"
             for field, (_, file_name) in mount.files.items()}
    return {**files, "min_version": tls.min_version}


def _all_mounts(cluster: GpuProxyCluster) -> list[SecretMount]:
    tls = tls_mount(cluster)
    return [*secret_mounts(cluster), *([tls] if tls is not None else [])]


def secret_volumes(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    # Whole-volume mounts, never subPath: the kubelet swaps the files on a rotation only then.
    return [
        {
            "name": m.volume,
            "secret": {
                "secretName": m.secret,
                "items": [{"key": key, "path": file_name} for key, file_name in m.files.values()],
                "defaultMode": SECRET_FILE_MODE,
            },
        }
        for m in _all_mounts(cluster)
    ]


def secret_volume_mounts(cluster: GpuProxyCluster) -> list[dict[str, Any]]:
    return [{"name": m.volume, "mountPath": m.directory, "readOnly": True}
            for m in _all_mounts(cluster)]
