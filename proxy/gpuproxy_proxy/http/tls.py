"""TLS on the client port: the server SSLContext (TLS 1.2+, ECDHE+AEAD ciphers, ALPN http/1.1)
and the watcher that builds a new context from a rotated certificate, which new handshakes
switch to while open connections keep theirs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gpuproxy_proxy.config import TlsConfig

log = logging.getLogger("gpuproxy.tls")

# Mozilla "intermediate" for TLS 1.2 minus the DHE suites (they need our own DH parameters and
# every current client has ECDHE): forward secrecy and AEAD only. TLS 1.3 suites are OpenSSL's
# (all AEAD) and not configurable here.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

Signature = tuple[int, int, int] | None


class CertificateError(ValueError):
    """The certificate/key pair cannot be used; the message says which file and what to do."""


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise CertificateError("listen.tls.key_file holds an encrypted private key; give an "
                           "unencrypted PEM key (cert-manager and kubernetes.io/tls Secrets "
                           "hold one)")


@contextlib.contextmanager
def _as_path(data: bytes) -> Iterator[str]:
    """`data` under a path OpenSSL can open: load_cert_chain only reads files, and the bytes
    must be the ones validated (the mounted file may change in between)."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd("gpuproxy-tls", os.MFD_CLOEXEC)  # in memory: the key never reaches a disk
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # pragma: no cover - Linux has memfd
        path = Path(tmp, "pem")
        path.write_bytes(data)
        path.chmod(0o600)
        yield str(path)


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """A server context with no certificate yet (see `load_pair`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[config.min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    # No compression (CRIME), no renegotiation (client-initiated renegotiation is a CPU DoS).
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # No session tickets (Mozilla intermediate: ssl_session_tickets off). Each process has its
    # own random ticket key, so behind SO_REUSEPORT and several replicas a ticket resumes only
    # on the process that issued it; issuing them cost ~20% of a handshake's CPU here.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    # The front end speaks HTTP/1.1 only; a client offering only h2 gets no ALPN and HTTP/1.1.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def read_pair(config: TlsConfig) -> tuple[bytes, bytes]:
    out = []
    for field, name in (("cert_file", config.cert_file), ("key_file", config.key_file)):
        try:
            out.append(Path(name).read_bytes())
        except OSError as exc:
            raise CertificateError(f"listen.tls.{field}: cannot read {name} "
                                   f"({exc.strerror}); mount the TLS Secret there") from None
    return out[0], out[1]


def load_pair(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> str:
    """Load a certificate chain and key into a fresh `ctx`; returns the leaf's SHA-256
    fingerprint. A context that refused a pair is discarded, never served with."""
    with _as_path(cert) as cert_path, _as_path(key) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_no_password)
        except ssl.SSLError as exc:
            raise CertificateError(
                f"certificate/key pair refused ({exc.reason or exc}): listen.tls.cert_file must "
                "hold the PEM chain (leaf first) and listen.tls.key_file its unencrypted PEM "
                "key; a rotation half written is retried when the files change again") from None
    try:
        leaf = ssl.PEM_cert_to_DER_cert(cert.decode("ascii", "replace").split(
            "-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    except ValueError:  # pragma: no cover - OpenSSL just parsed it
        return "?"
    return hashlib.sha256(leaf).hexdigest()


def not_after(cert: bytes) -> float | None:
    """The leaf's notAfter as a Unix time, None when it cannot be read. The standard library
    has no public certificate parser (`cryptography` is no dependency): this is the decoder
    behind SSLSocket.getpeercert(), present since Python 3.2."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:  # pragma: no cover - every CPython since 3.2 has it
        return None
    try:
        with _as_path(cert) as path:
            return float(ssl.cert_time_to_seconds(decode(path)["notAfter"]))
    except (ssl.SSLError, KeyError, ValueError):  # pragma: no cover - OpenSSL just loaded it
        return None


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)  # follows the Secret volume's ..data symlink
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class TlsTerminator:
    """The client port's SSLContext and its certificate watcher.

    The server keeps the context it was created with (`context`), so a rotated pair goes into
    a new one that each handshake switches to from the servername callback (called with or
    without SNI): the documented way to change a connection's context. Loading the new pair
    into the live context instead would not replace a certificate of another key type (OpenSSL
    keeps one per type, RSA and EC) and could leave it half loaded. A pair that does not load
    is logged and counted, and the previous one stays."""

    def __init__(self, config: TlsConfig, interval: Callable[[], float],
                 on_result: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.context = server_context(config)
        self._interval = interval
        self._on_result = on_result or (lambda _result: None)
        self._seen = self._signatures()
        cert, key = read_pair(config)  # at start a bad pair is fatal: there is nothing to keep
        self.fingerprint = load_pair(self.context, cert, key)
        self.not_after = not_after(cert)
        self.current = self.context  # the context new handshakes use
        self.context.sni_callback = self._select
        self._task: asyncio.Task[None] | None = None

    def _select(self, conn: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None,
                ctx: ssl.SSLContext) -> None:
        if self.current is not ctx:
            conn.context = self.current

    def _signatures(self) -> tuple[Signature, Signature]:
        return _signature(self.config.cert_file), _signature(self.config.key_file)

    def check(self) -> bool:
        """Reload when the files changed; True when a new pair is now in use."""
        now = self._signatures()
        if now == self._seen or None in now:
            return False  # unchanged, or mid-swap: looked at again next time
        self._seen = now
        try:
            cert, key = read_pair(self.config)
            new = server_context(self.config)
            fingerprint = load_pair(new, cert, key)
        except CertificateError as exc:
            # `now` was taken before the read: a swap during it is a change the next poll sees.
            log.error("TLS certificate not reloaded, the previous one stays in use: %s", exc)
            self._on_result("error")
            return False
        if fingerprint == self.fingerprint:
            return False
        log.warning("TLS certificate reloaded: sha256 %s for new connections (was %s)",
                    fingerprint, self.fingerprint)
        self.current, self.fingerprint, self.not_after = new, fingerprint, not_after(cert)
        self._on_result("reloaded")
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval())
            self.check()

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="tls-certificate")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
