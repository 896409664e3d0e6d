"""`python -m gpuproxy_proxy.simulator --port P [--config FILE] [--model NAME] ...`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpuproxy_proxy.simulator.app import serve
from gpuproxy_proxy.simulator.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gpuproxy_proxy.simulator",
                                     description="A simulated vLLM-like inference server.")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--config", type=Path, help="YAML or JSON SimulatorConfig")
    parser.add_argument("--model", action="append", dest="served_model_names",
                        help="served model name (repeatable; the first labels the metrics)")
    parser.add_argument("--lora", action="append", dest="lora_adapters",
                        help="LoRA adapter name listed in /v1/models (repeatable)")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--num-gpu-blocks", type=int)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--prefill-tokens-per-second", type=float)
    parser.add_argument("--decode-interval-seconds", type=float)
    parser.add_argument("--default-max-tokens", type=int)
    parser.add_argument("--time-scale", type=float,
                        help="wall seconds per simulated second (0.1 = 10x faster)")
    return parser.parse_args(argv)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that are SimulatorConfig/EngineConfig fields (unset ones are None)."""
    return {key: value for key, value in vars(args).items()
            if key not in ("port", "host", "config")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, config_overrides(args))
    except (OSError, ValueError, ValidationError) as exc:
        print(f"gpuproxy-simulator: bad configuration: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
