"""Shared builder helpers: canonical hashing and label-safe image versions."""

from __future__ import annotations

import re

import pytest

from gpuproxy_operator.builders.common import image_version, stable_hash

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def test_stable_hash_is_canonical_sha256() -> None:
    assert stable_hash({"b": 1, "a": [1, "x"]}) == stable_hash({"a": [1, "x"], "b": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": "1"})
    # sha256 of the canonical text '{"a":1}'
    assert stable_hash({"a": 1}) == (
        "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
    )


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("aiserve/gpuproxy-proxy:0.1.0", "0.1.0"),
        ("edoburu/pgbouncer:v1.24.1-p1", "v1.24.1-p1"),
        ("registry.example:5000/team/redis", "latest"),
        ("registry.example:5000/team/redis:7.4-alpine", "7.4-alpine"),
        ("busybox:1.37@sha256:" + "a" * 64, "1.37"),
        ("busybox@sha256:" + "0123456789ab" + "f" * 52, "sha256-0123456789ab"),
        ("img:_weird_", "weird"),
        ("img:" + "x" * 100, "x" * 63),
    ],
)
def test_image_version_is_a_valid_label_value(image: str, version: str) -> None:
    assert image_version(image) == version
    assert LABEL_VALUE.match(version)
    assert len(version) <= 63
