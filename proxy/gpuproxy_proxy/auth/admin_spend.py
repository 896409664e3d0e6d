"""The admin API's spend: `GET /admin/spend?group_by=api_key|user|team|model&day=YYYY-MM-DD`
(or `from`/`to`, at most 31 days; filters user_id, team, api_key_id, model): per UTC day and
group, tokens, requests and the cost in USD from the price table, from the usage records."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import asyncpg
from aiohttp import web

from gpuproxy_proxy.auth.admin import AdminRequest, _bad_request, _require_admin, _with_request_id
from gpuproxy_proxy.database.pool import DB_POOL
from gpuproxy_proxy.http.exceptions import json_error, unavailable
from gpuproxy_proxy.metering.spend import cost_usd
from gpuproxy_proxy.runtime import RUNTIME

# Column per group; fixed strings, never the client's text, go into the SQL.
GROUPS: Final = {"api_key": "api_key_id", "user": "user_id", "team": "team", "model": "model"}
FILTERS: Final = ("user_id", "team", "api_key_id", "model")
MAX_DAYS: Final = 31
MAX_LIMIT: Final = 10_000
# Rows of (day, group, model) read at most: a wider answer asks for a filter or fewer days.
MAX_ROWS: Final = 200_000
QUERY_TIMEOUT_SECONDS: Final = 10.0
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def _day(request: AdminRequest, name: str, default: date) -> date:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise _bad_request(f"query parameter '{name}' must be a day YYYY-MM-DD (UTC), not "
                           f"{raw[:40]!r}") from None


def _range(request: AdminRequest) -> tuple[date, date]:
    today = datetime.now(UTC).date()
    if "day" in request.query and ("from" in request.query or "to" in request.query):
        raise _bad_request("give either 'day' or 'from'/'to', not both")
    if "day" in request.query:
        day = _day(request, "day", today)
        return day, day
    first = _day(request, "from", today)
    last = _day(request, "to", today if "from" in request.query else first)
    if last < first:
        raise _bad_request("query parameter 'to' must not be before 'from'")
    if (last - first).days + 1 > MAX_DAYS:
        raise _bad_request(f"at most {MAX_DAYS} days at once: narrow 'from'/'to'")
    return first, last


def _sql(column: str, filters: list[str]) -> str:
    where = "".join(f" AND {name} = ${i}" for i, name in enumerate(filters, start=3))
    # created_at bounds only (runtime partition pruning: the days asked for are scanned);
    # the cost is applied per model in Python, from the price table in force.
    return (
        "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, "  # noqa: S608
        f"{column} AS grp, model, "
        "coalesce(sum(prompt_tokens), 0)::bigint AS prompt, "
        "coalesce(sum(completion_tokens), 0)::bigint AS completion, "
        "coalesce(sum(total_tokens), 0)::bigint AS total, count(*) AS requests "
        f"FROM usage_records WHERE created_at >= $1 AND created_at < $2{where} "
        f"GROUP BY 1, 2, 3 LIMIT {MAX_ROWS + 1}"
    )


async def get_spend(request: AdminRequest) -> web.Response:
    _require_admin(request)
    group_by = request.query.get("group_by", "team")
    if group_by not in GROUPS:
        raise _bad_request(f"query parameter 'group_by' must be one of {', '.join(GROUPS)}")
    first, last = _range(request)
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad_request(f"query parameter 'limit' must be an integer from 1 to {MAX_LIMIT}")
    names = [n for n in FILTERS if request.query.get(n)]
    for name in names:
        if len(request.query[name]) > 200:
            raise _bad_request(f"query parameter '{name}' must be at most 200 characters")
    db = request.app.get(DB_POOL)
    pool = None if db is None else db.pool
    if db is None:
        raise json_error(web.HTTPConflict, "metering_disabled",
                         "spend comes from the usage records: set a database section in the "
                         "proxy config")
    if pool is None:
        raise unavailable("the usage database is not connected yet; retry shortly")
    start = datetime.combine(first, time(), UTC)
    end = datetime.combine(last + timedelta(days=1), time(), UTC)
    try:
        rows = await pool.fetch(_sql(GROUPS[group_by], names), start, end,
                                *(request.query[n] for n in names),
                                timeout=QUERY_TIMEOUT_SECONDS)
    except _DB_ERRORS as exc:
        raise unavailable(f"the usage database is unavailable ({type(exc).__name__}); retry "
                          "shortly") from exc
    if len(rows) > MAX_ROWS:
        raise _bad_request("too many groups: add a filter (user_id, team, api_key_id, model) "
                           "or ask for fewer days")
    budgets = request.app[RUNTIME].config.budgets
    groups: dict[tuple[date, str | None], dict[str, Any]] = {}
    for row in rows:
        key = (row["day"], row["grp"])
        out = groups.get(key)
        if out is None:
            out = groups[key] = {"day": row["day"].isoformat(), group_by: row["grp"],
                                 "prompt_tokens": 0, "completion_tokens": 0,
                                 "total_tokens": 0, "requests": 0, "cost_usd": 0.0}
        out["prompt_tokens"] += row["prompt"]
        out["completion_tokens"] += row["completion"]
        out["total_tokens"] += row["total"]
        out["requests"] += row["requests"]
        out["cost_usd"] += cost_usd(budgets, row["model"], row["prompt"], row["completion"])
    ranked = sorted(groups.values(), key=lambda g: (g["day"], -g["cost_usd"],
                                                    -g["total_tokens"], str(g[group_by])))
    total = {"prompt_tokens": sum(g["prompt_tokens"] for g in ranked),
             "completion_tokens": sum(g["completion_tokens"] for g in ranked),
             "total_tokens": sum(g["total_tokens"] for g in ranked),
             "requests": sum(g["requests"] for g in ranked),
             "cost_usd": round(sum(g["cost_usd"] for g in ranked), 6)}
    for g in ranked:
        g["cost_usd"] = round(g["cost_usd"], 6)
    return web.json_response({
        "group_by": group_by, "from": first.isoformat(), "to": last.isoformat(),
        "filters": {n: request.query[n] for n in names}, "total": total,
        "truncated": len(ranked) > limit, "spend": ranked[:limit],
    })


def add_spend_routes(app: web.Application) -> None:
    app.router.add_get("/admin/spend", _with_request_id(get_spend))
