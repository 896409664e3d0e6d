"""Secrets from files (mounted Kubernetes Secret keys, else environment variables), read at
start and polled: a rotated JWT secret, admin token, database credentials or Redis password
goes to the component that uses it, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, SECRETS
from gpuproxy_proxy.auth.authenticator import AUTHENTICATOR
from gpuproxy_proxy.auth.revocations import REVOCATIONS
from gpuproxy_proxy.config import SecretFilesConfig, Secrets
from gpuproxy_proxy.database.pool import DB_POOL
from gpuproxy_proxy.limits.ratelimit import RATE_LIMITER
from gpuproxy_proxy.reload import file_signature
from gpuproxy_proxy.runtime import RUNTIME

log = logging.getLogger("gpuproxy.secrets")

FIELDS = ("jwt_secret", "admin_token", "db_user", "db_password", "redis_password")


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read secret file %s (%s); keeping the previous value", path, exc)
        return None
    # A file written by hand ends with a newline; Kubernetes Secret data usually does not.
    return text.removesuffix("\n").removesuffix("\r") or None


def read_secrets(files: SecretFilesConfig, env: Mapping[str, str] | None = None,
                 previous: Secrets | None = None) -> Secrets:
    """Files over environment variables; an unreadable file keeps `previous`'s value."""
    secrets = previous or Secrets.from_env(dict(env) if env is not None else None)
    update: dict[str, str | None] = {}
    for name in FIELDS:
        path = getattr(files, name)
        if path is not None and (value := _read(Path(path))) is not None:
            update[name] = value
    return secrets.model_copy(update=update)


def _signatures(files: SecretFilesConfig) -> dict[str, tuple[int, int, int] | None]:
    return {name: file_signature(Path(path)) for name in FIELDS
            if (path := getattr(files, name)) is not None}


def apply_secrets(app: web.Application, old: Secrets, new: Secrets) -> None:
    """Hand each changed secret to the component that uses it (values are never logged)."""
    changed = [name for name in FIELDS if getattr(old, name) != getattr(new, name)]
    if not changed:
        return
    log.warning("secret files changed: %s", ", ".join(changed))
    if (auth := app.get(AUTHENTICATOR)) is not None:
        if "jwt_secret" in changed:
            auth.rotate_jwt_secret(new.jwt_secret)
        if "admin_token" in changed:
            auth.set_admin_token(new.admin_token)
    if (db := app.get(DB_POOL)) is not None and ("db_user" in changed
                                                  or "db_password" in changed):
        db.set_credentials(new.db_user, new.db_password)
    if (limiter := app.get(RATE_LIMITER)) is not None and "redis_password" in changed:
        limiter.set_redis_password(new.redis_password)
    if (feed := app.get(REVOCATIONS)) is not None and "redis_password" in changed:
        feed.set_password(new.redis_password)


async def _watch(app: web.Application, files: SecretFilesConfig) -> None:
    current = app[SECRETS]
    seen = _signatures(files)
    while True:
        # Polled like the config file: a Secret volume is swapped by symlink too.
        await asyncio.sleep(app[RUNTIME].config.reload.interval_seconds)
        now = _signatures(files)
        if now == seen:
            continue
        seen = now
        new = read_secrets(files, previous=current)
        apply_secrets(app, current, new)
        current = new


async def secrets_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after the services that use secrets): watches `secret_files`, if any. It
    runs even with `reload.enabled: false`: a rotated secret must never be missed."""
    files = app[CONFIG].secret_files
    task = None
    if any(getattr(files, name) is not None for name in FIELDS):
        task = asyncio.create_task(_watch(app, files), name="secret-files")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
