"""Images are the operator's unless a cluster pins one: the CRD stores no default, so an
operator upgrade (new GPUPROXY_*_IMAGE from the chart) upgrades every cluster that leaves them
unset, including clusters an older CRD filled with its defaults."""

from __future__ import annotations

from typing import Any

import pytest
from tests.operator.clusters import CREDENTIALS, by_key, cluster, minimal_body

from gpuproxy_operator import platform
from gpuproxy_operator.builders import BuildInputs, OperandImages, build_all
from gpuproxy_operator.builders.images import LEGACY_CRD_DEFAULTS

NEW = OperandImages(proxy="reg.example/gpuproxy-proxy@sha256:" + "1" * 64,
                    pgbouncer="reg.example/pgbouncer:1.25", redis="reg.example/redis:8.0")


def _images(body: dict[str, Any], images: OperandImages) -> dict[str, str]:
    objs = by_key(build_all(cluster(body), BuildInputs(CREDENTIALS, images=images)))
    out = {}
    for kind, name in (("Deployment", "mini-proxy"), ("Deployment", "mini-pgbouncer"),
                       ("StatefulSet", "mini-redis")):
        [container] = objs[(kind, name)]["spec"]["template"]["spec"]["containers"]
        out[name] = container["image"]
    return out


def test_unset_images_come_from_the_operator() -> None:
    assert _images(minimal_body(), NEW) == {
        "mini-proxy": NEW.proxy, "mini-pgbouncer": NEW.pgbouncer, "mini-redis": NEW.redis}


def test_images_an_older_crd_defaulted_count_as_unset() -> None:
    body = minimal_body()
    body["spec"]["proxy"]["image"] = "aiserve/gpuproxy-proxy:0.1.0"
    body["spec"]["pgbouncer"] = {"image": "edoburu/pgbouncer:v1.24.1-p1"}
    body["spec"]["redis"] = {"image": "redis:7.4-alpine"}
    assert set(_images(body, OperandImages()).values()) == LEGACY_CRD_DEFAULTS
    assert _images(body, NEW) == _images(minimal_body(), NEW)


def test_a_pinned_image_stays() -> None:
    body = minimal_body()
    body["spec"]["proxy"]["image"] = "mine/proxy:9"
    assert _images(body, NEW)["mini-proxy"] == "mine/proxy:9"


def test_the_operator_reads_its_images_and_pods_from_the_environment() -> None:
    installed = platform.from_env({
        "GPUPROXY_PROXY_IMAGE": NEW.proxy, "GPUPROXY_PGBOUNCER_IMAGE": NEW.pgbouncer,
        "GPUPROXY_REDIS_IMAGE": NEW.redis,
        "GPUPROXY_OPERATOR_POD_LABELS": "app.kubernetes.io/name=op,app.kubernetes.io/instance=gp",
        "GPUPROXY_NODE_TUNING": "ops/gp-node-tuning"}, "ops")
    assert installed.images == NEW
    assert installed.operator is not None
    assert installed.operator.namespace == "ops"
    assert installed.operator.pod_labels == {"app.kubernetes.io/name": "op",
                                             "app.kubernetes.io/instance": "gp"}
    assert installed.node_tuning == "ops/gp-node-tuning"
    bare = platform.from_env({}, None)
    assert (bare.images, bare.operator, bare.node_tuning) == (OperandImages(), None, None)
    with pytest.raises(platform.PlatformConfigError, match="GPUPROXY_OPERATOR_POD_LABELS"):
        platform.from_env({"GPUPROXY_OPERATOR_POD_LABELS": "novalue"}, "ops")
