"""Request authentication: `Authorization: Bearer <API key | JWT>` or `X-API-Key`; the admin
token (held here too) is only for the admin API's listener, never a client credential.

401 for missing or invalid credentials (with `WWW-Authenticate`), 403 for revoked keys,
503 when a key cannot be checked in time (database down or slow, too many checks waiting) and
no entry younger than its maximum age is cached (see keylookup.py).
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gpuproxy_proxy.appkeys import CONFIG, METRICS, SECRETS
from gpuproxy_proxy.auth.apikeys import (
    ApiKeyStore,
    DatabaseUnavailable,
    LookupBusy,
    looks_like_api_key,
    lookup_limits,
    well_formed,
)
from gpuproxy_proxy.auth.jwt_tokens import BadSignature, InvalidToken, JwtVerifier, looks_like_jwt
from gpuproxy_proxy.auth.keylookup import Admit
from gpuproxy_proxy.auth.principal import ANONYMOUS, Principal
from gpuproxy_proxy.auth.tokencache import VerifiedTokens
from gpuproxy_proxy.config import AuthConfig, SecretFilesConfig, Secrets
from gpuproxy_proxy.database.pool import DB_POOL, Database
from gpuproxy_proxy.http.exceptions import forbidden, unauthorized, unavailable
from gpuproxy_proxy.http.request import ClientRequest
from gpuproxy_proxy.observability.metrics import ProxyMetrics

log = logging.getLogger(__name__)

# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
_MIN_JWT_SECRET_BYTES = 32
# The admin API creates credentials: a shorter token is refused (the admin API stays off).
MIN_ADMIN_TOKEN_CHARS = 32
_UNKNOWN_CREDENTIAL = "the credential is neither a valid API key nor a JWT"


def _printable_ascii(value: str) -> bool:
    # Keys and JWTs are ASCII; anything else (other bytes arrive surrogate-escaped) would
    # break encoding, hashing or JWT decoding further on.
    return value.isascii() and value.isprintable()


def bearer_token(request: ClientRequest) -> str | None:
    """The credential from `Authorization: Bearer ...` or `X-API-Key`, else None."""
    header = request.headers.get("Authorization")
    if header and not _printable_ascii(header):
        raise unauthorized("the Authorization header must be printable ASCII: "
                           "'Bearer <API key or JWT>'")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise unauthorized("the Authorization header must be 'Bearer <API key or JWT>'")
    key = request.headers.get("X-API-Key")
    if key and not _printable_ascii(key):
        raise unauthorized("the X-API-Key header must be printable ASCII (an API key)")
    return key.strip() if key and key.strip() else None


def admin_token_source(files: SecretFilesConfig) -> str:
    """Where the admin token comes from, for the messages that tell how to fix it."""
    if files.admin_token is not None:
        return (f"the admin token file {files.admin_token} (secret_files.admin_token; in "
                "Kubernetes the Secret key spec.proxy.auth.adminTokenSecretRef names)")
    return "GPUPROXY_ADMIN_TOKEN"


class Authenticator:
    """Checks credentials. Settings and secrets change live (config reload, rotated secret
    files): a new JWT secret takes over at once, and tokens signed with the previous one stay
    valid for `auth.jwt_rotation_overlap_seconds`."""

    def __init__(self, config: AuthConfig, secrets: Secrets, db: Database | None,
                 admin_token_source: str = "GPUPROXY_ADMIN_TOKEN",  # noqa: S107
                 metrics: ProxyMetrics | None = None) -> None:
        self.config = config
        self.enabled = config.enabled
        self.keys = ApiKeyStore(db, config.api_key_cache_seconds,
                                limits=lookup_limits(config), metrics=metrics)
        self._has_db = db is not None
        self.admin_token_source = admin_token_source
        self._admin_token: bytes | None = None
        # Why the admin API is off although a token is set (too short), else None.
        self.admin_refused: str | None = None
        self._accept_admin_token(secrets.admin_token)
        self._jwt = self._verifier(secrets.jwt_secret)
        self._previous_jwt: JwtVerifier | None = None
        # Verified JWTs; emptied whenever what decides a token's validity changes.
        self.verified = VerifiedTokens()

    def _verifier(self, secret: str | None) -> JwtVerifier | None:
        c = self.config
        if not secret:
            return None
        return JwtVerifier(secret, issuer=c.jwt_issuer, audience=c.jwt_audience,
                           leeway_seconds=c.jwt_leeway_seconds)

    def reconfigure(self, config: AuthConfig) -> None:
        """A config reload; verifiers are rebuilt only when their claims settings changed."""
        old, self.config = self.config, config
        self.enabled = config.enabled
        self.keys.configure(config)
        claims = ("jwt_issuer", "jwt_audience", "jwt_leeway_seconds")
        if any(getattr(old, f) != getattr(config, f) for f in claims):
            self.verified.clear()
            self._jwt = self._verifier(self._jwt.secret if self._jwt else None)
            previous = self._previous_jwt
            if previous is not None and previous.not_after is not None:
                self._previous_jwt = self._verifier(previous.secret)
                assert self._previous_jwt is not None
                self._previous_jwt.retire(previous.not_after)

    def rotate_jwt_secret(self, secret: str | None) -> None:
        """The JWT secret changed: sign-ins with the new one work at once; the old one keeps
        working for the overlap (not at all when the overlap is 0)."""
        current = self._jwt
        if (current.secret if current else None) == secret:
            return
        self.verified.clear()
        overlap = self.config.jwt_rotation_overlap_seconds
        if current is not None and overlap > 0:
            current.retire(time.time() + overlap)
            self._previous_jwt = current
        else:
            self._previous_jwt = None
        self._jwt = self._verifier(secret)
        log.warning("the JWT secret changed; tokens signed with the previous one are accepted "
                    "for %g more seconds", overlap if current is not None else 0)

    def _accept_admin_token(self, token: str | None) -> None:
        self._admin_token, self.admin_refused = None, None
        if not token:
            return
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            # Logged, not raised: a rotation to a short token must not crash a serving pod.
            self.admin_refused = "the configured admin token is too short (see the proxy's log)"
            log.error("the admin API is off: %s holds %d characters, at least %d are needed; "
                      "write a longer random token there (e.g. `openssl rand -hex 32`)",
                      self.admin_token_source, len(token), MIN_ADMIN_TOKEN_CHARS)
            return
        self._admin_token = token.encode()

    def set_admin_token(self, token: str | None) -> None:
        self._accept_admin_token(token)
        self.verified.clear()  # a cached JWT must never outlive its becoming the admin token

    def _verify_jwt(self, token: str) -> tuple[str, float]:
        current, previous = self._jwt, self._previous_jwt
        if current is None and previous is None:
            raise unauthorized("JWT authentication is not configured on this proxy")
        try:
            if current is None:
                raise BadSignature("the JWT signature is invalid")
            return current.verify_until(token)
        except BadSignature:
            if previous is None or not previous.usable():
                raise
            return previous.verify_until(token)

    @property
    def admin_enabled(self) -> bool:
        return self._admin_token is not None

    def is_admin_token(self, token: str) -> bool:
        # Constant-time: the comparison must not leak how many leading bytes matched.
        return self._admin_token is not None and hmac.compare_digest(
            token.encode(), self._admin_token
        )

    async def authenticate(
        self, request: ClientRequest,
        admit: Callable[[ClientRequest], Awaitable[None]] | None = None,
    ) -> Principal:
        """The caller's Principal; raises a JSON HTTPException (401/403/503) otherwise.
        `admit(request)` runs before an API key is looked up in the database and may raise
        to refuse that (the caller's per-IP lookup quota)."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(request)
        if token is None:
            raise unauthorized(
                "missing credentials: send 'Authorization: Bearer <API key or JWT>' or 'X-API-Key'",
                error="",
            )
        if admit is not None and looks_like_api_key(token):
            return await self.authenticate_token(token, functools.partial(admit, request))
        return await self.authenticate_token(token)

    async def authenticate_token(self, token: str, admit: Admit | None = None) -> Principal:
        cached = self.verified.get(token)
        if cached is not None:
            return cached
        if self.is_admin_token(token):
            # Never a client credential, even were it also a valid key or JWT; refused like
            # any unknown one, so the open port does not tell anyone they hold the admin token.
            log.warning("the admin token was sent as a client credential and refused; it "
                        "only works on the admin API port (listen.admin_api_port)")
            raise unauthorized(_UNKNOWN_CREDENTIAL)
        if looks_like_api_key(token):
            return await self._api_key(token, admit)
        if looks_like_jwt(token):
            try:
                subject, valid_until = self._verify_jwt(token)
            except InvalidToken as exc:
                raise unauthorized(str(exc)) from exc
            # One Principal per token: rate limiting keys its own caches on it.
            principal = Principal(kind="jwt", user_id=subject)
            self.verified.put(token, valid_until, principal)
            return principal
        raise unauthorized(_UNKNOWN_CREDENTIAL)

    async def _api_key(self, token: str, admit: Admit | None) -> Principal:
        if not self._has_db:
            raise unauthorized("API keys are not available: this proxy has no database")
        if not well_formed(token):
            raise unauthorized("invalid API key")
        try:
            record = await self.keys.lookup(token, admit)
        except LookupBusy as exc:
            raise unavailable("too many API key checks are waiting for the database; "
                              "retry shortly") from exc
        except DatabaseUnavailable as exc:
            log.warning("API key check failed: database unavailable (%s)", exc)
            raise unavailable("cannot verify the API key right now; retry shortly") from exc
        if record is None:
            raise unauthorized("invalid API key")
        if record.revoked:
            raise forbidden(f"the API key {record.prefix}... has been revoked")
        return Principal(kind="api_key", user_id=record.user_id, api_key_id=record.id,
                         team=record.team)


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after db_ctx): builds the Authenticator from config and secrets."""
    config, secrets = app[CONFIG], app[SECRETS]
    if config.auth.enabled:
        if secrets.jwt_secret and len(secrets.jwt_secret.encode()) < _MIN_JWT_SECRET_BYTES:
            log.warning(
                "GPUPROXY_JWT_SECRET is shorter than %d bytes; HS256 tokens signed with it can "
                "be brute-forced: use a longer random secret", _MIN_JWT_SECRET_BYTES,
            )
        if not secrets.jwt_secret and app[DB_POOL] is None:
            log.warning(
                "auth is enabled but neither GPUPROXY_JWT_SECRET nor config.database is set: "
                "every client request will get 401"
            )
    authenticator = Authenticator(config.auth, secrets, app[DB_POOL],
                                  admin_token_source(config.secret_files), app[METRICS])
    app[AUTHENTICATOR] = authenticator
    try:
        yield
    finally:
        await authenticator.keys.close()
