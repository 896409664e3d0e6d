"""Starts the servers under test on loopback: the fast backend, nginx, gpuproxy, Redis.

Each starter writes its own temp config, launches through `Children` and waits for the port.
gpuproxy runs from a chosen source tree (`--proxy-source`, `NAME@LABEL` sides): see `ProxyRun`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from harness import BENCH_DIR, PYTHON, Children, free_port, proxy_package_dir, wait_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
# High enough that the benchmark never trips them; the Redis round trip still happens.
NO_LIMIT = 1_000_000_000
JWT_SECRET = "bench-only-secret-bench-only-secret"  # noqa: S105 - throwaway loopback secret


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    pid: int
    admin_port: int | None = None
    gc_dir: Path | None = None
    # The admin API's own port; None where the tree serves it on the client port (older code).
    admin_api_port: int | None = None


@dataclass(frozen=True)
class Database:
    """Where the proxy's `database` section points (PgBouncer) and how to log in."""

    host: str
    port: int
    database: str
    user: str
    password: str


@dataclass(frozen=True)
class ProxyRun:
    """How one gpuproxy side runs: which source tree, which features, what upstream cap."""

    source: Path | None = None  # a checkout root or its proxy/ dir; None = this repository
    redis_port: int | None = None  # auth (JWT, API keys) + rate limits on when set
    database: Database | None = None  # API keys in PostgreSQL, usage metering on
    max_upstream: int = 1024  # upstream.max_connections_per_backend


def split_side(name: str, sources: dict[str, Path]) -> tuple[str, Path | None]:
    """`proxy-bare@old` -> ("proxy-bare", the tree `--source old=DIR` named); no @: default."""
    base, _, label = name.partition("@")
    if not label:
        return base, None
    if label not in sources:
        raise SystemExit(f"side {name!r}: no --source {label}=DIR given")
    return base, sources[label]


def parse_sources(items: list[str]) -> dict[str, Path]:
    """`--source LABEL=DIR` flags as a dict, each DIR checked to hold the proxy package."""
    sources: dict[str, Path] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or "@" in label:
            raise SystemExit(f"--source {item!r}: expected LABEL=DIR")
        proxy_package_dir(Path(path))
        sources[label] = Path(path)
    return sources


def gcwatch_env(
    work: Path, name: str, env: dict[str, str] | None = None, source: Path | None = None
) -> tuple[dict[str, str], Path]:
    """Environment that loads bench/gcwatch/sitecustomize.py: GC pauses recorded per process.
    With a proxy `source`, its package directory comes first on PYTHONPATH too."""
    gc_dir = work / f"gc-{name.replace('@', '-')}"
    gc_dir.mkdir(exist_ok=True)
    env = dict(os.environ if env is None else env)
    prior = env.get("PYTHONPATH")
    paths = [str(BENCH_DIR / "gcwatch")]
    if source is not None:
        paths.append(str(proxy_package_dir(source)))
    env["PYTHONPATH"] = os.pathsep.join(paths) + (os.pathsep + prior if prior else "")
    env["BENCH_GC_DIR"] = str(gc_dir)
    return env, gc_dir


def gc_pauses(
    gc_dir: Path | None, since: float = 0.0, until: float = float("inf")
) -> dict[str, float]:
    """Max collection pause (ms) over the processes: over the whole run, and in [since, until]."""
    result = {
        "max_ms": 0.0,
        "max_gen2_ms": 0.0,
        "window_max_ms": 0.0,
        "window_over_50ms": 0.0,
        "gen2_count": 0.0,
        "processes": 0.0,
        "window_max_generation": -1.0,
    }
    if gc_dir is None:
        return result
    for path in gc_dir.glob("gc-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        result["processes"] += 1
        result["max_ms"] = max(result["max_ms"], *data["max_ms"])
        result["max_gen2_ms"] = max(result["max_gen2_ms"], data["max_ms"][2])
        result["gen2_count"] += data["count"][2]
        for stamp, gen, ms in data["events"]:
            if since <= stamp <= until:
                if ms > result["window_max_ms"]:
                    result["window_max_ms"] = ms
                    result["window_max_generation"] = gen
                result["window_over_50ms"] += ms > 50
    return result


def start_backend(kids: Children, sse_events: int = 20, sse_delay_ms: float = 50.0) -> Server:
    port = free_port()
    argv = [PYTHON, str(BENCH_DIR / "backend.py"), "--port", str(port)]
    argv += ["--sse-events", str(sse_events), "--sse-delay-ms", str(sse_delay_ms)]
    proc = kids.start("backend", argv)
    wait_port(port, 10, proc)
    return Server("backend", port, proc.pid)


def nginx_conf(
    prefix: Path, port: int, backend_port: int, workers: int, conns: int, keepalive: int = 512
) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {prefix / "nginx.pid"};
error_log stderr warn;
events {{
    worker_connections {conns};
    use epoll;
}}
http {{
    access_log off;
{temp}
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    upstream bench_backend {{
        server 127.0.0.1:{backend_port};
        keepalive {keepalive};
        keepalive_requests 10000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(
    kids: Children,
    work: Path,
    backend_port: int,
    workers: int,
    conns: int = 19500,
    keepalive: int = 512,
) -> Server:
    """`keepalive` is the idle upstream pool per worker (not a cap on upstream connections)."""
    prefix = work / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, backend_port, workers, conns, keepalive))
    proc = kids.start("nginx", [NGINX, "-p", str(prefix), "-c", str(conf), "-e", "stderr"])
    wait_port(port, 10, proc)
    return Server("nginx", port, proc.pid)


def start_redis(kids: Children, work: Path) -> int:
    port = free_port()
    argv = [REDIS, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(work), "--protected-mode", "yes", "--maxclients", "10000"]
    proc = kids.start("redis", argv)
    wait_port(port, 10, proc)
    return port


def proxy_config(
    port: int, admin_port: int, backend_port: int, workers: int, run: ProxyRun,
    admin_api_port: int | None = None,
) -> dict[str, object]:
    """The proxy's YAML config as a dict; auth + rate limits on when a Redis port is given,
    API keys + metering when a database is."""
    redis_port, db = run.redis_port, run.database
    secure = redis_port is not None
    listen: dict[str, object] = {"host": "127.0.0.1", "port": port, "admin_port": admin_port,
                                 "backlog": 4096}
    if admin_api_port is not None:
        listen["admin_api_port"] = admin_api_port
    config: dict[str, object] = {
        "listen": listen,
        "workers": workers,
        "backends": [{"name": "bench", "url": f"http://127.0.0.1:{backend_port}"}],
        "load_balancing": {"strategy": "round_robin"},
        "upstream": {"max_connections_per_backend": run.max_upstream},
        "auth": {"enabled": secure},
        "rate_limits": {
            "enabled": secure,
            "per_ip": NO_LIMIT,
            "per_user": NO_LIMIT,
            "per_api_key": NO_LIMIT,
            "on_redis_failure": "open",
        },
        "metering": {"enabled": db is not None},
        # Idle keep-alive connections must outlive the idle benchmark's hold time.
        "limits": {"keepalive_timeout_seconds": 600, "max_connections_per_worker": 30000},
        "logging": {"level": "WARNING"},
    }
    if secure:
        config["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    if db is not None:
        config["database"] = {
            "host": db.host,
            "port": db.port,
            "database": db.database,
            "sslmode": "disable",
            "pool_min_size": 1,
            "pool_max_size": 4,
        }
    return config


ADMIN_TOKEN = "bench-admin-token-loopback-only-0123456789"  # noqa: S105 - 32+ characters


def has_admin_api_port(source: Path | None) -> bool:
    """Whether the tree serves the admin API on listen.admin_api_port (older trees refuse the
    field and serve /admin/keys on the client port)."""
    config = proxy_package_dir(source) / "gpuproxy_proxy" / "config.py"
    return "admin_api_port" in config.read_text(encoding="utf-8")


def start_gpuproxy(
    kids: Children,
    work: Path,
    name: str,
    backend_port: int,
    workers: int,
    run: ProxyRun | None = None,
) -> Server:
    run = run or ProxyRun()
    port, admin_port = free_port(), free_port()
    api_port = free_port() if has_admin_api_port(run.source) else None
    path = work / f"{name.replace('@', '-')}.yaml"
    # JSON is valid YAML; no need to depend on a YAML writer here.
    path.write_text(json.dumps(proxy_config(port, admin_port, backend_port, workers, run,
                                            api_port)))
    # The package dir of the chosen tree (this repo's by default) is always first on the path,
    # so the editable install in the venv never decides which code runs.
    env, gc_dir = gcwatch_env(work, name, source=run.source or proxy_package_dir(None))
    env["GPUPROXY_JWT_SECRET"] = JWT_SECRET
    env["GPUPROXY_ADMIN_TOKEN"] = ADMIN_TOKEN
    if run.database is not None:
        env["GPUPROXY_DB_USER"] = run.database.user
        env["GPUPROXY_DB_PASSWORD"] = run.database.password
    argv = [PYTHON, "-m", "gpuproxy_proxy.cli", "--config", str(path), "--workers", str(workers)]
    proc = kids.start(name.replace("@", "-"), argv, env=env)
    try:
        wait_port(port, 30, proc)
    except RuntimeError as exc:
        log = kids.log_tail(name.replace("@", "-"))
        raise RuntimeError(f"{exc}\n--- {name} log ---\n{log}") from exc
    # All workers must be up before measuring: wait until the tree stops growing.
    time.sleep(1.0)
    return Server(name, port, proc.pid, admin_port, gc_dir, api_port)


def start_naive(kids: Children, work: Path, backend_port: int, workers: int) -> Server:
    """The minimal aiohttp reverse proxy the issue's baseline numbers describe."""
    port = free_port()
    argv = [PYTHON, str(BENCH_DIR / "naive_proxy.py"), "--port", str(port)]
    argv += ["--upstream", f"http://127.0.0.1:{backend_port}", "--workers", str(workers)]
    env, gc_dir = gcwatch_env(work, "naive")
    proc = kids.start("naive", argv, env=env)
    wait_port(port, 20, proc)
    time.sleep(1.0)
    return Server("naive", port, proc.pid, None, gc_dir)


def start_raw(kids: Children, work: Path, backend_port: int, workers: int) -> Server:
    """The protocol-level reference proxy (raw_proxy.py): what the splice design costs."""
    port = free_port()
    argv = [PYTHON, str(BENCH_DIR / "raw_proxy.py"), "--port", str(port)]
    argv += ["--upstream-port", str(backend_port), "--workers", str(workers)]
    env, gc_dir = gcwatch_env(work, "raw")
    proc = kids.start("raw", argv, env=env)
    wait_port(port, 20, proc)
    time.sleep(1.0)
    return Server("raw", port, proc.pid, None, gc_dir)


def make_jwt(subject: str = "bench-user") -> str:
    import jwt  # pyjwt, from the proxy extra

    now = int(time.time())
    claims = {"sub": subject, "iat": now, "nbf": now - 5, "exp": now + 24 * 3600}
    return str(jwt.encode(claims, JWT_SECRET, algorithm="HS256"))
