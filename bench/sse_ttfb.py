"""SSE time-to-first-byte added by gpuproxy and by nginx, against the backend directly.

Keeps `streams-per-core x workers` SSE streams open at all times (each N events, fixed gap),
records for every stream the time from sending the request to the first event's bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import servers
from harness import Children, code_version, median, percentile

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

END = b"0\r\n\r\n"


async def one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> float:
    """Sends the request, returns ms to the first `data:` byte, reads the stream to its end."""
    start = time.perf_counter()
    writer.write(request)
    seen = b""
    first: float | None = None
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("stream closed before its end")
        seen = (seen + data)[-4096:]
        if first is None and b"data:" in seen:
            first = (time.perf_counter() - start) * 1000.0
        if first is not None and b"[DONE]" in seen and seen.endswith(END):
            return first


async def run_target(port: int, args: argparse.Namespace) -> dict[str, float]:
    concurrency = args.streams_per_core * args.workers
    request = (
        f"GET /v1/sse?n={args.events}&delay_ms={args.delay_ms:g} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    stream_seconds = args.events * args.delay_ms / 1000.0
    deadline = time.perf_counter() + args.seconds
    ttfb: list[float] = []
    failures = 0

    async def slot(index: int) -> None:
        nonlocal failures
        # Stagger starts over one stream's length so arrivals are steady, not one burst.
        await asyncio.sleep(stream_seconds * index / concurrency)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                try:
                    ttfb.append(await asyncio.wait_for(one_stream(reader, writer, request), 60))
                except (TimeoutError, ConnectionError):
                    failures += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(slot(i) for i in range(concurrency)))
    return {
        "streams": float(len(ttfb)),
        "failures": float(failures),
        "median_ms": median(ttfb),
        "p99_ms": percentile(ttfb, 99),
        "max_ms": max(ttfb) if ttfb else float("nan"),
    }


def measure(port: int, args: argparse.Namespace) -> dict[str, float]:
    coro = run_target(port, args)
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="nginx and proxy workers")
    parser.add_argument("--streams-per-core", type=int, default=100)
    parser.add_argument("--events", type=int, default=20, help="events per stream")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="gap between events")
    parser.add_argument("--seconds", type=float, default=10.0, help="per target per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--targets", default="direct,nginx,proxy", help="comma list; naive = reference proxy"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.streams_per_core * args.workers > 5000 or args.seconds > 120 or args.rounds > 10:
        parser.error("bounded benchmark: at most 5000 streams, 120 s per run, 10 rounds")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(names) - {"direct", "nginx", "proxy", "naive", "raw"}
    if unknown:
        parser.error(f"--targets: unknown {sorted(unknown)}; use direct, nginx, proxy, naive, raw")

    with tempfile.TemporaryDirectory(prefix="gpuproxy-sse-") as tmp:
        work = Path(tmp)
        kids = Children(work)
        print(f"proxy code: {code_version()}", flush=True)
        try:
            backend = servers.start_backend(kids, args.events, args.delay_ms)
            ports = {"direct": backend.port}
            if "nginx" in names:
                ports["nginx"] = servers.start_nginx(kids, work, backend.port, args.workers).port
            if "raw" in names:
                ports["raw"] = servers.start_raw(kids, work, backend.port, args.workers).port
            if "naive" in names:
                ports["naive"] = servers.start_naive(kids, work, backend.port, args.workers).port
            if "proxy" in names:
                ports["proxy"] = servers.start_gpuproxy(
                    kids, work, "proxy-bare", backend.port, args.workers
                ).port
            rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            for rnd in range(1, args.rounds + 1):
                order = names if rnd % 2 else list(reversed(names))
                for name in order:
                    row = measure(ports[name], args)
                    rows[name].append(row)
                    print(
                        f"round {rnd} {name:<7} streams {row['streams']:>5.0f}  "
                        f"ttfb median {row['median_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                        f"max {row['max_ms']:.1f} ms  failures {row['failures']}",
                        flush=True,
                    )
        finally:
            kids.close()

    summary: dict[str, dict[str, float]] = {}
    for name in names:
        med = median([r["median_ms"] for r in rows[name]])
        p99 = median([r["p99_ms"] for r in rows[name]])
        summary[name] = {"median_ms": med, "p99_ms": p99}
    concurrency = args.streams_per_core * args.workers
    print(
        f"\nmedians over {args.rounds} rounds, {concurrency} concurrent streams "
        f"({args.streams_per_core}/core x {args.workers}), {args.events} events x "
        f"{args.delay_ms:g} ms"
    )
    base = summary.get("direct")
    for name, row in summary.items():
        added = ""
        if base is not None and name != "direct":
            row["added_median_ms"] = row["median_ms"] - base["median_ms"]
            row["added_p99_ms"] = row["p99_ms"] - base["p99_ms"]
            added = (
                f"  added: median +{row['added_median_ms']:.2f} ms, "
                f"p99 +{row['added_p99_ms']:.2f} ms"
            )
        print(f"{name:<7} ttfb median {row['median_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms{added}")
    if args.json:
        payload = {
            "args": vars(args) | {"json": str(args.json)},
            "summary": summary,
            "rounds": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
