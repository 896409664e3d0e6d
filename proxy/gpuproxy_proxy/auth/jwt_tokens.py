"""HS256 JWT verification (exp/nbf/iss/aud with leeway) with a small cache of verified tokens."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import jwt


class InvalidToken(Exception):
    """The token is malformed, expired, not yet valid, or not for us; the message says which."""


class BadSignature(InvalidToken):
    """Not signed with this verifier's secret (it may be signed with a rotated-out one)."""


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


class JwtVerifier:
    """Verifies HS256 tokens and returns the subject (user id).

    Verified tokens are cached until their `exp` (bounded LRU) because clients resend the same
    token on every request and HMAC + JSON decoding is a measurable share of the hot path.
    """

    def __init__(
        self,
        secret: str,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = 0,
        max_cached: int = 10_000,
    ) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._max_cached = max_cached
        # Wall-clock end of this secret's validity once it has been rotated out; None = current.
        self.not_after: float | None = None
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._options: jwt.types.Options = {
            "require": ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else []),
            "verify_aud": audience is not None,
        }

    @property
    def secret(self) -> str:
        return self._secret

    def retire(self, until: float) -> None:
        """The secret was rotated: accept its tokens only until `until` (wall clock)."""
        self.not_after = until

    def usable(self) -> bool:
        return self.not_after is None or time.time() < self.not_after

    def verify(self, token: str) -> str:
        """The token's `sub`; raises InvalidToken."""
        if not self.usable():
            raise BadSignature("the JWT is signed with a secret that has been rotated out")
        hit = self._cache.get(token)
        if hit is not None:
            if hit[0] > time.time():
                return hit[1]
            del self._cache[token]
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("the JWT has expired (exp)") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("the JWT is not valid yet (nbf/iat)") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken(f"the JWT issuer (iss) must be {self._issuer!r}") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken(f"the JWT audience (aud) must include {self._audience!r}") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the JWT lacks the required claim {exc.claim!r}") from exc
        except jwt.InvalidSignatureError as exc:
            raise BadSignature("the JWT signature is invalid") from exc
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"the JWT is invalid: {exc}") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("the JWT subject (sub) must be a non-empty string")
        self._remember(token, float(claims["exp"]) + self._leeway, subject, claims.get("nbf"))
        return subject

    def _remember(self, token: str, valid_until: float, subject: str, nbf: Any) -> None:
        # A token whose nbf is still ahead (accepted thanks to leeway) is not cached, so the
        # cache never widens the validity window the checks above allowed.
        if nbf is not None and float(nbf) > time.time():
            return
        self._cache[token] = (valid_until, subject)
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
