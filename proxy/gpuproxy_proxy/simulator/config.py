"""Frozen configuration of the simulated inference server, parsed once from a file and CLI flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """Capacity and speed of the simulated engine.

    Defaults loosely follow vLLM serving an 8B model on one A100: ~8k prompt tokens/s of prefill,
    ~15 ms per decode step at batch 1, growing ~1% per extra running sequence (~25 ms at 64).
    The KV cache is small on purpose (2048 blocks x 16 tokens = 32k tokens) so pressure shows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(default=64, ge=1)
    num_gpu_blocks: int = Field(default=2048, ge=1)
    block_size: int = Field(default=16, ge=1)
    max_model_len: int = Field(default=8192, ge=2)
    prefill_tokens_per_second: float = Field(default=8000.0, gt=0)
    prefill_overhead_seconds: float = Field(default=0.01, ge=0)
    decode_interval_seconds: float = Field(default=0.015, gt=0)
    decode_slowdown_per_seq: float = Field(default=0.01, ge=0)


class SimulatorConfig(BaseModel):
    """Everything one simulated server needs; `time_scale` is wall seconds per simulated second."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    served_model_names: tuple[str, ...] = Field(default=("sim-llama-3-8b",), min_length=1)
    lora_adapters: tuple[str, ...] = ()
    engine: EngineConfig = EngineConfig()
    default_max_tokens: int = Field(default=128, ge=1)
    chars_per_token: int = Field(default=4, ge=1)
    time_scale: float = Field(default=1.0, gt=0)

    @property
    def model_name(self) -> str:
        """The name vLLM puts in the `model_name` metric label: the first served name."""
        return self.served_model_names[0]


def load_config(path: Path | None, overrides: dict[str, Any]) -> SimulatorConfig:
    """Reads YAML or JSON (optional), applies non-None overrides (engine keys nested), validates."""
    data: dict[str, Any] = {}
    if path is not None:
        text = path.read_text(encoding="utf-8")
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the top level must be a mapping")
            data = dict(loaded)
    engine_fields = set(EngineConfig.model_fields)
    engine_data = dict(data.get("engine") or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in engine_fields:
            engine_data[key] = value
        else:
            data[key] = value
    data["engine"] = engine_data
    return SimulatorConfig.model_validate(data)
