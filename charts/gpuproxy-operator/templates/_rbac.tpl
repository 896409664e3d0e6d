{{/*
RBAC rules of the operator, shared by the ClusterRole (cluster-wide install) and the per-namespace
Roles (namespaced install). Only the verbs the code uses; no wildcards. tests/chart/test_rbac.py
derives the needs from the operator's code and fails when a rule here is missing or too broad.
*/}}

{{/* Rules for objects that live in the watched namespaces. */}}
{{- define "gpuproxy-operator.namespacedRules" -}}
# --- Framework (kopf) ---
# The GpuProxyCluster resource: watch it, patch its metadata (handler progress annotations).
- apiGroups: ["gpuproxy.aiserve.farm"]
  resources: ["gpuproxyclusters"]
  verbs: ["get", "list", "watch", "patch"]
# Status goes through the status subresource (the CRD enables it).
- apiGroups: ["gpuproxy.aiserve.farm"]
  resources: ["gpuproxyclusters/status"]
  verbs: ["get", "patch"]
# Events about reconciles, repairs, scaling and errors (`kubectl describe gpc`).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# --- Application: the child objects the operator builds for each GpuProxyCluster ---
# Proxy and PgBouncer Deployments, the bundled Redis StatefulSet, the node-tuning DaemonSet.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Services, configuration, the PgBouncer userlist Secret and the proxy's ServiceAccount. Secrets
# are also read for the database credentials (spec.database.credentialsSecret).
- apiGroups: [""]
  resources: ["services", "configmaps", "secrets", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Disruption budget of the proxy pods.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Network isolation of PgBouncer and Redis.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Alerts and scraping, when the prometheus-operator CRDs exist.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["prometheusrules", "servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The autoscaler reads the proxy pods' IPs and readiness to count live connections.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Cluster-scoped reads of the framework (kopf): it follows CRD and namespace changes. */}}
{{- define "gpuproxy-operator.clusterScopedRules" -}}
# --- Framework (kopf): cluster-scoped reads ---
# Notice CRDs being installed or upgraded, and whether the optional prometheus-operator CRDs exist.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- if not .Values.watch.allNamespaces }}
# A namespaced operator lists namespaces to notice watched ones being created or deleted.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
