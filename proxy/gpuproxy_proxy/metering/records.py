"""A usage record, its spool lines and its idempotent batch insert: the row key is
(id, created_at), both fixed at admission, so a replay of the same request is a no-op."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

# Ids unique across processes without a syscall per request: 12 random bytes per process and
# a counter (a crash-looping pod draws new bytes on every start).
_ID_PREFIX = os.urandom(12)
_ID_COUNTER = iter(range(1, 2**32))


def new_record_id() -> uuid.UUID:
    return uuid.UUID(bytes=_ID_PREFIX + next(_ID_COUNTER).to_bytes(4, "big"))


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    principal_kind: str
    user_id: str | None
    api_key_id: str | None
    backend: str | None
    route: str
    status: int
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    # The token counts are metering/estimate.py's: the backend reported no usage (and an
    # interrupted stream's count so far).
    estimated: bool = False
    # Wall-clock seconds of the request's admission (part of the row key, so kept exact in
    # the spool); time.time() is a fraction of datetime.now()'s cost on the request path.
    created_unix: float = field(default_factory=time.time)
    # Fixed at admission when spooled, else at the first write attempt, and kept across
    # retries, so a batch whose commit acknowledgement was lost is not counted twice.
    record_id: uuid.UUID | None = None
    # "complete", or "interrupted": the process died mid-request (settled by a replay).
    outcome: str = "complete"
    # The request body's model (as sent, at most 200 characters) and the key's team at the
    # time of the request: spend per model and team (auth/admin_spend.py) needs no join.
    model: str | None = None
    team: str | None = None
    # The spool segment holding the settled line, or the admission's Ticket if that line
    # could not be written (either released once committed); not a column.
    segment: Any = None

    def entry(self) -> dict[str, Any]:
        """The spool's settled line."""
        assert self.record_id is not None
        return {"t": "s", "id": self.record_id.hex, "ts": self.created_unix,
                "rid": self.request_id, "pk": self.principal_kind, "u": self.user_id,
                "k": self.api_key_id, "b": self.backend, "r": self.route, "st": self.status,
                "bi": self.bytes_in, "bo": self.bytes_out, "d": self.duration_ms,
                "pt": self.prompt_tokens, "ct": self.completion_tokens,
                "tt": self.total_tokens, "e": self.estimated, "m": self.model,
                "tm": self.team}


def from_settled(e: dict[str, Any]) -> UsageRecord:
    return UsageRecord(
        request_id=e["rid"], principal_kind=e["pk"], user_id=e["u"], api_key_id=e["k"],
        backend=e["b"], route=e["r"], status=e["st"], bytes_in=e["bi"], bytes_out=e["bo"],
        duration_ms=e["d"], prompt_tokens=e["pt"], completion_tokens=e["ct"],
        total_tokens=e["tt"], estimated=bool(e.get("e", False)), created_unix=e["ts"],
        record_id=uuid.UUID(hex=e["id"]), model=e.get("m"), team=e.get("tm"),
    )


def interrupted(e: dict[str, Any]) -> UsageRecord:
    """An admitted request its process did not live to settle, from its last admitted or
    progress line: what was counted so far (status 0 when no answer had started)."""
    tokens = e.get("ct")
    return UsageRecord(
        request_id=e["rid"], principal_kind=e["pk"], user_id=e["u"], api_key_id=e["k"],
        backend=e.get("b"), route=e["r"], status=e.get("st", 0), bytes_in=e.get("bi", 0),
        bytes_out=e.get("bo", 0),
        duration_ms=max(0.0, (e.get("at", e["ts"]) - e["ts"]) * 1000.0),
        completion_tokens=tokens, total_tokens=tokens, estimated=tokens is not None,
        created_unix=e["ts"], record_id=uuid.UUID(hex=e["id"]), outcome="interrupted",
        model=e.get("m"), team=e.get("tm"),
    )


# One statement, one round trip, no COPY and no named prepared statement: works through
# PgBouncer in transaction mode.
INSERT = """
INSERT INTO usage_records (
    id, request_id, principal_kind, user_id, api_key_id, backend, route, status, bytes_in,
    bytes_out, duration_ms, prompt_tokens, completion_tokens, total_tokens, created_at, outcome,
    estimated, model, team)
SELECT * FROM unnest(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::int[], $9::bigint[], $10::bigint[], $11::float8[], $12::int[], $13::int[], $14::int[],
    $15::timestamptz[], $16::text[], $17::bool[], $18::text[], $19::text[])
ON CONFLICT (id, created_at) DO NOTHING
"""


def columns(batch: list[UsageRecord]) -> list[list[object]]:
    for rec in batch:
        if rec.record_id is None:
            rec.record_id = uuid.uuid4()
    return [
        [r.record_id for r in batch],
        [r.request_id for r in batch],
        [r.principal_kind for r in batch],
        [r.user_id for r in batch],
        [r.api_key_id for r in batch],
        [r.backend for r in batch],
        [r.route for r in batch],
        [r.status for r in batch],
        [r.bytes_in for r in batch],
        [r.bytes_out for r in batch],
        [r.duration_ms for r in batch],
        [r.prompt_tokens for r in batch],
        [r.completion_tokens for r in batch],
        [r.total_tokens for r in batch],
        [datetime.fromtimestamp(r.created_unix, UTC) for r in batch],
        [r.outcome for r in batch],
        [r.estimated for r in batch],
        [r.model for r in batch],
        [r.team for r in batch],
    ]


# check_violation: no partition takes the row (usage_records has no CHECK constraint).
NO_PARTITION = "23514"


def is_bad_data(exc: BaseException) -> bool:
    """Errors caused by a record's content (retrying cannot help), as opposed to outages.

    SQLSTATE class 22 is "data exception" (e.g. a NUL byte in text, a number out of range);
    asyncpg.DataError is raised client-side when a value cannot be encoded; 23514 here means
    no partition takes the row's created_at (older than the retention, once partitions for
    its day were looked for).
    """
    if isinstance(exc, asyncpg.DataError):
        return True
    state = str(getattr(exc, "sqlstate", "") or "")
    return isinstance(exc, asyncpg.PostgresError) and (
        state.startswith("22") or state == NO_PARTITION)

