"""One SSE client process of `sse_ttfb.py`: keeps `--streams` streams open for `--seconds`.

Each slot runs streams back to back on one keep-alive connection and records the time from
writing the request to the first `data:` byte; the first stream of a slot is not in the TTFBs
(it also pays the TCP connect and the accept, which differ between direct and proxied).
Prints one JSON line: TTFBs, failures, starved streams (no first byte within
`--starve-seconds`) and this process's own CPU seconds, so a saturated client shows up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

END = b"0\r\n\r\n"


class Tally:
    def __init__(self) -> None:
        self.ttfb: list[float] = []
        self.failures = 0
        self.starved = 0
        self.first_bytes = 0  # streams that got a first byte, counted in `ttfb` or not


async def one_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    starve_ms: float,
    tally: Tally,
    counted: bool,
) -> None:
    """Sends the request, records ms to the first `data:` byte, reads the stream to its end."""
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
            tally.first_bytes += 1
            if counted:
                tally.ttfb.append(first)
            tally.starved += first > starve_ms
        if first is not None and b"[DONE]" in seen and seen.endswith(END):
            return


async def run(args: argparse.Namespace) -> dict[str, object]:
    request = args.request
    tally = Tally()
    starve_ms = args.starve_seconds * 1000.0
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    deadline = time.perf_counter() + args.seconds

    async def slot(index: int) -> None:
        # Starts staggered over one stream's length (over all client processes) so arrivals
        # are steady, not one burst.
        await asyncio.sleep(args.stagger_seconds * index / args.total)
        reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
        fresh = True  # the connection's first stream
        try:
            while time.perf_counter() < deadline:
                before = tally.first_bytes
                stream = one_stream(reader, writer, request, starve_ms, tally, not fresh)
                try:
                    await asyncio.wait_for(stream, args.timeout)
                    fresh = False
                except (TimeoutError, OSError, ConnectionError):
                    tally.failures += 1
                    tally.starved += tally.first_bytes == before  # never got a first byte
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
                    fresh = True
        finally:
            writer.close()

    wall0 = time.perf_counter()
    await asyncio.gather(*(slot(args.offset + i) for i in range(args.streams)))
    times = os.times()
    return {
        "ttfb_ms": tally.ttfb,
        "failures": tally.failures,
        "starved": tally.starved,
        "cpu_s": times.user + times.system,
        "wall_s": time.perf_counter() - wall0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request-file", required=True, help="raw HTTP request bytes")
    parser.add_argument("--streams", type=int, required=True, help="slots in this process")
    parser.add_argument("--offset", type=int, default=0, help="index of this process's 1st slot")
    parser.add_argument("--total", type=int, required=True, help="slots over all processes")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--stagger-seconds", type=float, default=1.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock start time")
    parser.add_argument("--starve-seconds", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="per stream")
    args = parser.parse_args()
    with open(args.request_file, "rb") as handle:
        args.request = handle.read()
    if not 1 <= args.streams <= 5000 or args.seconds > 120:
        parser.error("bounded: 1-5000 streams per process, at most 120 s")
    coro = run(args)
    result = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
