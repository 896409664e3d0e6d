"""`gpuproxy-operator render`: offline manifests, clear errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from crd_schema import ROOT

from gpuproxy_operator.cli import main

MINIMAL = ROOT / "examples" / "gpuproxycluster-minimal.yaml"


def test_render_prints_every_child(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", str(MINIMAL)]) == 0
    out, err = capsys.readouterr()
    docs = list(yaml.safe_load_all(out))
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule",
        "Secret", "Service", "ServiceAccount", "ServiceMonitor", "StatefulSet",
    ]
    assert all(d["metadata"]["ownerReferences"][0]["name"] == "demo" for d in docs)
    # The random Redis password is made by the operator, once, not by render.
    assert err == ("note: the operator creates Secret default/demo-redis-auth (the bundled "
                   "Redis' password, random) on its first reconcile; it is not rendered\n")


def test_render_warns_about_ignored_node_tuning_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = list(yaml.safe_load_all(MINIMAL.read_text()))
    [cluster] = [d for d in docs if d["kind"] == "GpuProxyCluster"]
    cluster["spec"]["nodeTuning"] = {"image": "busybox:1.37", "sysctls": {"a.b": "1"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert main(["render", "-f", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "DaemonSet" not in {d["kind"] for d in yaml.safe_load_all(out)}
    assert "spec.nodeTuning.image, spec.nodeTuning.sysctls are ignored" in err


def test_render_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    main(["render", "-f", str(MINIMAL)])
    first = capsys.readouterr().out
    main(["render", "-f", str(MINIMAL)])
    assert capsys.readouterr().out == first


def test_render_without_the_secret_notes_the_missing_userlist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = [d for d in yaml.safe_load_all(MINIMAL.read_text()) if d["kind"] != "Secret"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert main(["render", "-f", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "Secret" not in {d["kind"] for d in yaml.safe_load_all(out)}
    assert "Secret default/gpuproxy-db is not in the input" in err


def test_invalid_resource_names_field_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = list(yaml.safe_load_all(MINIMAL.read_text()))
    cluster = next(d for d in docs if d["kind"] == "GpuProxyCluster")
    cluster["spec"]["autoscaling"] = {"minReplicas": 5, "maxReplicas": 2}
    cluster["spec"]["proxy"]["backends"][0]["url"] = "not a url"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert main(["render", "-f", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "GpuProxyCluster default/demo is invalid" in err
    assert "spec.autoscaling: minReplicas must be less than or equal to maxReplicas" in err
    assert "spec.proxy.backends[0].url:" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: [unclosed", "is not valid YAML"),
        ("apiVersion: v1\nkind: ConfigMap\n", "no GpuProxyCluster found"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_unusable_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "in.yaml"
    path.write_text(content)
    assert main(["render", "-f", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", "/nonexistent/cluster.yaml"]) == 2
    assert "cannot read /nonexistent/cluster.yaml" in capsys.readouterr().err


def test_console_script_survives_a_closed_pipe() -> None:
    cmd = f"{sys.executable} -m gpuproxy_operator.cli render -f {MINIMAL} | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "---\n"
    assert "Traceback" not in proc.stderr
