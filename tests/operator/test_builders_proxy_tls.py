"""spec.proxy.tls and allowPlainHttp: the kubernetes.io/tls Secret mounted as a whole volume
(renewals propagate, nothing restarts), the rendered listen.tls the proxy accepts and serves
HTTPS from, the Service's appProtocol, the https endpoint, and the ClientTls condition that
warns about plain HTTP nobody acknowledged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.operator.clusters import CREDENTIALS, by_key, cluster, minimal_body
from tests.proxy.certs import TestCa, TlsSecretVolume
from tests.proxy.conftest import proxy_config
from tests.proxy.fakes import FakeBackend, free_port
from tests.proxy.procs import RawConnection, start_proxy

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.proxy_secrets import SECRETS_DIR
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION
from gpuproxy_operator.status import Observation, compute_status, condition
from gpuproxy_proxy.config import parse_config


def _tls_body(**tls: Any) -> dict[str, Any]:
    body = minimal_body()
    body["spec"]["proxy"]["tls"] = {"secretName": "mini-tls", **tls}
    return body


def _objects(body: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return by_key(build_all(cluster(body), BuildInputs(CREDENTIALS)))


def _pod(body: dict[str, Any]) -> dict[str, Any]:
    return _objects(body)[("Deployment", "mini-proxy")]["spec"]["template"]  # type: ignore[no-any-return]


def _rendered(body: dict[str, Any]) -> dict[str, Any]:
    text = _objects(body)[("ConfigMap", "mini-proxy")]["data"]["config.yaml"]
    return yaml.safe_load(text)  # type: ignore[no-any-return]


def test_the_tls_secret_is_mounted_as_a_whole_volume() -> None:
    pod = _pod(_tls_body())
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "secret-tls")
    assert volume["secret"]["secretName"] == "mini-tls"
    # cert-manager's keys; ca.crt is not listed (it is optional in such a Secret).
    assert volume["secret"]["items"] == [{"key": "tls.crt", "path": "tls.crt"},
                                         {"key": "tls.key", "path": "tls.key"}]
    container = pod["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "secret-tls")
    assert mount == {"name": "secret-tls", "mountPath": f"{SECRETS_DIR}/tls", "readOnly": True}
    # A subPath mount never sees a renewal; an env var would need a restart.
    assert all("subPath" not in m for m in container["volumeMounts"])
    assert "mini-tls" not in str(container.get("env", []))
    # The probes stay on the plain admin port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "admin"
        assert "scheme" not in container[probe]["httpGet"]
    listen = parse_config(yaml.safe_dump(_rendered(_tls_body()))).listen
    assert listen.tls is not None
    assert (listen.tls.cert_file, listen.tls.key_file, listen.tls.min_version) == (
        f"{SECRETS_DIR}/tls/tls.crt", f"{SECRETS_DIR}/tls/tls.key", "1.2")
    assert parse_config(yaml.safe_dump(_rendered(minimal_body()))).listen.tls is None


def test_a_renewal_restarts_nothing() -> None:
    """The operator never reads the TLS Secret: what it builds depends on the spec only, and a
    renewal changes only the Secret's data. Changing the Secret's name or the version floor
    does roll the pods (a new mount, a new listener setting)."""
    base = build_all(cluster(_tls_body()), BuildInputs(CREDENTIALS))
    assert build_all(cluster(_tls_body()), BuildInputs(CREDENTIALS)) == base

    def config_hash(body: dict[str, Any]) -> str:
        return _pod(body)["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]  # type: ignore[no-any-return]

    hashes = {config_hash(minimal_body()), config_hash(_tls_body()),
              config_hash(_tls_body(minVersion="1.3"))}
    assert len(hashes) == 3
    assert _pod(_tls_body(secretName="other"))["spec"] != _pod(_tls_body())["spec"]


def test_service_and_endpoint_say_https() -> None:
    svc = _objects(_tls_body())[("Service", "mini-proxy")]
    assert svc["spec"]["ports"][0]["name"] == "http"  # kept: Ingresses refer to it by name
    assert svc["spec"]["ports"][0]["appProtocol"] == "https"
    assert "appProtocol" not in _objects(minimal_body())[("Service", "mini-proxy")][
        "spec"]["ports"][0]
    parsed = cluster(_tls_body())
    status = compute_status({}, Observation(1, cluster=parsed, desired=build_all(
        parsed, BuildInputs(CREDENTIALS))), "2026-01-01T00:00:00Z")
    assert status["endpoints"]["proxy"] == "https://mini-proxy.default.svc:80"


@pytest.mark.parametrize(("proxy", "status", "reason"), [
    ({}, "False", "PlainHttpNotAcknowledged"),  # every cluster from before tls existed
    ({"allowPlainHttp": True}, "False", "PlainHttpAllowed"),
    ({"tls": {"secretName": "mini-tls"}}, "True", "Terminated"),
    ({"tls": {"secretName": "mini-tls"}, "allowPlainHttp": False}, "True", "Terminated"),
])
def test_client_tls_condition(proxy: dict[str, Any], status: str, reason: str) -> None:
    body = copy.deepcopy(minimal_body())
    body["spec"]["proxy"].update(proxy)
    cond = condition(compute_status({}, Observation(1, cluster=cluster(body)), "now"),
                     "ClientTls")
    assert (cond["status"], cond["reason"]) == (status, reason)
    if reason == "PlainHttpNotAcknowledged":
        assert "spec.proxy.tls.secretName" in cond["message"]
        assert "spec.proxy.allowPlainHttp" in cond["message"]


async def test_the_proxy_serves_https_from_the_rendered_mount(tmp_path: Path) -> None:
    """The rendered listen.tls, its mount directory laid out as the kubelet does, a real
    proxy: HTTPS with the Secret's certificate."""
    ca = TestCa(tmp_path / "ca")
    leaf = ca.issue(7)
    mount = tmp_path / "secrets"
    TlsSecretVolume(mount / "tls").update(leaf.cert, leaf.key)
    tls = _rendered(_tls_body())["listen"]["tls"]
    tls = {k: v.replace(SECRETS_DIR, str(mount)) for k, v in tls.items()}
    backend = await FakeBackend("gpu").start()
    config = proxy_config([backend], listen={"host": "127.0.0.1", "port": free_port(),
                                             "admin_port": free_port(), "tls": tls})
    try:
        proxy = await start_proxy(tmp_path / "proxy.yaml", config, tmp_path / "proxy.log")
    except BaseException:
        await backend.stop()
        raise
    try:
        conn = await RawConnection.open(proxy.host, proxy.port, ca.client_context())
        assert (await conn.request("POST", "/v1/chat/completions", b"{}")).status == 200
        assert conn.writer.get_extra_info("peercert")["serialNumber"] == "07"
        conn.close()
    finally:
        await proxy.stop()
        await backend.stop()
