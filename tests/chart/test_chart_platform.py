"""What the chart decides for the platform: node tuning as one allowlisted DaemonSet (off by
default, never per cluster), the operands' default images (digest-pinnable) handed to the
operator, the operator's pod labels for the proxy NetworkPolicy, tenants' aggregated roles,
and a GpuProxyCluster that survives `helm uninstall`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.chart.helm import CLUSTER_VALUES, NAMESPACE, by_kind, one, render, render_result

from gpuproxy_operator import platform
from gpuproxy_operator.builders import OperandImages
from gpuproxy_operator.sysctls import NODE_TUNING_SYSCTLS

DIGEST = "sha256:" + "ab" * 32
TUNED = ("nodeTuning.enabled=true",)


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    pod = manifest["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def _env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    operator = one(by_kind(manifests, "Deployment"), "Deployment")
    [container] = operator["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_by_default_the_chart_runs_no_privileged_or_host_pod() -> None:
    for manifest in render():
        if manifest["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            pod = manifest["spec"]["template"]["spec"]
            assert not pod.get("hostNetwork")
            assert not any((c.get("securityContext") or {}).get("privileged")
                           for c in _containers(manifest))
    assert "GPUPROXY_NODE_TUNING" not in _env(render())


def test_enabled_node_tuning_is_one_daemonset_with_the_allowlisted_sysctls() -> None:
    manifests = render((), (*TUNED, f"nodeTuning.image.digest={DIGEST}",
                            "nodeTuning.nodeSelector.role=proxy"))
    ds = one(manifests, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["nodeSelector"] == {"role": "proxy"}
    [init] = pod["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert init["image"] == f"busybox@{DIGEST}"
    [main] = pod["containers"]
    assert main["securityContext"]["privileged"] is False
    [cm] = [m for m in by_kind(manifests, "ConfigMap")
            if m["metadata"]["name"] == ds["metadata"]["name"]]
    conf = cm["data"]["99-gpuproxy-100k.conf"]
    assert conf == "".join(f"{k} = {NODE_TUNING_SYSCTLS[k]}\n" for k in sorted(NODE_TUNING_SYSCTLS))
    # The operator reports this DaemonSet in NodeTuningReady.
    installed = platform.from_env(_env(manifests), NAMESPACE)
    assert installed.node_tuning == f"{NAMESPACE}/{ds['metadata']['name']}"


def test_a_sysctl_outside_the_allowlist_is_refused() -> None:
    result = render_result((), (*TUNED, "nodeTuning.sysctls.kernel\\.core_pattern=x"))
    assert result.returncode != 0
    assert "kernel.core_pattern" in result.stderr


def _verify_script() -> str:
    ds = one(render((), TUNED), "DaemonSet")
    [main] = ds["spec"]["template"]["spec"]["containers"]
    return str(main["readinessProbe"]["exec"]["command"][-1])


def _run_verify(conf: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("sysctl") is None:
        pytest.fail("sysctl is not installed (Debian package procps)")
    path = tmp_path / "99-gpuproxy-100k.conf"
    path.write_text(conf)
    script = _verify_script().replace("/etc/gpuproxy-sysctl/99-gpuproxy-100k.conf", str(path))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False,
                          timeout=30)


def _current(key: str) -> str:
    out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def test_readiness_passes_while_the_settings_hold_and_names_a_drifted_one(
        tmp_path: Path) -> None:
    keys = ("net.ipv4.ip_local_port_range", "net.core.somaxconn")
    ok = _run_verify("".join(f"{k} = {_current(k)}\n" for k in keys) + "\n", tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    current = _current("net.ipv4.ip_local_port_range")
    wanted = "1024 65535" if current != "1024 65535" else "2048 65000"
    bad = _run_verify(f"net.ipv4.ip_local_port_range = {wanted}\n", tmp_path)
    assert bad.returncode == 1
    assert "net.ipv4.ip_local_port_range" in bad.stdout


def test_operand_images_reach_the_operator_and_a_digest_pins_them() -> None:
    defaults = platform.from_env(_env(render()), NAMESPACE).images
    assert defaults == OperandImages()
    pinned = render((), (f"images.proxy.digest={DIGEST}", "images.redis.tag=8.0"))
    images = platform.from_env(_env(pinned), NAMESPACE).images
    assert images.proxy == f"aiserve/gpuproxy-proxy@{DIGEST}"
    assert images.redis == "redis:8.0"
    assert render_result((), ("images.redis.digest=latest",)).returncode != 0


def test_the_operator_knows_its_own_pod_labels() -> None:
    manifests = render()
    operator = platform.from_env(_env(manifests), NAMESPACE).operator
    assert operator is not None
    deployment = one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert operator.pod_labels
    assert operator.pod_labels.items() <= pod_labels.items()
    assert operator.pod_labels == deployment["spec"]["selector"]["matchLabels"]


def test_tenants_get_gpuproxyclusters_through_the_built_in_roles() -> None:
    roles = {r["metadata"]["name"]: r for r in by_kind(render(), "ClusterRole")}
    edit, view = roles["gp-gpuproxy-operator-edit"], roles["gp-gpuproxy-operator-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in view["metadata"]["labels"]
    edit_verbs = {v for r in edit["rules"] if "gpuproxyclusters" in r["resources"]
                  for v in r["verbs"]}
    assert {"create", "patch", "delete"} <= edit_verbs
    assert {v for r in view["rules"] for v in r["verbs"]} == {"get", "list", "watch"}
    assert not [r for r in by_kind(render((), ("rbac.aggregateToDefaultRoles=false",)),
                                   "ClusterRole") if r["metadata"]["name"].endswith("-view")]


def test_the_cluster_and_the_crd_survive_helm_uninstall() -> None:
    manifests = render((CLUSTER_VALUES,))
    cr = one(manifests, "GpuProxyCluster")
    assert cr["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    crd = one(render(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
