"""The proxy's objects: its config file (accepted by the proxy itself), Deployment (secrets as
files, probes, graceful shutdown), Services, ServiceAccount and PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from tests.operator.clusters import (
    CREDENTIALS,
    EXAMPLES,
    by_key,
    cluster,
    lean_body,
    minimal_body,
    production_body,
)

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.common import Manifest
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION
from gpuproxy_proxy.auth.authenticator import MIN_ADMIN_TOKEN_CHARS
from gpuproxy_proxy.config import LimitsConfig, ProxyConfig, SecretFilesConfig, parse_config


def _objects(body: dict[str, Any], replicas: int | None = None) -> dict[tuple[str, str], Manifest]:
    return by_key(build_all(cluster(body), BuildInputs(CREDENTIALS, replicas)))


def _config(body: dict[str, Any]) -> ProxyConfig:
    name = body["metadata"]["name"]
    return parse_config(_objects(body)[("ConfigMap", f"{name}-proxy")]["data"]["config.yaml"])


def _pod(body: dict[str, Any]) -> dict[str, Any]:
    name = body["metadata"]["name"]
    spec: dict[str, Any] = _objects(body)[("Deployment", f"{name}-proxy")]["spec"]["template"]
    return spec


def test_minimal_config_parses_with_the_proxy_and_carries_the_defaults() -> None:
    cfg = _config(minimal_body())
    assert (cfg.listen.port, cfg.listen.admin_port, cfg.workers) == (8080, 9090, 4)
    assert [(b.name, str(b.url)) for b in cfg.backends] == [("vllm-0", "http://vllm-0.gpu.svc:8000/")]
    assert cfg.load_balancing.strategy == "least_connections"
    assert (cfg.rate_limits.per_ip, cfg.rate_limits.per_user, cfg.rate_limits.per_api_key) == (
        1000, 10000, 100000
    )
    assert cfg.rate_limits.window_seconds == 60
    assert cfg.redis is not None
    assert cfg.redis.url == "redis://mini-redis.default.svc:6379/0"
    assert cfg.database is not None
    assert (cfg.database.host, cfg.database.port, cfg.database.database) == (
        "mini-pgbouncer.default.svc", 6432, "gpuproxy"
    )
    # 100000 connections * 1.1 / 4 workers
    assert cfg.limits.max_connections_per_worker == 27500
    assert cfg.limits.max_body_bytes == 10 * 1024 * 1024
    # Client deadlines: the CR's defaults are the proxy's own.
    proxy_defaults = LimitsConfig()
    assert (cfg.limits.body_read_timeout_seconds, cfg.limits.body_min_bytes_per_second,
            cfg.limits.client_write_timeout_seconds) == (
        proxy_defaults.body_read_timeout_seconds, proxy_defaults.body_min_bytes_per_second,
        proxy_defaults.client_write_timeout_seconds) == (60, 1024, 30)
    # Shutdown: 10 s drain delay, idle closes spread over 10 s, streams up to 600 s.
    assert (cfg.limits.drain_delay_seconds, cfg.limits.idle_close_seconds) == (10, 10)
    assert cfg.upstream.max_request_seconds == 600
    assert cfg.limits.shutdown_grace_seconds == 600


def test_client_timeouts_reach_the_proxy_limits() -> None:
    body = minimal_body()
    body["spec"]["proxy"]["clientTimeouts"] = {"bodySeconds": 600, "bodyMinBytesPerSecond": 0,
                                               "writeSeconds": 120}
    limits = _config(body).limits
    assert (limits.body_read_timeout_seconds, limits.body_min_bytes_per_second,
            limits.client_write_timeout_seconds) == (600, 0, 120)


def test_token_limits_budgets_and_prices_reach_the_proxy() -> None:
    body = minimal_body()
    body["spec"]["proxy"]["rateLimits"] = {"tokensPerMinute": {"perTeam": 50_000},
                                           "tokensPerDay": {"perApiKey": 1_000_000},
                                           "defaultMaxTokens": 256}
    body["spec"]["proxy"]["budgets"] = {
        "enabled": True, "prices": {"llama": {"input": "0.59", "output": "0.79"}},
        "defaultPrice": {"output": "2"}, "streamExtendTokens": 32}
    cfg = _config(body)
    rl = cfg.rate_limits
    assert (rl.tokens_per_minute.per_team, rl.tokens_per_minute.per_user) == (50_000, None)
    assert rl.tokens_per_day.per_api_key == 1_000_000
    assert rl.default_max_tokens == 256
    assert cfg.budgets.enabled
    assert (cfg.budgets.prices["llama"].input, cfg.budgets.prices["llama"].output) == (
        0.59, 0.79)
    assert (cfg.budgets.default_price.input, cfg.budgets.default_price.output) == (0.0, 2.0)
    assert cfg.budgets.stream_extend_tokens == 32
    # Off unless asked for: the CR's defaults are the proxy's own.
    default = _config(minimal_body())
    assert not default.budgets.enabled
    assert not default.rate_limits.tokens_per_minute.any
    assert not default.rate_limits.tokens_per_day.any


def test_production_config_follows_the_spec() -> None:
    cfg = _config(production_body())
    assert cfg.workers == 32
    assert cfg.listen.port == 8080
    assert cfg.load_balancing.strategy == "weighted_round_robin"
    assert [(b.name, b.weight, b.health_path, b.labels) for b in cfg.backends] == [
        ("a100-0", 3, "/health", {"gpu": "a100"}),
        ("h100-0", 5, "/v1/models", {}),
    ]
    assert (cfg.auth.jwt_issuer, cfg.auth.jwt_audience) == ("https://aiserve.farm", "gpuproxy")
    assert cfg.rate_limits.trusted_proxies == ["10.0.0.0/8"]
    assert cfg.redis is not None
    assert cfg.redis.url == "redis://prod-redis.aiserve-farm.svc:6379/0"
    assert cfg.database is not None
    assert cfg.database.host == "prod-pgbouncer.aiserve-farm.svc"
    assert cfg.database.database == "usage"
    assert cfg.limits.max_connections_per_worker == 3438  # ceil(110000 / 32)
    # terminationGracePeriodSeconds 120 - drain delay 10 - margin 20.
    assert cfg.limits.shutdown_grace_seconds == 90


def test_external_redis_url_is_used_verbatim() -> None:
    cfg = _config(lean_body())
    assert cfg.redis is not None
    assert cfg.redis.url == "rediss://redis.cache.example:6380/2"


@pytest.mark.parametrize(
    ("proxy", "grace", "waits"),
    [
        # Derived: drain delay + the longest request (or idle-close spread) + 20 s margin.
        ({}, 10 + 600 + 20, 600),
        ({"upstream": {"maxRequestSeconds": 60}}, 10 + 60 + 20, 60),
        ({"upstream": {"maxRequestSeconds": 5}, "shutdown": {"idleCloseSeconds": 30}},
         10 + 30 + 20, 30),
        ({"shutdown": {"drainDelaySeconds": 0, "idleCloseSeconds": 0},
          "upstream": {"maxRequestSeconds": 1}}, 0 + 1 + 20, 1),
        # An override: what is left after the drain delay and the margin.
        ({"terminationGracePeriodSeconds": 120}, 120, 90),
        ({"terminationGracePeriodSeconds": 30}, 30, 0),
        ({"terminationGracePeriodSeconds": 25, "shutdown": {"drainDelaySeconds": 5}}, 25, 0),
    ],
)
def test_grace_period_covers_drain_delay_longest_request_and_margin(
    proxy: dict[str, Any], grace: int, waits: int
) -> None:
    body = minimal_body()
    body["spec"]["proxy"].update(proxy)
    cfg = _config(body)
    assert _pod(body)["spec"]["terminationGracePeriodSeconds"] == grace
    assert cfg.limits.shutdown_grace_seconds == waits
    assert cfg.limits.drain_delay_seconds == body["spec"]["proxy"].get("shutdown", {}).get(
        "drainDelaySeconds", 10)


def test_deployment_strategy_probes_and_lifecycle() -> None:
    objs = _objects(minimal_body())
    dep = objs[("Deployment", "mini-proxy")]
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}
    }
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["--config", "/etc/gpuproxy/config/config.yaml"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "admin": 9090}
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "admin"}
    # Liveness: worker heartbeats; readiness: process, workers and config.
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "admin"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    # The proxy's own drain delay replaces the preStop sleep.
    assert "lifecycle" not in c
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/etc/gpuproxy/config": "config", "/etc/gpuproxy/secrets/db": "secret-db",
                      "/etc/gpuproxy/secrets/redis": "secret-redis", "/tmp": "tmp",
                      "/var/spool/gpuproxy": "metering-spool"}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "mini-proxy"
    assert "emptyDir" in volumes["tmp"]


def test_metering_spool_is_an_emptydir_sized_above_the_proxys_own_bound() -> None:
    cfg = _config(minimal_body())
    assert cfg.metering.spool_dir == "/var/spool/gpuproxy"
    assert cfg.metering.spool_max_bytes == 256 * 1024 * 1024
    assert (cfg.metering.on_spool_full, cfg.metering.retention_days) == ("reject", 90)
    assert _pod(minimal_body())["spec"]["volumes"][-1] == {
        "name": "metering-spool", "emptyDir": {"sizeLimit": "576Mi"}}

    body = minimal_body()
    body["spec"]["proxy"]["metering"] = {"spoolSizeMib": 1024, "onSpoolFull": "drop_oldest",
                                         "retentionDays": 400}
    cfg = _config(body)
    assert cfg.metering.spool_max_bytes == 1024 * 1024 * 1024
    assert (cfg.metering.on_spool_full, cfg.metering.retention_days) == ("drop_oldest", 400)
    volumes = {v["name"]: v for v in _pod(body)["spec"]["volumes"]}
    assert volumes["metering-spool"]["emptyDir"] == {"sizeLimit": "2112Mi"}


def test_pod_security_context_and_safe_sysctls() -> None:
    sc = _pod(minimal_body())["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == 10001
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["sysctls"] == [
        {"name": "net.ipv4.ip_local_port_range", "value": "1024 65535"},
        {"name": "net.ipv4.tcp_fin_timeout", "value": "15"},
        {"name": "net.ipv4.tcp_keepalive_intvl", "value": "10"},
        {"name": "net.ipv4.tcp_keepalive_probes", "value": "3"},
        {"name": "net.ipv4.tcp_keepalive_time", "value": "60"},
    ]
    # The legacy spec.nodeTuning.sysctls no longer reach the pods (ignored, reported).
    body = minimal_body()
    body["spec"]["nodeTuning"] = {"sysctls": {"net.core.somaxconn": "65535"}}
    assert _pod(body)["spec"]["securityContext"]["sysctls"] == sc["sysctls"]


def test_secrets_are_mounted_files_named_in_the_config() -> None:
    body = production_body()
    pod = _pod(body)["spec"]
    [c] = pod["containers"]
    assert "env" not in c  # no GPUPROXY_* secret variables any more
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert volumes == {
        "secret-jwt": {"secretName": "gpuproxy-auth", "items": [{"key": "jwt", "path": "secret"}],
                       "defaultMode": 0o440},
        "secret-admin": {"secretName": "gpuproxy-auth",
                         "items": [{"key": "admin", "path": "token"}], "defaultMode": 0o440},
        "secret-db": {"secretName": "gpuproxy-db", "items": [
            {"key": "username", "path": "username"}, {"key": "password", "path": "password"}],
            "defaultMode": 0o440},
        "secret-redis": {"secretName": "gpuproxy-redis",
                         "items": [{"key": "password", "path": "password"}],
                         "defaultMode": 0o440},
        "secret-tls": {"secretName": "gpuproxy-tls", "items": [
            {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
            "defaultMode": 0o440},
    }
    mounts = {m["name"]: m for m in c["volumeMounts"] if m["name"] in volumes}
    # Whole volumes, no subPath: the kubelet swaps the files on a rotation.
    assert all("subPath" not in m and m["readOnly"] for m in mounts.values())
    files = _config(body).secret_files
    assert files == SecretFilesConfig(
        jwt_secret="/etc/gpuproxy/secrets/jwt/secret",
        admin_token="/etc/gpuproxy/secrets/admin/token",
        db_user="/etc/gpuproxy/secrets/db/username",
        db_password="/etc/gpuproxy/secrets/db/password",
        redis_password="/etc/gpuproxy/secrets/redis/password",
    )
    # Every path the config names lies in a mounted volume, as one of its items.
    for path in files.model_dump().values():
        directory, _, name = path.rpartition("/")
        [mount] = [m for m in mounts.values() if m["mountPath"] == directory]
        assert name in [i["path"] for i in volumes[mount["name"]]["items"]]
    # What the spec references, and the bundled Redis' generated password.
    assert _config(minimal_body()).secret_files == SecretFilesConfig(
        db_user="/etc/gpuproxy/secrets/db/username",
        db_password="/etc/gpuproxy/secrets/db/password",
        redis_password="/etc/gpuproxy/secrets/redis/password",
    )


def test_scheduling_fields_pass_through() -> None:
    template = _pod(production_body())
    pod = template["spec"]
    assert pod["nodeSelector"] == {"node-role/proxy": "true"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "proxy", "effect": "NoSchedule"}
    ]
    assert pod["affinity"]["nodeAffinity"]
    assert pod["priorityClassName"] == "gpuproxy-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    annotations = template["metadata"]["annotations"]
    assert annotations["example.com/team"] == "inference"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert len(annotations[CONFIG_HASH_ANNOTATION]) == 64


def test_default_topology_spread_unless_the_user_sets_one() -> None:
    spread = _pod(minimal_body())["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "kubernetes.io/hostname"
    assert all(s["maxSkew"] == 1 and s["whenUnsatisfiable"] == "ScheduleAnyway" for s in spread)
    assert spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "proxy"
    body = minimal_body()
    own = {"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule",
           "labelSelector": {"matchLabels": {"app": "x"}}}
    body["spec"]["proxy"]["topologySpreadConstraints"] = [own]
    assert _pod(body)["spec"]["topologySpreadConstraints"] == [own]


@pytest.mark.parametrize(
    ("autoscaling", "decided", "expected"),
    [
        ({"enabled": False}, None, 3),
        ({"enabled": False}, 12, 12),
        ({"enabled": True, "minReplicas": 4, "maxReplicas": 8}, None, 4),
        ({"enabled": True, "minReplicas": 2, "maxReplicas": 8}, 6, 6),
        # Reconcile passes the count to keep: above a lowered maxReplicas the autoscaler
        # steps down at its scale-down pace, so the builder never clamps a decided count.
        ({"enabled": True, "minReplicas": 2, "maxReplicas": 8}, 20, 20),
    ],
)
def test_replicas(autoscaling: dict[str, Any], decided: int | None, expected: int) -> None:
    body = minimal_body()
    body["spec"]["autoscaling"] = autoscaling
    dep = _objects(body, decided)[("Deployment", "mini-proxy")]
    assert dep["spec"]["replicas"] == expected


def test_client_service_follows_spec_proxy_service() -> None:
    svc = _objects(production_body())[("Service", "prod-proxy")]
    assert svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-type"] == (
        "nlb"
    )
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["loadBalancerSourceRanges"] == ["0.0.0.0/0"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 443, "targetPort": "http",
                                     "protocol": "TCP", "appProtocol": "https"}]
    minimal = _objects(minimal_body())[("Service", "mini-proxy")]["spec"]
    assert minimal["type"] == "ClusterIP"
    assert minimal["ports"][0]["port"] == 80
    assert "externalTrafficPolicy" not in minimal


def test_metrics_service_service_account_and_pdb() -> None:
    objs = _objects(production_body())
    metrics = objs[("Service", "prod-proxy-metrics")]["spec"]
    assert metrics["type"] == "ClusterIP"
    assert metrics["ports"] == [{"name": "admin", "port": 9090, "targetPort": "admin",
                                 "protocol": "TCP"}]
    assert metrics["selector"]["app.kubernetes.io/component"] == "proxy"
    assert objs[("ServiceAccount", "prod-proxy")]["automountServiceAccountToken"] is False
    pod = objs[("Deployment", "prod-proxy")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "prod-proxy"
    pdb = objs[("PodDisruptionBudget", "prod-proxy")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "proxy"


def test_admin_api_port_only_with_an_admin_token() -> None:
    """Issue 11: the admin API has its own port, declared and configured only when the spec
    references an admin token (the proxy opens nothing for it otherwise)."""
    for body, expected in ((minimal_body(), None), (production_body(), 9091)):
        assert _config(body).listen.admin_api_port == expected
        [c] = _pod(body)["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports.get("admin-api") == expected
    body = production_body()
    body["spec"]["proxy"]["adminApiPort"] = 9443
    cfg = _config(body)
    assert (cfg.listen.port, cfg.listen.admin_port, cfg.listen.admin_api_port) == (8080, 9090,
                                                                                  9443)
    # Never on a Service: it is not for clients, and kubectl port-forward needs none.
    for (kind, _), obj in _objects(body).items():
        if kind == "Service":
            assert 9443 not in [p["port"] for p in obj["spec"]["ports"]]


def test_example_admin_tokens_are_long_enough_for_the_proxy() -> None:
    """A placeholder the proxy would refuse (under 32 characters) makes a broken example."""
    found = 0
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "GpuProxyCluster":
                continue
            ref = doc["spec"]["proxy"].get("auth", {}).get("adminTokenSecretRef")
            if ref is None:
                continue
            [secret] = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8"))
                        if d and d.get("kind") == "Secret"
                        and d["metadata"]["name"] == ref["name"]]
            assert len(secret["stringData"][ref["key"]]) >= MIN_ADMIN_TOKEN_CHARS, path
            found += 1
    assert found
