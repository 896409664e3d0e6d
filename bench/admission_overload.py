"""Admitted requests' TTFT under 2x overload, with and without the admission queue.

Two simulated vLLM backends (`gpuproxy-simulator`, `--max-num-seqs` slots each) behind one
proxy; an open-loop client sends streamed completions at `--overload` times the backends'
measured capacity for `--seconds`. Without admission every request reaches a backend and waits
in its queue (TTFT grows with the backlog); with it the proxy holds them and sheds with
Retry-After past `queue_timeout_seconds`, so the admitted ones' TTFT stays bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from harness import Children, free_port, load_average, percentile, wait_port

BIN = Path(sys.executable).parent


async def one(http: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[int, float]:
    """(status, seconds to the first event) of one streamed completion."""
    started = time.monotonic()
    body = {"model": "sim-llama-3-8b", "prompt": "x" * 400, "max_tokens": max_tokens,
            "stream": True}
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return resp.status, 0.0
        ttft = 0.0
        async for _ in resp.content.iter_any():
            if not ttft:
                ttft = time.monotonic() - started
        return 200, ttft


async def run(url: str, rate: float, seconds: float, max_tokens: int) -> dict[str, Any]:
    tasks: list[asyncio.Task[tuple[int, float]]] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) + 1
            for _ in range(due - sent):
                tasks.append(asyncio.create_task(one(http, url, max_tokens)))
            sent = due
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [r[1] for r in results if isinstance(r, tuple) and r[0] == 200]
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r[0]) if isinstance(r, tuple) else type(r).__name__
        statuses[key] = statuses.get(key, 0) + 1
    return {"sent": len(tasks), "statuses": statuses,
            "admitted_ttft_p50_s": round(percentile(ok, 50), 3) if ok else None,
            "admitted_ttft_p99_s": round(percentile(ok, 99), 3) if ok else None,
            "admitted_ttft_max_s": round(max(ok), 3) if ok else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--overload", type=float, default=2.0)
    parser.add_argument("--slots", type=int, default=8, help="--max-num-seqs per backend")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--queue-timeout", type=float, default=1.0)
    args = parser.parse_args()
    # One request holds a slot ~max_tokens decode steps of ~15-20 ms (the simulator's default).
    per_request = args.max_tokens * 0.018 + 0.06
    capacity = 2 * args.slots / per_request
    rate = capacity * args.overload
    out: dict[str, Any] = {"capacity_rps_estimate": round(capacity, 1), "rate_rps": round(rate, 1),
                           "load_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        children = Children(Path(tmp))
        try:
            ports = [free_port(), free_port()]
            for i, port in enumerate(ports):
                proc = children.start(f"sim{i}", [str(BIN / "gpuproxy-simulator"), "--port",
                                                  str(port), "--max-num-seqs", str(args.slots)])
                wait_port(port, 60, proc)
            for mode in ("off", "on"):
                port, admin = free_port(), free_port()
                config = {
                    "listen": {"host": "127.0.0.1", "port": port, "admin_port": admin},
                    "backends": [{"name": f"sim{i}", "url": f"http://127.0.0.1:{p}"}
                                 for i, p in enumerate(ports)],
                    "auth": {"enabled": False}, "rate_limits": {"enabled": False},
                    "metering": {"enabled": False},
                    "admission": {"enabled": mode == "on",
                                  "max_in_flight_per_backend": args.slots,
                                  "queue_timeout_seconds": args.queue_timeout},
                }
                path = Path(tmp) / f"proxy-{mode}.yaml"
                path.write_text(yaml.safe_dump(config))
                proc = children.start(f"proxy-{mode}",
                                      [str(BIN / "gpuproxy-proxy"), "--config", str(path)])
                wait_port(port, 60, proc)
                out[f"admission_{mode}"] = asyncio.run(run(
                    f"http://127.0.0.1:{port}/v1/completions", rate, args.seconds,
                    args.max_tokens))
                proc.terminate()
                proc.wait(timeout=30)
        finally:
            children.close()
    out["load_after"] = load_average()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
