"""HS256 JWT verification (exp/nbf/iss/aud with leeway); auth/tokencache.py caches results."""

from __future__ import annotations

import time

import jwt

MAX_SUBJECT_CHARS = 256


class InvalidToken(Exception):
    """The token is malformed, expired, not yet valid, or not for us; the message says which."""


class BadSignature(InvalidToken):
    """Not signed with this verifier's secret (it may be signed with a rotated-out one)."""


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


class JwtVerifier:
    """Verifies HS256 tokens and returns the subject (user id) and how long it stays valid."""

    def __init__(
        self,
        secret: str,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int = 0,
    ) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        # Wall-clock end of this secret's validity once it has been rotated out; None = current.
        self.not_after: float | None = None
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
        return self.verify_until(token)[0]

    def verify_until(self, token: str) -> tuple[str, float]:
        """The token's `sub` and the wall-clock time until which this verifier would accept
        it again unchanged (0.0 when that cannot be promised); raises InvalidToken."""
        if not self.usable():
            raise BadSignature("the JWT is signed with a secret that has been rotated out")
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
        if len(subject) > MAX_SUBJECT_CHARS or not subject.isprintable():
            # It keys rate limits and usage records: no control characters, no lone
            # surrogates (they cannot be stored as text), bounded.
            raise InvalidToken(f"the JWT subject (sub) must be printable text of at most "
                               f"{MAX_SUBJECT_CHARS} characters")
        # PyJWT accepts while now < exp + leeway. A token whose nbf or iat is still ahead
        # (accepted thanks to leeway) gets no promise, so a cache never widens the window.
        now = time.time()
        valid_until = float(claims["exp"]) + self._leeway
        for claim in ("nbf", "iat"):
            value = claims.get(claim)
            if isinstance(value, int | float) and value > now:
                valid_until = 0.0
        if self.not_after is not None:
            valid_until = min(valid_until, self.not_after)
        return subject, valid_until
