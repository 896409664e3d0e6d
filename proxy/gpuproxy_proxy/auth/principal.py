"""Who is calling: the identity authentication produces and rate limiting and metering consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# No "admin": the admin token authenticates only on the admin API's own listener.
PrincipalKind = Literal["api_key", "jwt", "anonymous"]


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    user_id: str | None = None
    api_key_id: str | None = None
    # The API key's team (token limits and budgets per team); JWTs carry none.
    team: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"


# One shared instance: the anonymous principal carries no state, so no per-request allocation.
ANONYMOUS = Principal(kind="anonymous")
