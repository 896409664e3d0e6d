"""Runs the engine in real time: maps wall clock to simulated time and feeds tokens to requests.

Simulated time advances by the engine's iteration durations while it is busy (so loop lag on a
loaded machine does not leak into reported TTFTs) and jumps to the wall clock when it is idle.
Wall seconds = simulated seconds * time_scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from gpuproxy_proxy.simulator.engine import Engine, SequenceRequest, TokenEvent
from gpuproxy_proxy.simulator.metrics import SimulatorMetrics


class EngineDriver:
    """Owns the engine loop task; each submitted request gets a queue of its TokenEvents."""

    def __init__(self, engine: Engine, metrics: SimulatorMetrics, time_scale: float) -> None:
        self.engine = engine
        self._metrics = metrics
        self._time_scale = time_scale
        self._origin = time.monotonic()
        self._clock = 0.0  # simulated time, never behind the last iteration's end
        self._busy_until: float | None = None
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _wall_now(self) -> float:
        return (time.monotonic() - self._origin) / self._time_scale

    def now(self) -> float:
        """Simulated now: the wall clock, clamped into the iteration in progress."""
        wall = max(self._clock, self._wall_now())
        return wall if self._busy_until is None else min(wall, self._busy_until)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="simulator-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, request: SequenceRequest) -> asyncio.Queue[TokenEvent]:
        """Queues the request (may raise RequestTooLarge); events arrive on the returned queue."""
        self.engine.submit(request, self.now())
        stream: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._wake.set()
        return stream

    def release(self, request_id: str) -> None:
        """The client is done or gone: abort it in the engine if it is still there."""
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort(request_id)

    async def _run(self) -> None:
        chained = False  # True while iterations follow each other without an idle gap
        while True:
            start = self._clock if chained else max(self._clock, self._wall_now())
            end = self.engine.begin_iteration(start) if self.engine.has_work() else None
            if end is None:
                chained = False
                self._wake.clear()
                await self._wake.wait()
                continue
            self._busy_until = end
            # Behind schedule (loaded machine): no sleep, simulated time still advances by `end`.
            await asyncio.sleep(max(self._origin + end * self._time_scale - time.monotonic(), 0.0))
            self._clock = end
            self._busy_until = None
            chained = True
            self._deliver(self.engine.finish_iteration())

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            if event.ttft_seconds is not None:
                self._metrics.ttft.observe(event.ttft_seconds)
            if event.e2e_seconds is not None:
                self._metrics.e2e.observe(event.e2e_seconds)
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.put_nowait(event)
                if event.finished:
                    del self._streams[event.request_id]
