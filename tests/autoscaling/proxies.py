"""Real `gpuproxy-proxy` processes on distinct loopback addresses (127.0.0.x), standing in for
proxy pods, and client connections held open against them."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROXY_BIN = Path(sys.executable).with_name("gpuproxy-proxy")
START_SECONDS = 90


def free_port_on(addresses: list[str]) -> int:
    """A port below the ephemeral range that is free on every address."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        socks = []
        try:
            for addr in addresses:
                s = socket.socket()
                socks.append(s)
                s.bind((addr, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port on " + ", ".join(addresses))


@dataclass
class ProxyProcess:
    """One proxy "pod": its address, ports and process."""

    ip: str
    port: int
    admin_port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    clients: list[socket.socket] = field(default_factory=list)

    def start(self) -> None:
        config = self.workdir / f"proxy-{self.ip}.yaml"
        config.write_text(json.dumps({
            "listen": {"host": self.ip, "port": self.port, "admin_port": self.admin_port},
            "workers": 1,
            "backends": [],
            "auth": {"enabled": False},
            "rate_limits": {"enabled": False},
            "metering": {"enabled": False},
            "logging": {"level": "WARNING"},
        }))
        log = (self.workdir / f"proxy-{self.ip}.log").open("ab")
        self.process = subprocess.Popen(  # our own proxy binary, fixed arguments
            [str(PROXY_BIN), "--config", str(config)], stdout=log, stderr=log)
        # Generous: four Python processes starting at once on a loaded 2-core machine.
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy on {self.ip} exited: see {log.name}")
            with contextlib.suppress(OSError):
                self.stats()
                return
            time.sleep(0.1)
        raise RuntimeError(f"proxy on {self.ip} did not serve /stats within {START_SECONDS} s")

    def stop(self) -> None:
        self.close_clients()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def stats(self) -> dict[str, object]:
        url = f"http://{self.ip}:{self.admin_port}/stats"
        with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
            body: dict[str, object] = json.load(resp)
        return body

    def open_clients(self, count: int) -> None:
        for _ in range(count):
            self.clients.append(socket.create_connection((self.ip, self.port), timeout=30))

    def close_clients(self) -> None:
        for s in self.clients:
            s.close()
        self.clients.clear()

    def wait_for_connections(self, expected: int, timeout: float = 60) -> None:
        """The proxy counts a connection once its loop accepted it: wait for that."""
        deadline = time.monotonic() + timeout
        seen: object = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # a slow /stats answer is retried, not fatal
                seen = self.stats().get("connections_active")
                if seen == expected:
                    return
            time.sleep(0.05)
        raise AssertionError(f"{self.ip}: {seen} connections, expected {expected}")
