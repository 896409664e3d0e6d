"""Node tuning: the sysctl file pinned to the guide's 99-gpuproxy-100k.conf, the DaemonSet's
host-network privileged init container, and its readiness check run against this machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.operator.clusters import by_key, cluster, minimal_body, production_body

from gpuproxy_operator.builders import BuildInputs, build_all
from gpuproxy_operator.builders.common import Manifest
from gpuproxy_operator.builders.node_tuning import SYSCTL_DIR, SYSCTL_FILE, VERIFY_SCRIPT

# The guide's /etc/sysctl.d/99-gpuproxy-100k.conf, comments dropped and lines sorted.
GUIDE_SYSCTL_FILE = """\
net.core.default_qdisc = fq
net.core.netdev_max_backlog = 65536
net.core.rmem_default = 10485760
net.core.rmem_max = 10485760
net.core.somaxconn = 65535
net.core.wmem_default = 10485760
net.core.wmem_max = 10485760
net.ipv4.ip_local_port_range = 1024 65535
net.ipv4.tcp_congestion_control = bbr
net.ipv4.tcp_fastopen = 3
net.ipv4.tcp_fin_timeout = 15
net.ipv4.tcp_keepalive_intvl = 10
net.ipv4.tcp_keepalive_probes = 3
net.ipv4.tcp_keepalive_time = 60
net.ipv4.tcp_max_syn_backlog = 65536
net.ipv4.tcp_max_tw_buckets = 2000000
net.ipv4.tcp_mem = 786432 1048576 26777216
net.ipv4.tcp_rmem = 4096 87380 10485760
net.ipv4.tcp_slow_start_after_idle = 0
net.ipv4.tcp_tw_reuse = 1
net.ipv4.tcp_wmem = 4096 65536 10485760
"""


def _objects(body: dict[str, Any]) -> dict[tuple[str, str], Manifest]:
    return by_key(build_all(cluster(body), BuildInputs()))


def test_sysctl_file_is_the_guides() -> None:
    cm = _objects(minimal_body())[("ConfigMap", "mini-node-tuning")]
    assert cm["data"] == {"99-gpuproxy-100k.conf": GUIDE_SYSCTL_FILE}


def test_custom_sysctls_replace_the_defaults_sorted() -> None:
    body = minimal_body()
    body["spec"]["nodeTuning"] = {"sysctls": {"net.ipv4.tcp_fin_timeout": "30",
                                              "net.core.somaxconn": "4096"}}
    cm = _objects(body)[("ConfigMap", "mini-node-tuning")]
    assert cm["data"]["99-gpuproxy-100k.conf"] == (
        "net.core.somaxconn = 4096\nnet.ipv4.tcp_fin_timeout = 30\n"
    )


def test_daemonset_tunes_the_host_namespace_with_one_privileged_init_container() -> None:
    ds = _objects(production_body())[("DaemonSet", "prod-node-tuning")]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"node-role/proxy": "true"}
    assert pod["tolerations"] == [{"operator": "Exists"}]
    [init] = pod["initContainers"]
    assert init["command"] == ["sysctl", "-p", f"{SYSCTL_DIR}/{SYSCTL_FILE}"]
    assert init["securityContext"]["privileged"] is True
    [main] = pod["containers"]
    assert main["command"] == ["sleep", "2147483647"]
    assert main["securityContext"]["privileged"] is False
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert main["resources"]["limits"] == {"cpu": "10m", "memory": "16Mi"}
    for c in (init, main):
        assert c["volumeMounts"] == [
            {"name": "sysctls", "mountPath": SYSCTL_DIR, "readOnly": True}
        ]
    assert pod["volumes"] == [{"name": "sysctls", "configMap": {"name": "prod-node-tuning"}}]


def test_disabled_node_tuning_builds_nothing() -> None:
    body = minimal_body()
    body["spec"]["nodeTuning"] = {"enabled": False}
    assert not [k for k in _objects(body) if k[1] == "mini-node-tuning"]


def _run_verify(conf: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("sysctl") is None:
        pytest.fail("sysctl is not installed (Debian package procps)")
    path = tmp_path / SYSCTL_FILE
    path.write_text(conf)
    script = VERIFY_SCRIPT.replace(f"{SYSCTL_DIR}/{SYSCTL_FILE}", str(path))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False,
                          timeout=30)


def _current(key: str) -> str:
    out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def test_readiness_script_passes_when_the_settings_hold(tmp_path: Path) -> None:
    """Multi-value settings print tab-separated; the script compares them word by word."""
    keys = ("net.ipv4.ip_local_port_range", "net.core.somaxconn")
    conf = "".join(f"{k} = {_current(k)}\n" for k in keys) + "\n"
    result = _run_verify(conf, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readiness_script_fails_and_names_the_drifted_setting(tmp_path: Path) -> None:
    current = _current("net.ipv4.ip_local_port_range")
    wanted = "1024 65535" if current != "1024 65535" else "2048 65000"
    conf = f"net.core.somaxconn = {_current('net.core.somaxconn')}\n"
    conf += f"net.ipv4.ip_local_port_range = {wanted}\n"
    result = _run_verify(conf, tmp_path)
    assert result.returncode == 1
    assert "net.ipv4.ip_local_port_range" in result.stdout
