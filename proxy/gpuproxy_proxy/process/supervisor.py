"""workers > 1: a supervisor process starts N workers that share the client port (SO_REUSEPORT),
restarts the ones that exit or stop sending heartbeats, and serves the admin port: /health and
/ready from the heartbeats, /stats and /metrics summed over the workers' status sockets."""

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
from typing import Any

from aiohttp import web

from gpuproxy_proxy.config import BackendConfig, ProxyConfig, load_config
from gpuproxy_proxy.observability.logging import reconfigure_logging
from gpuproxy_proxy.observability.status import UnixSource, build_status_app
from gpuproxy_proxy.process.heartbeat import WorkerSlot, beat_interval
from gpuproxy_proxy.process.server import admin_socket
from gpuproxy_proxy.reload import effective_config, file_signature
from gpuproxy_proxy.routing.discovered import all_backends
from gpuproxy_proxy.routing.discovery import SNAPSHOT_NAME as DISCOVERY_SNAPSHOT
from gpuproxy_proxy.routing.discovery import DiscoveryWatcher
from gpuproxy_proxy.routing.discovery import file_publisher as write_discovered
from gpuproxy_proxy.routing.scraper import SNAPSHOT_NAME, SignalScraper, file_publisher

log = logging.getLogger("gpuproxy.supervisor")

_RESTART_DELAY_SECONDS = 1.0
_RESTART_DELAY_MAX_SECONDS = 30.0
# Beyond the drain itself: a worker's cleanup (metering flush) before it is killed.
_DRAIN_MARGIN_SECONDS = 15.0


class Supervisor:
    def __init__(self, config: ProxyConfig, config_path: Path, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = workers
        self.draining = False
        self.stopping = asyncio.Event()
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.slots = [WorkerSlot(i) for i in range(workers)]
        self.dir = Path(tempfile.mkdtemp(prefix="gpuproxy-"))
        self.paths = [self.dir / f"worker-{i}.sock" for i in range(workers)]
        self.discovered: list[BackendConfig] = []

    @property
    def heartbeat_timeout(self) -> float:
        return self.config.limits.worker_heartbeat_timeout_seconds

    def _snapshots(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        return [slot.snapshot(now, self.heartbeat_timeout) for slot in self.slots]

    # --- the admin port's view (status.Lifecycle) -------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """Fails while a worker is hung beyond the heartbeat timeout (until it is replaced) or
        a worker slot keeps crashing; never while draining (the kubelet would kill the drain)."""
        workers = self._snapshots()
        failing = [w for w in workers if w["state"] in ("hung", "crashloop")]
        ok = self.draining or not failing
        return ok, {"status": "ok" if ok else "failing", "pid": os.getpid(),
                    "failing_workers": [{"index": w["index"], "state": w["state"]}
                                        for w in failing],
                    "workers": workers}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when not draining and every worker beats as serving."""
        workers = self._snapshots()
        serving = sum(1 for w in workers if w["state"] == "ok")
        ok = not self.draining and serving == self.workers
        return ok, {"ready": ok, "draining": self.draining, "workers_expected": self.workers,
                    "workers_ready": serving, "workers": workers}

    # --- workers -----------------------------------------------------------------------------
    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        self.paths[index].unlink(missing_ok=True)
        slot = self.slots[index]
        beat_fd = slot.open_pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gpuproxy_proxy.cli", "--config", str(self.config_path),
                "--worker-index", str(index), "--status-socket", str(self.paths[index]),
                "--parent-pid", str(os.getpid()), "--heartbeat-fd", str(beat_fd),
                pass_fds=(beat_fd,),
            )
        finally:
            os.close(beat_fd)  # the child has its copy; EOF on ours means it is gone
        slot.started(proc.pid, asyncio.get_running_loop().time())
        self.procs[index] = proc
        return proc

    async def _keep_running(self, index: int) -> None:
        slot = self.slots[index]
        loop = asyncio.get_running_loop()
        while True:
            proc = await self._spawn(index)
            code = await proc.wait()
            slot.exited(code, loop.time())
            if self.draining:
                return
            slot.restarts += 1
            # Back off while it keeps failing: 1, 2, 4 ... 30 s.
            delay = min(_RESTART_DELAY_SECONDS * 2 ** max(0, len(slot.exits) - 1),
                        _RESTART_DELAY_MAX_SECONDS)
            log.error("worker %d (pid %d) exited with %s; restarting in %.0fs", index, proc.pid,
                      code, delay)
            await asyncio.sleep(delay)

    async def _watch_heartbeats(self) -> None:
        """Kill a worker that stopped beating; its keeper starts a new one. Other workers and
        their connections are not touched."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = self.heartbeat_timeout
            await asyncio.sleep(beat_interval(timeout))
            if self.draining:
                return  # the drain deadline ends a worker that does not finish
            now = loop.time()
            for slot in self.slots:
                proc = self.procs.get(slot.index)
                if proc is None or proc.returncode is not None or not slot.overdue(now, timeout):
                    continue
                silent = now - (slot.last_beat if slot.last_beat is not None
                                else slot.spawned_at)
                log.error("worker %d (pid %d) sent no heartbeat for %.1fs (limit %gs): "
                          "killing it", slot.index, proc.pid, silent, timeout)
                slot.hang_kills += 1
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # SIGKILL works on a stopped process too

    async def _watch_config(self) -> None:
        """The supervisor's own settings (heartbeat timeout, drain timing, log level) follow
        the config file like the workers' do; an invalid file is the workers' to report."""
        seen = file_signature(self.config_path)
        while True:
            await asyncio.sleep(self.config.reload.interval_seconds)
            current = file_signature(self.config_path)
            if current is None or current == seen:
                continue
            seen = current
            try:
                new = effective_config(self.config, load_config(self.config_path))
            except (OSError, ValueError):
                continue
            if new.logging != self.config.logging:
                reconfigure_logging(new.logging)
            self.config = new

    def _discovered(self, backends: list[BackendConfig]) -> None:
        self.discovered = backends
        write_discovered(self.dir / DISCOVERY_SNAPSHOT)(backends)

    def _scraped_config(self) -> ProxyConfig:
        if not self.discovered:
            return self.config
        return self.config.model_copy(
            update={"backends": all_backends(self.config, self.discovered)})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        sources = [UnixSource(path) for path in self.paths]
        runner = web.AppRunner(build_status_app(sources, self), handle_signals=False,
                               access_log=None)
        await runner.setup()
        await web.SockSite(runner, admin_socket(self.config)).start()
        keepers = [asyncio.create_task(self._keep_running(i)) for i in range(self.workers)]
        watchers = [asyncio.create_task(self._watch_heartbeats(), name="heartbeats")]
        # Engine signals once per pod, not per worker: the workers read this file.
        scraper = SignalScraper(self._scraped_config, file_publisher(self.dir / SNAPSHOT_NAME))
        watchers.append(asyncio.create_task(scraper.run(), name="signals-scrape"))
        if self.config.discovery.sources:
            # EndpointSlices watched once per pod too: the workers follow backends.json.
            discovery = DiscoveryWatcher(self.config.discovery, self._discovered)
            watchers.append(asyncio.create_task(discovery.run(), name="discovery-watch"))
        if self.config.reload.enabled:
            watchers.append(asyncio.create_task(self._watch_config(), name="config-watch"))
        log.info("supervisor serving admin port %d with %d workers on port %d",
                 self.config.listen.admin_port, self.workers, self.config.listen.port)
        try:
            await self.stopping.wait()
            await self._drain(keepers)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await runner.cleanup()
            for source in sources:
                await source.close()
            for slot in self.slots:
                slot.close_pipe()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _drain(self, keepers: list[asyncio.Task[None]]) -> None:
        self.draining = True  # /ready answers 503 from now on
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        limits = self.config.limits
        deadline = (max(limits.drain_delay_seconds, limits.shutdown_grace_seconds)
                    + _DRAIN_MARGIN_SECONDS)
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
