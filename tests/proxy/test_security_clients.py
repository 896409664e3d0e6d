"""Hostile clients on the client port: paths normalized before routing and forwarding,
malformed credentials answered 401, bugs logged with their request id, client-chosen
forwarding headers and request ids not believed (issue 11, items 2, 6, 7, 8)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

import pytest
from tests.proxy.conftest import ProxyFactory, proxy_config
from tests.proxy.test_http_frontend import RawBackend, _exchange, _frontend, _parse, raw_backend
from tests.proxy.test_services_ratelimit import limiter, unique_ip

from gpuproxy_proxy.auth.principal import Principal
from gpuproxy_proxy.config import Secrets
from gpuproxy_proxy.http import protocol
from gpuproxy_proxy.http.paths import BadPath, normalize_path
from gpuproxy_proxy.metering.records import UsageRecord
from gpuproxy_proxy.metering.records import columns as _columns
from gpuproxy_proxy.observability.logging import UNHANDLED_LOGGER

__all__ = ["raw_backend"]  # the fixture, imported for the tests here

JWT_SECRET = "jwt-secret-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
_DEADLINE = 30.0


async def _proxy(make_proxy: ProxyFactory, backend: RawBackend, secrets: Secrets | None = None,
                 **overrides: Any) -> int:
    client = await make_proxy(proxy_config([backend], **overrides),  # type: ignore[list-item]
                              secrets)
    port = client.server.port
    assert isinstance(port, int)
    return port


def _request(target: bytes, *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    length = b"Content-Length: %d\r\n" % len(body) if body or method == b"POST" else b""
    return (method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + lines
            + length + b"\r\n" + body)


def _json_error(answer: bytes, status: int) -> dict[str, Any]:
    got, headers, body = _parse(answer)
    assert got == status, answer
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["request_id"] == headers["x-request-id"]
    assert error["message"]
    return error


def _head_lines(head: bytes) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            found.setdefault(name.strip().lower(), []).append(value.strip())
    return found


# --- item 2: paths ----------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "normal"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/./chat/completions", "/v1/chat/completions"),
    ("/v1/../admin/keys", "/admin/keys"),
    ("/v1/%2e%2e/x", "/x"),
    ("/v1/.%2E/x", "/x"),
    ("/v1/a/b/..", "/v1/a/"),
    ("/v1/a/.", "/v1/a/"),
    ("/../../etc", "/etc"),
    ("/v1/a..b/.x/c%20d", "/v1/a..b/.x/c%20d"),
])
def test_normalize_path_resolves_dot_segments(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize("raw", ["/v1/a%2fb", "/v1/a%2F..%2Fadmin", "/v1\\..\\admin",
                                 "/v1/a%5cb", "/v1/a%5Cb"])
def test_normalize_path_refuses_encoded_slashes_and_backslashes(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


@pytest.mark.parametrize(("target", "received"), [
    (b"/v1/./chat/completions", b"/v1/chat/completions"),
    (b"/v1/a/%2e%2e/embeddings?q=%2e%2E/../&r=1", b"/v1/embeddings?q=%2e%2E/../&r=1"),
    (b"/v1/x/.%2e/completions", b"/v1/completions"),
    (b"/v1/x/y/../z?a=b", b"/v1/x/z?a=b"),
])
async def test_backend_receives_the_normalized_path(
    raw_backend: RawBackend, make_proxy: ProxyFactory, target: bytes, received: bytes
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    status, _, body = _parse(await _exchange(port, _request(target, method=b"POST",
                                                            body=b"{}")))
    assert status == 200
    (head, sent), = raw_backend.forwarded()
    assert head.split(b" ")[1] == received
    assert sent == b"{}"
    # The router matched the same path (the backend echoes what it got).
    assert json.loads(body) == {"path": received.decode()}


@pytest.mark.parametrize("target", [b"/v1/../admin/keys", b"/v1/%2e%2e/admin/keys",
                                    b"/v1/.%2e/.%2e/etc/passwd", b"/v1/../../x"])
async def test_dot_segments_never_leave_v1_toward_a_backend(
    raw_backend: RawBackend, make_proxy: ProxyFactory, target: bytes
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    status, _, _ = _parse(await _exchange(port, _request(target)))
    assert status == 404  # no route: the admin API is not on the client port
    assert not raw_backend.forwarded()


@pytest.mark.parametrize("target", [b"/v1/a%2fb", b"/v1/x%2F..%2F..%2Fadmin/keys",
                                    b"/v1\\..\\admin/keys", b"/v1/a%5cb"])
async def test_encoded_slashes_and_backslashes_get_400(
    raw_backend: RawBackend, make_proxy: ProxyFactory, target: bytes
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    error = _json_error(await _exchange(port, _request(target)), 400)
    assert error["type"] == "invalid_request_error"
    assert "request path" in error["message"]
    assert not raw_backend.forwarded()


# --- item 6: malformed credentials ------------------------------------------------------------

def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _signed(header: bytes, payload: bytes) -> bytes:
    signing_input = _b64(header) + b"." + _b64(payload)
    signature = hmac.new(JWT_SECRET.encode(), signing_input, hashlib.sha256).digest()
    return signing_input + b"." + _b64(signature)


_HS256 = b'{"alg":"HS256","typ":"JWT"}'


def _claims(sub: str) -> bytes:
    # Raw JSON text: `sub` may hold escapes (lone surrogates, NUL) json.dumps would keep.
    return b'{"sub":' + sub.encode() + b',"exp":%d}' % (int(time.time()) + 3600)


MALFORMED = {
    "authorization-not-utf8": b"Authorization: Bearer \xff\xfe\xfd",
    "authorization-non-ascii": b"Authorization: Bearer caf\xc3\xa9",
    "api-key-not-utf8": b"X-API-Key: gpx_\xe9\xff",
    "jwt-header-not-json": b"Authorization: Bearer " + _signed(b"not json", _claims('"a"')),
    "jwt-header-not-utf8": b"Authorization: Bearer " + _signed(b"\xff\xfe", _claims('"a"')),
    "jwt-payload-not-object": b"Authorization: Bearer " + _signed(_HS256, b"[1, 2]"),
    "jwt-payload-not-utf8": b"Authorization: Bearer " + _signed(_HS256, b'{"sub":"\xff"}'),
    "jwt-sub-number": b"Authorization: Bearer " + _signed(_HS256, _claims("123")),
    "jwt-sub-object": b"Authorization: Bearer " + _signed(_HS256, _claims('{"a": 1}')),
    "jwt-sub-lone-surrogate": b"Authorization: Bearer " + _signed(_HS256, _claims('"\\ud800"')),
    "jwt-sub-nul": b"Authorization: Bearer " + _signed(_HS256, _claims('"a\\u0000b"')),
    "jwt-sub-huge": b"Authorization: Bearer " + _signed(_HS256, _claims('"' + "u" * 3000 + '"')),
    "huge-token": b"Authorization: Bearer " + b"x" * 4000 + b"." + b"y" * 3000 + b".z",
}


@pytest.mark.parametrize("header", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_credentials_get_401_json(
    raw_backend: RawBackend, make_proxy: ProxyFactory, header: bytes
) -> None:
    secrets = Secrets(jwt_secret=JWT_SECRET, admin_token=ADMIN_TOKEN)
    port = await _proxy(make_proxy, raw_backend, secrets, auth={"enabled": True})
    good = _signed(_HS256, _claims('"alice"'))
    ok = await _exchange(port, _request(b"/v1/x", b"Authorization: Bearer " + good))
    assert _parse(ok)[0] == 200  # the proxy does accept a well-formed token
    error = _json_error(await _exchange(port, _request(b"/v1/x", header)), 401)
    assert error["type"]
    assert len(raw_backend.forwarded()) == 1


async def test_batch_with_one_poisoned_entry_answers_the_others(redis_server: Any) -> None:
    rl = limiter(redis_server, per_ip=100, per_user=100)
    try:
        odd = Principal(kind="jwt", user_id="\udcff\x00\r\n$3\r\nodd")
        users = [Principal(kind="jwt", user_id="u-" + uuid.uuid4().hex) for _ in range(5)]
        calls = [rl.check(unique_ip(), p) for p in [users[0], users[1], odd, *users[2:]]]
        decisions = await asyncio.gather(*calls)
        assert all(d.allowed for d in decisions)
        assert {d.source for d in decisions} == {"redis"}
    finally:
        await rl.close()


# --- item 7: unhandled exceptions -------------------------------------------------------------

@pytest.fixture
def silenced_gpuproxy_loggers() -> Any:
    # A level on a parent logger (or the root) must not hide a 500's traceback.
    parent = logging.getLogger("gpuproxy")
    level = parent.level
    parent.setLevel(logging.CRITICAL)
    yield
    parent.setLevel(level)


async def test_handler_failure_gives_500_and_one_error_record_with_the_request_id(
    raw_backend: RawBackend, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, silenced_gpuproxy_loggers: None,
) -> None:
    client = await make_proxy(proxy_config([raw_backend]))  # type: ignore[list-item]
    frontend = _frontend(client.server)

    async def broken(request: Any, route: str) -> Any:
        raise RuntimeError("a bug in the handler")

    monkeypatch.setattr(frontend._pipeline, "handle", broken)
    port = client.server.port
    assert isinstance(port, int)
    answer = await _exchange(port, _request(b"/v1/x", b"X-Request-ID: bug-1"))
    assert _json_error(answer, 500)["request_id"] == "bug-1"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert getattr(errors[0], "request_id", None) == "bug-1"
    assert errors[0].exc_info is not None
    assert "a bug in the handler" in caplog.text


async def test_parser_callback_failure_is_logged_with_the_answers_request_id(
    raw_backend: RawBackend, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, silenced_gpuproxy_loggers: None,
) -> None:
    port = await _proxy(make_proxy, raw_backend)

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug while parsing")

    monkeypatch.setattr(protocol, "Request", broken)
    error = _json_error(await _exchange(port, _request(b"/v1/x")), 500)
    errors = [r for r in caplog.records if r.name == UNHANDLED_LOGGER]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert getattr(errors[0], "request_id", None) == error["request_id"]


# --- item 8: headers from clients -------------------------------------------------------------

SPOOFED = (b"Forwarded: for=198.51.100.1;proto=https", b"X-Forwarded-For: 198.51.100.2",
           b"X-Forwarded-Proto: https", b"X-Forwarded-Host: evil.example",
           b"X-Real-IP: 198.51.100.3")


async def test_forwarding_headers_from_an_untrusted_peer_are_replaced(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    assert _parse(await _exchange(port, _request(b"/v1/x", *SPOOFED)))[0] == 200
    (head, _), = raw_backend.forwarded()
    sent = _head_lines(head)
    assert sent[b"x-forwarded-for"] == [b"127.0.0.1"]
    assert sent[b"x-forwarded-proto"] == [b"http"]
    for name in (b"forwarded", b"x-forwarded-host", b"x-real-ip"):
        assert name not in sent
    assert b"198.51.100" not in head


async def test_forwarding_headers_from_a_trusted_proxy_are_passed_on(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend,
                        rate_limits={"trusted_proxies": ["127.0.0.0/8"]})
    assert _parse(await _exchange(port, _request(b"/v1/x", *SPOOFED)))[0] == 200
    (head, _), = raw_backend.forwarded()
    sent = _head_lines(head)
    assert sent[b"x-forwarded-for"] == [b"198.51.100.2, 127.0.0.1"]
    assert sent[b"x-forwarded-proto"] == [b"https"]
    assert sent[b"forwarded"] == [b"for=198.51.100.1;proto=https"]
    assert sent[b"x-forwarded-host"] == [b"evil.example"]
    assert sent[b"x-real-ip"] == [b"198.51.100.3"]


@pytest.mark.parametrize(("given", "kept"), [
    (b"client-id.1:2_3", True),
    (b"a" * 128, True),
    (b"a" * 129, False),
    (b"has space", False),
    (b"semi;colon", False),
    (b"caf\xc3\xa9", False),
    (b"\xff\xfe", False),
])
async def test_client_request_id_is_sanitized(
    raw_backend: RawBackend, make_proxy: ProxyFactory, given: bytes, kept: bool
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    _, headers, _ = _parse(await _exchange(port, _request(b"/v1/x", b"X-Request-ID: " + given)))
    (head, _), = raw_backend.forwarded()
    sent = _head_lines(head)[b"x-request-id"]
    assert sent == [headers["x-request-id"].encode()]
    assert (sent == [given]) is kept
    assert len(sent[0]) <= 128


def test_usage_records_with_the_same_request_id_get_distinct_ids() -> None:
    # usage_records' key is (id, created_at), one id per record; `request_id` has a plain,
    # non-unique index: a client repeating an X-Request-ID cannot collide or overwrite.
    records = [UsageRecord(request_id="same", principal_kind="anonymous", user_id=None,
                           api_key_id=None, backend="b", route="other", status=200)
               for _ in range(3)]
    ids, request_ids = _columns(records)[:2]
    assert request_ids == ["same"] * 3
    assert len(set(ids)) == 3


async def test_expect_continue_without_credentials_gets_401_and_no_100(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    secrets = Secrets(jwt_secret=JWT_SECRET)
    port = await _proxy(make_proxy, raw_backend, secrets, auth={"enabled": True})
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n")  # the body is held back, as curl does
    answer = await _exchange(port, head)
    assert not answer.startswith(b"HTTP/1.1 100")
    assert _json_error(answer, 401)["type"]
    # With credentials the 100 does come, and then the answer.
    good = _signed(_HS256, _claims('"alice"'))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer " + good
                                  + b"\r\n"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _DEADLINE)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"0123456789")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _DEADLINE)
        assert final.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    (_, body), = raw_backend.forwarded()
    assert body == b"0123456789"


async def test_gzip_encoded_body_reaches_the_backend_byte_identical(
    raw_backend: RawBackend, make_proxy: ProxyFactory
) -> None:
    port = await _proxy(make_proxy, raw_backend)
    payload = gzip.compress(json.dumps({"prompt": "x" * 500}).encode())
    answer = await _exchange(port, _request(b"/v1/completions", b"Content-Encoding: gzip",
                                            method=b"POST", body=payload))
    assert _parse(answer)[0] == 200
    (head, body), = raw_backend.forwarded()
    assert body == payload
    assert _head_lines(head)[b"content-encoding"] == [b"gzip"]
