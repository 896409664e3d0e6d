"""The sides `proxy_vs_nginx.py` measures: starting each (gpuproxy from a chosen tree, nginx,
LiteLLM, references), their Redis/PostgreSQL dependencies, and the proof that features ran.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import litellm_side
import pgservices
import servers
from harness import Children, process_tree


@dataclass
class Side:
    name: str
    server: servers.Server
    headers: dict[str, str]
    served: list[int] = field(default_factory=list)  # wrk requests of every run, warm-up too


BASES = ("nginx", "proxy-bare", "proxy-auth", "proxy-full", "litellm", "naive", "raw")
REFERENCES = ("nginx", "litellm")  # sides the gpuproxy sides are paired against


@dataclass
class Rig:
    """What the sides share: children, the backend, Redis and PostgreSQL once started."""

    kids: Children
    work: Path
    backend: servers.Server
    args: argparse.Namespace
    sources: dict[str, Path]
    redis_port: int = 0
    pg: pgservices.PgCluster | None = None


def create_api_key(srv: servers.Server) -> str:
    """A new API key from the proxy's admin API (stored, hashed, in PostgreSQL): on its own
    port, or on the client port of a tree from before it had one."""
    port = srv.admin_api_port or srv.port
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/keys",
        data=json.dumps({"user_id": "bench-user", "name": "bench"}).encode(),
        headers={
            "Authorization": f"Bearer {servers.ADMIN_TOKEN}",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
                return str(json.loads(resp.read())["key"])
        except OSError as exc:  # 503 until the pool has connected and migrated
            if time.monotonic() > deadline:
                raise RuntimeError(f"POST /admin/keys failed: {exc}") from exc
            time.sleep(0.5)


def start_side(rig: Rig, name: str) -> Side:
    base, source = servers.split_side(name, rig.sources)
    source = source or rig.args.proxy_source
    kids, work, bport, workers = rig.kids, rig.work, rig.backend.port, rig.args.workers
    if base == "nginx":
        return Side(name, servers.start_nginx(kids, work, bport, workers), {})
    if base == "raw":
        return Side(name, servers.start_raw(kids, work, bport, workers), {})
    if base == "naive":
        return Side(name, servers.start_naive(kids, work, bport, workers), {})
    if base == "litellm":
        srv = litellm_side.start_litellm(kids, work, bport, workers, rig.args.litellm_venv)
        return Side(name, srv, litellm_side.auth_header())
    if base == "proxy-bare":
        run = servers.ProxyRun(source=source)
        return Side(name, servers.start_gpuproxy(kids, work, name, bport, workers, run), {})
    rig.redis_port = rig.redis_port or servers.start_redis(kids, work)
    if base == "proxy-auth":
        run = servers.ProxyRun(source=source, redis_port=rig.redis_port)
        srv = servers.start_gpuproxy(kids, work, name, bport, workers, run)
        return Side(name, srv, {"Authorization": f"Bearer {servers.make_jwt()}"})
    rig.pg = rig.pg or pgservices.start(kids)
    run = servers.ProxyRun(source=source, redis_port=rig.redis_port, database=rig.pg.bouncer)
    srv = servers.start_gpuproxy(kids, work, name, bport, workers, run)
    return Side(name, srv, {"Authorization": f"Bearer {create_api_key(srv)}"})


DEPENDENCIES = {"proxy-auth": ("redis",), "proxy-full": ("redis", "postgres", "pgbouncer")}


def dependency_pids(side: Side, rig: Rig) -> list[int]:
    """Redis for proxy-auth; Redis, PgBouncer and PostgreSQL for proxy-full; else none."""
    names = DEPENDENCIES.get(side.name.partition("@")[0], ())
    return [pid for name, proc in rig.kids.procs if name in names for pid in process_tree(proc.pid)]


def redis_script_calls(port: int) -> int:
    import redis  # from the proxy extra

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    names = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall", "cmdstat_evalsha_ro")
    return sum(int(stats[n]["calls"]) for n in names if n in stats)


def report_proofs(rig: Rig, sides: list[Side]) -> dict[str, float]:
    """Redis script calls and metered usage rows per request: the features really ran."""
    proofs: dict[str, float] = {}
    if rig.redis_port:
        calls = redis_script_calls(rig.redis_port)
        limited = [s for s in sides if s.name.startswith(("proxy-auth", "proxy-full"))]
        served = sum(sum(s.served) for s in limited)
        proofs["redis_calls_per_request"] = calls / max(served, 1)
        print(
            f"redis script calls {calls} for {served} proxy-auth/proxy-full requests "
            f"(warm-up included): {proofs['redis_calls_per_request']:.3f} per request"
        )
    if rig.pg is not None:
        time.sleep(3.0)  # metering flushes every second
        rows = rig.pg.count_rows("usage_records")
        served = sum(sum(s.served) for s in sides if s.name.startswith("proxy-full"))
        proofs["usage_rows_per_request"] = rows / max(served, 1)
        print(
            f"usage_records rows {rows} for {served} proxy-full requests answered to wrk "
            f"(warm-up included): {proofs['usage_rows_per_request']:.3f} rows per request"
        )
    return proofs
