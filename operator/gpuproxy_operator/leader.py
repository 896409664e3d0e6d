"""Leader election on a coordination.k8s.io/v1 Lease with client-go's algorithm and defaults
(lease 15 s, renew deadline 10 s, retry 2 s): only the holder runs the operator, followers
answer liveness probes meanwhile. Every write carries the resourceVersion it was computed
from, so two candidates never both win."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp.web

from gpuproxy_operator import kube

log = logging.getLogger("gpuproxy_operator.leader")
LEASE = "Lease"
JITTER = 1.2  # client-go's JitterFactor: followers retry every retry_period..2.2x of it


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    identity: str
    name: str = "gpuproxy-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def problems(self) -> list[str]:
        """client-go's checks: a leader must give up before its lease can be taken."""
        out = []
        if self.lease_duration <= self.renew_deadline:
            out.append("the lease duration must be greater than the renew deadline")
        if self.renew_deadline <= JITTER * self.retry_period:
            out.append(f"the renew deadline must be greater than {JITTER} x the retry period")
        if not self.identity:
            out.append("the identity must not be empty")
        return out


class LeadershipLost(Exception):
    """The lease could not be renewed within the renew deadline."""


def _micro_time(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One candidate. `acquire` waits for the lease, `hold` renews it until stopped (or raises
    LeadershipLost), `release` hands it over at once on a clean shutdown."""

    def __init__(self, client: kube.KubeClient, config: LeaseConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.config, self._clock = client, config, clock
        self.is_leader = False
        self.holder: str | None = None  # as last observed
        self._record: dict[str, Any] | None = None  # the Lease's spec as last observed
        self._version: str | None = None
        self._observed_at = 0.0  # when the record last changed (our clock, not theirs)

    def _spec(self, *, acquire: bool, release: bool = False) -> dict[str, Any]:
        old = self._record or {}
        now = _micro_time(datetime.datetime.now(datetime.UTC))
        mine = old.get("holderIdentity") == self.config.identity
        return {
            "holderIdentity": "" if release else self.config.identity,
            "leaseDurationSeconds": 1 if release else max(1, round(self.config.lease_duration)),
            "acquireTime": old.get("acquireTime", now) if mine and not acquire else now,
            "renewTime": now,
            "leaseTransitions": int(old.get("leaseTransitions") or 0) + (0 if mine else 1),
        }

    def _observe(self, lease: dict[str, Any]) -> None:
        spec = dict(lease.get("spec") or {})
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if spec != self._record or version != self._version:
            self._record, self._version = spec, version
            self._observed_at = self._clock()
        self.holder = spec.get("holderIdentity") or None

    async def _write(self, spec: dict[str, Any]) -> bool:
        """Patch the Lease if it is still the version we observed (409 otherwise)."""
        cfg = self.config
        try:
            lease = await self.client.patch(LEASE, cfg.namespace, cfg.name, {
                "metadata": {"resourceVersion": self._version}, "spec": spec})
        except kube.KubeError as exc:
            log.debug(f"lease {cfg.namespace}/{cfg.name} not written: {exc}")
            return False
        self._observe(lease)
        return True

    async def try_acquire_or_renew(self) -> bool:
        """client-go's tryAcquireOrRenew: renew optimistically while we hold a valid lease,
        else read it and take it if it is free, ours or expired. A failed call changes
        nothing (`hold` retries until its deadline); only another valid holder demotes us."""
        cfg = self.config
        valid = self._clock() - self._observed_at < cfg.lease_duration
        if self.is_leader and valid and self._version and await self._write(
                self._spec(acquire=False)):
            return True
        try:
            lease = await self.client.get(LEASE, cfg.namespace, cfg.name)
        except kube.NotFound:
            return await self._create()
        except kube.KubeError as exc:
            log.debug(f"lease {cfg.namespace}/{cfg.name} not readable: {exc}")
            return False
        self._observe(lease)
        duration = float((self._record or {}).get("leaseDurationSeconds") or cfg.lease_duration)
        if (self.holder not in (None, cfg.identity)
                and self._clock() - self._observed_at < duration):
            self.is_leader = False
            return False  # held by someone else and not expired
        if await self._write(self._spec(acquire=self.holder != cfg.identity)):
            self.is_leader = True
            return True
        return False

    async def _create(self) -> bool:
        cfg = self.config
        self._record, self._version = None, None
        try:
            lease = await self.client.create({
                "apiVersion": "coordination.k8s.io/v1", "kind": LEASE,
                "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": {**self._spec(acquire=True), "leaseTransitions": 0}})
        except kube.KubeError as exc:
            log.debug(f"lease {cfg.namespace}/{cfg.name} not created: {exc}")
            return False
        self._observe(lease)
        self.is_leader = True
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Retry every retry period (jittered) until leader (True) or `stop` is set (False)."""
        cfg = self.config
        announced = None
        while not stop.is_set():
            if await self.try_acquire_or_renew():
                log.info(f"{cfg.identity} became the leader (lease {cfg.namespace}/{cfg.name})")
                return True
            if self.holder != announced:
                announced = self.holder
                log.info(f"waiting for lease {cfg.namespace}/{cfg.name}, held by {self.holder}")
            delay = cfg.retry_period * (1 + random.random() * JITTER)  # noqa: S311  # jitter
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew every retry period until `stop` is set; LeadershipLost when no renewal has
        succeeded for the renew deadline (the lease may be taken renew-lease seconds later)."""
        cfg = self.config
        renewed = self._clock()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.retry_period)
            if stop.is_set():
                return
            left = renewed + cfg.renew_deadline - self._clock()
            ok = False
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    ok = await asyncio.wait_for(self.try_acquire_or_renew(), left)
            if ok:
                renewed = self._clock()
            elif self._clock() - renewed >= cfg.renew_deadline or not self.is_leader:
                self.is_leader = False
                raise LeadershipLost(f"{cfg.identity} could not renew lease {cfg.namespace}/"
                                     f"{cfg.name} within {cfg.renew_deadline:g}s"
                                     + (f" (now held by {self.holder})" if self.holder
                                        not in (None, cfg.identity) else ""))

    async def release(self) -> None:
        """Give the lease up (holder "", 1 s), so a follower takes over at its next retry."""
        if not self.is_leader:
            return
        self.is_leader = False
        if await self._write(self._spec(acquire=False, release=True)):
            log.info(f"{self.config.identity} released lease {self.config.namespace}/"
                     f"{self.config.name}")


async def keep(elector: LeaderElector, fence: Callable[[str], None], stop: asyncio.Event
               ) -> str | None:
    """Renew until `stop` is set (None); on a lost lease, `fence` every writer at once, set
    `stop` and return why."""
    try:
        await elector.hold(stop)
    except Exception as exc:  # LeadershipLost, or a bug: either way we may not write on
        reason = str(exc) or type(exc).__name__
        fence(reason)
        log.error(f"{reason}: stopping (the kubelet restarts the pod as a follower)")
        stop.set()
        return reason
    return None


async def serve_follower_liveness(endpoint: str, elector: LeaderElector
                                  ) -> aiohttp.web.AppRunner:
    """The liveness endpoint while waiting for the lease (kopf serves it once leader)."""
    parts = urllib.parse.urlsplit(endpoint)

    async def health(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"leader": False, "holder": elector.holder})

    app = aiohttp.web.Application()
    app.add_routes([aiohttp.web.get(parts.path or "/", health)])
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, parts.hostname or "localhost", parts.port or 80).start()
    return runner
