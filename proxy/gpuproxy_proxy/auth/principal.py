"""Who is calling: the identity authentication produces and rate limiting and metering consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PrincipalKind = Literal["api_key", "jwt", "admin", "anonymous"]


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    user_id: str | None = None
    api_key_id: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


# One shared instance: the anonymous principal carries no state, so no per-request allocation.
ANONYMOUS = Principal(kind="anonymous")
ADMIN = Principal(kind="admin")
