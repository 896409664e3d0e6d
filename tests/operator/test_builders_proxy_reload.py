"""The proxy's config contract: every config the builders render parses with the proxy's own
ProxyConfig, and the pod template changes exactly when the proxy cannot reload the change."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from tests.operator.clusters import CREDENTIALS, all_manifests, by_key, cluster, minimal_body

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.proxy_config import build_proxy_config
from gpuproxy_operator.naming import CONFIG_HASH_ANNOTATION
from gpuproxy_proxy.config import ProxyConfig, parse_config, restart_key

CONFIGS = [(name, m["data"]["config.yaml"]) for name, ms in all_manifests().items() for m in ms
           if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-proxy")]


def _kept(rendered: Any, parsed: Any, path: str = "") -> list[str]:
    """Paths where the parsed value differs from what was rendered."""
    if isinstance(rendered, dict):
        return [p for k, v in rendered.items()
                for p in _kept(v, parsed.get(k, "<missing>"), f"{path}.{k}")]
    if isinstance(rendered, list):
        if len(rendered) != len(parsed):
            return [path]
        return [p for i, (r, q) in enumerate(zip(rendered, parsed, strict=True))
                for p in _kept(r, q, f"{path}[{i}]")]
    return [] if rendered == parsed else [f"{path}: {rendered!r} -> {parsed!r}"]


@pytest.mark.parametrize(("name", "text"), CONFIGS, ids=[n for n, _ in CONFIGS])
def test_every_rendered_config_parses_with_the_proxys_model(name: str, text: str) -> None:
    config = parse_config(text)  # unknown keys and bad values raise (extra="forbid")
    # Every value the operator rendered arrives unchanged in the proxy's model.
    assert _kept(yaml.safe_load(text), config.model_dump(mode="json")) == []
    assert config.secret_files.db_password is not None


# (what changes, spec.proxy patch). Reloaded in place by the proxy: no rollout.
RELOADED = [
    ("backends", {"backends": [{"name": "vllm-9", "url": "http://vllm-9.gpu.svc:8000"}]}),
    ("backend-weights", {"loadBalancing": {"strategy": "weighted_round_robin"},
                         "backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000",
                                       "weight": 5}]}),
    ("strategy", {"loadBalancing": {"strategy": "round_robin"}}),
    ("per-model-strategy", {"loadBalancing": {"strategy": "least_load",
                                              "perModel": {"llama": "prefix_affinity"}}}),
    ("upstream-timeouts", {"upstream": {"connectTimeoutSeconds": 2, "readTimeoutSeconds": 90}}),
    ("max-request", {"upstream": {"maxRequestSeconds": 900}}),
    ("retries", {"upstream": {"retry": {"maxAttempts": 0, "budgetPercent": 5}}}),
    ("admission", {"admission": {"enabled": True, "maxInFlightPerBackend": 16,
                                 "priorities": {"gold": {"weight": 3, "apiKeys": ["k1"]}}}}),
    ("health-check", {"healthCheck": {"intervalSeconds": 9, "timeoutSeconds": 3}}),
    ("rate-limits", {"rateLimits": {"perIp": 50, "perUser": 60}}),
    ("body-limit", {"maxBodyBytes": 2048}),
    ("client-timeouts", {"clientTimeouts": {"bodySeconds": 300, "bodyMinBytesPerSecond": 0,
                                            "writeSeconds": 90}}),
    # Shorter than maxRequestSeconds, so the grace period stays.
    ("drain-timing", {"shutdown": {"idleCloseSeconds": 30}}),
]
# Fixed when the processes start: a rollout.
RESTARTED = [
    ("workers", {"workers": 8}),
    ("port", {"port": 8081}),
    ("admin-port", {"adminPort": 9091}),
]


def _patched(patch: dict[str, Any]) -> dict[str, Any]:
    body = minimal_body()
    body["spec"]["proxy"].update(copy.deepcopy(patch))
    return body


def _template(body: dict[str, Any]) -> dict[str, Any]:
    dep = by_key(build_all(cluster(body), BuildInputs(CREDENTIALS)))[("Deployment", "mini-proxy")]
    template: dict[str, Any] = dep["spec"]["template"]
    return template


def _config_map(body: dict[str, Any]) -> str:
    objs = by_key(build_all(cluster(body), BuildInputs(CREDENTIALS)))
    text: str = objs[("ConfigMap", "mini-proxy")]["data"]["config.yaml"]
    return text


@pytest.mark.parametrize(("what", "patch"), RELOADED, ids=[w for w, _ in RELOADED])
def test_reloadable_changes_reach_pods_through_the_configmap_alone(
    what: str, patch: dict[str, Any]
) -> None:
    before, after = minimal_body(), _patched(patch)
    assert _config_map(before) != _config_map(after), what
    if what == "max-request":
        # The pod's grace period follows the longest request: a template field, but not the
        # config hash (the running processes take the new limit by reload).
        old, new = _template(before), _template(after)
        assert (old["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
                == new["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])
        assert (old["spec"]["terminationGracePeriodSeconds"]
                != new["spec"]["terminationGracePeriodSeconds"])
        return
    assert _template(before) == _template(after), what


@pytest.mark.parametrize(("what", "patch"), RESTARTED, ids=[w for w, _ in RESTARTED])
def test_restart_only_changes_change_the_config_hash(what: str, patch: dict[str, Any]) -> None:
    old, new = _template(minimal_body()), _template(_patched(patch))
    assert (old["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
            != new["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]), what


@pytest.mark.parametrize(("what", "patch"), RELOADED + RESTARTED,
                         ids=[w for w, _ in RELOADED + RESTARTED])
def test_the_config_hash_follows_the_proxys_restart_key(what: str, patch: dict[str, Any]) -> None:
    """Whatever the proxy declares reloadable (config.restart_key), the operator agrees."""
    keys = [restart_key(ProxyConfig.model_validate(build_proxy_config(cluster(b))))
            for b in (minimal_body(), _patched(patch))]
    hashes = [_template(b)["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
              for b in (minimal_body(), _patched(patch))]
    assert (keys[0] != keys[1]) == (hashes[0] != hashes[1]), what
