"""The cost of usage metering: the same proxy (one worker, no auth) with metering on
(PostgreSQL via PgBouncer, the crash-safe spool on, spend counters; and without the spool)
beside metering off, the same backend and the same wrk load of chat completions (answers with
usage). Rounds rotate the sides; per side the medians of requests/s and of the proxy's CPU per
request (µs), and the ratios to off. PostgreSQL's and PgBouncer's CPU are reported apart.
Loopback only."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import litellm_side
import pgservices
import servers
import wrk
from harness import (
    PYTHON,
    Children,
    code_version,
    cpu_seconds,
    free_port,
    median,
    process_tree,
    proxy_package_dir,
    wait_port,
)

# metering-on-nospool: records go to PostgreSQL from memory only (no crash-safe copy), which
# splits the spool's share from the rest (usage parsing, records, batched inserts).
SIDES = ("metering-off", "metering-on", "metering-on-nospool")
CHAT = "/v1/chat/completions"


def start_proxy(kids: Children, work: Path, name: str, backend: int,
                pg: pgservices.PgCluster | None, spool: bool = True) -> servers.Server:
    port, admin = free_port(), free_port()
    run = servers.ProxyRun(database=None if pg is None else pg.bouncer)
    config: dict[str, Any] = servers.proxy_config(port, admin, backend, 1, run)
    if pg is not None:
        config["metering"] = {"enabled": True}
        if spool:
            (work / f"{name}-spool").mkdir()
            config["metering"]["spool_dir"] = str(work / f"{name}-spool")
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config))
    env, gc_dir = servers.gcwatch_env(work, name, source=proxy_package_dir(None))
    if pg is not None:
        env["GPUPROXY_DB_USER"] = pg.bouncer.user
        env["GPUPROXY_DB_PASSWORD"] = pg.bouncer.password
    proc = kids.start(name, [PYTHON, "-m", "gpuproxy_proxy.cli", "--config", str(path),
                             "--workers", "1"], env=env)
    try:
        wait_port(port, 60, proc)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- {name} log ---\n{kids.log_tail(name)}") from exc
    return servers.Server(name, port, proc.pid, admin, gc_dir)


def _post(port: int) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{CHAT}", data=litellm_side.CHAT_BODY.encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        return int(resp.status)


def wait_metered(server: servers.Server, pg: pgservices.PgCluster, timeout: float = 90.0
                 ) -> None:
    """Ready when a request's usage record is in PostgreSQL (the pool has connected and
    migrated): polled, with a generous deadline for a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _post(server.port)
            if pg.count_rows("usage_records") > 0:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("no usage record reached PostgreSQL in time")
        time.sleep(0.2)


def measure(server: servers.Server, dep_pids: list[int], args: argparse.Namespace,
            script: Path, seconds: float) -> dict[str, float]:
    pids = process_tree(server.pid)
    cpu0, dep0, t0 = cpu_seconds(pids), cpu_seconds(dep_pids), time.monotonic()
    result = wrk.run(f"http://127.0.0.1:{server.port}{CHAT}", args.connections, args.threads,
                     seconds, script=script)
    wall = time.monotonic() - t0
    cpu, dep = cpu_seconds(pids) - cpu0, cpu_seconds(dep_pids) - dep0
    done = max(result.requests, 1)
    return {"rps": result.rps, "p99_ms": result.p99_ms, "requests": result.requests,
            "errors": result.errors + result.non_2xx, "cpu_us_per_request": cpu / done * 1e6,
            "db_cpu_us_per_request": dep / done * 1e6, "proxy_cpu_share": cpu / wall}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="metering-overhead-") as tmp:
        work = Path(tmp)
        kids = Children(work)
        try:
            backend = servers.start_backend(kids)
            pg = pgservices.start(kids)
            script = wrk.post_script(work / "chat.lua", litellm_side.CHAT_BODY)
            sides = {"metering-off": start_proxy(kids, work, "metering-off", backend.port, None),
                     "metering-on": start_proxy(kids, work, "metering-on", backend.port, pg),
                     "metering-on-nospool": start_proxy(kids, work, "metering-on-nospool",
                                                        backend.port, pg, spool=False)}
            wait_metered(sides["metering-on"], pg)
            wait_metered(sides["metering-on-nospool"], pg)
            deps = [pid for name, proc in kids.procs if name in ("postgres", "pgbouncer")
                    for pid in process_tree(proc.pid)]
            for server in sides.values():  # warm-up, not counted
                measure(server, deps, args, script, args.warmup)
            for n in range(args.rounds):
                order = SIDES[n % 3:] + SIDES[:n % 3]  # rotated: drift hits every side
                for side in order:
                    sample = measure(sides[side], deps if side != "metering-off" else [],
                                     args, script, args.seconds)
                    results[side].append(sample)
                    print(side, json.dumps({k: round(v, 2) for k, v in sample.items()}),
                          flush=True)
            served = sum(int(s["requests"]) for side in SIDES[1:] for s in results[side])
            deadline = time.monotonic() + 60
            rows = pg.count_rows("usage_records")
            while rows < served and time.monotonic() < deadline:  # the last batches land
                time.sleep(0.5)
                rows = pg.count_rows("usage_records")
            print(f"usage_records rows {rows} for {served} metered requests in the rounds "
                  "(warm-up and readiness included in the rows)", flush=True)
        finally:
            kids.close()  # every child, by PID
    return {"rounds": results, "usage_rows": rows, "metered_requests": served}


def summary(results: dict[str, Any]) -> list[str]:
    med = {side: {k: median([r[k] for r in rounds]) for k in rounds[0]}
           for side, rounds in results["rounds"].items()}
    off = med["metering-off"]
    lines = ["== summary (medians)",
             f"{'side':<13} {'req/s':>8} {'p99 ms':>7} {'proxy µs/req':>13} "
             f"{'pg+bouncer µs/req':>18}"]
    for side, m in med.items():
        lines.append(f"{side:<13} {m['rps']:>8.0f} {m['p99_ms']:>7.1f} "
                     f"{m['cpu_us_per_request']:>13.1f} {m['db_cpu_us_per_request']:>18.1f}")
    base = off["cpu_us_per_request"]
    for side in SIDES[1:]:
        cost, rps = med[side]["cpu_us_per_request"], med[side]["rps"]
        lines.append(f"{side}: {cost - base:+.1f} µs of proxy CPU per request "
                     f"({cost / base:.2f}x); throughput vs off {rps / off['rps']:.2f}x")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="per side and round (<= 10)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 10:
        p.error("--rounds must be 1-20 and --seconds 1-10 (a short benchmark)")
    print(f"proxy code: {code_version()}", flush=True)
    results = run(args)
    print("\n".join(summary(results)))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
