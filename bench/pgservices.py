"""A throwaway PostgreSQL cluster (initdb) and a PgBouncer in front of it, on free loopback ports.

Both run as the `postgres` account when the benchmark runs as root (they refuse root), in a
private directory under /tmp that `cleanup()` removes; the processes are `Children`, ended by PID.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import Children, free_port, wait_port
from servers import Database

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian layout), else initdb on PATH."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    if dirs:
        return Path(dirs[-1])
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("proxy-full needs PostgreSQL: apt-get install postgresql pgbouncer")
    return Path(initdb).resolve().parent


@dataclass
class PgCluster:
    workdir: Path
    uid: int | None
    pg_port: int
    bouncer: Database
    superuser_socket: Path

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def count_rows(self, table: str) -> int:
        """Rows in `table` (a fixed name from the caller), asked over the private unix socket
        as the superuser."""
        psql = postgres_bin() / "psql"
        argv = [str(psql), "-X", "-At", "-h", str(self.superuser_socket), "-p", str(self.pg_port)]
        query = "SELECT count(*) FROM " + table  # noqa: S608 - a fixed table name, no input
        argv += ["-U", "postgres", "-d", self.bouncer.database, "-c", query]
        done = subprocess.run(  # noqa: S603 - our own psql argv
            argv, capture_output=True, text=True, timeout=60, check=False, user=self.uid
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql count {table} failed: {done.stderr.strip()}")
        return int(done.stdout.strip())


def _account() -> int | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_uid
    except KeyError:
        raise RuntimeError(
            "running as root needs the `postgres` OS account (Debian postgresql)"
        ) from None


def _write(path: Path, text: str, uid: int | None) -> None:
    path.write_text(text)
    path.chmod(0o600)
    if uid is not None:
        os.chown(path, uid, pwd.getpwuid(uid).pw_gid)


def start(kids: Children) -> PgCluster:
    """initdb + postgres + role/database `gpuproxy` + PgBouncer (transaction pooling)."""
    uid = _account()
    workdir = Path(tempfile.mkdtemp(prefix="gpuproxy-bench-pg-", dir="/tmp"))
    if uid is not None:
        os.chown(workdir, uid, pwd.getpwuid(uid).pw_gid)
    try:
        return _start(kids, workdir, uid)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _start(kids: Children, workdir: Path, uid: int | None) -> PgCluster:
    bindir = postgres_bin()
    data = workdir / "data"
    password = secrets.token_hex(16)
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8"]
    initdb += ["--no-locale", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256"]
    done = subprocess.run(  # noqa: S603 - our own initdb argv
        initdb, capture_output=True, text=True, timeout=120, check=False, user=uid, cwd=workdir
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
    hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
    _write(data / "pg_hba.conf", hba, uid)
    pg_port = free_port()
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(pg_port),
        "unix_socket_directories": str(workdir),
        "password_encryption": "scram-sha-256",
        "max_connections": "100",
        # Throwaway data: no durability work, as in the test services.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    argv = [str(bindir / "postgres"), "-D", str(data)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    proc = kids.start("postgres", argv, user=uid, cwd=workdir)
    wait_port(pg_port, 60, proc)
    _wait_sql(bindir, workdir, pg_port, uid)
    psql = [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(workdir)]
    psql += ["-p", str(pg_port), "-U", "postgres", "-d", "postgres"]
    psql += ["-c", f"CREATE ROLE gpuproxy LOGIN PASSWORD '{password}'"]
    psql += ["-c", "CREATE DATABASE gpuproxy OWNER gpuproxy"]
    done = subprocess.run(  # noqa: S603 - our own psql argv
        psql, capture_output=True, text=True, timeout=60, check=False, user=uid
    )
    if done.returncode != 0:
        raise RuntimeError(f"creating the role/database failed: {done.stderr}")
    bouncer_port = free_port()
    _write(workdir / "userlist.txt", f'"gpuproxy" "{password}"\n', uid)
    _write(
        workdir / "pgbouncer.ini",
        f"""[databases]
gpuproxy = host=127.0.0.1 port={pg_port} dbname=gpuproxy

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {bouncer_port}
unix_socket_dir = {workdir}
auth_type = scram-sha-256
auth_file = {workdir / "userlist.txt"}
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
""",
        uid,
    )
    argv = [PGBOUNCER, str(workdir / "pgbouncer.ini")]
    proc = kids.start("pgbouncer", argv, user=uid, cwd=workdir)
    wait_port(bouncer_port, 30, proc)
    bouncer = Database("127.0.0.1", bouncer_port, "gpuproxy", "gpuproxy", password)
    return PgCluster(workdir, uid, pg_port, bouncer, workdir)


def _wait_sql(bindir: Path, socket_dir: Path, port: int, uid: int | None) -> None:
    """The port opens before recovery ends: wait until pg_isready says it takes queries."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        argv = [str(bindir / "pg_isready"), "-q", "-h", str(socket_dir), "-p", str(port)]
        with contextlib.suppress(subprocess.TimeoutExpired):
            if subprocess.run(argv, timeout=5, check=False, user=uid).returncode == 0:  # noqa: S603
                return
        time.sleep(0.2)
    raise RuntimeError(f"postgres on port {port} not ready within 60 s")
