"""Engine signals of one backend (queue, running, KV-cache use, prefix-cache counters, models)
parsed from its Prometheus text and /v1/models, and the JSON snapshot the pod's workers share.

Times are `time.monotonic()`: CLOCK_MONOTONIC is one clock for every process of the host, so
a worker can age a signal its supervisor scraped, and a wall-clock jump cannot.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Sample name -> (engine, field). Counters appear with and without the _total suffix (the
# text format has both spellings in the wild). vLLM renamed gpu_cache_usage_perc to
# kv_cache_usage_perc (v0.10 exports both; the new one wins, see _PREFERRED).
_SAMPLES: dict[str, tuple[str, str]] = {
    "vllm:num_requests_waiting": ("vllm", "waiting"),
    "vllm:num_requests_running": ("vllm", "running"),
    "vllm:kv_cache_usage_perc": ("vllm", "kv_usage"),
    "vllm:gpu_cache_usage_perc": ("vllm", "kv_usage_old"),
    "vllm:prefix_cache_hits_total": ("vllm", "prefix_hits"),
    "vllm:prefix_cache_hits": ("vllm", "prefix_hits"),
    "vllm:prefix_cache_queries_total": ("vllm", "prefix_queries"),
    "vllm:prefix_cache_queries": ("vllm", "prefix_queries"),
    "vllm:gpu_prefix_cache_hits_total": ("vllm", "prefix_hits_old"),
    "vllm:gpu_prefix_cache_hits": ("vllm", "prefix_hits_old"),
    "vllm:gpu_prefix_cache_queries_total": ("vllm", "prefix_queries_old"),
    "vllm:gpu_prefix_cache_queries": ("vllm", "prefix_queries_old"),
    "sglang:num_queue_reqs": ("sglang", "waiting"),
    "sglang:num_running_reqs": ("sglang", "running"),
    "sglang:token_usage": ("sglang", "kv_usage"),
    "sglang:cache_hit_rate": ("sglang", "hit_rate"),
    "tgi_queue_size": ("tgi", "waiting"),
    "tgi_batch_current_size": ("tgi", "running"),
}
_PREFIXES = tuple({name.split(":")[0] + ":" if ":" in name else "tgi_" for name in _SAMPLES})
# Old names only count when the new one is absent.
_PREFERRED = (("kv_usage", "kv_usage_old"), ("prefix_hits", "prefix_hits_old"),
              ("prefix_queries", "prefix_queries_old"))
# A KV-cache use or hit rate is a fraction: per-engine series (data parallel) are averaged.
_MEANS = frozenset({"kv_usage", "kv_usage_old", "hit_rate"})


class MetricsFormatError(ValueError):
    """A /metrics answer that is not Prometheus text with the engine's numbers."""


@dataclass(frozen=True, slots=True)
class BackendSignals:
    """What one scrape of one backend said; None fields were not reported."""

    scraped_at: float = 0.0  # monotonic; 0 = never (only a model list, or nothing)
    engine: str | None = None
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    prefix_hits: float | None = None  # cumulative counters (tokens)
    prefix_queries: float | None = None
    # Share of queried prompt tokens served from the prefix cache between the last two
    # scrapes (SGLang reports it directly).
    prefix_hit_rate: float | None = None
    models: tuple[str, ...] | None = None  # ids from /v1/models (LoRA adapters included)
    models_at: float = 0.0
    error: str | None = None

    def fresh(self, now: float, max_age: float) -> bool:
        return self.scraped_at > 0.0 and now - self.scraped_at <= max_age

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = None if self.models is None else list(self.models)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackendSignals:
        models = data.get("models")
        return cls(**{**data, "models": None if models is None else tuple(models)})


def parse_metrics(text: str, scraped_at: float,
                  previous: BackendSignals | None = None) -> BackendSignals:
    """The engine fields of a Prometheus text page (vLLM, SGLang or TGI names). Strict on the
    lines it uses (a value that is not a number is an error), blind to every other line, so a
    big histogram page costs one prefix test per line."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    engine: str | None = None
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        brace = line.find("{")
        if brace >= 0:
            name = line[:brace]
            end = line.rfind("}")
            if end < brace:
                raise MetricsFormatError(f"unbalanced labels in {name!r}")
            rest = line[end + 1:].split()
        else:
            name, *rest = line.split()
        known = _SAMPLES.get(name)
        if known is None:
            continue
        if not rest:
            raise MetricsFormatError(f"{name!r} has no value")
        try:
            value = float(rest[0])
        except ValueError:
            raise MetricsFormatError(f"{name!r} has a value that is not a number") from None
        if not math.isfinite(value):
            continue
        engine, field = known
        sums[field] = sums.get(field, 0.0) + value
        counts[field] = counts.get(field, 0) + 1
    if engine is None:
        raise MetricsFormatError("no vLLM, SGLang or TGI load metrics on the page")
    values = {f: (v / counts[f] if f in _MEANS else v) for f, v in sums.items()}
    for new, old in _PREFERRED:
        if new not in values and old in values:
            values[new] = values[old]
    hits, queries = values.get("prefix_hits"), values.get("prefix_queries")
    rate = values.get("hit_rate")
    if rate is None and previous is not None and hits is not None and queries is not None \
            and previous.prefix_hits is not None and previous.prefix_queries is not None:
        asked = queries - previous.prefix_queries
        rate = (hits - previous.prefix_hits) / asked if asked > 0 else previous.prefix_hit_rate
    base = previous or BackendSignals()
    return replace(base, scraped_at=scraped_at, engine=engine, waiting=values.get("waiting"),
                   running=values.get("running"), kv_usage=values.get("kv_usage"),
                   prefix_hits=hits, prefix_queries=queries, prefix_hit_rate=rate, error=None)


def parse_models(payload: bytes) -> tuple[str, ...]:
    """Model ids of an OpenAI /v1/models answer (vLLM lists LoRA adapters there too)."""
    data = json.loads(payload)
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError("no data list")
    return tuple(sorted({item["id"] for item in items
                         if isinstance(item, dict) and isinstance(item.get("id"), str)}))


# --- the pod's snapshot file (supervisor -> workers) -----------------------------------------

def write_snapshot(path: Path, signals: dict[str, BackendSignals]) -> None:
    """Replace the file in one rename: a worker reads the old or the new snapshot, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({name: s.to_json() for name, s in signals.items()}),
                   encoding="utf-8")
    os.replace(tmp, path)


def read_snapshot(path: Path) -> dict[str, BackendSignals]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: BackendSignals.from_json(entry) for name, entry in data.items()}
