"""Builds the simulator's aiohttp application and serves it on a port."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from gpuproxy_proxy.simulator import openai_api
from gpuproxy_proxy.simulator.config import SimulatorConfig
from gpuproxy_proxy.simulator.driver import EngineDriver
from gpuproxy_proxy.simulator.engine import Engine
from gpuproxy_proxy.simulator.metrics import SimulatorMetrics


def build_app(config: SimulatorConfig) -> web.Application:
    """One simulated server: its own engine, driver and metrics registry."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    engine = Engine(config.engine)
    metrics = SimulatorMetrics(config.model_name, engine.stats)
    app[openai_api.CONFIG] = config
    app[openai_api.METRICS] = metrics

    async def run_driver(app: web.Application) -> AsyncIterator[None]:
        driver = EngineDriver(engine, metrics, config.time_scale)
        app[openai_api.DRIVER] = driver
        driver.start()
        yield
        await driver.stop()

    app.cleanup_ctx.append(run_driver)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_get("/v1/models", openai_api.models)
    app.router.add_get("/health", openai_api.health)
    app.router.add_get("/metrics", openai_api.metrics)
    return app


async def start_server(config: SimulatorConfig, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Starts one server (port 0 picks a free one); returns its runner and the bound port."""
    # Handler cancellation: a client that hangs up must free its slot and KV blocks at once.
    runner = web.AppRunner(build_app(config), access_log=None, handle_signals=False,
                           handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])


async def serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Serves until SIGINT/SIGTERM; prints one ready line with the bound port."""
    runner, bound_port = await start_server(config, host, port)
    names = ",".join((*config.served_model_names, *config.lora_adapters))
    print(f"gpuproxy-simulator ready on http://{host}:{bound_port} models={names}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
