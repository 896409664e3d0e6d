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

# Migration 4. The old table is kept in place as the partition of everything before tomorrow
# (UTC): no copy (no doubled disk, no long rewrite), its indexes are reused as the partition's;
# only the new key (id, created_at) is built on it, and the partition bound is checked by one
# scan. An empty old table is simply dropped. It is dropped like any other partition once its
# upper bound is past the retention. The maintenance function creates the daily partitions
# ahead (a day covered by the old table is skipped) and drops expired ones, serialized by a
# transaction-scoped advisory lock (correct through PgBouncer in transaction mode).
_PARTITIONED_USAGE = r"""
ALTER TABLE usage_records RENAME TO usage_records_legacy;
-- The new key, built here once (attaching then reuses it as the partition's key).
ALTER TABLE usage_records_legacy DROP CONSTRAINT usage_records_pkey,
    ADD CONSTRAINT usage_records_legacy_pkey PRIMARY KEY (id, created_at);
ALTER INDEX usage_records_created_at_idx RENAME TO usage_records_legacy_created_at_idx;
ALTER INDEX usage_records_user_created_idx RENAME TO usage_records_legacy_user_created_idx;
ALTER INDEX usage_records_key_created_idx RENAME TO usage_records_legacy_key_created_idx;
ALTER INDEX usage_records_request_id_idx RENAME TO usage_records_legacy_request_id_idx;
ALTER TABLE usage_records_legacy ADD COLUMN outcome text NOT NULL DEFAULT 'complete';

CREATE TABLE usage_records (
    id                uuid NOT NULL,
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
    created_at        timestamptz NOT NULL,
    estimated         boolean NOT NULL DEFAULT false,
    -- 'complete', or 'interrupted': settled from the spool after the proxy process died.
    outcome           text NOT NULL DEFAULT 'complete',
    -- The key must hold the partition key; created_at is the admission time, fixed in the
    -- spool, so a replayed record meets its own row here.
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX usage_records_created_at_idx ON usage_records USING brin (created_at);
CREATE INDEX usage_records_user_created_idx ON usage_records (user_id, created_at);
CREATE INDEX usage_records_key_created_idx ON usage_records (api_key_id, created_at);
CREATE INDEX usage_records_request_id_idx ON usage_records (request_id);

DO $$
DECLARE
    newest timestamptz;
BEGIN
    SELECT max(created_at) INTO newest FROM usage_records_legacy;
    IF newest IS NULL THEN
        DROP TABLE usage_records_legacy;
    ELSE
        EXECUTE format(
            'ALTER TABLE usage_records ATTACH PARTITION usage_records_legacy '
            'FOR VALUES FROM (MINVALUE) TO (%L)',
            (date_trunc('day', greatest(newest, now()) AT TIME ZONE 'UTC')
             + interval '1 day') AT TIME ZONE 'UTC');
    END IF;
END
$$;

CREATE FUNCTION gpuproxy_usage_partitions(first_day date, days_ahead integer,
                                          retention_days integer)
RETURNS TABLE (created integer, dropped integer) LANGUAGE plpgsql AS $fn$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    cutoff timestamptz;
    d date;
    part record;
    upper_bound timestamptz;
    n_created integer := 0;
    n_dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(7451038711598661);
    IF retention_days IS NOT NULL THEN
        cutoff := ((today - retention_days)::timestamp AT TIME ZONE 'UTC');
        FOR part IN
            SELECT c.oid::regclass AS rel, pg_get_expr(c.relpartbound, c.oid) AS bound
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'usage_records'::regclass
        LOOP
            upper_bound := substring(part.bound FROM 'TO \(''([^'']+)''\)')::timestamptz;
            IF upper_bound IS NOT NULL AND upper_bound <= cutoff THEN
                EXECUTE format('DROP TABLE %s', part.rel);
                n_dropped := n_dropped + 1;
            END IF;
        END LOOP;
        first_day := greatest(first_day, today - retention_days);
    END IF;
    d := least(first_day, today);
    WHILE d <= today + days_ahead LOOP
        IF to_regclass('usage_records_p' || to_char(d, 'YYYYMMDD')) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF usage_records FOR VALUES FROM (%L) TO (%L)',
                    'usage_records_p' || to_char(d, 'YYYYMMDD'),
                    d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
                n_created := n_created + 1;
            EXCEPTION WHEN invalid_object_definition THEN
                NULL;  -- the day is inside the old table's partition
            END;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN QUERY SELECT n_created, n_dropped;
END
$fn$;

SELECT gpuproxy_usage_partitions(((now() AT TIME ZONE 'UTC')::date - 1), 7, NULL);
"""

_MIGRATION_TIMEOUT_SECONDS: Final = 3600.0

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
    (4, "usage records partitioned by day, with an outcome", _PARTITIONED_USAGE),
    (
        5,
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
    (
        6,
        "usage records: model and team",
        # Additive only (propagates to every partition, no rewrite: nullable, no default): the
        # request's model and the key's team, so daily spend per model and team is one
        # grouped scan of the day's partitions (auth/admin_spend.py).
        """
        ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS model text;
        ALTER TABLE usage_records ADD COLUMN IF NOT EXISTS team text;
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
            # Beyond the pool's per-command timeout: migration 4 builds a key on, and scans,
            # the old usage table, which on a large table takes minutes.
            await conn.execute(sql, timeout=_MIGRATION_TIMEOUT_SECONDS)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                version,
                description,
            )
            applied_now.append(version)
    if applied_now:
        log.info("applied database migrations", extra={"versions": applied_now})
    return applied_now
