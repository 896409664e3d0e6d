"""Throughput side by side: gpuproxy (bare, and with JWT auth + Redis rate limits) vs nginx.

Same fast backend, same worker count, wrk in alternating-order rounds; prints requests/s,
p99 and CPU microseconds per request (from /proc) per round, then medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyspy_top
import servers
import wrk
from harness import VENV_BIN, Children, code_version, cpu_seconds, median, process_tree

PYSPY = str(VENV_BIN / "py-spy") if (VENV_BIN / "py-spy").exists() else "py-spy"


@dataclass(frozen=True)
class Sample:
    side: str
    round: int
    rps: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    non_2xx: int
    cpu_s: float
    cpu_us_per_req: float
    backend_cpu_us_per_req: float


@dataclass(frozen=True)
class Side:
    name: str
    server: servers.Server
    headers: dict[str, str]


def measure(side: Side, backend_pid: int, args: argparse.Namespace, rnd: int) -> Sample:
    pids = process_tree(side.server.pid)
    url = f"http://127.0.0.1:{side.server.port}{args.path}"
    cpu0, bcpu0 = cpu_seconds(pids), cpu_seconds([backend_pid])
    result = wrk.run(url, args.connections, args.threads, args.duration, side.headers)
    cpu = cpu_seconds(pids) - cpu0
    bcpu = cpu_seconds([backend_pid]) - bcpu0
    served = max(result.requests, 1)
    return Sample(
        side=side.name,
        round=rnd,
        rps=result.rps,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
        requests=result.requests,
        errors=result.errors,
        non_2xx=result.non_2xx,
        cpu_s=cpu,
        cpu_us_per_req=cpu * 1e6 / served,
        backend_cpu_us_per_req=bcpu * 1e6 / served,
    )


def print_sample(s: Sample) -> None:
    bad = f"  errors={s.errors} non2xx={s.non_2xx}" if s.errors or s.non_2xx else ""
    print(
        f"round {s.round}  {s.side:<13} {s.rps:>9.0f} req/s  p99 {s.p99_ms:>7.2f} ms  "
        f"max {s.max_ms:>7.1f} ms  cpu {s.cpu_us_per_req:>6.1f} us/req  "
        f"(backend {s.backend_cpu_us_per_req:.1f}){bad}",
        flush=True,
    )


def summarise(samples: list[Sample], names: list[str]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [s for s in samples if s.side == name]
        cpu_us = median([s.cpu_us_per_req for s in mine])
        summary[name] = {
            "rps": median([s.rps for s in mine]),
            "p99_ms": median([s.p99_ms for s in mine]),
            "max_ms": max(s.max_ms for s in mine),
            "cpu_us_per_req": cpu_us,
            "rps_per_core": 1e6 / cpu_us if cpu_us > 0 else float("nan"),
            "failed_requests": sum(s.errors + s.non_2xx for s in mine),
        }
    if "nginx" in names:
        nginx = {s.round: s for s in samples if s.side == "nginx"}
        for name in names:
            if name == "nginx":
                continue
            mine = [s for s in samples if s.side == name]
            # Paired per round: each round's proxy run against the same round's nginx run.
            summary[name]["rps_ratio"] = median([s.rps / nginx[s.round].rps for s in mine])
            summary[name]["per_core_ratio"] = median(
                [nginx[s.round].cpu_us_per_req / s.cpu_us_per_req for s in mine]
            )
            summary[name]["p99_ratio"] = median([s.p99_ms / nginx[s.round].p99_ms for s in mine])
    return summary


def print_summary(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(
        f"\nmedians over {args.rounds} rounds x {args.duration:g}s, {args.connections} "
        f"connections, wrk -t{args.threads}, {args.workers} worker(s) each"
    )
    print(f"{'side':<13} {'req/s':>9} {'p99 ms':>8} {'CPU us/req':>10} {'req/s/core':>10}  ratios")
    for name, row in summary.items():
        ratios = ""
        if "rps_ratio" in row:
            ratios = (
                f"req/s x{row['rps_ratio']:.3f}  per-core x{row['per_core_ratio']:.3f}  "
                f"p99 x{row['p99_ratio']:.2f} (proxy/nginx)"
            )
        print(
            f"{name:<13} {row['rps']:>9.0f} {row['p99_ms']:>8.2f} {row['cpu_us_per_req']:>10.1f} "
            f"{row['rps_per_core']:>10.0f}  {ratios}"
        )
        if row["failed_requests"]:
            print(f"  !! {name}: {row['failed_requests']:.0f} failed or non-2xx responses")


def profile(side: Side, args: argparse.Namespace, out_dir: Path) -> list[Path]:
    """py-spy every process of a Python side during one extra wrk run (not a measured round)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []
    seconds = int(args.duration)
    try:
        for pid in process_tree(side.server.pid):
            out = out_dir / f"{side.name}-{pid}.txt"
            argv = [PYSPY, "record", "--pid", str(pid), "--duration", str(seconds)]
            argv += ["--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"]
            quiet = subprocess.DEVNULL
            spy = subprocess.Popen(argv, stdout=quiet, stderr=quiet)  # noqa: S603 - own argv
            spies.append((spy, out))
        time.sleep(0.5)
        url = f"http://127.0.0.1:{side.server.port}{args.path}"
        wrk.run(url, args.connections, args.threads, seconds, side.headers)
        for proc, _out in spies:
            proc.wait(timeout=seconds + 30)
    finally:
        for proc, _out in spies:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [out for _proc, out in spies if out.exists()]


def redis_script_calls(port: int) -> int:
    import redis  # from the proxy extra

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    names = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall", "cmdstat_evalsha_ro")
    return sum(int(stats[n]["calls"]) for n in names if n in stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="nginx and proxy workers")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--path", default="/v1/bench", help="request path (proxied to backend)")
    parser.add_argument(
        "--sides", default="nginx,proxy-bare,proxy-auth", help="comma list of sides to run"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per side")
    parser.add_argument("--json", type=Path, help="also write all samples and medians here")
    parser.add_argument(
        "--py-spy", type=Path, dest="pyspy", help="after the rounds, profile Python sides here"
    )
    parser.add_argument(
        "--hold", type=float, default=0.0, help="after starting, sleep this long (for py-spy)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.duration <= 60:
        parser.error("--rounds must be 1-20 and --duration 1-60 s (bounded benchmark)")
    names = [n.strip() for n in args.sides.split(",") if n.strip()]
    unknown = set(names) - {"nginx", "proxy-bare", "proxy-auth", "naive", "raw"}
    if unknown:
        parser.error(
            f"--sides: unknown {sorted(unknown)}; use nginx, proxy-bare, proxy-auth, naive, raw"
        )

    with tempfile.TemporaryDirectory(prefix="gpuproxy-bench-") as tmp:
        work = Path(tmp)
        kids = Children(work)
        print(f"proxy code: {code_version()}", flush=True)
        try:
            backend = servers.start_backend(kids)
            sides: list[Side] = []
            redis_port = 0
            for name in names:
                if name == "nginx":
                    srv = servers.start_nginx(kids, work, backend.port, args.workers)
                    sides.append(Side(name, srv, {}))
                elif name == "raw":
                    srv = servers.start_raw(kids, work, backend.port, args.workers)
                    sides.append(Side(name, srv, {}))
                elif name == "naive":
                    srv = servers.start_naive(kids, work, backend.port, args.workers)
                    sides.append(Side(name, srv, {}))
                elif name == "proxy-bare":
                    srv = servers.start_gpuproxy(kids, work, name, backend.port, args.workers)
                    sides.append(Side(name, srv, {}))
                else:
                    redis_port = redis_port or servers.start_redis(kids, work)
                    srv = servers.start_gpuproxy(
                        kids, work, name, backend.port, args.workers, redis_port
                    )
                    token = servers.make_jwt()
                    sides.append(Side(name, srv, {"Authorization": f"Bearer {token}"}))
            for side in sides:
                print(f"{side.name}: port {side.server.port}, pids {process_tree(side.server.pid)}")
            if args.hold:
                time.sleep(args.hold)
            for side in sides:
                url = f"http://127.0.0.1:{side.server.port}{args.path}"
                warm = wrk.run(url, args.connections, args.threads, args.warmup, side.headers)
                if warm.non_2xx or warm.errors:
                    print(f"!! warm-up {side.name}: non2xx={warm.non_2xx} errors={warm.errors}")
            samples: list[Sample] = []
            rounds_started = time.time()
            for rnd in range(1, args.rounds + 1):
                order = sides if rnd % 2 else list(reversed(sides))
                for side in order:
                    sample = measure(side, backend.pid, args, rnd)
                    print_sample(sample)
                    samples.append(sample)
            summary = summarise(samples, names)
            print_summary(summary, args)
            for side in sides:
                pauses = servers.gc_pauses(side.server.gc_dir, rounds_started, time.time())
                if pauses["processes"]:
                    print(
                        f"{side.name}: longest GC pause during the rounds "
                        f"{pauses['window_max_ms']:.1f} ms (generation "
                        f"{pauses['window_max_generation']:.0f}), "
                        f"{pauses['window_over_50ms']:.0f} over "
                        f"50 ms (since start: {pauses['gen2_count']:.0f} full collections, "
                        f"longest {pauses['max_gen2_ms']:.1f} ms)"
                    )
            if redis_port:
                # Proof the auth side really hit Redis: script calls per request served.
                calls = redis_script_calls(redis_port)
                served = sum(s.requests for s in samples if s.side == "proxy-auth")
                print(
                    f"redis script calls {calls} for {served} measured proxy-auth requests "
                    f"(+warm-up): {calls / max(served, 1):.2f} per request"
                )
            if args.pyspy:
                for side in sides:
                    if side.name != "nginx":
                        profiles = profile(side, args, args.pyspy)
                        print(f"\n== py-spy: {side.name} ({len(profiles)} processes)", flush=True)
                        pyspy_top.summarise(profiles, 20)
            if args.json:
                payload = {
                    "args": vars(args) | {"json": str(args.json)},
                    "summary": summary,
                    "samples": [asdict(s) for s in samples],
                }
                args.json.write_text(json.dumps(payload, indent=2, default=str))
        finally:
            kids.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
