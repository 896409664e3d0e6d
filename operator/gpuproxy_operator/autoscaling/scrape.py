"""Concurrent reads of `connections_active` from each proxy pod's admin `/stats`, each with its
own timeout, so one slow pod (or cluster) never delays another."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from gpuproxy_operator.autoscaling.policy import PodSample

DEFAULT_TIMEOUT = 2.0
# /stats of a pod with many workers is a few KiB; anything far larger is not our proxy.
MAX_BODY_BYTES = 1 << 20


class Pod(Protocol):
    """What the scraper needs of a pod (kube.PodInfo fits)."""

    @property
    def name(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def ready(self) -> bool: ...
    @property
    def phase(self) -> str: ...
    @property
    def terminating(self) -> bool: ...
    @property
    def deletion_cost(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class ScrapeResult:
    """Samples for the policy plus, per unreadable pod, why (for the Scaling message)."""

    samples: tuple[PodSample, ...]
    errors: dict[str, str]


def counted(pod: Pod) -> bool:
    """Pods that are gone or going (Succeeded/Failed, or being deleted: a deletionTimestamp)
    take no part, as in the HPA: their clients are moving to the other pods."""
    return not pod.terminating and pod.phase not in ("Succeeded", "Failed")


async def read_connections(
    session: aiohttp.ClientSession, url: str, per_pod_timeout: float
) -> int:
    """`connections_active` from one /stats URL; raises ValueError/aiohttp errors/TimeoutError."""
    async with asyncio.timeout(per_pod_timeout):
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            raw = await resp.content.read(MAX_BODY_BYTES + 1)
            if len(raw) > MAX_BODY_BYTES:
                raise ValueError("response too large")
    body = json.loads(raw)
    value = body.get("connections_active") if isinstance(body, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("no non-negative integer connections_active in /stats")
    return value


async def scrape(
    session: aiohttp.ClientSession,
    pods: Sequence[Pod],
    admin_port: int,
    per_pod_timeout: float = DEFAULT_TIMEOUT,
) -> ScrapeResult:
    """Read every ready pod at once; unready or unreadable pods become samples without a value
    (the policy treats them as missing: idle when not ready, at the target when unanswered)."""
    live = [p for p in pods if counted(p)]
    errors: dict[str, str] = {}

    async def one(pod: Pod) -> PodSample:
        if not pod.ready or not pod.ip:
            errors[pod.name] = "not ready" if pod.ip else "no IP yet"
            return PodSample(pod.name, None, ready=False)
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        try:
            value = await read_connections(session, f"http://{host}:{admin_port}/stats",
                                           per_pod_timeout)
        except TimeoutError:
            errors[pod.name] = f"/stats timed out after {per_pod_timeout:g}s"
            return PodSample(pod.name, None)
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            errors[pod.name] = f"/stats unreadable: {exc or type(exc).__name__}"
            return PodSample(pod.name, None)
        return PodSample(pod.name, value)

    samples = await asyncio.gather(*(one(p) for p in live))
    return ScrapeResult(tuple(samples), errors)
