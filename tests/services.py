"""Real Redis, PostgreSQL and PgBouncer servers for tests, on free 127.0.0.1 ports in temp dirs.

Each server is started and stopped by its own PID only; `stop()`/`start()` keep the same port so
outage tests can take a dependency down and bring it back. Registered as a pytest plugin.
"""

from __future__ import annotations

import atexit
import functools
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.tools import MissingToolError, find_executable, postgres_bin_dir

LOOPBACK = "127.0.0.1"
# Below the ephemeral range (32768-60999 here) so outgoing client sockets never occupy the port
# a stopped server has to get back on start().
_PORT_RANGE = (20000, 32000)
_HANDED_OUT: set[int] = set()  # ports given to a server in this process, even while it is stopped
SERVICE_FIXTURES = frozenset({"redis_server", "postgres_server", "pgbouncer_server"})


class ServiceError(RuntimeError):
    """A test server could not be started or stopped; the message carries its log tail."""


def free_port() -> int:
    """A 127.0.0.1 TCP port that is free now and was not handed to another server here."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randint(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise ServiceError(f"no free TCP port on {LOOPBACK} in range {_PORT_RANGE}")


@dataclass(frozen=True, slots=True)
class RunAs:
    """OS account a server runs under (PostgreSQL and PgBouncer refuse to run as root)."""

    name: str
    uid: int
    gid: int


def service_account(name: str = "postgres") -> RunAs | None:
    """The account to drop to when we are root; None means run as the current user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise MissingToolError(
            f"OS user {name!r} does not exist (the Debian postgresql package creates it); "
            "run `make bootstrap`"
        ) from None
    return RunAs(name, entry.pw_uid, entry.pw_gid)


def make_workdir(prefix: str, run_as: RunAs | None) -> Path:
    """A private temp dir, owned by the account the server runs as."""
    # /tmp is traversable by every account; a TMPDIR under /root would not be for `postgres`.
    base = "/tmp" if run_as is not None and os.path.isdir("/tmp") else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)
    return path


def write_file(path: Path, text: str, run_as: RunAs | None) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)


def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ManagedServer:
    """One server process we own: start/stop by PID, same port across restarts, log in workdir."""

    name = "server"
    stop_signal: signal.Signals = signal.SIGTERM
    stop_grace_seconds = 15.0

    def __init__(self, workdir: Path, port: int, run_as: RunAs | None) -> None:
        self.host = LOOPBACK
        self.port = port
        self.workdir = workdir
        self.run_as = run_as
        self.log_path = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # --- what subclasses define -------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HOME=str(self.workdir), LC_ALL="C", LANG="C")
        return env

    def run_tool(self, argv: list[str], *, timeout: float = 120.0) -> None:
        """Run a helper command (initdb, psql) as the server account; fail with its output."""
        user, group, extra_groups = self._account()
        result = subprocess.run(
            argv,
            cwd=self.workdir,
            env=self.child_env(),
            capture_output=True,
            timeout=timeout,
            check=False,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServiceError(
                f"{self.name}: `{' '.join(argv)}` exited with {result.returncode}:\n{output}"
            )

    def _account(self) -> tuple[int | None, int | None, list[int] | None]:
        """(user, group, extra_groups) for subprocess; all None keeps the current account."""
        if self.run_as is None:
            return None, None, None
        return self.run_as.uid, self.run_as.gid, []

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (no-op if running) and wait until it accepts connections.

        The deadline is generous on purpose: on a loaded 2-core CI machine a PostgreSQL start
        (after an outage test) can take many seconds; a healthy start returns as soon as ready.
        """
        if self.running:
            return
        if _can_connect(self.host, self.port):
            raise ServiceError(
                f"{self.name}: port {self.host}:{self.port} is already taken by another process; "
                "it cannot be restarted on the same port"
            )
        argv = self.command()
        user, group, extra_groups = self._account()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.child_env(),
                # Own session: a Ctrl-C in the terminal reaches pytest, which then stops us.
                start_new_session=True,
                user=user,
                group=group,
                extra_groups=extra_groups,
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise ServiceError(
                    f"{self.name} exited with code {code} while starting on "
                    f"{self.host}:{self.port}\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                self.terminate(kill=True)
                raise ServiceError(
                    f"{self.name} did not accept connections on {self.host}:{self.port} "
                    f"within {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server we started (no-op if stopped); afterwards its port refuses."""
        self.terminate()
        deadline = time.monotonic() + 30.0
        while _can_connect(self.host, self.port):
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name}: {self.host}:{self.port} still accepts after stop")
            time.sleep(0.05)

    def terminate(self, *, kill: bool = False) -> None:
        """Signal our own process (by PID) and reap it; SIGKILL if it outlives the grace time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout=self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.pid}>"


class RedisServer(ManagedServer):
    """redis-server without persistence."""

    name = "redis-server"

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir, port, run_as=None)

    @functools.cached_property
    def binary(self) -> Path:
        # Looked up on first start, inside _launch, so a missing binary leaks no temp dir.
        return find_executable("redis-server", provider="Debian package redis-server")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip

    def is_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class PostgresServer(ManagedServer):
    """A fresh PostgreSQL cluster with database `gpuproxy` owned by a password-protected role."""

    name = "postgres"
    # SIGINT is PostgreSQL's fast shutdown: it disconnects clients instead of waiting for them.
    stop_signal = signal.SIGINT
    superuser = "postgres"

    def __init__(self, workdir: Path, port: int, run_as: RunAs | None) -> None:
        super().__init__(workdir, port, run_as)
        self.datadir = workdir / "data"
        self.socket_dir = workdir
        self.user = "gpuproxy"
        self.password = secrets.token_hex(16)
        self.database = "gpuproxy"

    @functools.cached_property
    def bindir(self) -> Path:
        return postgres_bin_dir()

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def superuser_dsn(self) -> str:
        """Trusted superuser login over the private unix socket (for test setup only)."""
        return f"postgresql://{self.superuser}@/postgres?host={self.socket_dir}&port={self.port}"

    def initialize(self) -> None:
        """initdb, start, then create the role and database the tests use."""
        self.run_tool([
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
            "-E", "UTF8", "--no-locale", "--no-sync", "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ])  # fmt: skip
        # Password logins on loopback TCP only; the trusted socket lives in our 0700 workdir.
        write_file(
            self.datadir / "pg_hba.conf",
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
            self.run_as,
        )
        self.start()
        psql = [
            str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port),
            "-U", self.superuser, "-d", "postgres",
        ]  # fmt: skip
        self.run_tool([
            *psql,
            "-c", f"CREATE ROLE {self.user} LOGIN CREATEDB PASSWORD '{self.password}'",
            "-c", f"CREATE DATABASE {self.database} OWNER {self.user}",
        ])  # fmt: skip

    def command(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "password_encryption": "scram-sha-256",
            "max_connections": "300",
            # Throwaway data: skip durability work so tests stay fast on 2 cores.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def is_ready(self) -> bool:
        result = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-t",
                "1",
            ],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0


class PgBouncerServer(ManagedServer):
    """PgBouncer in transaction pooling mode in front of a PostgresServer, with admin console."""

    name = "pgbouncer"
    # SIGTERM is an immediate shutdown in PgBouncer 1.18 (SIGINT would wait for clients).
    stop_signal = signal.SIGTERM
    stop_grace_seconds = 5.0
    pool_mode = "transaction"

    def __init__(
        self, workdir: Path, port: int, run_as: RunAs | None, backend: PostgresServer
    ) -> None:
        super().__init__(workdir, port, run_as)
        self.backend = backend
        self.user = backend.user
        self.password = backend.password
        self.database = backend.database
        self.config_path = workdir / "pgbouncer.ini"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @functools.cached_property
    def binary(self) -> Path:
        return find_executable("pgbouncer", provider="Debian package pgbouncer")

    @property
    def admin_dsn(self) -> str:
        """The admin console (`SHOW POOLS`, ...); it speaks the simple query protocol only."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/pgbouncer"

    def write_config(self) -> None:
        write_file(self.workdir / "userlist.txt", f'"{self.user}" "{self.password}"\n', self.run_as)
        backend = f"host={self.backend.host} port={self.backend.port}"
        write_file(
            self.config_path,
            f"""[databases]
{self.database} = {backend} dbname={self.backend.database}
* = {backend}

[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
unix_socket_dir = {self.workdir}
auth_type = scram-sha-256
auth_file = {self.workdir / "userlist.txt"}
admin_users = {self.user}
stats_users = {self.user}
pool_mode = {self.pool_mode}
max_client_conn = 2000
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
; recover within a second after a PostgreSQL outage (default waits 15s between logins)
server_login_retry = 1
server_connect_timeout = 5
; fail queued clients during an outage instead of holding them for the default 120s
query_wait_timeout = 15
""",
            self.run_as,
        )

    def command(self) -> list[str]:
        return [str(self.binary), str(self.config_path)]

    def is_ready(self) -> bool:
        return _can_connect(self.host, self.port)


ServerT = TypeVar("ServerT", bound=ManagedServer)


class ServiceRegistry:
    """Servers started in this test session, torn down in reverse order with their temp dirs."""

    def __init__(self) -> None:
        self.servers: list[ManagedServer] = []
        self._closed = False
        atexit.register(self.close)  # backstop if pytest exits without session teardown

    def add(self, server: ManagedServer) -> None:
        self.servers.append(server)

    def restart_stopped(self) -> None:
        """Bring back servers a test stopped (dependencies first), so later tests see them up."""
        for server in self.servers:
            server.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in reversed(self.servers):
            # No port check here: teardown must reach every server even if one misbehaves.
            server.terminate()
            shutil.rmtree(server.workdir, ignore_errors=True)


def _launch(registry: ServiceRegistry, server: ServerT, boot: Callable[[], None]) -> ServerT:
    # Only servers that came up join the registry: the autouse restart must not retry a broken one.
    try:
        boot()
    except BaseException:
        server.terminate(kill=True)
        shutil.rmtree(server.workdir, ignore_errors=True)
        raise
    registry.add(server)
    return server


def start_redis(registry: ServiceRegistry) -> RedisServer:
    server = RedisServer(make_workdir("gpuproxy-redis-", None), free_port())
    return _launch(registry, server, server.start)


def start_postgres(registry: ServiceRegistry) -> PostgresServer:
    run_as = service_account()
    server = PostgresServer(make_workdir("gpuproxy-pg-", run_as), free_port(), run_as)
    return _launch(registry, server, server.initialize)


def start_pgbouncer(registry: ServiceRegistry, backend: PostgresServer) -> PgBouncerServer:
    run_as = service_account()
    server = PgBouncerServer(make_workdir("gpuproxy-pgb-", run_as), free_port(), run_as, backend)

    def boot() -> None:
        server.write_config()
        server.start()

    return _launch(registry, server, boot)


def _start_or_fail(start: Callable[[], ServerT]) -> ServerT:
    # A missing server must FAIL the tests that need it (never skip), with the fix in the message.
    try:
        return start()
    except MissingToolError as exc:
        message = str(exc)
    except ServiceError as exc:
        message = f"{exc}\n(if a package or binary is missing, run `make bootstrap`)"
    pytest.fail(message, pytrace=False)  # outside `except`: no chained traceback noise


# --- pytest plugin -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def service_registry() -> Iterator[ServiceRegistry]:
    registry = ServiceRegistry()
    yield registry
    registry.close()


@pytest.fixture(autouse=True)
def _restart_stopped_services(service_registry: ServiceRegistry) -> Iterator[None]:
    # Outage tests stop servers; restart them so one failing test cannot break the next ones.
    yield
    service_registry.restart_stopped()


@pytest.fixture(scope="session")
def redis_server(service_registry: ServiceRegistry) -> RedisServer:
    return _start_or_fail(lambda: start_redis(service_registry))


@pytest.fixture(scope="session")
def postgres_server(service_registry: ServiceRegistry) -> PostgresServer:
    return _start_or_fail(lambda: start_postgres(service_registry))


@pytest.fixture(scope="session")
def pgbouncer_server(
    service_registry: ServiceRegistry, postgres_server: PostgresServer
) -> PgBouncerServer:
    return _start_or_fail(lambda: start_pgbouncer(service_registry, postgres_server))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tag every test that uses a real server so `-m "not services"` can deselect them.
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
