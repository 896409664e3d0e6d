"""PgBouncer run the way its pod runs it: the operator's pgbouncer.ini, userlist and entrypoint
script in kubelet-style volumes, `/bin/sh run-pgbouncer.sh ...`, on a loopback port."""

from __future__ import annotations

import base64
import shutil
import socket
from pathlib import Path
from typing import Any

from tests.operator.clusters import by_key, cluster, minimal_body
from tests.operator.kubelet_volume import KubeletVolume
from tests.services import (
    LOOPBACK,
    ManagedServer,
    PostgresServer,
    RunAs,
    free_port,
    make_workdir,
    service_account,
)
from tests.tools import find_executable

from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.pgbouncer_reload import RUN_SCRIPT_FILE


def _replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} not found exactly once in:\n{text}"
    return text.replace(old, new)


class RenderedPgBouncer(ManagedServer):
    """The entrypoint script execs pgbouncer, so our PID is pgbouncer's."""

    name = "pgbouncer"

    def __init__(self, workdir: Path, port: int, run_as: RunAs | None, argv: list[str],
                 env: dict[str, str]) -> None:
        super().__init__(workdir, port, run_as)
        self.argv = argv
        self.env = env

    def command(self) -> list[str]:
        return self.argv

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), **self.env}

    def is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


class PgBouncerPod:
    """The rendered files in two volumes (the ConfigMap's and the Secret's) and the server."""

    def __init__(self, postgres: PostgresServer, credentials: DatabaseCredentials,
                 *, reload_interval: int = 1, extra_settings: str = "") -> None:
        self.postgres = postgres
        self.credentials = credentials
        self.run_as = service_account()
        self.workdir = make_workdir("gpuproxy-pgb-pod-", self.run_as)
        self.port = free_port()
        self.extra_settings = extra_settings
        self.config = KubeletVolume(self.workdir / "config", self.run_as)
        self.auth = KubeletVolume(self.workdir / "auth", self.run_as)
        self.project(credentials, {})
        binary = find_executable("pgbouncer", provider="Debian package pgbouncer")
        self.server = RenderedPgBouncer(
            self.workdir, self.port, self.run_as,
            ["/bin/sh", str(self.config.path(RUN_SCRIPT_FILE)),
             str(self.config.path("pgbouncer.ini")), str(self.auth.path("userlist.txt"))],
            {"PATH": f"{binary.parent}:/usr/bin:/bin",
             "PGBOUNCER_RELOAD_INTERVAL_SECONDS": str(reload_interval)},
        )

    def project(self, credentials: DatabaseCredentials, pgbouncer: dict[str, Any]) -> None:
        """Render the cluster and update both volumes, as the operator and kubelet would."""
        body = minimal_body()
        body["spec"]["database"].update(host=LOOPBACK, port=self.postgres.port,
                                        database=self.postgres.database, sslMode="disable")
        body["spec"]["pgbouncer"] = pgbouncer
        objs = by_key(build_all(cluster(body), BuildInputs(database_credentials=credentials)))
        data = objs[("ConfigMap", "mini-pgbouncer")]["data"]
        secret = objs[("Secret", "mini-pgbouncer")]["data"]
        # Only the container-specific paths and the listener change; every setting stays.
        ini = _replace(data["pgbouncer.ini"], "listen_addr = 0.0.0.0", f"listen_addr = {LOOPBACK}")
        ini = _replace(ini, "listen_port = 6432", f"listen_port = {self.port}")
        ini = _replace(ini, "/etc/pgbouncer-auth/userlist.txt", str(self.auth.path("userlist.txt")))
        self.config.update({"pgbouncer.ini": ini + self.extra_settings,
                            RUN_SCRIPT_FILE: data[RUN_SCRIPT_FILE]})
        self.auth.update({"userlist.txt": base64.b64decode(secret["userlist.txt"]).decode()})

    def close(self) -> None:
        self.server.terminate()
        shutil.rmtree(self.workdir, ignore_errors=True)
