"""Garbage a closed connection leaves in the permanent GC generation: open N idle keep-alive
connections (one request each), let the proxy's periodic gc.freeze() run, close them, repeat;
prints the proxy's frozen-object count (`gpuproxy_gc_frozen_objects`) after each phase and the
full (generation 2) collections it ran. One worker, so the count is one process's."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import Children, code_version, wait_port
from servers import ProxyRun, parse_sources, split_side, start_backend, start_gpuproxy

_FROZEN = re.compile(r"^gpuproxy_gc_frozen_objects (\S+)$", re.M)
_FULL = re.compile(r'^gpuproxy_gc_pause_milliseconds_count\{generation="2"\} (\S+)$', re.M)


def scrape(admin_port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    frozen, full = _FROZEN.search(text), _FULL.search(text)
    return (float(frozen.group(1)) if frozen else -1.0, float(full.group(1)) if full else 0.0)


async def hold(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/bench HTTP/1.1\r\nHost: bench\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writers.append(writer)
    return writers


async def churn(port: int, admin_port: int, args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for cycle in range(args.cycles):
        writers = await hold(port, args.connections)
        await asyncio.sleep(args.settle_seconds)  # several freezer intervals
        frozen_open, _ = scrape(admin_port)
        for writer in writers:
            writer.close()
        await asyncio.sleep(args.settle_seconds)
        frozen_closed, full = scrape(admin_port)
        rows.append({"cycle": cycle, "frozen_open": frozen_open,
                     "frozen_closed": frozen_closed, "full_collections": full})
        print(f"cycle {cycle}: frozen {frozen_open:.0f} with {args.connections} open, "
              f"{frozen_closed:.0f} after closing; full collections {full:.0f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--settle-seconds", type=float, default=3.0)
    parser.add_argument("--side", default="proxy", help="proxy or proxy@LABEL with --source")
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    _, source = split_side(args.side, parse_sources(args.source))
    print(f"code {code_version(source)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpuproxy-gc-churn-"))
    kids = Children(work)
    try:
        backend = start_backend(kids)
        proxy = start_gpuproxy(kids, work, args.side, backend.port, 1, ProxyRun(source=source))
        assert proxy.admin_port is not None
        wait_port(proxy.admin_port, 30)
        started, _ = scrape(proxy.admin_port)
        print(f"frozen at start: {started:.0f}", flush=True)
        began = time.monotonic()
        rows = asyncio.run(churn(proxy.port, proxy.admin_port, args))
        closed = args.cycles * args.connections
        growth = rows[-1]["frozen_closed"] - started
        print(f"== summary: {growth:.0f} frozen objects left by {closed} closed connections "
              f"({growth / closed:.2f} each) in {time.monotonic() - began:.0f} s; "
              f"full collections {rows[-1]['full_collections']:.0f}")
        if args.json:
            args.json.write_text(json.dumps({"start": started, "rows": rows}, indent=2))
    finally:
        kids.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
