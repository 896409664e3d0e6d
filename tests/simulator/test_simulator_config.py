"""Simulator configuration: file plus CLI overrides, frozen, validated."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gpuproxy_proxy.simulator.__main__ import config_overrides, parse_args
from gpuproxy_proxy.simulator.config import load_config


def test_file_values_and_cli_overrides_merge(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("served_model_names: [file-model]\nlora_adapters: [a1]\n"
                    "engine:\n  max_num_seqs: 8\n  block_size: 32\n", encoding="utf-8")
    args = parse_args(["--port", "0", "--config", str(path), "--max-num-seqs", "3",
                       "--time-scale", "0.5"])
    config = load_config(args.config, config_overrides(args))
    assert config.served_model_names == ("file-model",)
    assert config.lora_adapters == ("a1",)
    assert (config.engine.max_num_seqs, config.engine.block_size) == (3, 32)
    assert config.time_scale == 0.5
    with pytest.raises(ValidationError):
        config.time_scale = 1.0  # type: ignore[misc]


def test_unknown_or_invalid_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    path.write_text('{"engine": {"max_num_seqs": 0}}', encoding="utf-8")
    with pytest.raises(ValidationError):
        load_config(path, {})
    with pytest.raises(ValidationError):
        load_config(None, {"slots": 4})
