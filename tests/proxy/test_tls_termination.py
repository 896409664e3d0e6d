"""TLS termination on real proxy processes: HTTPS only on the client port (TLS 1.2+, ECDHE+AEAD,
ALPN http/1.1, no compression), the admin port plain; a rotated Secret volume reaches new
handshakes while open keep-alive connections go on; a bad rotation keeps the old pair; a bad
pair at start is refused naming the field."""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import generate_latest
from pydantic import ValidationError
from tests.proxy.certs import Pair, TestCa, TlsSecretVolume, serial_of
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import ProxyProcess, RawConnection, start_proxy

from gpuproxy_proxy.config import ProxyConfig, TlsConfig
from gpuproxy_proxy.http import tls
from gpuproxy_proxy.observability.metrics import ProxyMetrics

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("ca"))


def _config(backends: list[FakeBackend], volume: TlsSecretVolume, **overrides: Any) -> ProxyConfig:
    tls = {"cert_file": volume.cert_file, "key_file": volume.key_file,
           **overrides.pop("tls", {})}
    return proxy_config(backends, listen={"host": "127.0.0.1", "port": free_port(),
                                          "admin_port": free_port(), "tls": tls},
                        reload={"interval_seconds": 0.1}, **overrides)


async def _start(tmp_path: Path, backends: list[FakeBackend], volume: TlsSecretVolume,
                 **overrides: Any) -> ProxyProcess:
    backends.append(await FakeBackend("gpu").start())
    return await start_proxy(tmp_path / "proxy.yaml", _config(backends, volume, **overrides),
                             tmp_path / "proxy.log")


async def _served_serial(proxy: ProxyProcess, ca: TestCa) -> int:
    """The serial a new connection is handed, after one request answered over it."""
    conn = await RawConnection.open(proxy.host, proxy.port, ca.client_context())
    try:
        assert (await conn.request("POST", CHAT, b"{}")).status == 200
        return serial_of(conn.writer.get_extra_info("peercert"))
    finally:
        conn.close()


async def _until_serial(proxy: ProxyProcess, ca: TestCa, serial: int, runs: int = 1,
                        timeout: float = 60.0) -> None:
    """`runs` new connections in a row see `serial` (every worker has reloaded)."""
    deadline, streak, seen = time.monotonic() + timeout, 0, None
    while streak < runs:
        seen = await _served_serial(proxy, ca)
        streak = streak + 1 if seen == serial else 0
        assert time.monotonic() < deadline, f"new connections still get serial {seen}"
        if streak == 0:
            await asyncio.sleep(0.05)


async def _reload_count(proxy: ProxyProcess, result: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    pattern = rf'^gpuproxy_tls_certificate_reloads_total{{result="{result}"}} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, text, re.M))


async def _expiry(proxy: ProxyProcess) -> float:
    async with aiohttp.ClientSession() as http, http.get(proxy.admin + "/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^gpuproxy_tls_certificate_expiry_timestamp_seconds (\S+)$", text, re.M)
    assert found is not None, "no certificate expiry exported"
    return float(found.group(1))


async def _until_count(proxy: ProxyProcess, result: str, at_least: float) -> None:
    deadline = time.monotonic() + 60.0
    while await _reload_count(proxy, result) < at_least:
        assert time.monotonic() < deadline, f"tls reloads {result} never reached {at_least}"
        await asyncio.sleep(0.05)


async def _handshake_refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), 30)
    except (ssl.SSLError, ConnectionError):
        return True
    writer.close()
    return False


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_client_port_is_https_only_with_modern_tls(
        tmp_path: Path, backends: list[FakeBackend], ca: TestCa) -> None:
    volume = TlsSecretVolume(tmp_path / "tls")
    volume.update(**vars(ca.issue(1)))
    proxy = await _start(tmp_path, backends, volume)
    try:
        client = ca.client_context()
        client.set_alpn_protocols(["h2", "http/1.1"])
        conn = await RawConnection.open(proxy.host, proxy.port, client)
        for _ in range(2):  # kept alive over TLS
            assert (await conn.request("POST", CHAT, b"{}")).status == 200
        tls = conn.writer.get_extra_info("ssl_object")
        assert tls.selected_alpn_protocol() == "http/1.1"  # never h2: the front end is 1.1
        assert tls.compression() is None
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # No session tickets: they could only resume on the process that issued them.
        assert tls.session is None or not tls.session.has_ticket
        conn.close()

        # Plain HTTP on the client port gets no HTTP answer, only a failed handshake.
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n"
                     b"\r\n{}")
        data = await asyncio.wait_for(reader.read(), 30)
        assert b"HTTP/1." not in data
        writer.close()

        old = ca.client_context(maximum_version=ssl.TLSVersion.TLSv1_1)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so the client offers TLS 1.1 at all
        assert await _handshake_refused(proxy.port, old)
        for weak in ("AES128-GCM-SHA256",  # no forward secrecy (RSA key exchange)
                     "ECDHE-ECDSA-AES128-SHA"):  # CBC, no AEAD
            legacy = ca.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
            legacy.set_ciphers(weak)
            assert await _handshake_refused(proxy.port, legacy), weak
        strong = ca.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
        strong.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        assert not await _handshake_refused(proxy.port, strong)
        status, _ = await proxy.get("/ready")  # the kubelet's probes: plain HTTP, admin port
        assert status == 200
    finally:
        await proxy.stop()


async def test_tls13_only_and_the_handshake_timeout(
        tmp_path: Path, backends: list[FakeBackend], ca: TestCa) -> None:
    volume = TlsSecretVolume(tmp_path / "tls")
    volume.update(**vars(ca.issue(1)))
    proxy = await _start(tmp_path, backends, volume,
                         tls={"min_version": "1.3", "handshake_timeout_seconds": 1})
    try:
        tls12 = ca.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
        assert await _handshake_refused(proxy.port, tls12)
        assert await _served_serial(proxy, ca) == 1
        # A connection that never starts its handshake is not held for long: before it ends,
        # it counts for no limit (cap, keep-alive sweep).
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 60) == b""
        assert time.monotonic() - started >= 0.9
        writer.close()
    finally:
        await proxy.stop()


async def test_rotation_reaches_new_connections_and_keeps_open_ones(
        tmp_path: Path, backends: list[FakeBackend], ca: TestCa) -> None:
    volume = TlsSecretVolume(tmp_path / "tls")
    volume.update(**vars(ca.issue(1)))
    proxy = await _start(tmp_path, backends, volume, workers=2)
    try:
        kept = [await RawConnection.open(proxy.host, proxy.port, ca.client_context())
                for _ in range(4)]  # over both workers, most likely
        for conn in kept:
            assert (await conn.request("POST", CHAT, b"{}")).status == 200
        volume.update(**vars(ca.issue(2, rsa=True)))  # a new key type too: cert-manager may
        await _until_serial(proxy, ca, 2, runs=8)
        # The rotated context has the same settings: ALPN http/1.1, TLS 1.2 floor, no tickets.
        client = ca.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
        client.set_alpn_protocols(["h2", "http/1.1"])
        fresh = await RawConnection.open(proxy.host, proxy.port, client)
        assert (await fresh.request("POST", CHAT, b"{}")).status == 200
        tls_object = fresh.writer.get_extra_info("ssl_object")
        assert tls_object.selected_alpn_protocol() == "http/1.1"
        assert tls_object.cipher()[0].startswith("ECDHE-RSA-")  # the new RSA certificate
        assert tls_object.session is None or not tls_object.session.has_ticket
        fresh.close()
        for conn in kept:  # the same TLS sessions, still serving after the rotation
            assert (await conn.request("POST", CHAT, b"{}")).status == 200
            assert serial_of(conn.writer.get_extra_info("peercert")) == 1
            conn.close()
        assert await _reload_count(proxy, "reloaded") == 2  # one per worker
        # The certificates are valid for 2 days: the pod exports the served one's notAfter
        # (the earliest over its workers), for an alert before a failed renewal bites.
        assert abs(await _expiry(proxy) - (time.time() + 2 * 86400)) < 3 * 3600
        assert await _reload_count(proxy, "error") == 0
    finally:
        await proxy.stop()


async def test_bad_rotation_keeps_the_previous_pair(
        tmp_path: Path, backends: list[FakeBackend], ca: TestCa) -> None:
    volume = TlsSecretVolume(tmp_path / "tls")
    first, second, third = ca.issue(1), ca.issue(2), ca.issue(3)
    volume.update(**vars(first))
    proxy = await _start(tmp_path, backends, volume)
    try:
        kept = await RawConnection.open(proxy.host, proxy.port, ca.client_context())
        assert (await kept.request("POST", CHAT, b"{}")).status == 200
        bad = [Pair(second.cert, first.key),  # mismatched key
               Pair(second.cert[: len(second.cert) // 2], second.key),  # half written
               Pair(second.cert, ca.encrypted_key(second)),  # needs a passphrase
               Pair(b"", b"")]  # emptied
        for errors, pair in enumerate(bad, start=1):
            volume.update(**vars(pair))
            await _until_count(proxy, "error", errors)
            assert await _served_serial(proxy, ca) == 1
        assert (await kept.request("POST", CHAT, b"{}")).status == 200
        assert proxy.proc.returncode is None
        volume.update(**vars(third))  # a good pair afterwards is taken
        await _until_serial(proxy, ca, 3)
        logged = [line for line in proxy.log_lines()
                  if "TLS certificate not reloaded" in line.get("msg", "")]
        assert len(logged) == len(bad), logged
        assert "encrypted private key" in logged[2]["msg"]
        assert all("BEGIN" not in line["msg"] for line in logged)  # no key material
        kept.close()
    finally:
        await proxy.stop()


async def test_sigterm_closes_idle_tls_connections_cleanly(
        tmp_path: Path, backends: list[FakeBackend], ca: TestCa) -> None:
    """The drain's idle closes on TLS: a close_notify and EOF (no half-close exists in TLS),
    never a reset; then the process exits."""
    volume = TlsSecretVolume(tmp_path / "tls")
    volume.update(**vars(ca.issue(1)))
    proxy = await _start(tmp_path, backends, volume,
                         limits={"drain_delay_seconds": 0, "idle_close_seconds": 0.5})
    try:
        idle = [await RawConnection.open(proxy.host, proxy.port, ca.client_context())
                for _ in range(3)]
        for conn in idle:
            assert (await conn.request("POST", CHAT, b"{}")).status == 200
        proxy.proc.send_signal(signal.SIGTERM)
        for conn in idle:
            await conn.wait_closed_by_server(60)  # b"" after close_notify, not ECONNRESET
            conn.close()
        assert await asyncio.wait_for(proxy.proc.wait(), 60) == 0
    finally:
        await proxy.stop()


def test_bad_pair_at_start_is_refused_naming_the_field(tmp_path: Path, ca: TestCa) -> None:
    volume = TlsSecretVolume(tmp_path / "tls")
    one, two = ca.issue(1), ca.issue(2)
    volume.update(one.cert, two.key)
    config = _config([], volume)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    cases = [(config, "listen.tls.key_file"),
             (config.model_copy(update={"listen": config.listen.model_copy(update={
                 "tls": config.listen.tls.model_copy(update={  # type: ignore[union-attr]
                     "cert_file": str(tmp_path / "absent.crt")})})}), "listen.tls.cert_file")]
    for case, field in cases:
        path.write_text(yaml.safe_dump(case.model_dump(mode="json")))
        done = subprocess.run([sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert field in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def test_tls_config_refuses_old_versions() -> None:
    for bad in ({"min_version": "1.1"}, {"cert_file": ""}, {"ciphers": "ALL"}):
        tls = {"cert_file": "/c", "key_file": "/k", **bad}
        with pytest.raises(ValidationError):
            ProxyConfig.model_validate({"listen": {"tls": tls}})


def test_a_pair_swapped_again_while_read_is_retried(
        tmp_path: Path, ca: TestCa, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = ca.issue(1), ca.issue(2)
    volume = TlsSecretVolume(tmp_path / "tls")
    volume.update(**vars(first))
    terminator = tls.TlsTerminator(
        TlsConfig(cert_file=volume.cert_file, key_file=volume.key_file), lambda: 1.0)
    volume.update(second.cert, first.key)  # a writer that is not atomic: the cert first
    read = tls.read_pair

    def racing(config: TlsConfig) -> tuple[bytes, bytes]:
        pair = read(config)
        volume.update(**vars(second))  # ... and the key while the proxy reads
        return pair

    monkeypatch.setattr(tls, "read_pair", racing)
    assert not terminator.check()  # the mismatched pair is refused
    monkeypatch.setattr(tls, "read_pair", read)
    assert terminator.check()  # the next poll takes the good pair: no further change needed
    assert terminator.current is not terminator.context


def test_a_plain_proxy_exports_no_certificate_expiry() -> None:
    metrics = ProxyMetrics()
    assert b"gpuproxy_tls_certificate_expiry" not in generate_latest(metrics.registry)
    metrics.track_tls_expiry(lambda: 1.5e9)
    assert b"gpuproxy_tls_certificate_expiry_timestamp_seconds 1.5e+09" in generate_latest(
        metrics.registry)
