"""CEL `x-kubernetes-validations` per API model: cross-field rules the apiserver enforces.

Each rule mirrors a pydantic validator in the models, so `render` and the apiserver agree;
tests evaluate both on the same inputs.
"""

from __future__ import annotations

from pydantic import BaseModel

from gpuproxy_operator.api.components import (
    AutoscalingSpec,
    NodeTuningSpec,
    PgBouncerSpec,
    RedisSpec,
    ScalingRules,
)
from gpuproxy_operator.api.proxy import Auth, HealthCheck, ProxySpec

Rule = dict[str, str]

RULES: dict[type[BaseModel], list[Rule]] = {
    AutoscalingSpec: [
        {
            "rule": "self.minReplicas <= self.maxReplicas",
            "message": "minReplicas must be less than or equal to maxReplicas",
            "fieldPath": ".minReplicas",
        },
    ],
    ScalingRules: [
        {
            "rule": "self.selectPolicy == 'Disabled' || size(self.policies) > 0",
            "message": "policies must not be empty unless selectPolicy is Disabled",
            "fieldPath": ".policies",
        },
    ],
    ProxySpec: [
        {
            "rule": "self.loadBalancing.strategy == 'weighted_round_robin'"
            " || self.backends.all(b, b.weight == 1)",
            "message": "backends[].weight other than 1 only takes effect with "
            "loadBalancing.strategy weighted_round_robin",
            "fieldPath": ".backends",
        },
        {
            "rule": "self.port != self.adminPort",
            "message": "port and adminPort must differ",
            "fieldPath": ".adminPort",
        },
    ],
    HealthCheck: [
        {
            "rule": "self.timeoutSeconds < self.intervalSeconds",
            "message": "timeoutSeconds must be less than intervalSeconds",
            "fieldPath": ".timeoutSeconds",
        },
    ],
    Auth: [
        {
            "rule": "!(has(self.jwtIssuer) || has(self.jwtAudience)) || has(self.jwtSecretRef)",
            "message": "jwtIssuer and jwtAudience need jwtSecretRef (the HS256 secret)",
            "fieldPath": ".jwtSecretRef",
        },
    ],
    PgBouncerSpec: [
        {
            "rule": "self.maxDbConnections == 0 || self.defaultPoolSize <= self.maxDbConnections",
            "message": "defaultPoolSize must not exceed maxDbConnections",
            "fieldPath": ".defaultPoolSize",
        },
    ],
    RedisSpec: [
        {
            "rule": "self.mode != 'external' || has(self.url)",
            "message": "url is required when mode is external",
            "fieldPath": ".url",
        },
    ],
    NodeTuningSpec: [
        {
            "rule": "self.sysctls.all(k, k.matches('^[a-z0-9_]+([.][a-z0-9_-]+)+$'))",
            "message": "sysctls keys must be kernel parameter names such as net.core.somaxconn",
            "fieldPath": ".sysctls",
        },
    ],
}
