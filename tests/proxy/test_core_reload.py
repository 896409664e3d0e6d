"""Config file reload: backends and strategy change without a restart or dropped streams."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.reload import restart_only_changes
from gpuproxy_proxy.runtime import RUNTIME


def write_configmap_style(root: Path, config: ProxyConfig, version: int) -> Path:
    """Kubernetes' layout: config.yaml -> ..data/config.yaml, ..data -> ..v<N> (swapped)."""
    data_dir = root / f"..v{version}"
    data_dir.mkdir()
    (data_dir / "config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    os.replace(tmp_link, root / "..data")
    link = root / "config.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/config.yaml")
    return link


async def wait_generation(client: Any, generation: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.app[RUNTIME].generation < generation:
        assert time.monotonic() < deadline, "config was not reloaded"
        await asyncio.sleep(0.02)


async def test_reload_swaps_backends_without_dropping_streams(
    tmp_path: Path, backends: list[FakeBackend], make_proxy: ProxyFactory
) -> None:
    gate = asyncio.Event()
    old = await FakeBackend("old", gate=gate).start()
    new = await FakeBackend("new").start()
    backends += [old, new]
    first = proxy_config([old], reload={"interval_seconds": 0.05})
    path = write_configmap_style(tmp_path, first, 1)
    client = await make_proxy(first, config_path=path)
    stream = await client.post("/v1/chat/completions", json={"stream": True})
    assert stream.status == 200
    assert old.hits == 1

    second = proxy_config([new], reload={"interval_seconds": 0.05},
                          load_balancing={"strategy": "weighted_round_robin"})
    write_configmap_style(tmp_path, second, 2)
    await wait_generation(client, 2)
    runtime = client.app[RUNTIME]
    assert runtime.pool.strategy == "weighted_round_robin"
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json={})
        assert (await resp.json())["backend"] == "new"
    gate.set()  # the stream started before the reload still completes on the old backend
    body = await stream.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert b'"backend": "old"' in body


async def test_invalid_config_is_ignored(tmp_path: Path, backends: list[FakeBackend],
                                         make_proxy: ProxyFactory,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="gpuproxy_proxy.reload")
    a = await FakeBackend("a").start()
    backends.append(a)
    config = proxy_config([a], reload={"interval_seconds": 0.05})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    client = await make_proxy(config, config_path=path)
    path.write_text("backends: [{name: 'Not Valid', url: 'nope'}]\n", encoding="utf-8")
    # Wait until the watcher has read (and refused) the file, instead of a fixed sleep.
    deadline = time.monotonic() + 30
    while not any("ignoring invalid config" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the invalid file was never read"
        await asyncio.sleep(0.02)
    assert client.app[RUNTIME].generation == 1
    assert (await client.post("/v1/chat/completions", json={})).status == 200
    # A valid file afterwards is applied again.
    path.write_text(yaml.safe_dump(
        proxy_config([a], reload={"interval_seconds": 0.05},
                     load_balancing={"strategy": "equal_weighted"}).model_dump(mode="json")),
        encoding="utf-8")
    await wait_generation(client, 2)
    assert client.app[RUNTIME].pool.strategy == "equal_weighted"


def test_restart_only_sections_are_reported() -> None:
    base = ProxyConfig()
    changed = base.model_copy(update={
        "workers": 4, "backends": [], "limits": base.limits.model_copy(
            update={"max_body_bytes": 5}),
        "upstream": base.upstream.model_copy(update={"read_timeout_seconds": 9.0})})
    assert restart_only_changes(base, changed) == ["workers"]
    fields = changed.model_copy(update={
        "logging": base.logging.model_copy(update={"access_log": True, "level": "DEBUG"}),
        "upstream": base.upstream.model_copy(update={"max_connections_per_backend": 7})})
    assert restart_only_changes(changed, fields) == ["logging.access_log"]


def test_effective_config_keeps_restart_only_values() -> None:
    from gpuproxy_proxy.reload import effective_config

    running = ProxyConfig()
    new = ProxyConfig.model_validate({
        "workers": 8, "listen": {"port": 9999},
        "logging": {"access_log": True, "level": "WARNING"},
        "limits": {"max_body_bytes": 5}, "reload": {"enabled": False, "interval_seconds": 9},
    })
    applied = effective_config(running, new)
    assert (applied.workers, applied.listen, applied.logging.access_log,
            applied.reload.enabled) == (1, running.listen, False, True)
    assert (applied.logging.level, applied.limits.max_body_bytes,
            applied.reload.interval_seconds) == ("WARNING", 5, 9)
