"""GpuProxyCluster bodies for builder tests: a minimal one, a production-100k one like the
guide's, and variants that turn components off; plus the examples users apply."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

from gpuproxy_operator.api.cluster import GpuProxyCluster, parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.common import Manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CREDENTIALS = DatabaseCredentials(username="gpuproxy", password='s3cr"et pw')


def minimal_body() -> dict[str, Any]:
    return {
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1",
        "kind": "GpuProxyCluster",
        "metadata": {"name": "mini", "namespace": "default", "uid": "uid-mini"},
        "spec": {
            "proxy": {"backends": [{"name": "vllm-0", "url": "http://vllm-0.gpu.svc:8000"}]},
            "database": {"host": "postgres.db.svc", "credentialsSecret": "gpuproxy-db"},
        },
    }


def production_body() -> dict[str, Any]:
    """Everything switched on and customised, sized like the guide's 1M-connection setup."""
    return {
        "apiVersion": "gpuproxy.aiserve.farm/v1alpha1",
        "kind": "GpuProxyCluster",
        "metadata": {"name": "prod", "namespace": "aiserve-farm", "uid": "uid-prod"},
        "spec": {
            "proxy": {
                "image": "registry.example/gpuproxy-proxy:1.2.3",
                "imagePullSecrets": ["regcred"],
                "replicas": 3,
                "workers": 32,
                "connectionsPerReplica": 100000,
                "backends": [
                    {"name": "a100-0", "url": "http://a100-0.gpu.svc:8000", "weight": 3,
                     "labels": {"gpu": "a100"}},
                    {"name": "h100-0", "url": "https://h100-0.gpu.svc", "weight": 5,
                     "healthPath": "/v1/models"},
                ],
                "loadBalancing": {"strategy": "weighted_round_robin"},
                "auth": {
                    "jwtSecretRef": {"name": "gpuproxy-auth", "key": "jwt"},
                    "adminTokenSecretRef": {"name": "gpuproxy-auth", "key": "admin"},
                    "jwtIssuer": "https://aiserve.farm",
                    "jwtAudience": "gpuproxy",
                },
                "rateLimits": {"trustedProxies": ["10.0.0.0/8"]},
                "service": {
                    "type": "LoadBalancer",
                    "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
                    "externalTrafficPolicy": "Local",
                    "loadBalancerSourceRanges": ["0.0.0.0/0"],
                    "port": 443,
                },
                "podDisruptionBudget": {"maxUnavailable": 2},
                "nodeSelector": {"node-role/proxy": "true"},
                "tolerations": [{"key": "dedicated", "value": "proxy", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                    ]}]}}},
                "priorityClassName": "gpuproxy-critical",
                "podAnnotations": {"example.com/team": "inference"},
                "terminationGracePeriodSeconds": 120,
                "tls": {"secretName": "gpuproxy-tls"},  # a cert-manager Certificate's
            },
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 10},
            "database": {
                "host": "postgres.aiserve-farm.svc", "port": 5433, "database": "usage",
                "credentialsSecret": "gpuproxy-db", "sslMode": "require",
                "backup": {"enabled": True, "claimName": "gpuproxy-backups",
                           "timeZone": "Europe/Berlin", "retentionDays": 14},
            },
            "redis": {
                "passwordSecretRef": {"name": "gpuproxy-redis", "key": "password"},
                "persistence": True, "storageClassName": "fast-ssd",
            },
            "nodeTuning": {"enabled": True},
            "monitoring": {
                "prometheusRule": {"labels": {"release": "kube-prometheus-stack"}},
                "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            },
        },
    }


def lean_body() -> dict[str, Any]:
    """External Redis; node tuning, PDB and both monitoring objects switched off."""
    body = minimal_body()
    body["metadata"].update(name="lean", uid="uid-lean")
    spec = body["spec"]
    spec["redis"] = {"mode": "external", "url": "rediss://redis.cache.example:6380/2"}
    spec["nodeTuning"] = {"enabled": False}
    spec["proxy"]["podDisruptionBudget"] = {"enabled": False}
    spec["monitoring"] = {"prometheusRule": {"enabled": False}}
    return body


def discovery_body() -> dict[str, Any]:
    """The minimal cluster plus backends discovered from a Service and from slice labels."""
    body = minimal_body()
    body["spec"]["proxy"]["backendDiscovery"] = [
        {"name": "h100", "service": "vllm-h100", "port": "http"},
        {"name": "l4", "selector": {"app": "vllm-l4", "tier": "gpu"}, "port": 8000,
         "scheme": "https", "healthPath": "/v1/models"},
    ]
    return body


def cluster(body: dict[str, Any]) -> GpuProxyCluster:
    return parse_cluster(copy.deepcopy(body))


def variants() -> dict[str, tuple[GpuProxyCluster, BuildInputs]]:
    return {
        "minimal": (cluster(minimal_body()), BuildInputs()),
        "minimal-with-credentials": (
            cluster(minimal_body()), BuildInputs(database_credentials=CREDENTIALS)
        ),
        "production-100k": (
            cluster(production_body()),
            BuildInputs(database_credentials=CREDENTIALS, proxy_replicas=7),
        ),
        "lean": (cluster(lean_body()), BuildInputs(database_credentials=CREDENTIALS)),
        "discovery": (cluster(discovery_body()), BuildInputs(database_credentials=CREDENTIALS)),
    }


def example_inputs(path: Path) -> list[tuple[GpuProxyCluster, BuildInputs]]:
    """The clusters of an example file, with credentials from Secrets in the same file."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    for doc in docs:
        if doc.get("kind") == "Secret":
            meta = doc["metadata"]
            data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
            data.update({k: str(v) for k, v in (doc.get("stringData") or {}).items()})
            secrets[(meta.get("namespace", "default"), meta["name"])] = data
    out = []
    for doc in docs:
        if doc.get("kind") != "GpuProxyCluster":
            continue
        doc.setdefault("metadata", {}).setdefault("namespace", "default")
        parsed = parse_cluster(doc)
        found = secrets.get((parsed.metadata.namespace, parsed.spec.database.credentials_secret))
        creds = DatabaseCredentials(found["username"], found["password"]) if found else None
        out.append((parsed, BuildInputs(database_credentials=creds)))
    return out


def all_manifests() -> dict[str, list[Manifest]]:
    """Every manifest of every variant and example, keyed by a readable id."""
    out = {name: build_all(c, i) for name, (c, i) in variants().items()}
    for path in EXAMPLES:
        for n, (c, i) in enumerate(example_inputs(path)):
            out[f"example:{path.name}:{n}"] = build_all(c, i)
    return out


def by_key(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def pod_templates(manifest: Manifest) -> list[dict[str, Any]]:
    if manifest["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        return [manifest["spec"]["template"]]
    return []
