"""Proxy subprocesses for lifecycle tests: the real CLI from a config file, its admin port
polled with generous deadlines, raw HTTP/1.1 on one kept-alive connection, stopped by PID."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from tests.proxy.fakes import wait_ready

from gpuproxy_proxy.config import ProxyConfig


def write_config(path: Path, config: ProxyConfig) -> None:
    """Replace the file in one rename, as a ConfigMap update does (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    host: str
    port: int
    admin_port: int
    log_path: Path
    admin_api_port: int | None = None  # listen.admin_api_port, when the config opens one

    @property
    def admin(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    @property
    def admin_api(self) -> str:
        """The admin API's own listener (key management), never the client port."""
        assert self.admin_api_port, "this proxy's config opens no listen.admin_api_port"
        return f"http://{self.host}:{self.admin_api_port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.get(
            self.admin + path, timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            return resp.status, await resp.json()

    async def stats(self) -> dict[str, Any]:
        return (await self.get("/stats"))[1]  # type: ignore[no-any-return]

    async def wait_for(self, check: Callable[[dict[str, Any]], bool], what: str,
                       timeout: float = 90.0) -> dict[str, Any]:
        """Poll /stats until `check` holds (a loaded machine may need many seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stats = await self.stats()
            except (aiohttp.ClientError, TimeoutError):
                stats = {}
            if stats and check(stats):
                return stats
            assert self.proc.returncode is None, f"proxy exited while waiting for: {what}"
            assert time.monotonic() < deadline, f"{what}; last /stats: {stats}"
            await asyncio.sleep(0.1)

    async def wait_not_ready(self, timeout: float = 60.0) -> None:
        """Poll /ready (cheap: no worker is asked) until it answers 503."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(self.admin + "/ready") as resp:
                    if resp.status == 503:
                        return
                assert time.monotonic() < deadline, "never reported not ready"
                await asyncio.sleep(0.02)

    async def wait_generation(self, generation: int) -> None:
        """Every worker runs config generation >= `generation`."""
        await self.wait_for(
            lambda s: len(s["per_worker"]) == s["workers_expected"] and all(
                (w["config_generation"] or 0) >= generation for w in s["per_worker"]),
            f"not every worker reloaded to generation {generation}")

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def start_proxy(config_path: Path, config: ProxyConfig, log_path: Path,
                      env: Mapping[str, str] | None = None) -> ProxyProcess:
    """Start `gpuproxy-proxy --config` (its own workers setting) and wait until ready."""
    write_config(config_path, config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(config_path),
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stderr=log_path.open("w"))
    handle = ProxyProcess(proc, config.listen.host, config.listen.port,
                          config.listen.admin_port, log_path, config.listen.admin_api_port)
    try:
        await wait_ready(handle.admin, proc)
    except BaseException:
        await handle.stop()
        raise
    return handle


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """One client connection kept alive across requests; fails loudly if the server drops it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.requests = 0

    @classmethod
    async def open(cls, host: str, port: int,
                   tls: ssl.SSLContext | None = None) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        return cls(reader, writer)

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Mapping[str, str] | None = None,
                      timeout: float = 60.0, head_only: bool = False) -> Answer:
        """Send a request and read the answer (only its head with `head_only`)."""
        lines = [f"{method} {path} HTTP/1.1", "Host: proxy", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = await asyncio.wait_for(self._read_answer(head_only), timeout)
        self.requests += 1
        return answer

    async def _read_answer(self, head_only: bool) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        if head_only:
            return Answer(int(status_line.split()[1]), headers, b"")
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if not size:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.read()
        return Answer(int(status_line.split()[1]), headers, body)

    async def wait_closed_by_server(self, timeout: float) -> float:
        """Seconds until the server closes this (idle) connection."""
        started = time.monotonic()
        data = await asyncio.wait_for(self.reader.read(), timeout)
        assert data == b"", data
        return time.monotonic() - started

    def close(self) -> None:
        self.writer.close()
