"""Memory per idle keep-alive connection, and latency under many idle connections.

For nginx and gpuproxy (same workers, same backend): RSS of the server's process tree before and
after N idle connections (one request each), and a low-rate latency probe (p50/p99/max) without
and with them held; max latency stands in for pauses (GC) when the proxy does not export them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import servers
import wrk
from harness import (
    BENCH_DIR,
    PYTHON,
    Children,
    code_version,
    load_average,
    median,
    percentile,
    process_tree,
    rss_kib,
)

PER_HOLDER = 15000  # sockets per holder process, under the 20000 open-files cap


def start_probe(port: int, seconds: float, args: argparse.Namespace) -> subprocess.Popen[str]:
    argv = [PYTHON, str(BENCH_DIR / "loadclients.py"), "probe", "--port", str(port)]
    argv += ["--rate", str(args.probe_rate), "--seconds", str(seconds)]
    argv += ["--conns", str(args.probe_conns)]
    return subprocess.Popen(  # noqa: S603 - our own client script
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_probe(proc: subprocess.Popen[str], seconds: float) -> dict[str, float]:
    try:
        out, err = proc.communicate(timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed: {err[-2000:]}")
    data = json.loads(out.strip().splitlines()[-1])
    lat = data["latencies_ms"]
    return {
        "n": len(lat),
        "p50_ms": median(lat),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "failures": data["failures"],
    }


def run_probe(port: int, seconds: float, args: argparse.Namespace) -> dict[str, float]:
    return finish_probe(start_probe(port, seconds, args), seconds)


def run_load(port: int, args: argparse.Namespace) -> dict[str, float]:
    """A saturating wrk run: p99 and max under load (pauses show up as max latency)."""
    result = wrk.run(
        f"http://127.0.0.1:{port}/v1/bench", args.load_connections, 1, args.load_seconds
    )
    return {
        "rps": result.rps,
        "p99_ms": result.p99_ms,
        "max_ms": result.max_ms,
        "failures": result.errors + result.non_2xx,
    }


def fd_counts(pids: list[int]) -> dict[int, int]:
    counts = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            counts[pid] = len(os.listdir(f"/proc/{pid}/fd"))
    return counts


def gc_metrics(admin_port: int | None) -> list[str]:
    if admin_port is None:
        return []
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return [f"(metrics unavailable: {exc})"]
    return [
        line
        for line in text.splitlines()
        if ("gc" in line.lower() or "pause" in line.lower()) and not line.startswith("#")
    ]


def hold_connections(
    port: int, total: int, args: argparse.Namespace
) -> tuple[list[subprocess.Popen[str]], int, int]:
    sources = ",".join(f"127.0.0.{2 + i}" for i in range(args.sources))
    holders: list[subprocess.Popen[str]] = []
    for start in range(0, total, PER_HOLDER):
        count = min(PER_HOLDER, total - start)
        argv = [PYTHON, str(BENCH_DIR / "loadclients.py"), "hold", "--port", str(port)]
        argv += ["--count", str(count), "--sources", sources, "--max-hold", str(args.max_hold)]
        holders.append(
            subprocess.Popen(  # noqa: S603 - our own client script
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    opened = failed = 0
    for proc in holders:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"holder {proc.pid} did not get ready: {line}")
        opened += int(line[1])
        failed += int(line[2])
    return holders, opened, failed


def release(holders: list[subprocess.Popen[str]]) -> None:
    for proc in holders:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
    for proc in holders:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def bench_target(server: servers.Server, args: argparse.Namespace) -> dict[str, Any]:
    total = args.per_worker * args.workers
    run_probe(server.port, 3.0, args)  # warm-up: pools, caches, first-request allocations
    t0 = time.time()
    quiet = run_probe(server.port, args.probe_seconds, args)
    quiet_load = run_load(server.port, args) if args.load_seconds else None
    t1 = time.time()
    pids = process_tree(server.pid)
    rss0 = rss_kib(pids)
    gc0 = gc_metrics(server.admin_port)
    holders: list[subprocess.Popen[str]] = []
    # A probe runs while the connections are being opened: collections triggered by many new
    # long-lived objects happen then, and show up as its max latency.
    ramp_probe = start_probe(server.port, args.ramp_probe_seconds, args)
    try:
        holders, opened, failed = hold_connections(server.port, total, args)
        t2 = time.time()
        ramp = finish_probe(ramp_probe, args.ramp_probe_seconds)
        time.sleep(2.0)
        pids = process_tree(server.pid)
        rss1 = rss_kib(pids)
        fds = fd_counts(pids)
        t3 = time.time()
        loaded = run_probe(server.port, args.probe_seconds, args)
        loaded_load = run_load(server.port, args) if args.load_seconds else None
        t4 = time.time()
        gc1 = gc_metrics(server.admin_port)
        rss2 = rss_kib(pids)
    finally:
        if ramp_probe.poll() is None:
            ramp_probe.kill()
            ramp_probe.wait()
        release(holders)
    return {
        "target": server.name,
        "opened": opened,
        "failed": failed,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "rss_after_load_kib": rss2,
        "kib_per_conn": (rss1 - rss0) / opened if opened else math.nan,
        "fds_per_process": fds,
        "probe_without": quiet,
        "probe_during_ramp": ramp,
        "probe_with": loaded,
        "p99_ratio": loaded["p99_ms"] / quiet["p99_ms"],
        "load_without": quiet_load,
        "load_with": loaded_load,
        "load_p99_ratio": (
            loaded_load["p99_ms"] / quiet_load["p99_ms"] if quiet_load and loaded_load else None
        ),
        "gc_pause_without": servers.gc_pauses(server.gc_dir, t0, t1),
        "gc_pause_while_opening": servers.gc_pauses(server.gc_dir, t1, t2),
        "gc_pause_with": servers.gc_pauses(server.gc_dir, t3, t4),
        "gc_metrics_before": gc0,
        "gc_metrics_after": gc1,
    }


def report(r: dict[str, Any]) -> None:
    print(
        f"\n== {r['target']}: {r['opened']} idle connections held "
        f"({r['failed']} failed to open); sockets per process {r['fds_per_process']}"
    )
    print(
        f"RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB: "
        f"{r['kib_per_conn']:.2f} KiB per idle connection"
    )
    probes = (
        ("without idle ", r["probe_without"]),
        ("while opening", r["probe_during_ramp"]),
        ("with idle    ", r["probe_with"]),
    )
    for label, row in probes:
        print(
            f"probe {label}: n={row['n']} p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
            f"  max {row['max_ms']:.1f} ms  failures {row['failures']}"
        )
    print(f"probe p99 with/without idle: x{r['p99_ratio']:.2f}")
    for label, key in (("without idle", "load_without"), ("with idle   ", "load_with")):
        row = r[key]
        if row:
            print(
                f"load  {label}: {row['rps']:.0f} req/s  p99 {row['p99_ms']:.2f} ms  "
                f"max {row['max_ms']:.1f} ms  failures {row['failures']:.0f}"
            )
    if r["load_p99_ratio"] is not None:
        print(f"load p99 with/without idle: x{r['load_p99_ratio']:.2f}")
    if r["gc_pause_with"]["processes"]:
        whole = r["gc_pause_with"]
        print(
            f"GC (measured in-process, {whole['gen2_count']:.0f} full collections, max pause "
            f"{whole['max_ms']:.1f} ms over the run); pauses >= 10 ms by phase:"
        )
        for label, key in (
            ("without idle ", "gc_pause_without"),
            ("while opening", "gc_pause_while_opening"),
            ("with idle    ", "gc_pause_with"),
        ):
            row = r[key]
            gen = (
                f" (generation {row['window_max_generation']:.0f})" if row["window_max_ms"] else ""
            )
            print(
                f"  {label}: max {row['window_max_ms']:.1f} ms{gen}, "
                f"{row['window_over_50ms']:.0f} over 50 ms"
            )
    before = dict(_metric_pairs(r["gc_metrics_before"]))
    for name, value in _metric_pairs(r["gc_metrics_after"]):
        if not name.split("{")[0].endswith(("_count", "_sum", "_total")):
            continue  # buckets and _created lines: in the JSON output
        print(f"  metric {name} = {value:g} (was {before.get(name, float('nan')):g})")


def _metric_pairs(lines: list[str]) -> list[tuple[str, float]]:
    pairs = []
    for line in lines:
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            pairs.append((name, float(value)))
    return pairs


def print_summary(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\n== summary: {args.per_worker * args.workers} idle connections over {args.workers} "
        f"worker(s) per target, probe {args.probe_rate:g} req/s; {load_average()}"
    )
    print(
        f"{'target':<16} {'held':>7} {'failed':>6} {'KiB/conn':>8} {'probe p99 w/o':>13} "
        f"{'with':>7} {'ratio':>6} {'wrk p99 w/o':>11} {'with':>7} {'GC max ms':>9} "
        f"{'opening':>8}"
    )
    for r in results:
        load_w = r["load_without"]["p99_ms"] if r["load_without"] else math.nan
        load_h = r["load_with"]["p99_ms"] if r["load_with"] else math.nan
        gc_run = r["gc_pause_with"]["max_ms"] if r["gc_pause_with"]["processes"] else math.nan
        opening = r["gc_pause_while_opening"]
        gc_open = opening["window_max_ms"] if math.isfinite(gc_run) else math.nan
        print(
            f"{r['target']:<16} {r['opened']:>7} {r['failed']:>6} {r['kib_per_conn']:>8.2f} "
            f"{r['probe_without']['p99_ms']:>13.2f} {r['probe_with']['p99_ms']:>7.2f} "
            f"{r['p99_ratio']:>6.2f} {load_w:>11.2f} {load_h:>7.2f} {gc_run:>9.1f} {gc_open:>8.1f}"
        )


def start_target(
    kids: Children, work: Path, target: str, backend: servers.Server, args: argparse.Namespace
) -> servers.Server:
    base, source = servers.split_side(target, args.sources_by_label)
    conns = args.per_worker + 1000
    if base == "nginx":
        return servers.start_nginx(kids, work, backend.port, args.workers, conns)
    if base == "proxy":
        run = servers.ProxyRun(source=source or args.proxy_source)
        return servers.start_gpuproxy(kids, work, target, backend.port, args.workers, run)
    if base == "raw":
        return servers.start_raw(kids, work, backend.port, args.workers)
    if base == "naive":
        return servers.start_naive(kids, work, backend.port, args.workers)
    # The bench backend itself: the floor for a bare uvloop Protocol server.
    return backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-worker", type=int, default=2000, help="idle connections / worker")
    parser.add_argument(
        "--total", type=int, help="idle connections in all (overrides --per-worker: total/workers)"
    )
    parser.add_argument("--sources", type=int, default=4, help="source addresses 127.0.0.2..")
    parser.add_argument(
        "--targets",
        default="nginx,proxy",
        help="comma list: nginx, proxy (proxy@LABEL: the tree --source LABEL=DIR); references: "
        "naive (aiohttp), raw (raw_proxy.py), backend (the bench backend itself)",
    )
    parser.add_argument("--proxy-source", type=Path, help="tree of the `proxy` target")
    parser.add_argument("--source", action="append", default=[], help="LABEL=DIR")
    parser.add_argument("--probe-rate", type=float, default=200.0, help="probe requests/s")
    parser.add_argument("--probe-seconds", type=float, default=10.0)
    parser.add_argument("--probe-conns", type=int, default=8)
    parser.add_argument("--ramp-probe-seconds", type=float, default=20.0)
    parser.add_argument("--load-seconds", type=float, default=10.0, help="0 skips the wrk load")
    parser.add_argument("--load-connections", type=int, default=64)
    parser.add_argument("--max-hold", type=float, default=300.0, help="holders self-release")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.sources_by_label = servers.parse_sources(args.source)
    if args.total is not None:
        args.per_worker = math.ceil(args.total / args.workers)
    if not 1 <= args.per_worker <= 19000:
        parser.error("--per-worker must be 1-19000 (20000 open files per process here)")
    if args.per_worker * args.workers > 28000 * args.sources:
        parser.error("--sources: each source address gives at most 28k ports; add sources")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bases = {"nginx", "proxy", "naive", "raw", "backend"}
    unknown = {t for t in targets if t.partition("@")[0] not in bases}
    if unknown:
        parser.error(f"--targets: unknown {sorted(unknown)}; use nginx, proxy, naive, raw, backend")
    if "backend" in targets and args.per_worker * args.workers > 19000:
        parser.error("--targets backend: one process; keep per-worker x workers <= 19000")

    results = []
    with tempfile.TemporaryDirectory(prefix="gpuproxy-idle-") as tmp:
        work = Path(tmp)
        kids = Children(work)
        print(f"proxy code: {code_version(args.proxy_source)}", flush=True)
        print(f"{args.per_worker * args.workers} idle connections, {args.workers} workers")
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        try:
            backend = servers.start_backend(kids)
            for target in targets:
                server = start_target(kids, work, target, backend, args)
                result = bench_target(server, args)
                result["target"] = target
                report(result)
                results.append(result)
        finally:
            kids.close()
    print_summary(results, args)
    if args.json:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "code": code_version(args.proxy_source),
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
