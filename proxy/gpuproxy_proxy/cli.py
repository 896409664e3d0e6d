"""`gpuproxy-proxy`: run the proxy from a config file (one process or N workers), or `--demo`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gpuproxy_proxy.auth.secretfiles import read_secrets
from gpuproxy_proxy.config import ProxyConfig, describe_config_error, load_config
from gpuproxy_proxy.http.tls import CertificateError, load_pair, read_pair, server_context
from gpuproxy_proxy.observability.logging import setup_logging
from gpuproxy_proxy.process.server import (
    ListenError,
    raise_nofile_limit,
    serve_single,
    serve_worker,
)

T = TypeVar("T")
log = logging.getLogger("gpuproxy.cli")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]; argparse names the flag when it is not."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuproxy-proxy",
        description="OpenAI-compatible GPU inference proxy (asyncio, httptools).",
    )
    p.add_argument("--config", type=Path, help="YAML config file (the operator's ConfigMap)")
    p.add_argument("--workers", type=_bounded_int(1, 256),
                   help="worker processes (overrides `workers`)")
    p.add_argument("--demo", action="store_true",
                   help="run with built-in simulated GPU backends; nothing else needed")
    p.add_argument("--self-test", action="store_true",
                   help="with --demo: send a few requests, print the results and exit")
    p.add_argument("--port", type=_bounded_int(1, 65535),
                   help="with --demo: client port (default 8080)")
    p.add_argument("--admin-port", type=_bounded_int(1, 65535),
                   help="with --demo: admin port (default 9090)")
    # Internal: how the supervisor starts its workers.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--status-socket", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat-fd", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ListenError, CertificateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if (args.self_test or args.port or args.admin_port) and not args.demo:
        print("error: --self-test, --port and --admin-port go with --demo; a config file sets "
              "listen.port and listen.admin_port", file=sys.stderr)
        return 2
    if args.demo and args.workers not in (None, 1):
        print("note: the demo runs one worker process; --workers is ignored", file=sys.stderr)
    if args.demo:
        from gpuproxy_proxy.demo import run_demo

        return run(run_demo(args.port, args.admin_port, args.self_test))
    if args.config is None:
        print("error: --config PATH is required (or try --demo)", file=sys.stderr)
        return 2
    try:
        config: ProxyConfig = load_config(args.config)
    except (OSError, ValueError) as exc:
        print(describe_config_error(args.config, exc), file=sys.stderr)
        return 2
    if args.workers is not None:
        config = config.model_copy(update={"workers": args.workers})
    if config.listen.tls is not None and args.worker_index is None:
        # Refused before any worker starts, with the field to fix.
        load_pair(server_context(config.listen.tls), *read_pair(config.listen.tls))
    setup_logging(config.logging, args.worker_index)
    limit = raise_nofile_limit()
    secrets = read_secrets(config.secret_files)
    if args.worker_index is not None:
        assert args.status_socket is not None
        assert args.parent_pid is not None
        run(serve_worker(config, secrets, args.config, args.worker_index, args.status_socket,
                         args.parent_pid, args.heartbeat_fd))
        return 0
    log.info("open files limit %d", limit)
    if config.workers == 1:
        run(serve_single(config, secrets, args.config))
        return 0
    from gpuproxy_proxy.process.supervisor import Supervisor

    run(Supervisor(config, args.config, config.workers).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
