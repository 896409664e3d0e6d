"""A config file the proxy cannot use: refused by field, never with its values (a URL may hold a
password), and a broken file (not even YAML) leaves the watcher running for the next one."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import yaml
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.fakes import FakeBackend

from gpuproxy_proxy.cli import main
from gpuproxy_proxy.runtime import RUNTIME

SECRET = "s3cret-Pa55"


async def _refused(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while True:
        lines = [r.getMessage() for r in caplog.records if "ignoring invalid config" in
                 r.getMessage()]
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, "the invalid file was never read"
        await asyncio.sleep(0.02)


async def test_refused_files_never_log_their_values_and_the_watcher_survives(
    tmp_path: Path, backends: list[FakeBackend], make_proxy: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="gpuproxy_proxy.reload")
    a = await FakeBackend("a").start()
    backends.append(a)
    config = proxy_config([a], reload={"interval_seconds": 0.05})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    client = await make_proxy(config, config_path=path)

    path.write_text(f"backends: [{{name: b, url: 'http://user:{SECRET}@10.0.0.1:8000'}}]\n",
                    encoding="utf-8")
    first = (await _refused(caplog, 1))[0]
    assert "backends.0" in first
    assert "credentials" in first
    assert SECRET not in caplog.text

    path.write_text(f"backends: [{{name: b, url: http://x}}\n  password: {SECRET}: [\n",
                    encoding="utf-8")
    second = (await _refused(caplog, 2))[1]
    assert "not valid YAML at line" in second
    assert SECRET not in caplog.text

    # Still watching: a good file afterwards applies.
    path.write_text(yaml.safe_dump(proxy_config(
        [a], reload={"interval_seconds": 0.05},
        load_balancing={"strategy": "equal_weighted"}).model_dump(mode="json")),
        encoding="utf-8")
    deadline = time.monotonic() + 30
    while client.app[RUNTIME].generation < 2:
        assert time.monotonic() < deadline, "the valid file after the broken ones never applied"
        await asyncio.sleep(0.02)
    assert client.app[RUNTIME].pool.strategy == "equal_weighted"


def test_the_cli_names_the_field_of_a_bad_file_without_its_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"backends: [{{name: b, url: 'http://user:{SECRET}@10.0.0.1:8000'}}]\n",
                    encoding="utf-8")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "backends.0" in err
    assert SECRET not in err
    path.write_text(f"password: {SECRET}: [\n", encoding="utf-8")
    assert main(["--config", str(path)]) == 2  # a YAML error, not a traceback
    err = capsys.readouterr().err
    assert "not valid YAML at line" in err
    assert SECRET not in err
