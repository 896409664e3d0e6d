"""Schema migrations, applied idempotently at start, safe when many processes start at once.

Everything runs in one transaction holding a transaction-scoped advisory lock, which (unlike a
session lock) stays correct through PgBouncer in transaction pooling mode.
"""

from __future__ import annotations

import logging
from typing import Final

import asyncpg

log = logging.getLogger(__name__)

# An arbitrary constant naming "gpuproxy schema migrations" in pg_advisory_xact_lock's key space.
_LOCK_KEY: Final = 0x67707870726F7879 & 0x7FFFFFFFFFFFFFFF

# (version, description, SQL). Append only; never edit an applied migration.
MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (
        1,
        "api keys",
        """
        CREATE TABLE api_keys (
            id          uuid PRIMARY KEY,
            key_hash    bytea NOT NULL,
            prefix      text NOT NULL,
            user_id     text NOT NULL,
            name        text NOT NULL DEFAULT '',
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        );
        CREATE UNIQUE INDEX api_keys_key_hash_idx ON api_keys (key_hash);
        CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
        """,
    ),
    (
        2,
        "usage records",
        """
        CREATE TABLE usage_records (
            id                uuid PRIMARY KEY,
            request_id        text NOT NULL,
            principal_kind    text NOT NULL,
            user_id           text,
            api_key_id        text,
            backend           text,
            route             text NOT NULL,
            status            integer NOT NULL,
            bytes_in          bigint NOT NULL DEFAULT 0,
            bytes_out         bigint NOT NULL DEFAULT 0,
            duration_ms       double precision NOT NULL DEFAULT 0,
            prompt_tokens     integer,
            completion_tokens integer,
            total_tokens      integer,
            created_at        timestamptz NOT NULL
        );
        -- Billing and dashboards query by time, per user and per key over time ranges.
        CREATE INDEX usage_records_created_at_idx ON usage_records USING brin (created_at);
        CREATE INDEX usage_records_user_created_idx ON usage_records (user_id, created_at);
        CREATE INDEX usage_records_key_created_idx ON usage_records (api_key_id, created_at);
        CREATE INDEX usage_records_request_id_idx ON usage_records (request_id);
        """,
    ),
    (
        3,
        "usage records: estimated token counts",
        # Additive only (also on a partitioned table): token counts the proxy estimated because
        # the backend reported no usage (metering/estimate.py).
        """
        ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS estimated boolean NOT NULL
            DEFAULT false;
        """,
    ),
    (
        4,
        "api keys: team; budgets",
        # Additive only: a key's optional team (token limits and budgets per team), and the
        # budgets set through the admin API, so losing Redis never loses a limit
        # (limits/budgets.py reloads them into Redis).
        """
        ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS team text;
        CREATE TABLE IF NOT EXISTS budgets (
            scope       text NOT NULL,
            scope_id    text NOT NULL,
            amount      bigint NOT NULL,
            unit        text NOT NULL,
            period      text NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (scope, scope_id)
        );
        """,
    ),
)


async def apply_migrations(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
) -> list[int]:
    """Apply the pending migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     integer PRIMARY KEY,
                description text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version FROM schema_migrations")
        done = {int(r["version"]) for r in rows}
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                version,
                description,
            )
            applied_now.append(version)
    if applied_now:
        log.info("applied database migrations", extra={"versions": applied_now})
    return applied_now
