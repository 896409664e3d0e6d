"""No secret is derivable from what `view` can read: no annotation or hash of any child
depends on a password (a plain SHA-256 of one can be brute-forced offline). Only Secret data
changes with it; the planner compares that data itself."""

from __future__ import annotations

from typing import Any

from tests.operator.clusters import cluster, production_body

from gpuproxy_operator import reconcile
from gpuproxy_operator.builders import BuildInputs, DatabaseCredentials, build_all
from gpuproxy_operator.builders.redis_auth import build_generated_redis_secret
from gpuproxy_operator.naming import SPEC_HASH_ANNOTATION


def _without_secret_data(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if not (m["kind"] == "Secret" and k == "data")}
            for m in manifests]


def test_nothing_but_secret_data_depends_on_the_database_password() -> None:
    parsed = cluster(production_body())
    one = build_all(parsed, BuildInputs(DatabaseCredentials("app", "hunter2")))
    two = build_all(parsed, BuildInputs(DatabaseCredentials("app", "correct horse")))
    assert one != two  # the userlist differs ...
    assert _without_secret_data(one) == _without_secret_data(two)  # ... and nothing else


def test_the_generated_redis_password_is_in_no_annotation() -> None:
    parsed = cluster(production_body())
    one, two = (build_generated_redis_secret(parsed, pw) for pw in ("pw-one", "pw-two"))
    assert one["data"] != two["data"]
    assert one["metadata"] == two["metadata"]


def test_a_password_change_is_still_planned_as_a_patch() -> None:
    """Without the data in the spec hash, the planner sees the change in the data itself."""
    parsed = cluster(production_body())
    old = build_all(parsed, BuildInputs(DatabaseCredentials("app", "hunter2")))
    new = build_all(parsed, BuildInputs(DatabaseCredentials("app", "correct horse")))
    observed = {reconcile.key_of(m): m for m in old}
    [action] = reconcile.plan(new, observed, parsed.metadata.uid).actions
    assert (action.verb, action.kind, action.name) == ("patch", "Secret", "prod-pgbouncer")
    assert action.body["data"] != observed[("Secret", "prod-pgbouncer")]["data"]
    assert SPEC_HASH_ANNOTATION in action.body["metadata"]["annotations"]
