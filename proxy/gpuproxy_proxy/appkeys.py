"""Typed application keys shared by the proxy's modules."""

from __future__ import annotations

from aiohttp import web

from gpuproxy_proxy.config import ProxyConfig, Secrets
from gpuproxy_proxy.observability.metrics import ProxyMetrics

CONFIG = web.AppKey("config", ProxyConfig)
SECRETS = web.AppKey("secrets", Secrets)
METRICS = web.AppKey("metrics", ProxyMetrics)
