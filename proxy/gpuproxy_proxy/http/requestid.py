"""Request ids: the client's `X-Request-ID` when it is safe to echo, else one unique to this
process. Every response on the client port carries it, errors in their body too."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

from multidict import MultiMapping

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Unique per process without a syscall per request: random prefix + counter. Workers are
# separate interpreters (the supervisor execs them), so each draws its own prefix.
_PREFIX = os.urandom(4).hex()
_IDS = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_IDS):08x}"


def client_request_id(headers: MultiMapping[str]) -> str:
    given = headers.get("X-Request-ID")
    if given is not None and _CLIENT_REQUEST_ID.fullmatch(given):
        return given
    return new_request_id()


def request_id_for(request: Any) -> str:
    """The request's id: the lean Request keeps the one it chose; for aiohttp's request (the
    admin API mounted on an aiohttp app) it is chosen here."""
    rid = getattr(request, "request_id", None)
    return rid if isinstance(rid, str) else client_request_id(request.headers)
