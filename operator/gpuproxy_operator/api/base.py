"""Shared building blocks of the GpuProxyCluster API: the model base and common value types."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from gpuproxy_operator.api.rules import CrossFieldRule, apply_rules

GROUP = "gpuproxy.aiserve.farm"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "GpuProxyCluster"
PLURAL = "gpuproxyclusters"
SINGULAR = "gpuproxycluster"
SHORT_NAMES = ("gpc",)


class Model(BaseModel):
    """Base of every API model: frozen, camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = ()
    """Rules over several fields; each also becomes a CEL rule in the CRD (see rules.py)."""

    @model_validator(mode="wrap")
    @classmethod
    def _cross_field(cls, data: Any, handler: ValidatorFunctionWrapHandler,
                     info: ValidationInfo) -> Any:
        return apply_rules(cls, data, handler, strict=info.mode == "json")


def _quantity_to_str(value: Any) -> Any:
    # The CRD types quantities as int-or-string, as the API server does for `cpu: 2`; a
    # float such as 0.5 is neither, and the API server refuses it, so it is refused here too.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"

# Kubernetes quantities arrive as YAML ints ("cpu: 2") or strings ("cpu: 500m").
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]

# Free-form Kubernetes objects we pass through verbatim (affinity, topology spread constraints).
FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(pattern=DNS_LABEL, min_length=1, max_length=63)]


class SecretKeyRef(Model):
    """A key in a Secret in the cluster's namespace."""

    name: Name
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """Key inside the Secret's data."""


class Resources(Model):
    """Compute resources of a container, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources, e.g. {cpu: 500m, memory: 1Gi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources."""

    def to_k8s(self) -> dict[str, dict[str, str]]:
        body: dict[str, dict[str, str]] = {}
        if self.requests:
            body["requests"] = dict(self.requests)
        if self.limits:
            body["limits"] = dict(self.limits)
        return body


class Toleration(Model):
    """A Pod toleration."""

    key: str | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """How the key is matched."""
    value: str | None = None
    """Taint value, for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; empty tolerates every effect."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)
