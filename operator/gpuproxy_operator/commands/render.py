"""`gpuproxy-operator render -f FILE`: every child manifest of the GpuProxyClusters in FILE,
as multi-document YAML, with no cluster. Secrets in the same file supply database credentials."""

from __future__ import annotations

import argparse
import base64
import os
import sys
from typing import Any, TextIO

import yaml

from gpuproxy_operator.api.base import KIND
from gpuproxy_operator.api.cluster import parse_cluster
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.redis_auth import generated_secret_name, needs_generated_secret
from gpuproxy_operator.commands.inputs import INPUT_ERRORS, read_documents, report_input_error


class RenderError(ValueError):
    """Input that cannot be rendered; the message is for the user."""


def _secret_data(doc: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
    data.update({k: str(v) for k, v in (doc.get("stringData") or {}).items()})
    return data


def render_documents(docs: list[Any]) -> list[dict[str, Any]]:
    """Build the manifests for every GpuProxyCluster among `docs`."""
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    clusters = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise RenderError(f"document {index + 1}: expected a mapping, got {type(doc).__name__}")
        if doc.get("kind") == "Secret":
            meta = doc.get("metadata") or {}
            key = (meta.get("namespace", "default"), meta.get("name", ""))
            secrets[key] = _secret_data(doc)
        elif doc.get("kind") == KIND:
            doc.setdefault("metadata", {}).setdefault("namespace", "default")
            clusters.append(doc)
    if not clusters:
        raise RenderError(f"no {KIND} found in the input")
    manifests: list[dict[str, Any]] = []
    for body in clusters:
        cluster = parse_cluster(body)
        ns = cluster.metadata.namespace
        creds = secrets.get((ns, cluster.spec.database.credentials_secret))
        credentials = None
        if creds and "username" in creds and "password" in creds:
            credentials = DatabaseCredentials(creds["username"], creds["password"])
        elif creds is None:
            print(
                f"note: Secret {ns}/{cluster.spec.database.credentials_secret} is not in the "
                "input, so the PgBouncer userlist Secret is not rendered",
                file=sys.stderr,
            )
        ignored = cluster.spec.node_tuning.ignored_fields()
        if ignored:
            print(
                f"warning: {KIND} {ns}/{cluster.metadata.name}: "
                + ", ".join(f"spec.nodeTuning.{f}" for f in ignored)
                + " are ignored (node tuning is the platform's: the operator chart's nodeTuning "
                "values); remove them",
                file=sys.stderr,
            )
        if needs_generated_secret(cluster):
            print(
                f"note: the operator creates Secret {ns}/{generated_secret_name(cluster)} (the "
                "bundled Redis' password, random) on its first reconcile; it is not rendered",
                file=sys.stderr,
            )
        manifests.extend(build_all(cluster, BuildInputs(database_credentials=credentials)))
    return manifests


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (pgbouncer.ini, redis.conf, config.yaml) as readable literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_manifests(manifests: list[dict[str, Any]], out: TextIO) -> None:
    yaml.dump_all(
        manifests, out, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=100
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--filename", required=True, help="YAML file with GpuProxyCluster(s); - for stdin"
    )


def main(args: argparse.Namespace) -> int:
    try:
        manifests = render_documents(read_documents(args.filename))
    except INPUT_ERRORS as exc:
        return report_input_error(args.filename, exc)
    try:
        dump_manifests(manifests, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # `render | head` closed the pipe: not an error. Silence the flush at exit too.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    return 0
