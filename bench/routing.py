"""Routing strategies on a shared-prefix multi-tenant workload: TTFT, throughput, queues, hits.

Starts N simulated vLLM servers (`gpuproxy-simulator` processes: batch slots, FIFO queue, an
LRU prefix-cached KV cache, prefill time per uncached token) and one gpuproxy (the real CLI,
2 workers) in front of them, then, for each arrival rate and strategy, fresh servers and a
fresh proxy: a warm-up that sends every tenant once, then Poisson arrivals of streamed chat
requests for `--duration` seconds. Each tenant has its own long system prompt; tenants are
picked uniformly. Measured: TTFT (first content chunk) p50/p90/p99, completed requests per
second, the engines' mean queue depth and the mean queue wait it implies (Little's law), and
the prefix-cache hit rate (hit / queried prompt tokens, from the servers' vLLM counters).

Every process is ended by its PID in a `finally`; each cell is bounded in time (requests
still unanswered `--drain` seconds after the last arrival count as timeouts, TTFT = inf).

    .venv/bin/python bench/routing.py                                   # the README's run
    .venv/bin/python bench/routing.py --rates 8,24 --duration 10 --runs 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from harness import PYTHON, Children, code_version, free_port, median, percentile

STRATEGIES = ("round_robin", "least_connections", "least_load", "prefix_affinity")
MODEL = "sim-llama-3-8b"


@dataclass(frozen=True)
class Workload:
    backends: int = 4
    tenants: int = 120
    system_tokens: int = 1500  # each tenant's own system prompt
    user_tokens: int = 40
    max_tokens: int = 8
    chars_per_token: int = 4
    gpu_blocks: int = 4096  # x 16 tokens: ~43 tenants' prompts per server
    max_num_seqs: int = 64
    duration: float = 20.0
    drain: float = 30.0
    workers: int = 2
    seed: int = 13


@dataclass
class Cell:
    strategy: str
    rate: float
    run: int
    sent: int = 0
    ok: int = 0
    failed: int = 0
    timeouts: int = 0
    ttfts: list[float] = field(default_factory=list)
    seconds: float = 0.0
    hit_rate: float = float("nan")
    mean_queue: float = float("nan")
    decisions: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        throughput = self.ok / self.seconds if self.seconds else 0.0
        samples = self.ttfts + [math.inf] * self.timeouts
        return {
            "strategy": self.strategy, "rate": self.rate, "run": self.run, "sent": self.sent,
            "ok": self.ok, "failed": self.failed, "timeouts": self.timeouts,
            "ttft_p50_ms": percentile(samples, 50) * 1000,
            "ttft_p90_ms": percentile(samples, 90) * 1000,
            "ttft_p99_ms": percentile(samples, 99) * 1000,
            "throughput_rps": throughput, "prefix_hit_rate": self.hit_rate,
            "mean_queue_depth": self.mean_queue,
            "mean_queue_wait_ms": self.mean_queue / throughput * 1000 if throughput else math.inf,
            "decisions": self.decisions,
        }


def system_prompt(tenant: int, w: Workload) -> str:
    # Distinct from the first characters on, like real tenants' prompts.
    words = random.Random(tenant).choices(  # noqa: S311 - a workload, not security
        ["policy", "refund", "order", "account", "shipping", "warranty", "invoice", "support"],
        k=w.system_tokens * w.chars_per_token // 8)
    return f"Tenant {tenant}: " + " ".join(words)[: w.system_tokens * w.chars_per_token]


def body(tenant: int, prompts: list[str], rng: random.Random, w: Workload) -> bytes:
    question = "".join(rng.choices("abcdefghij ", k=w.user_tokens * w.chars_per_token))
    return json.dumps({
        "model": MODEL, "stream": True, "max_tokens": w.max_tokens,
        "messages": [{"role": "system", "content": prompts[tenant]},
                     {"role": "user", "content": question}],
    }).encode()


async def one_request(http: aiohttp.ClientSession, url: str, payload: bytes,
                      cell: Cell, limit: float) -> None:
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            async with http.post(url, data=payload,
                                 headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    cell.failed += 1
                    await resp.read()
                    return
                first = None
                async for line in resp.content:
                    if first is None and line.startswith(b"data: {"):
                        first = time.monotonic() - started
                if first is None:
                    cell.failed += 1
                    return
                cell.ttfts.append(first)
                cell.ok += 1
    except TimeoutError:
        cell.timeouts += 1
    except aiohttp.ClientError:
        cell.failed += 1


async def engine_counters(http: aiohttp.ClientSession, urls: list[str]) -> dict[str, float]:
    totals = {"hits": 0.0, "queries": 0.0, "waiting": 0.0}
    names = {"vllm:prefix_cache_hits_total": "hits", "vllm:prefix_cache_queries_total": "queries",
             "vllm:num_requests_waiting": "waiting"}
    for url in urls:
        async with http.get(url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in names:
                    totals[names[name]] += float(line.rsplit(" ", 1)[1])
    return totals


async def routing_decisions(http: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with http.get(admin + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("gpuproxy_routing_decisions_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def wait_http(http: aiohttp.ClientSession, url: str, deadline: float) -> None:
    while True:
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready")
        await asyncio.sleep(0.1)


def start_servers(children: Children, w: Workload, tag: str) -> list[str]:
    urls = []
    for i in range(w.backends):
        port = free_port()
        children.start(f"{tag}-sim-{i}", [
            PYTHON, "-m", "gpuproxy_proxy.simulator", "--port", str(port), "--model", MODEL,
            "--num-gpu-blocks", str(w.gpu_blocks), "--max-num-seqs", str(w.max_num_seqs)])
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def start_proxy(children: Children, w: Workload, urls: list[str], strategy: str,
                tmp: Path, tag: str) -> tuple[str, str]:
    port, admin = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "admin_port": admin},
        "workers": w.workers,
        "backends": [{"name": f"gpu-{i}", "url": url} for i, url in enumerate(urls)],
        "load_balancing": {"strategy": strategy},
        "auth": {"enabled": False}, "rate_limits": {"enabled": False},
        "metering": {"enabled": False}, "logging": {"level": "WARNING"},
        "limits": {"gc_freeze_interval_seconds": 1.0},
    }
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    children.start(f"{tag}-proxy", [PYTHON, "-m", "gpuproxy_proxy.cli", "--config", str(path)])
    return f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


async def run_cell(strategy: str, rate: float, run: int, w: Workload, prompts: list[str],
                   tmp: Path) -> Cell:
    cell = Cell(strategy, rate, run)
    tag = f"{strategy}-{rate:g}-{run}"
    children = Children(tmp)
    try:
        urls = start_servers(children, w, tag)
        proxy, admin = start_proxy(children, w, urls, strategy, tmp, tag)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            deadline = time.monotonic() + 90
            for url in urls:
                await wait_http(http, url + "/health", deadline)
            await wait_http(http, admin + "/ready", deadline)
            chat = proxy + "/v1/chat/completions"
            rng = random.Random(w.seed * 1000 + run)  # noqa: S311 - a workload
            # Warm-up: every tenant once, a few at a time (the steady state of a long run).
            warm = Cell(strategy, rate, run)
            order = list(range(w.tenants))
            rng.shuffle(order)
            for start in range(0, len(order), 8):
                await asyncio.gather(*(one_request(http, chat, body(t, prompts, rng, w), warm,
                                                   60) for t in order[start:start + 8]))
            if strategy in ("least_load", "prefix_affinity"):
                await asyncio.sleep(1.5)  # a scrape after the warm-up, as in a steady state
            before = await engine_counters(http, urls)
            decided = await routing_decisions(http, admin)
            tasks: list[asyncio.Task[None]] = []
            queue_samples: list[float] = []
            started = time.monotonic()
            next_at = started
            next_sample = started
            end = started + w.duration
            while True:
                next_at += rng.expovariate(rate)
                if next_at >= end:
                    break
                while True:
                    now = time.monotonic()
                    if now >= next_sample:
                        queue_samples.append((await engine_counters(http, urls))["waiting"])
                        next_sample += 0.5
                        continue
                    if now >= next_at:
                        break
                    await asyncio.sleep(min(next_at, next_sample) - now)
                tenant = rng.randrange(w.tenants)
                tasks.append(asyncio.create_task(one_request(
                    http, chat, body(tenant, prompts, rng, w), cell,
                    end - next_at + w.drain)))
            cell.sent = len(tasks)
            await asyncio.gather(*tasks)
            cell.seconds = time.monotonic() - started
            after = await engine_counters(http, urls)
            asked = after["queries"] - before["queries"]
            cell.hit_rate = (after["hits"] - before["hits"]) / asked if asked else float("nan")
            cell.mean_queue = sum(queue_samples) / len(queue_samples) if queue_samples else 0.0
            cell.decisions = {reason: count - decided.get(reason, 0.0) for reason, count in
                              (await routing_decisions(http, admin)).items() if count}
    finally:
        children.close()
    return cell


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.0f}"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rates", default="6,12,18,24",
                        help="arrival rates, requests/s over the whole pool")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=Workload.duration)
    parser.add_argument("--backends", type=int, default=Workload.backends)
    parser.add_argument("--tenants", type=int, default=Workload.tenants)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    w = Workload(backends=args.backends, tenants=args.tenants, duration=args.duration)
    rates = [float(r) for r in args.rates.split(",")]
    strategies = args.strategies.split(",")
    prompts = [system_prompt(t, w) for t in range(w.tenants)]
    print(f"proxy code: {code_version()}", flush=True)
    print(f"workload: {asdict(w)}", flush=True)
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        for run in range(args.runs):
            for rate in rates:
                for strategy in strategies:
                    cell = (await run_cell(strategy, rate, run, w, prompts, Path(tmp))).summary()
                    cells.append(cell)
                    print(f"run {run} rate {rate:g} {strategy:18} ok {cell['ok']:4} "
                          f"timeouts {cell['timeouts']:3} p50 {_fmt(cell['ttft_p50_ms']):>6} "
                          f"p90 {_fmt(cell['ttft_p90_ms']):>6} p99 {_fmt(cell['ttft_p99_ms']):>6}"
                          f" ms  {cell['throughput_rps']:.1f} req/s  hits "
                          f"{cell['prefix_hit_rate']:.2f}  queue {cell['mean_queue_depth']:.1f}"
                          f"  {cell['decisions']}", flush=True)
    print("== summary (medians over runs; ratio = round_robin p90 / this p90)")
    print(f"{'rate':>5} {'strategy':18} {'p50':>7} {'p90':>7} {'p99':>7} {'req/s':>6} "
          f"{'wait ms':>8} {'hits':>5} {'p90 ratio':>9}")
    summary = []
    for rate in rates:
        rr_p90 = None
        for strategy in strategies:
            mine = [c for c in cells if c["rate"] == rate and c["strategy"] == strategy]
            row = {key: median([c[key] for c in mine]) for key in (
                "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "throughput_rps",
                "mean_queue_wait_ms", "prefix_hit_rate")}
            if strategy == "round_robin":
                rr_p90 = row["ttft_p90_ms"]
            ratio = rr_p90 / row["ttft_p90_ms"] if rr_p90 is not None else float("nan")
            summary.append({"rate": rate, "strategy": strategy, **row, "p90_ratio": ratio})
            print(f"{rate:5g} {strategy:18} {_fmt(row['ttft_p50_ms']):>7} "
                  f"{_fmt(row['ttft_p90_ms']):>7} {_fmt(row['ttft_p99_ms']):>7} "
                  f"{row['throughput_rps']:6.1f} {_fmt(row['mean_queue_wait_ms']):>8} "
                  f"{row['prefix_hit_rate']:5.2f} {ratio:9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"workload": asdict(w), "cells": cells,
                                         "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
