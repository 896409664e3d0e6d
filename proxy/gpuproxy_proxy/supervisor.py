"""workers > 1: a supervisor process starts N workers that share the client port (SO_REUSEPORT),
restarts crashed ones, and serves the admin port with the sum of the workers' numbers, which it
reads from each worker's status socket in a private temp dir."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from gpuproxy_proxy.config import ProxyConfig
from gpuproxy_proxy.server import admin_socket
from gpuproxy_proxy.status import UnixSource, build_status_app

log = logging.getLogger("gpuproxy.supervisor")

_RESTART_DELAY_SECONDS = 1.0


class Supervisor:
    def __init__(self, config: ProxyConfig, config_path: Path, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = workers
        self.draining = False
        self.stopping = asyncio.Event()
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="gpuproxy-"))
        self.paths = [self.dir / f"worker-{i}.sock" for i in range(workers)]

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        self.paths[index].unlink(missing_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(self.config_path),
            "--worker-index", str(index), "--status-socket", str(self.paths[index]),
            "--parent-pid", str(os.getpid()),
        )
        self.procs[index] = proc
        return proc

    async def _keep_running(self, index: int) -> None:
        while True:
            proc = await self._spawn(index)
            code = await proc.wait()
            if self.draining:
                return
            log.error("worker %d (pid %d) exited with %s; restarting", index, proc.pid, code)
            await asyncio.sleep(_RESTART_DELAY_SECONDS)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        sources = [UnixSource(path) for path in self.paths]
        runner = web.AppRunner(build_status_app(sources, lambda: self.draining),
                               handle_signals=False, access_log=None)
        await runner.setup()
        await web.SockSite(runner, admin_socket(self.config)).start()
        keepers = [asyncio.create_task(self._keep_running(i)) for i in range(self.workers)]
        log.info("supervisor serving admin port %d with %d workers on port %d",
                 self.config.listen.admin_port, self.workers, self.config.listen.port)
        try:
            await self.stopping.wait()
            await self._drain(keepers)
        finally:
            await runner.cleanup()
            for source in sources:
                await source.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _drain(self, keepers: list[asyncio.Task[None]]) -> None:
        self.draining = True  # /ready answers 503 from now on
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        limits = self.config.limits
        deadline = limits.drain_delay_seconds + limits.shutdown_grace_seconds + 15.0
        _done, pending = await asyncio.wait(keepers, timeout=deadline)
        for proc in self.procs.values():
            if proc.returncode is None:
                log.error("worker pid %d did not drain in time; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        log.info("all workers stopped")
