"""The platform's node-tuning DaemonSet as reconcile sees it: read at most once per TTL for all
clusters together, so NodeTuningReady says whether the nodes are tuned, not only that the chart
installed the DaemonSet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuproxy_operator import kube

# Node tuning changes rarely (a chart upgrade, nodes joining): one read per half minute keeps a
# converged operator nearly silent, and the resync or any child event refreshes the condition.
TTL_SECONDS = 30.0


@dataclass(frozen=True)
class TuningSeen:
    """One read of the DaemonSet: its body, or why it could not be read."""

    daemonset: dict[str, Any] | None = None
    missing: bool = False  # 404: the chart says it installed one, but it is not there
    error: str | None = None  # any other failure (RBAC, the API server): status unknown


@dataclass
class NodeTuningProbe:
    """Reads `<namespace>/<name>` (the chart's GPUPROXY_NODE_TUNING) through the TTL cache."""

    ref: str
    ttl: float = TTL_SECONDS
    clock: Callable[[], float] = time.monotonic
    _seen: TuningSeen | None = None
    _at: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def observe(self, api: kube.KubeClient) -> TuningSeen:
        async with self._lock:  # concurrent reconciles share one read
            if self._seen is not None and self.clock() - self._at < self.ttl:
                return self._seen
            namespace, _, name = self.ref.partition("/")
            try:
                seen = TuningSeen(daemonset=await api.get("DaemonSet", namespace, name))
            except kube.NotFound:
                seen = TuningSeen(missing=True)
            except kube.KubeError as exc:
                seen = TuningSeen(error=str(exc))
            self._seen, self._at = seen, self.clock()
            return seen
