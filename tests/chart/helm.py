"""Helm chart test helpers: run `helm lint` / `helm template` on charts/gpuproxy-operator with the
repo's Helm 4 binary and return parsed manifests; renders are cached per argument list."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from tests.tools import REPO_ROOT, helm_binary

CHART = REPO_ROOT / "charts" / "gpuproxy-operator"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
NAMESPACED_VALUES = CHART / "ci" / "namespaced-values.yaml"
CLUSTER_VALUES = CHART / "ci" / "cluster-values.yaml"
RELEASE = "gp"
NAMESPACE = "gpuproxy-system"
CR_API = "gpuproxy.aiserve.farm/v1alpha1/GpuProxyCluster"
CRD_SOURCE = REPO_ROOT / "crds" / "gpuproxy.aiserve.farm_gpuproxyclusters.yaml"
# Default values plus every CI values file: what CI lints and renders.
VALUE_SETS: dict[str, tuple[Path, ...]] = {
    "default": (),
    **{path.stem: (path,) for path in CI_VALUES},
}


def values_files(name: str) -> tuple[Path, ...]:
    return VALUE_SETS[name]


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str


def run_helm(*args: str) -> HelmResult:
    proc = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120, check=False
    )
    return HelmResult(proc.returncode, proc.stdout, proc.stderr)


@functools.cache
def _template(args: tuple[str, ...]) -> HelmResult:
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)


def template_args(
    values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = (), *extra: str
) -> tuple[str, ...]:
    args: list[str] = []
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return (*args, *extra)


def render_result(
    values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = (), *extra: str
) -> HelmResult:
    return _template(template_args(values_files, sets, *extra))


def render(
    values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = (), *extra: str
) -> list[dict[str, Any]]:
    """`helm template` output as manifests; fails the test with Helm's message on an error."""
    result = render_result(values_files, sets, *extra)
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def notes(values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = ()) -> str:
    """The rendered NOTES.txt: `helm template` never prints it, a client-side dry-run install
    does (and talks to no cluster)."""
    args = template_args(values_files, sets)
    result = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *args
    )
    if result.returncode != 0:
        pytest.fail(f"helm install --dry-run=client failed:\n{result.stderr}")
    return result.stdout.split("NOTES:", 1)[1]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@functools.cache
def sync_module() -> ModuleType:
    """scripts/sync-chart-crd.py as a module (its file name is not an importable name)."""
    path = REPO_ROOT / "scripts" / "sync-chart-crd.py"
    spec = importlib.util.spec_from_file_location("sync_chart_crd", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
