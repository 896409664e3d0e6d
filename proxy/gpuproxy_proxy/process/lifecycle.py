"""The SIGTERM drain of one worker process, independent of the HTTP server that holds the
connections: not ready at once, keep serving for the drain delay, stop accepting, close idle
keep-alive connections spread over time, let the rest finish until the grace deadline, cut.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gpuproxy_proxy.config import LimitsConfig
from gpuproxy_proxy.runtime import Runtime

log = logging.getLogger("gpuproxy.lifecycle")

# How often the drain looks for connections that went idle after a response that began before
# SIGTERM (later ones say `Connection: close` and close themselves). Each look scans every
# open connection, so not too often.
_SWEEP_SECONDS = 0.2
# Idle connections are closed in batches at most this often (each batch one loop turn).
_MIN_TICK_SECONDS = 0.01

Conn = TypeVar("Conn")


class ProcessLifecycle:
    """/health and /ready of a process that serves clients itself (workers == 1, or one
    worker's status socket): alive while its loop answers; ready from the moment its client
    port is open until it starts draining. Dependencies play no part (dependencies.py)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ok", "pid": os.getpid()}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        r = self.runtime
        ok = r.serving and not r.draining
        return ok, {"ready": ok, "serving": r.serving, "draining": r.draining,
                    "config_generation": r.generation}


class ConnectionSet(Protocol[Conn]):
    """What the drain needs from the server that accepts and holds client connections."""

    async def stop_accepting(self) -> None:
        """Close the listening socket(s); open connections stay."""

    def open_count(self) -> int:
        """Connections still open."""

    def idle(self) -> Sequence[Conn]:
        """A snapshot of the connections waiting for their next request."""

    def close_if_idle(self, conn: Conn) -> bool:
        """Close `conn` when it is (still) idle; True when it was closed."""

    async def close_all(self) -> None:
        """End every connection left, requests in progress included."""


@dataclass(frozen=True, slots=True)
class DrainPlan:
    delay: float  # keep accepting this long after SIGTERM (endpoints stop routing here)
    idle_close: float  # spread the closing of idle keep-alive connections over this long
    grace: float  # from SIGTERM: what is still running then is cut

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> DrainPlan:
        return cls(limits.drain_delay_seconds, limits.idle_close_seconds,
                   limits.shutdown_grace_seconds)


@dataclass(slots=True)
class DrainReport:
    idle_closed: int = 0
    cut: int = 0
    seconds: float = 0.0


async def drain(conns: ConnectionSet[Conn], plan: DrainPlan) -> DrainReport:
    """Run the drain phases; the caller has already marked the process as draining."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + plan.grace
    report = DrainReport()
    await asyncio.sleep(min(plan.delay, plan.grace))
    await conns.stop_accepting()
    log.info("drain: stopped accepting; %d connections open", conns.open_count())
    report.idle_closed = await _close_idle_gradually(conns, plan.idle_close, deadline)
    while conns.open_count() and loop.time() < deadline:
        for conn in conns.idle():  # a stream that began before SIGTERM finished keep-alive
            if conns.close_if_idle(conn):
                report.idle_closed += 1
        await asyncio.sleep(min(_SWEEP_SECONDS, max(0.0, deadline - loop.time())))
    report.cut = conns.open_count()
    if report.cut:
        log.warning("drain: grace period (%.1fs) over; cutting %d connections",
                    plan.grace, report.cut)
    await conns.close_all()
    report.seconds = loop.time() - started
    return report


async def _close_idle_gradually(conns: ConnectionSet[Conn], spread: float,
                                deadline: float) -> int:
    """Close the connections idle now, evenly over `spread` seconds. The pauses are relative
    (sleep after each batch), so a stalled loop makes the closing slower, never a burst."""
    loop = asyncio.get_running_loop()
    idle = list(conns.idle())
    if not idle:
        return 0
    tick = max(_MIN_TICK_SECONDS, spread / len(idle)) if spread > 0 else 0.0
    batch = len(idle) if not tick else max(1, math.ceil(len(idle) * tick / spread))
    closed = 0
    for start in range(0, len(idle), batch):
        if loop.time() >= deadline:
            break
        closed += sum(conns.close_if_idle(conn) for conn in idle[start:start + batch])
        if tick and start + batch < len(idle):
            await asyncio.sleep(min(tick, max(0.0, deadline - loop.time())))
    return closed
