"""Dockerfile.operator and Dockerfile.proxy: hadolint-clean, multi-stage, non-root, exec-form,
and consistent with what runs them (the chart, the builders' proxy Deployment, pyproject)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.chart.helm import load_yaml, one, render
from tests.tools import REPO_ROOT, hadolint_binary

from gpuproxy_operator.api.proxy import ProxySpec
from gpuproxy_operator.builders import proxy as proxy_builder
from gpuproxy_operator.cli import build_parser
from gpuproxy_operator.commands.run import namespaces_from

DOCKERFILES = {
    "operator": REPO_ROOT / "Dockerfile.operator",
    "proxy": REPO_ROOT / "Dockerfile.proxy",
}
SCRIPTS = {"operator": "gpuproxy-operator", "proxy": "gpuproxy-proxy"}
BUILD_TOOLS = ("apt-get", "apk ", "gcc", "build-essential", "make ", "git ")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif keyword == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), value
    assert all(isinstance(p, str) for p in parsed), value
    return parsed


def project() -> dict[str, Any]:
    """pyproject.toml's [project] table."""
    data: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return data


@pytest.mark.parametrize("image", DOCKERFILES)
def test_hadolint_passes(image: str) -> None:
    proc = subprocess.run(
        [str(hadolint_binary()), "--no-color", str(DOCKERFILES[image])],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("image", DOCKERFILES)
def test_multi_stage_wheel_build(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    builder, final = stages[0], stages[-1]
    assert len(stages) == 2
    assert builder.name == "builder"
    assert builder.base == final.base, "the wheels must be built for the runtime's Python"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", final.base), final.base
    assert any(f'pip wheel --no-cache-dir --wheel-dir /wheels ".[{image}]"' in run
               for run in builder.all("RUN"))
    version = project()["version"]
    install = " ".join(final.all("RUN"))
    assert "--mount=type=bind,from=builder,source=/wheels,target=/wheels" in install
    assert "--no-index" in install
    assert f'"gpuproxy[{image}]=={version}"' in install
    other = "proxy" if image == "operator" else "operator"
    assert f"gpuproxy[{other}]" not in install


@pytest.mark.parametrize("image", DOCKERFILES)
def test_final_stage_is_lean(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    final = stages[-1]
    assert final.all("COPY") == [], "the runtime stage gets only the installed wheels"
    assert final.all("ADD") == []
    for run in final.all("RUN"):
        assert not any(tool in run for tool in BUILD_TOOLS), run
    runs = " ".join(final.all("RUN"))
    assert "--no-cache-dir" in runs
    assert "pip uninstall --yes setuptools wheel" in runs, "packaging tools of the base image"


@pytest.mark.parametrize("image", DOCKERFILES)
def test_runs_as_numeric_non_root_user(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    user = stages[-1].last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), user
    assert gid.isdigit(), user
    assert int(uid) != 0
    assert int(gid) != 0


def test_users_match_what_kubernetes_runs() -> None:
    _, operator_stages = parse_dockerfile(DOCKERFILES["operator"])
    _, proxy_stages = parse_dockerfile(DOCKERFILES["proxy"])
    chart_values = load_yaml(REPO_ROOT / "charts" / "gpuproxy-operator" / "values.yaml")
    assert operator_stages[-1].last("USER") == "{0}:{0}".format(
        chart_values["podSecurityContext"]["runAsUser"])
    assert proxy_stages[-1].last("USER") == f"{proxy_builder.PROXY_UID}:{proxy_builder.PROXY_UID}"


@pytest.mark.parametrize("image", DOCKERFILES)
def test_exec_form_entrypoint_is_a_project_script(image: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[image])
    entrypoint = exec_form(stages[-1].last("ENTRYPOINT"))
    assert entrypoint == [SCRIPTS[image]]
    assert SCRIPTS[image] in project()["scripts"]


def run_defaults(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> argparse.Namespace:
    for var in ("GPUPROXY_WATCH_NAMESPACE", "GPUPROXY_METRICS_PORT", "GPUPROXY_LIVENESS"):
        monkeypatch.delenv(var, raising=False)
    return build_parser("run").parse_args(argv)


def test_operator_image_defaults_match_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    _, stages = parse_dockerfile(DOCKERFILES["operator"])
    final = stages[-1]
    args = run_defaults(monkeypatch, exec_form(final.last("CMD")))
    assert namespaces_from(args) == ()
    port = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\w+)", args.liveness)
    assert port is not None, args.liveness
    exposed = {int(p) for p in final.last("EXPOSE").split()}
    assert exposed == {int(port.group(1)), args.metrics_port}
    probe = exec_form(final.last("HEALTHCHECK").split(" CMD ", 1)[1])
    assert f"http://127.0.0.1:{port.group(1)}{port.group(2)}" in probe[-1]


def test_operator_image_runs_what_the_chart_passes() -> None:
    (container,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "command" not in container, "the chart keeps the image's ENTRYPOINT"
    assert container["args"][0] == "run"


def test_proxy_image_matches_the_builders_deployment() -> None:
    _, stages = parse_dockerfile(DOCKERFILES["proxy"])
    final = stages[-1]
    defaults = ProxySpec.model_fields
    client_port, admin_port = defaults["port"].default, defaults["admin_port"].default
    admin_api_port = defaults["admin_api_port"].default
    assert {int(p) for p in final.last("EXPOSE").split()} == {client_port, admin_port,
                                                              admin_api_port}
    cmd = exec_form(final.last("CMD"))
    assert cmd == ["--config", f"{proxy_builder.CONFIG_DIR}/{proxy_builder.CONFIG_FILE}"]
    probe = exec_form(final.last("HEALTHCHECK").split(" CMD ", 1)[1])
    assert f"http://127.0.0.1:{admin_port}/health" in probe[-1]


def test_dockerignore_admits_only_what_the_builds_copy() -> None:
    lines = [
        ln.strip()
        for ln in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "**", "deny everything, then re-include"
    included = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied: set[str] = set()
    for path in DOCKERFILES.values():
        _, stages = parse_dockerfile(path)
        for copy in stages[0].all("COPY"):
            copied |= {src.rstrip("/") for src in copy.split()[:-1]}
    assert included == copied
    assert all((REPO_ROOT / src).exists() for src in copied)
