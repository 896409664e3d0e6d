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

import servers
from harness import BENCH_DIR, PYTHON, Children, median, percentile, process_tree, rss_kib

PER_HOLDER = 15000  # sockets per holder process, under the 20000 open-files cap


def run_probe(port: int, args: argparse.Namespace) -> dict[str, float]:
    argv = [PYTHON, str(BENCH_DIR / "loadclients.py"), "probe", "--port", str(port)]
    argv += ["--rate", str(args.probe_rate), "--seconds", str(args.probe_seconds)]
    argv += ["--conns", str(args.probe_conns)]
    done = subprocess.run(  # noqa: S603 - our own client script
        argv, capture_output=True, text=True, timeout=args.probe_seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    lat = data["latencies_ms"]
    return {
        "n": len(lat),
        "p50_ms": median(lat),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "failures": data["failures"],
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


def bench_target(server: servers.Server, args: argparse.Namespace) -> dict[str, object]:
    total = args.per_worker * args.workers
    run_probe(server.port, argparse.Namespace(**vars(args) | {"probe_seconds": 3}))  # warm-up
    quiet = run_probe(server.port, args)
    pids = process_tree(server.pid)
    rss0 = rss_kib(pids)
    gc0 = gc_metrics(server.admin_port)
    holders: list[subprocess.Popen[str]] = []
    try:
        holders, opened, failed = hold_connections(server.port, total, args)
        time.sleep(2.0)
        pids = process_tree(server.pid)
        rss1 = rss_kib(pids)
        fds = fd_counts(pids)
        loaded = run_probe(server.port, args)
        gc1 = gc_metrics(server.admin_port)
        rss2 = rss_kib(pids)
    finally:
        release(holders)
    return {
        "target": server.name,
        "opened": opened,
        "failed": failed,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "rss_after_probe_kib": rss2,
        "kib_per_conn": (rss1 - rss0) / opened if opened else math.nan,
        "fds_per_process": fds,
        "probe_without": quiet,
        "probe_with": loaded,
        "p99_ratio": loaded["p99_ms"] / quiet["p99_ms"],
        "gc_metrics_before": gc0,
        "gc_metrics_after": gc1,
    }


def report(result: dict[str, object]) -> None:
    q = result["probe_without"]
    w = result["probe_with"]
    assert isinstance(q, dict)
    assert isinstance(w, dict)
    print(
        f"\n== {result['target']}: {result['opened']} idle connections held "
        f"({result['failed']} failed to open); sockets per process {result['fds_per_process']}"
    )
    print(
        f"RSS {result['rss_before_kib']} -> {result['rss_after_kib']} KiB: "
        f"{result['kib_per_conn']:.2f} KiB per idle connection"
    )
    for label, row in (("without idle", q), ("with idle   ", w)):
        print(
            f"probe {label}: n={row['n']} p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
            f"  max {row['max_ms']:.1f} ms  failures {row['failures']}"
        )
    print(f"p99 with/without: x{result['p99_ratio']:.2f}")
    for line in result["gc_metrics_after"] or []:  # type: ignore[attr-defined]
        print(f"  metric: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-worker", type=int, default=2000, help="idle connections / worker")
    parser.add_argument("--sources", type=int, default=4, help="source addresses 127.0.0.2..")
    parser.add_argument("--targets", default="nginx,proxy", help="comma list: nginx, proxy")
    parser.add_argument("--probe-rate", type=float, default=200.0, help="probe requests/s")
    parser.add_argument("--probe-seconds", type=float, default=10.0)
    parser.add_argument("--probe-conns", type=int, default=8)
    parser.add_argument("--max-hold", type=float, default=300.0, help="holders self-release")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.per_worker <= 19000:
        parser.error("--per-worker must be 1-19000 (20000 open files per process here)")
    if args.per_worker * args.workers > 28000 * args.sources:
        parser.error("--sources: each source address gives at most 28k ports; add sources")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]

    results = []
    with tempfile.TemporaryDirectory(prefix="gpuproxy-idle-") as tmp:
        work = Path(tmp)
        kids = Children(work)
        try:
            backend = servers.start_backend(kids)
            conns = args.per_worker + 1000
            for target in targets:
                if target == "nginx":
                    server = servers.start_nginx(kids, work, backend.port, args.workers, conns)
                elif target == "proxy":
                    server = servers.start_gpuproxy(
                        kids, work, "proxy-bare", backend.port, args.workers
                    )
                else:
                    parser.error(f"--targets: unknown {target!r}; use nginx, proxy")
                result = bench_target(server, args)
                report(result)
                results.append(result)
        finally:
            kids.close()
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
