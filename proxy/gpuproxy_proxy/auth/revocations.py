"""Pushed revocations: a revoke publishes the key's hash on a Redis channel, and every worker of
every pod, subscribed to it, evicts the key from its cache when the message arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.auth.apikeys import ApiKey, ApiKeyStore
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR
from gpuproxy_proxy.config import RedisConfig
from gpuproxy_proxy.observability.metrics import ProxyMetrics

log = logging.getLogger(__name__)

CHANNEL = "gpuproxy:revocations"
# Publishing waits this long at most: the admin call answers, and the TTL still bounds.
_TIMEOUT_SECONDS = 2.0
# A silent link (a partition sends no RST) is noticed by unanswered pings.
_PING_SECONDS = 5.0
# Longest the subscriber's and publisher's connections get to close at shutdown.
_CLOSE_SECONDS = 5.0
_SILENT_SECONDS = 3 * _PING_SECONDS
_READ_SECONDS = 1.0
_BACKOFF_MIN_SECONDS = 0.25
_BACKOFF_MAX_SECONDS = 10.0
_FAILURES = (RedisError, OSError, TimeoutError, ValueError)


def _pool(config: RedisConfig, password: str | None, retries: int) -> aioredis.ConnectionPool:
    return aioredis.ConnectionPool.from_url(
        config.url, password=password, max_connections=2,
        socket_timeout=_TIMEOUT_SECONDS, socket_connect_timeout=_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), retries),
    )


def _publisher(config: RedisConfig, password: str | None) -> aioredis.Redis:
    # One retry: after a Redis restart the pooled connection is dead, a new one is not.
    return aioredis.Redis(connection_pool=_pool(config, password, retries=1))


class RevocationFeed:
    """One subscriber task per process; reconnects with backoff while Redis is away."""

    def __init__(self, config: RedisConfig, password: str | None, store: ApiKeyStore,
                 metrics: ProxyMetrics | None = None) -> None:
        self._config = config
        self._password = password
        self._store = store
        self._publisher = _publisher(config, password)
        self._task: asyncio.Task[None] | None = None
        self._session: asyncio.Task[None] | None = None
        self._session_subscribed = False
        self._closing: set[asyncio.Task[None]] = set()
        self.subscribed = False
        self._received = None if metrics is None else metrics.api_key_revocations_received
        self._published = None if metrics is None else {
            result: metrics.api_key_revocations_published.labels(result)
            for result in ("ok", "failed")
        }
        self._up = None if metrics is None else metrics.api_key_revocation_feed_up
        self._subscriptions = (
            None if metrics is None else metrics.api_key_revocation_subscriptions
        )
        store.revocation_listeners.append(self.publish)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="revocation-feed")

    async def publish(self, record: ApiKey, digest: bytes) -> None:
        """The store's revocation listener; a failure is logged, never raised."""
        message = json.dumps({"id": record.id, "hash": digest.hex()})
        try:
            async with asyncio.timeout(_TIMEOUT_SECONDS):
                receivers = await self._publisher.publish(CHANNEL, message)
        except _FAILURES as exc:
            if self._published is not None:
                self._published["failed"].inc()
            log.warning("could not publish the revocation of API key %s (%s: %s); other "
                        "processes stop accepting it when their cache entry expires",
                        record.id, type(exc).__name__, exc)
            return
        if self._published is not None:
            self._published["ok"].inc()
        log.info("API key revocation published", extra={"key_id": record.id,
                                                        "receivers": receivers})

    def set_password(self, password: str | None) -> None:
        """A rotated Redis password: publish and subscribe again with it."""
        self._password = password
        old, self._publisher = self._publisher, _publisher(self._config, password)
        task = asyncio.create_task(old.aclose(close_connection_pool=True))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        if self._session is not None:
            self._session.cancel()  # _run subscribes again at once, with the new password

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN_SECONDS
        warned = False
        while True:
            self._session_subscribed = False
            self._session = asyncio.create_task(self._subscribe(), name="revocation-session")
            try:
                await self._session
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # closing
                continue  # a password change
            except Exception as exc:  # whatever it was: a dead subscriber would go unnoticed
                if self._session_subscribed:
                    backoff, warned = _BACKOFF_MIN_SECONDS, False  # an outage starts now
                if not warned:
                    log.warning("revocation channel unavailable (%s: %s); until it is back, a "
                                "key revoked elsewhere works here until its cache entry "
                                "expires", type(exc).__name__, exc)
                    warned = True
            # Jittered: after a Redis restart every worker of every pod reconnects.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311
            backoff = min(backoff * 2, _BACKOFF_MAX_SECONDS)

    async def _subscribe(self) -> None:
        # No silent reconnect: each new subscription must be seen, since messages sent while
        # there was none are lost (see _subscribed).
        pool = _pool(self._config, self._password, retries=0)
        pubsub = aioredis.Redis(connection_pool=pool).pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            loop = asyncio.get_running_loop()
            last_heard = last_ping = loop.time()
            while True:
                message = await pubsub.get_message(timeout=_READ_SECONDS)
                now = loop.time()
                if message is not None:
                    last_heard = now
                    self._handle(message)
                if now - last_ping >= _PING_SECONDS:
                    await pubsub.ping()
                    last_ping = now
                if now - last_heard > _SILENT_SECONDS:
                    raise TimeoutError(f"no answer from Redis for {now - last_heard:.0f} s")
        finally:
            self._set_subscribed(False)
            with contextlib.suppress(*_FAILURES, TimeoutError):
                async with asyncio.timeout(_CLOSE_SECONDS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(*_FAILURES, TimeoutError):
                async with asyncio.timeout(_CLOSE_SECONDS):
                    await pool.disconnect()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._subscribed()
        elif kind == "message":
            try:
                data = json.loads(message["data"])
                digest = bytes.fromhex(data["hash"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignored a malformed message on %s", CHANNEL)
                return
            self._store.evict(digest)
            if self._received is not None:
                self._received.inc()

    def _subscribed(self) -> None:
        # Revocations published while this process was not subscribed are lost: every key
        # cached before now is checked against the database again before its next use.
        self._store.expire_cached()
        if self._subscriptions is not None:
            self._subscriptions.inc()
        log.info("subscribed to %s: revocations published from now on take effect here at "
                 "once", CHANNEL)
        self._session_subscribed = True
        self._set_subscribed(True)

    def _set_subscribed(self, up: bool) -> None:
        self.subscribed = up
        if self._up is not None:
            self._up.set(1 if up else 0)

    async def close(self) -> None:
        """Bounded: a wedged Redis socket must not hold up the process's shutdown."""
        with contextlib.suppress(ValueError):
            self._store.revocation_listeners.remove(self.publish)
        pending = set(self._closing)
        if self._task is not None:
            self._task.cancel()
            pending.add(self._task)
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_SECONDS)
        with contextlib.suppress(*_FAILURES, TimeoutError):
            async with asyncio.timeout(_CLOSE_SECONDS):
                await self._publisher.aclose(close_connection_pool=True)


REVOCATIONS = web.AppKey("revocations", RevocationFeed)


async def revocations_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after auth_ctx): with Redis configured, this process's subscriber; without
    it revocations reach other processes only when their cache entries expire."""
    config = app[CONFIG]
    if config.redis is None or not config.auth.enabled:
        yield
        return
    feed = RevocationFeed(config.redis, app[SECRETS].redis_password,
                          app[AUTHENTICATOR].keys, app[METRICS])
    app[REVOCATIONS] = feed
    feed.start()
    try:
        yield
    finally:
        await feed.close()
