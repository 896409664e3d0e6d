"""Fixtures for the autoscaling tests: real proxy processes on 127.0.0.2-5 as proxy "pods"
(module-scoped: starting them costs about a second each)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.autoscaling.proxies import PROXY_BIN, ProxyProcess, free_port_on

POD_IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


@pytest.fixture(scope="module")
def proxy_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ProxyProcess]]:
    if not PROXY_BIN.exists():
        pytest.fail(f"{PROXY_BIN} is missing: install the project into the venv")
    workdir: Path = tmp_path_factory.mktemp("proxies")
    port = free_port_on(POD_IPS)
    admin_port = free_port_on(POD_IPS)
    while admin_port == port:
        admin_port = free_port_on(POD_IPS)
    pods = [ProxyProcess(ip, port, admin_port, workdir) for ip in POD_IPS]
    try:
        for pod in pods:
            pod.start()
        yield pods
    finally:
        for pod in pods:
            pod.stop()
