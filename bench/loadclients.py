"""Client side of the idle-connection benchmark: idle keep-alive holders and a latency probe.

`python loadclients.py hold ...` opens connections (one request each), prints `READY opened
failed`, then holds them until stdin closes or its own deadline passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import cast

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


def request_bytes(path: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


class OneShot(asyncio.Protocol):
    """Sends one request per `ask()` and resolves when a Content-Length response is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed by server"))

    def ask(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = self.buf[:end].lower()
        pos = head.find(b"content-length:")
        length = int(head[pos + 15 :].split(b"\r\n", 1)[0]) if pos >= 0 else 0
        if len(self.buf) >= end + 4 + length:
            self.waiter.set_result(int(head[9:12]))


async def _open(
    port: int, source: str, request: bytes, gate: asyncio.Semaphore
) -> tuple[asyncio.Transport, OneShot] | None:
    loop = asyncio.get_running_loop()
    async with gate:
        try:
            transport, proto = await asyncio.wait_for(
                loop.create_connection(OneShot, "127.0.0.1", port, local_addr=(source, 0)), 20
            )
            status = await asyncio.wait_for(proto.ask(request), 30)
        except (TimeoutError, OSError, ConnectionError):
            return None
    if status != 200:
        transport.close()
        return None
    return transport, proto


async def hold(args: argparse.Namespace) -> None:
    sources = args.sources.split(",")
    request = request_bytes(args.path)
    gate = asyncio.Semaphore(args.parallel)
    tasks = [_open(args.port, sources[i % len(sources)], request, gate) for i in range(args.count)]
    held = [c for c in await asyncio.gather(*tasks) if c is not None]
    print(f"READY {len(held)} {args.count - len(held)}", flush=True)
    loop = asyncio.get_running_loop()
    released = loop.create_future()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not released.done():
            released.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(released, args.max_hold)
    lost = sum(1 for _t, proto in held if proto.lost)
    for transport, _proto in held:
        transport.close()
    print(f"RELEASED lost={lost}", flush=True)


async def probe(args: argparse.Namespace) -> None:
    """`conns` connections, each sending a request every conns/rate seconds, for `seconds`."""
    loop = asyncio.get_running_loop()
    headers = json.loads(args.headers) if args.headers else None
    request = request_bytes(args.path, headers)
    latencies: list[float] = []
    failures = 0
    interval = args.conns / args.rate
    deadline = time.perf_counter() + args.seconds

    async def one(index: int) -> None:
        nonlocal failures
        transport, proto = await loop.create_connection(OneShot, "127.0.0.1", args.port)
        next_at = time.perf_counter() + interval * index / args.conns
        try:
            while next_at < deadline:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                start = time.perf_counter()
                try:
                    status = await asyncio.wait_for(proto.ask(request), 30)
                except (TimeoutError, ConnectionError):
                    # Counted, then a fresh connection: one failure must not end the stream.
                    failures += 1
                    transport.close()
                    transport, proto = await loop.create_connection(OneShot, "127.0.0.1", args.port)
                    next_at += interval
                    continue
                latencies.append((time.perf_counter() - start) * 1000.0)
                failures += status != 200
                next_at += interval
        finally:
            transport.close()

    await asyncio.gather(*(one(i) for i in range(args.conns)))
    print(json.dumps({"latencies_ms": latencies, "failures": failures}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("hold")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--count", type=int, required=True)
    h.add_argument("--sources", default="127.0.0.1")
    h.add_argument("--path", default="/v1/bench")
    h.add_argument("--parallel", type=int, default=256, help="connections opened at once")
    h.add_argument("--max-hold", type=float, default=600.0, help="self-release deadline")
    p = sub.add_parser("probe")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/bench")
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--rate", type=float, default=200.0, help="requests per second in total")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--headers", default="", help="JSON object of extra request headers")
    args = parser.parse_args()
    if args.mode == "hold" and not 1 <= args.count <= 19000:
        parser.error("--count: one holder process keeps at most 19000 sockets (file cap 20000)")
    coro = hold(args) if args.mode == "hold" else probe(args)
    if uvloop is not None:
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
