{{/*
RBAC rules of the operator, shared by the ClusterRole (cluster-wide install) and the per-namespace
Roles (namespaced install). Only the verbs the code uses; no wildcards. tests/chart/test_chart_rbac.py
derives the needs from the operator's code and fails when a rule here is missing or unused.
*/}}

{{/* Rules for objects that live in the watched namespaces. */}}
{{- define "gpuproxy-operator.namespacedRules" -}}
# --- Framework (kopf) and the reconcile loop: the GpuProxyCluster itself ---
# Watched by kopf; read when reconcile needs a fresh copy and listed by the periodic resync;
# patched by kopf for its progress and last-handled-configuration annotations.
- apiGroups: ["gpuproxy.aiserve.farm"]
  resources: ["gpuproxyclusters"]
  verbs: ["get", "list", "watch", "patch"]
# Phase, conditions, replicas and endpoints go through the status subresource.
- apiGroups: ["gpuproxy.aiserve.farm"]
  resources: ["gpuproxyclusters/status"]
  verbs: ["patch"]
# Children's ownerReferences set blockOwnerDeletion; the OwnerReferencesPermissionEnforcement
# admission plugin (e.g. OpenShift) then requires update on the owner's finalizers.
- apiGroups: ["gpuproxy.aiserve.farm"]
  resources: ["gpuproxyclusters/finalizers"]
  verbs: ["update"]
# Events about created/repaired children, scaling and errors (`kubectl describe gpc`).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# --- Application: the child objects the operator builds for each GpuProxyCluster ---
# Watched for drift repair and the caches reconcile reads, created/patched to converge, deleted
# when a component is switched off. get: ownership check on a name conflict, the autoscaler's
# read of the proxy Deployment. Secrets are also listed and watched one by one (fieldSelector
# metadata.name) for the database credentials Secret (spec.database.credentialsSecret).
# Proxy and PgBouncer Deployments, the bundled Redis StatefulSet.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The per-cluster node-tuning DaemonSet older operators created: observed and deleted only (node
# tuning is the chart's own DaemonSet now; the operator never creates privileged pods).
- apiGroups: ["apps"]
  resources: ["daemonsets"]
  verbs: ["get", "list", "watch", "delete"]
# Services, configuration, the PgBouncer userlist Secret and the proxy's ServiceAccount.
- apiGroups: [""]
  resources: ["services", "configmaps", "secrets", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The database backup (spec.database.backup): a CronJob whose pods run pg_dump.
- apiGroups: ["batch"]
  resources: ["cronjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Backend discovery (spec.proxy.backendDiscovery): the proxy's own Role and RoleBinding.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Never used by the operator itself: RBAC escalation prevention lets it create the proxy's
# Role (list/watch EndpointSlices) only if it holds those permissions too.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
# Disruption budget of the proxy pods.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Network isolation of the proxy, PgBouncer and Redis.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Alerts and scraping, when the prometheus-operator CRDs exist (skipped otherwise).
- apiGroups: ["monitoring.coreos.com"]
  resources: ["prometheusrules", "servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# --- Application: the autoscaler ---
# Lists the proxy pods (IPs and readiness) to scrape their live connection counts; patches
# their controller.kubernetes.io/pod-deletion-cost annotation right before a scale-down, so the
# least loaded pods go first.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
# Looks for a HorizontalPodAutoscaler on the proxy Deployment (reconcile and the autoscaler),
# so the operator never fights one.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list"]
{{- end }}

{{/* Cluster-scoped reads of the framework (kopf). */}}
{{- define "gpuproxy-operator.clusterScopedRules" -}}
# --- Framework (kopf): cluster-scoped reads ---
# kopf watches CRDs to notice resources (ours, prometheus-operator's) being added or removed.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not .Values.watch.allNamespaces }}
# A namespaced kopf lists namespaces to notice watched ones being created or deleted.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

{{/* Leader election, in the release namespace. */}}
{{- define "gpuproxy-operator.leaderElectionRules" -}}
# The Lease every replica reads, the first one creates, and the leader renews and releases
# (merge patches carrying the resourceVersion they were computed from).
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "patch"]
{{- end }}
