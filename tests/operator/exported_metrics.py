"""What the proxy and the operator really export: sample names and their label names, read from
a /metrics scrape of a running `gpuproxy-proxy` (two workers behind the supervisor, as in a pod)
and of the operator's metrics server. Alert rules and dashboards are checked against these."""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from tests.autoscaling.proxies import free_port_on
from tests.proxy.fakes import free_port

from gpuproxy_operator.operator_metrics import OperatorMetrics, serve

PROXY_BIN = Path(sys.executable).with_name("gpuproxy-proxy")
START_SECONDS = 120  # two workers and a supervisor on a loaded 2-core machine
# Families that have series only once something happened; the proxy run below makes it happen.
_EVENT_FAMILIES = ("gpuproxy_backend_failures_total", "gpuproxy_ratelimit_fallback_total")

Exported = dict[str, frozenset[str]]  # sample name -> label names


def parse(text: str) -> Exported:
    """Sample names with the label names seen on them; a family without samples still names
    its samples (with no labels), so a check of its labels fails instead of passing."""
    seen: dict[str, set[str]] = defaultdict(set)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                                "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            seen.setdefault(family.name + suffix, set())
        for sample in family.samples:
            seen[sample.name] |= set(sample.labels)
    return {name: frozenset(labels) for name, labels in seen.items()}


def _get(url: str, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # loopback only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@functools.cache
def proxy_metrics() -> Exported:
    """Scrape a real proxy whose one backend refuses connections and whose Redis is down, after
    one request: every family then has series, the event-driven ones included."""
    with tempfile.TemporaryDirectory(prefix="gpuproxy-metrics-") as tmp:
        port, admin = free_port_on(["127.0.0.1"]), free_port_on(["127.0.0.1"])
        while admin == port:
            admin = free_port_on(["127.0.0.1"])
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({
            "listen": {"host": "127.0.0.1", "port": port, "admin_port": admin},
            "workers": 2,
            "backends": [{"name": "gpu-0", "url": f"http://127.0.0.1:{free_port()}"}],
            # One check an hour: the backend stays optimistically healthy, so the request
            # below reaches it and records a failure.
            "health_check": {"interval_seconds": 3600, "timeout_seconds": 1},
            "auth": {"enabled": False},
            "rate_limits": {"enabled": True, "on_redis_failure": "local"},
            "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"},
            "metering": {"enabled": False},
            "logging": {"level": "WARNING"},
        }))
        log = (Path(tmp) / "proxy.log").open("ab")
        proc = subprocess.Popen(  # our own proxy binary, fixed arguments
            [str(PROXY_BIN), "--config", str(config)], stdout=log, stderr=log)
        try:
            base = f"http://127.0.0.1:{admin}"
            deadline = time.monotonic() + START_SECONDS
            while True:
                assert proc.poll() is None, f"proxy exited: {(Path(tmp) / 'proxy.log').read_text()}"
                with contextlib.suppress(OSError):
                    if _get(f"{base}/ready")[0] == 200:
                        break
                assert time.monotonic() < deadline, "proxy did not become ready"
                time.sleep(0.1)
            status, _ = _get(f"http://127.0.0.1:{port}/v1/completions",
                             json.dumps({"model": "m", "prompt": "hi"}).encode())
            assert status in (502, 503), status
            while True:
                exported = parse(_get(f"{base}/metrics")[1])
                if all(exported.get(name) for name in _EVENT_FAMILIES):
                    return exported
                assert time.monotonic() < deadline, f"no series for {_EVENT_FAMILIES}"
                time.sleep(0.2)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


@functools.cache
def operator_metrics() -> Exported:
    """Scrape the operator's metrics server after giving every labelled metric one series."""
    metrics = OperatorMetrics()
    for metric in vars(metrics).values():
        if isinstance(metric, Counter | Gauge | Histogram):
            # prometheus_client has no public accessor for a metric's label names.
            names: tuple[str, ...] = metric._labelnames
            if names:
                metric.labels(*("x" for _ in names))
    server, thread = serve(metrics, free_port_on(["127.0.0.1"]), "127.0.0.1")
    try:
        return parse(_get(f"http://127.0.0.1:{server.server_port}/metrics")[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
