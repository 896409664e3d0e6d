"""SSE time-to-first-byte added by gpuproxy, nginx (and LiteLLM), against the backend directly.

For each level of `--streams-per-core` keeps `level x workers` SSE streams open at all times
(each N events, fixed gap), spread over client processes (`sseclient.py`) so the client is never
the limit; per stream the time from sending the request to the first event's bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import litellm_side
import servers
from harness import (
    BENCH_DIR,
    PYTHON,
    Children,
    code_version,
    load_average,
    median,
    percentile,
)

BASES = ("direct", "nginx", "proxy", "naive", "raw", "litellm")


def request_bytes(args: argparse.Namespace, headers: dict[str, str]) -> bytes:
    """GET /v1/sse?n=&delay_ms=, or a streamed chat completion POST (backend defaults)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if args.request == "get":
        return (
            f"GET /v1/sse?n={args.events}&delay_ms={args.delay_ms:g} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAccept: text/event-stream\r\n{extra}\r\n"
        ).encode()
    body = json.dumps(
        {
            "model": litellm_side.MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def measure(
    port: int, concurrency: int, request: Path, args: argparse.Namespace
) -> dict[str, float]:
    """One run: `concurrency` streams over ceil(concurrency / streams-per-client) processes."""
    procs = math.ceil(concurrency / args.streams_per_client)
    share = math.ceil(concurrency / procs)
    stream_seconds = args.events * args.delay_ms / 1000.0
    start_at = time.time() + 1.5 + 0.05 * procs  # every client process started and importing
    clients: list[subprocess.Popen[str]] = []
    results: list[dict[str, Any]] = []
    try:
        for offset in range(0, concurrency, share):
            count = min(share, concurrency - offset)
            argv = [PYTHON, str(BENCH_DIR / "sseclient.py"), "--port", str(port)]
            argv += ["--request-file", str(request), "--streams", str(count)]
            argv += ["--offset", str(offset), "--total", str(concurrency)]
            argv += ["--seconds", str(args.seconds), "--stagger-seconds", f"{stream_seconds:g}"]
            argv += ["--start-at", f"{start_at:.3f}", "--starve-seconds", str(args.starve_seconds)]
            clients.append(
                subprocess.Popen(  # noqa: S603 - our own client script
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        for proc in clients:
            out, err = proc.communicate(timeout=args.seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"sse client {proc.pid} failed: {err[-2000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ttfb = [t for r in results for t in r["ttfb_ms"]]
    cores = [r["cpu_s"] / r["wall_s"] for r in results if r["wall_s"] > 0]
    return {
        "streams": float(len(ttfb)),
        "failures": float(sum(r["failures"] for r in results)),
        "starved": float(sum(r["starved"] for r in results)),
        "median_ms": median(ttfb),
        "p99_ms": percentile(ttfb, 99),
        "max_ms": max(ttfb) if ttfb else float("nan"),
        "client_processes": float(len(results)),
        "client_cores": sum(cores),
        "client_max_process_cpu": max(cores) if cores else float("nan"),
    }


def summarise(
    rows: dict[tuple[int, str], list[dict[str, float]]], names: list[str], levels: list[int]
) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for level in levels:
        base = rows.get((level, "direct"))
        for name in names:
            mine = rows[(level, name)]
            row = {
                "streams_per_core": float(level),
                "median_ms": median([r["median_ms"] for r in mine]),
                "p99_ms": median([r["p99_ms"] for r in mine]),
                "streams": sum(r["streams"] for r in mine),
                "failures": sum(r["failures"] for r in mine),
                "starved": sum(r["starved"] for r in mine),
                "client_max_process_cpu": max(r["client_max_process_cpu"] for r in mine),
                "client_cores": median([r["client_cores"] for r in mine]),
            }
            if base is not None and name != "direct":
                # Paired per round: each round's target against the same round's direct run.
                row["added_median_ms"] = median(
                    [r["median_ms"] - b["median_ms"] for r, b in zip(mine, base, strict=True)]
                )
                row["added_p99_ms"] = median(
                    [r["p99_ms"] - b["p99_ms"] for r, b in zip(mine, base, strict=True)]
                )
            summary[f"{level}/{name}"] = row
    return summary


def print_summary(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(
        f"\n== summary: medians over {args.rounds} rounds x {args.seconds:g}s, {args.request} "
        f"streams of {args.events} events x {args.delay_ms:g} ms, {args.workers} worker(s); "
        f"starved = no first byte within {args.starve_seconds:g} s; {load_average()}"
    )
    print(
        f"{'per core/target':<22} {'TTFB p50':>9} {'p99':>8} {'added p50':>10} {'added p99':>10}"
        f" {'streams':>8} {'failed':>7} {'starved':>8} {'clients: busiest':>16} {'total':>6}"
    )
    for key, row in summary.items():
        added = (
            f"{row['added_median_ms']:>+10.2f} {row['added_p99_ms']:>+10.2f}"
            if "added_median_ms" in row
            else f"{'':>10} {'':>10}"
        )
        print(
            f"{key:<22} {row['median_ms']:>9.2f} {row['p99_ms']:>8.2f} {added} "
            f"{row['streams']:>8.0f} {row['failures']:>7.0f} {row['starved']:>8.0f} "
            f"{row['client_max_process_cpu'] * 100:>15.0f}% {row['client_cores']:>5.2f}c"
        )


def start_targets(
    kids: Children, work: Path, names: list[str], args: argparse.Namespace, top: int
) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    """Ports (and request headers) of every target; upstream pools sized for `top` streams."""
    sources = args.sources_by_label
    backend = servers.start_backend(kids, args.events, args.delay_ms)
    ports: dict[str, int] = {}
    headers: dict[str, dict[str, str]] = {}
    for name in names:
        base, source = servers.split_side(name, sources)
        headers[name] = {}
        if base == "direct":
            ports[name] = backend.port
        elif base == "nginx":
            conns = max(19500 // 2, 2 * top + 1000)
            srv = servers.start_nginx(kids, work, backend.port, args.workers, conns, top)
            ports[name] = srv.port
        elif base == "raw":
            ports[name] = servers.start_raw(kids, work, backend.port, args.workers).port
        elif base == "naive":
            ports[name] = servers.start_naive(kids, work, backend.port, args.workers).port
        elif base == "litellm":
            srv = litellm_side.start_litellm(
                kids, work, backend.port, args.workers, args.litellm_venv
            )
            ports[name] = srv.port
            headers[name] = litellm_side.auth_header()
        else:
            # No upstream cap below the stream count: every stream holds one upstream connection.
            run = servers.ProxyRun(source=source or args.proxy_source, max_upstream=top + 100)
            srv = servers.start_gpuproxy(kids, work, name, backend.port, args.workers, run)
            ports[name] = srv.port
    return ports, headers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="workers of every proxy")
    parser.add_argument(
        "--streams-per-core", default="100,500,1000", help="comma list of levels (x workers)"
    )
    parser.add_argument("--events", type=int, default=20, help="events per stream")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="gap between events")
    parser.add_argument("--seconds", type=float, default=10.0, help="per target per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--targets",
        default="direct,nginx,proxy",
        help=f"comma list of {', '.join(BASES)}; proxy@LABEL runs the tree --source LABEL=DIR",
    )
    parser.add_argument(
        "--request", choices=("get", "chat"), default="get", help="chat: streamed chat POST"
    )
    parser.add_argument("--streams-per-client", type=int, default=200)
    parser.add_argument("--starve-seconds", type=float, default=2.0)
    parser.add_argument("--proxy-source", type=Path, help="tree of the `proxy` target")
    parser.add_argument("--source", action="append", default=[], help="LABEL=DIR")
    parser.add_argument("--litellm-venv", type=Path, default=litellm_side.DEFAULT_VENV)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.sources_by_label = servers.parse_sources(args.source)
    levels = [int(x) for x in args.streams_per_core.split(",") if x.strip()]
    top = max(levels) * args.workers
    if top > 5000 or args.seconds > 120 or args.rounds > 10 or min(levels) < 1:
        parser.error("bounded benchmark: at most 5000 streams, 120 s per run, 10 rounds")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = {n for n in names if n.partition("@")[0] not in BASES}
    if unknown:
        parser.error(f"--targets: unknown {sorted(unknown)}; use {', '.join(BASES)}")
    if any(n.startswith("litellm") for n in names) and args.request != "chat":
        parser.error("the litellm target streams chat completions only: add --request chat")

    rows: dict[tuple[int, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gpuproxy-sse-") as tmp:
        work = Path(tmp)
        kids = Children(work)
        print(f"proxy code: {code_version(args.proxy_source)}", flush=True)
        try:
            ports, headers = start_targets(kids, work, names, args, top)
            requests: dict[str, Path] = {}
            for name in names:
                requests[name] = work / f"request-{name.replace('@', '-')}.bin"
                requests[name].write_bytes(request_bytes(args, headers[name]))
            for level in levels:
                concurrency = level * args.workers
                for rnd in range(1, args.rounds + 1):
                    order = names if rnd % 2 else list(reversed(names))
                    for name in order:
                        row = measure(ports[name], concurrency, requests[name], args)
                        rows.setdefault((level, name), []).append(row)
                        print(
                            f"{level}/core round {rnd} {name:<10} streams {row['streams']:>6.0f}  "
                            f"ttfb median {row['median_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                            f"max {row['max_ms']:.1f} ms  failed {row['failures']:.0f}  "
                            f"starved {row['starved']:.0f}  clients {row['client_processes']:.0f}"
                            f" (busiest {row['client_max_process_cpu'] * 100:.0f}% cpu, "
                            f"{row['client_cores']:.2f} cores)  "
                            f"{load_average()}",
                            flush=True,
                        )
        finally:
            kids.close()

    summary = summarise(rows, names, levels)
    print_summary(summary, args)
    if args.json:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "code": code_version(args.proxy_source),
            "summary": summary,
            "rounds": {f"{level}/{name}": r for (level, name), r in rows.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
