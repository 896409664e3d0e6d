"""A real proxy process on the operator's rendered config and Secret files, in kubelet-style
volumes: its idle memory per process stays within the sizing figure, and a ConfigMap update
(new `..data` directory, atomic symlink rename) reaches it without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from tests.operator.clusters import by_key, cluster, minimal_body
from tests.operator.kubelet_volume import KubeletVolume
from tests.proxy.fakes import wait_ready
from tests.services import LOOPBACK, PgBouncerServer, RedisServer, free_port

from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.proxy_secrets import SECRETS_DIR
from gpuproxy_operator.sizing import PROXY_PROCESS_MIB

pytestmark = pytest.mark.services

WORKERS = 2
# Generous on a loaded machine; the proxy polls every reload.interval_seconds (2 s by default).
APPLY_DEADLINE_SECONDS = 60.0


@dataclass
class RenderedProxy:
    proc: asyncio.subprocess.Process
    admin: str
    config: KubeletVolume
    rendered: dict[str, Any]


def _render(body: dict[str, Any], redis: RedisServer, pgb: PgBouncerServer, secrets: Path,
            ports: tuple[int, int]) -> dict[str, Any]:
    """The rendered config.yaml, pointed at loopback servers and the test's secret files."""
    creds = DatabaseCredentials(pgb.user, pgb.password)
    objs = by_key(build_all(cluster(body), BuildInputs(database_credentials=creds)))
    text = objs[("ConfigMap", "mini-proxy")]["data"]["config.yaml"]
    config: dict[str, Any] = yaml.safe_load(text.replace(SECRETS_DIR, str(secrets)))
    config["listen"].update(host=LOOPBACK, port=ports[0], admin_port=ports[1])
    config["redis"]["url"] = redis.url
    config["database"].update(host=pgb.host, port=pgb.port, database=pgb.database)
    return config


def _body(backend: str) -> dict[str, Any]:
    body = minimal_body()
    body["spec"]["proxy"].update(workers=WORKERS, backends=[
        {"name": backend, "url": f"http://{backend}.gpu.invalid:8000"}])
    return body


@pytest.fixture
async def proxy(tmp_path: Path, redis_server: RedisServer,
                pgbouncer_server: PgBouncerServer) -> AsyncIterator[RenderedProxy]:
    secrets = tmp_path / "secrets"
    KubeletVolume(secrets / "db", None).update(
        {"username": pgbouncer_server.user, "password": pgbouncer_server.password})
    ports = (free_port(), free_port())
    rendered = _render(_body("gpu-a"), redis_server, pgbouncer_server, secrets, ports)
    config = KubeletVolume(tmp_path / "config", None)
    config.update({"config.yaml": yaml.safe_dump(rendered)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPROXY_")}
    log = (tmp_path / "proxy.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(config.path("config.yaml")),
        env=env, stderr=log)
    admin = f"http://{LOOPBACK}:{ports[1]}"
    try:
        await wait_ready(admin, proc)
        yield RenderedProxy(proc, admin, config, rendered)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


def _children(pid: int) -> list[int]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == pid:
            out.append(int(entry))
    return sorted(out)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def test_idle_processes_fit_the_sizing_figure(proxy: RenderedProxy) -> None:
    await asyncio.sleep(5)  # past start-up: migrations, pools and health checks settled
    pids = [proxy.proc.pid, *_children(proxy.proc.pid)]
    assert len(pids) == WORKERS + 1  # supervisor + workers, as sizing.proxy_processes counts
    rss = [_rss_mib(pid) for pid in pids]
    print(f"\nidle proxy processes RSS MiB: {', '.join(f'{r:.1f}' for r in rss)}")
    assert max(rss) <= PROXY_PROCESS_MIB, rss


async def _backends(admin: str) -> set[str]:
    """The backends any worker still routes to (/stats merges them over all workers), once
    every worker answered."""
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/stats") as resp:
        stats = json.loads(await resp.text())
    if len(stats["per_worker"]) != WORKERS:
        return set()
    return set(stats["backends"])


async def test_a_configmap_update_reaches_the_running_proxy(proxy: RenderedProxy) -> None:
    pids = [proxy.proc.pid, *_children(proxy.proc.pid)]
    assert await _backends(proxy.admin) == {"gpu-a"}
    delays = []
    for n in range(5):
        # Swaps at different phases of the proxy's poll (every 2 s): worst case ~ one interval.
        await asyncio.sleep(0.45 * n)
        name = f"gpu-{'bc'[n % 2]}{n}"
        new = dict(proxy.rendered, backends=[{"name": name, "url": f"http://{name}.invalid:8000/"}])
        proxy.config.update({"config.yaml": yaml.safe_dump(new)})
        started = time.monotonic()
        while await _backends(proxy.admin) != {name}:
            assert time.monotonic() - started < APPLY_DEADLINE_SECONDS, "config not applied"
            await asyncio.sleep(0.05)
        delays.append(time.monotonic() - started)
    print(f"\nConfigMap swap -> applied in every worker, s: {', '.join(f'{d:.2f}' for d in delays)}"
          f" (median {statistics.median(delays):.2f}, max {max(delays):.2f})")
    assert [proxy.proc.pid, *_children(proxy.proc.pid)] == pids  # no process restarted
