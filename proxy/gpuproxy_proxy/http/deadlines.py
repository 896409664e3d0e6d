"""Client-side deadlines of the lean front end: the rest of a request head, a request body (a
total bound and a minimum rate) and writes to a client that stopped reading, each on a shared
timer wheel (http/timers.py) holding only the connections in that state; and the connection's
side of them (DeadlineHooks, a base of http/protocol.py's HttpConnection)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from gpuproxy_proxy.config import LimitsConfig
from gpuproxy_proxy.http.timers import DeadlineSweep
from gpuproxy_proxy.observability.metrics import ProxyMetrics

if TYPE_CHECKING:
    from gpuproxy_proxy.http.frontend import Frontend
    from gpuproxy_proxy.http.protocol import HttpConnection
    from gpuproxy_proxy.http.request import Request

log = logging.getLogger("gpuproxy.http")

PHASES = ("head", "body", "write")
# Which read deadline watches a connection (DeadlineHooks._reading).
NOT_READING, HEAD, BODY = 0, 1, 2


def _body_wheel_timeout(limits: LimitsConfig) -> float:
    # With a rate, bodies are looked at from the end of the grace period on, every tick.
    total = limits.body_read_timeout_seconds
    if limits.body_min_bytes_per_second:
        return min(total, limits.body_min_rate_grace_seconds)
    return total


class ClientDeadlines:
    """One process's three wheels; a connection calls `watch`/`unwatch` on entering and
    leaving a state, the wheel's callback here decides and ends it."""

    __slots__ = ("_counts", "_grace", "_rate", "_total", "body", "head", "write")

    def __init__(self, limits: LimitsConfig, metrics: ProxyMetrics) -> None:
        self.head: DeadlineSweep[HttpConnection] = DeadlineSweep(
            limits.request_head_timeout_seconds, self._head_expired)
        self.body: DeadlineSweep[HttpConnection] = DeadlineSweep(
            _body_wheel_timeout(limits), self._body_expired)
        self.write: DeadlineSweep[HttpConnection] = DeadlineSweep(
            limits.client_write_timeout_seconds, self._write_expired)
        self._counts = {phase: metrics.client_timeouts.labels(phase) for phase in PHASES}
        self._total = limits.body_read_timeout_seconds
        self._rate = limits.body_min_bytes_per_second
        self._grace = limits.body_min_rate_grace_seconds

    def apply(self, limits: LimitsConfig) -> None:
        """A reload: every waiting connection gets the new deadlines from the next tick."""
        self._total = limits.body_read_timeout_seconds
        self._rate = limits.body_min_bytes_per_second
        self._grace = limits.body_min_rate_grace_seconds
        self.head.set_timeout(limits.request_head_timeout_seconds)
        self.body.set_timeout(_body_wheel_timeout(limits))
        self.write.set_timeout(limits.client_write_timeout_seconds)

    def close(self) -> None:
        self.head.close()
        self.body.close()
        self.write.close()

    # --- the wheels' callbacks: True keeps the connection waiting ---------------------------

    def _head_expired(self, conn: HttpConnection, waited: float) -> bool:
        if conn.read_paused:
            self.head.watch(conn)  # we stopped reading (pipelining), not the client: restart
            return False
        self._end(conn, "head", waited,
                  f"the request head did not arrive within {self.head.timeout:g}s")
        return False

    def _body_expired(self, conn: HttpConnection, waited: float) -> bool:
        if conn.read_paused:
            self.body.watch(conn)
            return False
        total, rate = self._total, self._rate
        received = conn.body_received
        if waited < total and (not rate or received >= rate * (waited - self._grace)):
            return True
        if waited >= total:
            message = f"the request body did not arrive within {total:g}s"
        else:
            message = (f"the request body arrived slower than {rate} bytes/s "
                       f"({received} bytes in {waited:.0f}s)")
        self._end(conn, "body", waited, message)
        return False

    def _end(self, conn: HttpConnection, phase: str, waited: float, message: str) -> None:
        self._counts[phase].inc()
        request_id = conn.read_timed_out(message)
        log.info("client request timed out", extra={
            "request_id": request_id, "phase": phase, "waited_seconds": round(waited, 1),
            "remote": conn.remote})

    def _write_expired(self, conn: HttpConnection, waited: float) -> bool:
        if not conn.write_stalled:
            return False
        self._counts["write"].inc()
        log.info("client stopped reading; connection aborted", extra={
            "request_id": conn.current_request_id, "phase": "write",
            "waited_seconds": round(waited, 1), "remote": conn.remote})
        conn.abort()  # its handler is cancelled, which aborts the backend connection too
        return False


class DeadlineHooks:
    """HttpConnection's side: entering and leaving the wheels, and what their callbacks ask.
    The rest of the state it reads lives in HttpConnection's slots."""

    __slots__ = ("_reading",)
    _server: Frontend
    _parsing: Request | None
    _current: Request | None
    _partial: bool
    _stopped: bool
    _closing: bool
    _lost: bool
    _read_paused: bool
    _write_paused: bool
    transport: asyncio.Transport | None

    def _remote(self) -> str | None:
        raise NotImplementedError

    def _watch_read(self) -> None:
        """A head or body is still arriving after a read: its deadline starts now."""
        if self._stopped or self._closing:
            return
        deadlines = self._server.deadlines
        conn = cast("HttpConnection", self)
        if self._partial:
            self._server.sweep.unwatch(conn)  # past the keep-alive wait, if it was idle
            deadlines.head.watch(conn)
            self._reading = HEAD
        elif self._parsing is not None and not self._parsing.expect_continue:
            # (One waiting for our 100 Continue is not slow: continue_sent starts it.)
            deadlines.body.watch(conn)
            self._reading = BODY

    def continue_sent(self, request: Request) -> None:
        """100 Continue went out: the client's time to send the body starts."""
        if self._parsing is request and not self._reading:
            self._watch_read()

    def _end_read_deadline(self) -> None:
        deadlines = self._server.deadlines
        wheel = deadlines.head if self._reading == HEAD else deadlines.body
        wheel.unwatch(cast("HttpConnection", self))
        self._reading = NOT_READING

    def _watch_flush(self, transport: asyncio.Transport) -> None:
        # A closing transport waits for its buffer to flush: bounded like a paused write.
        wheel = self._server.deadlines.write
        conn = cast("HttpConnection", self)
        if transport.get_write_buffer_size() and conn not in wheel:
            wheel.watch(conn)

    @property
    def read_paused(self) -> bool:
        return self._read_paused

    @property
    def body_received(self) -> int:
        return self._parsing.received if self._parsing is not None else 0

    @property
    def remote(self) -> str | None:
        return self._remote()

    @property
    def current_request_id(self) -> str | None:
        request = self._current or self._parsing
        return request.request_id if request is not None else None

    @property
    def write_stalled(self) -> bool:
        """Still above the high-water mark, or closing with unsent data."""
        transport = self.transport
        if self._lost or transport is None:
            return False
        return self._write_paused or (self._closing and transport.get_write_buffer_size() > 0)
