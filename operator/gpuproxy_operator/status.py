"""Pure status computation: what the reconcile observed -> phase, conditions (with transition
times kept while a condition's status holds), scale-subresource fields and endpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.naming import child_name, selector_labels
from gpuproxy_operator.node_tuning import TuningSeen

OWN_CONDITIONS = ("Ready", "Progressing", "Degraded", "Paused", "ProxyReady", "PgBouncerReady",
                  "RedisReady", "NodeTuningReady", "AlertsReady", "ClientTls")
# Status fields this module owns; others (currentConnections, desiredReplicas, lastScaleTime,
# the Scaling condition) belong to the autoscaler and are left as they are.
OWN_FIELDS = ("phase", "observedGeneration", "replicas", "readyReplicas", "selector", "endpoints",
              "replicasOwner", "replicasOwnerMessage", "handoverSpecReplicas")
COMPONENT_CONDITIONS = ("ProxyReady", "PgBouncerReady", "RedisReady", "NodeTuningReady")
# What Ready waits for. Node tuning is the platform's and the proxy serves without it (at the
# kernel's defaults), so NodeTuningReady informs but never holds Ready back.
READY_GATES = ("ProxyReady", "PgBouncerReady", "RedisReady")

Children = Mapping[tuple[str, str], Mapping[str, Any]]


@dataclass(frozen=True)
class Observation:
    """Everything one reconcile learned; the input of `compute_status`."""

    generation: int | None
    paused: bool = False
    cluster: GpuProxyCluster | None = None  # None when the spec is invalid
    invalid: list[tuple[str, str]] = field(default_factory=list)
    children: Children = field(default_factory=dict)
    desired: Sequence[Mapping[str, Any]] = field(default_factory=list)
    credentials_problem: str | None = None
    missing_apis: dict[str, str] = field(default_factory=dict)  # kind -> why
    errors: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)
    applied: list[str] = field(default_factory=list)  # changes made by this reconcile
    withheld: int = 0  # changes not made because of spec.paused
    # The replica owner's status fields (autoscaling/ownership.py); a None value is written as
    # null (removed). Empty when the spec is invalid: the fields stay as they are.
    replicas_owner: Mapping[str, Any] = field(default_factory=dict)
    # `<namespace>/<name>` of the platform's node-tuning DaemonSet (the chart's), None: absent.
    node_tuning: str | None = None
    # What reading that DaemonSet showed (node_tuning.py); None: not read by this reconcile.
    node_tuning_seen: TuningSeen | None = None


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool | None  # None -> "Unknown"
    reason: str
    message: str = ""


def _workload(obj: Mapping[str, Any] | None, what: str, hint: str) -> Cond:
    """Readiness of a Deployment/StatefulSet (replicas) or DaemonSet (nodes)."""
    if obj is None:
        return Cond("", False, "NotCreated", f"{what} does not exist yet")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    meta_gen = (obj.get("metadata") or {}).get("generation")
    seen_gen = status.get("observedGeneration")
    if meta_gen is not None and (seen_gen is None or seen_gen < meta_gen):
        return Cond("", False, "RollingOut", f"{what}: the controller has not yet seen the change")
    if obj.get("kind") == "DaemonSet":
        want = int(status.get("desiredNumberScheduled") or 0)
        ready = int(status.get("numberReady") or 0)
        updated = int(status.get("updatedNumberScheduled") or 0)
        unit = "nodes"
    else:
        want = int(spec.get("replicas", 1))
        ready = int(status.get("readyReplicas") or 0)
        updated = int(status.get("updatedReplicas", ready) or 0)
        unit = "pods"
    if ready >= want and updated >= want:
        return Cond("", True, "AllReady", f"{what}: {ready}/{want} {unit} ready")
    return Cond("", False, "NotReady", f"{what}: {ready}/{want} {unit} ready; {hint}")


def _pods_hint(namespace: str, cluster: str, component: str) -> str:
    sel = ",".join(f"{k}={v}" for k, v in selector_labels(cluster, component).items())  # type: ignore[arg-type]
    return f"see `kubectl -n {namespace} get pods -l {sel}`"


def component_conditions(obs: Observation) -> list[Cond]:
    c = obs.cluster
    if c is None:
        why = "the spec is invalid, nothing was built (see the Degraded condition)"
        return [Cond(t, None, "SpecInvalid", why)
                for t in (*COMPONENT_CONDITIONS, "AlertsReady", "ClientTls")]
    ns, name, kids = c.metadata.namespace, c.metadata.name, obs.children
    out: list[Cond] = []
    proxy = _workload(kids.get(("Deployment", child_name(name, "proxy"))), "proxy Deployment",
                      _pods_hint(ns, name, "proxy"))
    out.append(Cond("ProxyReady", proxy.status, proxy.reason, proxy.message))
    if obs.credentials_problem:
        out.append(Cond("PgBouncerReady", False, "CredentialsUnavailable", obs.credentials_problem))
    else:
        pgb = _workload(kids.get(("Deployment", child_name(name, "pgbouncer"))),
                        "PgBouncer Deployment", _pods_hint(ns, name, "pgbouncer"))
        out.append(Cond("PgBouncerReady", pgb.status, pgb.reason, pgb.message))
    if c.spec.redis.mode == "external":
        out.append(Cond("RedisReady", True, "External",
                        "using the external Redis from spec.redis.url"))
    else:
        red = _workload(kids.get(("StatefulSet", child_name(name, "redis"))), "Redis StatefulSet",
                        _pods_hint(ns, name, "redis"))
        out.append(Cond("RedisReady", red.status, red.reason, red.message))
    out.append(_node_tuning(obs))
    out.append(_alerts(obs))
    out.append(_client_tls(obs))
    return out


def _client_tls(obs: Observation) -> Cond:
    """How clients reach the proxy. Plain HTTP that nobody acknowledged is a warning (False),
    never an error: every cluster created before spec.proxy.tls existed is in that state."""
    assert obs.cluster is not None
    proxy = obs.cluster.spec.proxy
    if proxy.tls is not None:
        return Cond("ClientTls", True, "Terminated",
                    f"the client port serves HTTPS (TLS {proxy.tls.min_version}+) with the "
                    f"certificate in Secret {proxy.tls.secret_name}; renewals are reloaded "
                    "without a restart")
    if proxy.allow_plain_http:
        return Cond("ClientTls", False, "PlainHttpAllowed",
                    "the client port serves plain HTTP, as spec.proxy.allowPlainHttp asks "
                    "(TLS is expected to end before the proxy)")
    return Cond("ClientTls", False, "PlainHttpNotAcknowledged",
                "the client port serves plain HTTP because spec.proxy.tls is unset: set "
                "spec.proxy.tls.secretName to a kubernetes.io/tls Secret (e.g. a cert-manager "
                "Certificate's), or spec.proxy.allowPlainHttp: true when TLS ends before the "
                "proxy")


def _node_tuning(obs: Observation) -> Cond:
    """Whether the platform provides what spec.nodeTuning asks for; legacy fields are named
    here (a warning, not an error: an older CRD defaulted them into every stored cluster)."""
    assert obs.cluster is not None
    nt = obs.cluster.spec.node_tuning
    ignored = nt.ignored_fields()
    note = ("; ignored: " + ", ".join(f"spec.nodeTuning.{f}" for f in ignored)
            + " (node tuning is the platform's: the operator chart's nodeTuning values choose "
            "the image, sysctls and nodes); remove them from the spec") if ignored else ""
    if not nt.enabled:
        return Cond("NodeTuningReady", True, "NotRequested",
                    "spec.nodeTuning.enabled is false" + note)
    if obs.node_tuning is None:
        return Cond("NodeTuningReady", False, "NotInstalled",
                    "spec.nodeTuning.enabled asks for tuned nodes, but this operator's "
                    "installation has no node tuning: the platform admin enables it with the "
                    "chart value nodeTuning.enabled=true (or tunes the nodes through their "
                    "image); the proxy runs meanwhile with the nodes' kernel defaults. Set "
                    "spec.nodeTuning.enabled: false to silence this" + note)
    return _platform_tuning(obs.node_tuning, obs.node_tuning_seen, note)


def _platform_tuning(ref: str, seen: TuningSeen | None, note: str) -> Cond:
    """Whether the chart's DaemonSet has tuned every node it selects (its pods are ready)."""
    ns, name = ref.partition("/")[::2]
    rollout = f"`kubectl -n {ns} rollout status daemonset/{name}`"
    if seen is None:
        return Cond("NodeTuningReady", True, "ProvidedByPlatform",
                    f"the platform's node-tuning DaemonSet {ref} tunes the nodes ({rollout}); "
                    "the proxy pods set their own network namespace's safe sysctls" + note)
    if seen.missing:
        return Cond("NodeTuningReady", False, "DaemonSetMissing",
                    f"the operator was installed with node tuning, but DaemonSet {ref} does not "
                    "exist: re-install the chart with nodeTuning.enabled=true (or run "
                    "`helm upgrade` again); the proxy runs meanwhile with the nodes' kernel "
                    "defaults" + note)
    if seen.daemonset is None:
        return Cond("NodeTuningReady", None, "StatusUnknown",
                    f"cannot read the node-tuning DaemonSet {ref} ({seen.error}); the chart "
                    "grants the operator `get` on it: check the operator's RBAC" + note)
    ds = {"kind": "DaemonSet", **seen.daemonset}
    wanted = int(((ds.get("status") or {}).get("desiredNumberScheduled")) or 0)
    state = _workload(ds, f"node-tuning DaemonSet {ref}", f"see {rollout}")
    if state.status and wanted == 0:
        return Cond("NodeTuningReady", False, "NoNodesSelected",
                    f"the node-tuning DaemonSet {ref} runs on no node: its nodeSelector or "
                    "tolerations (chart values nodeTuning.nodeSelector, nodeTuning.tolerations) "
                    "match none of the nodes the proxy runs on" + note)
    if not state.status:
        return Cond("NodeTuningReady", False, "TuningInProgress", state.message + note)
    return Cond("NodeTuningReady", True, "NodesTuned",
                f"{state.message}: every selected node is tuned; the proxy pods set their own "
                "network namespace's safe sysctls" + note)


def _alerts(obs: Observation) -> Cond:
    assert obs.cluster is not None
    mon = obs.cluster.spec.monitoring
    wanted = [k for k, on in (("PrometheusRule", mon.prometheus_rule.enabled),
                              ("ServiceMonitor", mon.service_monitor.enabled)) if on]
    if not wanted:
        return Cond("AlertsReady", True, "Disabled",
                    "spec.monitoring turns alerts and scraping off")
    missing = [k for k in wanted if k in obs.missing_apis]
    if missing:
        return Cond("AlertsReady", False, "PrometheusOperatorMissing",
                    f"skipped {' and '.join(missing)}: the monitoring.coreos.com/v1 CRDs are not "
                    "installed in this cluster; install the prometheus-operator CRDs, or turn "
                    "these off under spec.monitoring")
    absent = [k for k in wanted if not any(key[0] == k for key in obs.children)]
    if absent:
        return Cond("AlertsReady", False, "NotCreated", f"{' and '.join(absent)} not created yet")
    return Cond("AlertsReady", True, "Created", f"{' and '.join(wanted)} in place")


def summary_conditions(obs: Observation, components: list[Cond]) -> list[Cond]:
    degraded: list[tuple[str, str]] = []
    if obs.invalid:
        degraded.append(("InvalidSpec", "cannot build the stack: " + "; ".join(
            f"{path or 'spec'}: {reason}" for path, reason in obs.invalid)
            + "; fix these fields (`kubectl edit gpc` for spec.*)"))
    if obs.credentials_problem:
        degraded.append(("CredentialsUnavailable", obs.credentials_problem))
    degraded.extend(obs.errors)
    core = [cond for cond in components if cond.type in READY_GATES]
    waiting = [cond for cond in core if cond.status is not True]
    ready = not waiting and not obs.invalid
    out = [
        Cond("Ready", ready, "AllComponentsReady" if ready else "ComponentsNotReady",
             "; ".join(cond.message for cond in core) if ready else
             "waiting for " + "; ".join(f"{cond.type}: {cond.message}" for cond in waiting)),
    ]
    if obs.paused:
        out.append(Cond("Progressing", False, "Paused", "changes are on hold while paused"))
    elif obs.applied:
        shown = "; ".join(obs.applied[:3])
        more = f"; and {len(obs.applied) - 3} more" if len(obs.applied) > 3 else ""
        out.append(Cond("Progressing", True, "Applied", f"applied: {shown}{more}"))
    elif waiting and not obs.invalid:
        out.append(Cond("Progressing", True, "RollingOut",
                        "waiting for the workloads to become ready"))
    else:
        out.append(Cond("Progressing", False, "Converged" if not degraded else "Blocked",
                        "every child matches the spec" if not degraded
                        else "cannot progress until the Degraded condition is resolved"))
    if degraded:
        out.append(Cond("Degraded", True, degraded[0][0], "; ".join(m for _, m in degraded)))
    else:
        out.append(Cond("Degraded", False, "AsExpected", ""))
    if obs.paused:
        out.append(Cond("Paused", True, "PausedBySpec",
                        f"spec.paused is true: {obs.withheld} change(s) to child objects are on "
                        "hold; set spec.paused to false to apply them"))
    else:
        out.append(Cond("Paused", False, "NotPaused", ""))
    return out


def _phase(obs: Observation, conds: Mapping[str, Cond]) -> str:
    if obs.paused:
        return "Paused"
    if conds["Degraded"].status:
        return "Degraded"
    if conds["Ready"].status:
        return "Ready"
    return "Progressing" if obs.children else "Pending"


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def endpoints(obs: Observation) -> dict[str, str]:
    c = obs.cluster
    if c is None:
        return {}
    ns, name = c.metadata.namespace, c.metadata.name
    ports: dict[str, int] = {}
    for m in obs.desired:
        if m.get("kind") == "Service":
            svc_ports = (m.get("spec") or {}).get("ports") or []
            if svc_ports:
                ports[m["metadata"]["name"]] = int(svc_ports[0]["port"])

    def host(svc: str) -> str | None:
        return f"{svc}.{ns}.svc:{ports[svc]}" if svc in ports else None

    out: dict[str, str | None] = {
        "proxy": (h := host(child_name(name, "proxy")))
        and f"{'https' if c.spec.proxy.tls is not None else 'http'}://{h}",
        "metrics": (h := host(child_name(name, "proxy", "metrics"))) and f"http://{h}/metrics",
        "pgbouncer": host(child_name(name, "pgbouncer")),
        "redis": _strip_userinfo(c.spec.redis.url) if c.spec.redis.mode == "external" and
        c.spec.redis.url else (h := host(child_name(name, "redis"))) and f"redis://{h}",
    }
    return {k: v for k, v in out.items() if v}


def compute_status(previous: Mapping[str, Any], obs: Observation, now: str) -> dict[str, Any]:
    """The status this module owns (camelCase, as on the wire), with the previous status'
    transition times kept for conditions whose status did not change."""
    components = component_conditions(obs)
    summary = summary_conditions(obs, components)
    by_type = {cond.type: cond for cond in summary + components}
    old = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, dict)}
    conditions: list[dict[str, Any]] = []
    for ctype in OWN_CONDITIONS:
        cond = by_type[ctype]
        status = "Unknown" if cond.status is None else ("True" if cond.status else "False")
        before = old.get(ctype) or {}
        conditions.append({
            "type": ctype, "status": status, "reason": cond.reason, "message": cond.message,
            "lastTransitionTime": before.get("lastTransitionTime", now)
            if before.get("status") == status else now,
            "observedGeneration": obs.generation,
        })
    # Conditions of other writers (the autoscaler's Scaling) stay, after ours.
    conditions += [c for t, c in old.items() if t not in OWN_CONDITIONS]
    result: dict[str, Any] = {
        "phase": _phase(obs, by_type),
        "conditions": conditions,
        "observedGeneration": obs.generation,
        "endpoints": endpoints(obs),
    }
    if obs.cluster is not None:
        name = obs.cluster.metadata.name
        labels = selector_labels(name, "proxy")
        result["selector"] = ",".join(f"{k}={v}" for k, v in labels.items())
        proxy = obs.children.get(("Deployment", child_name(name, "proxy")))
        if proxy is not None:
            st = proxy.get("status") or {}
            result["replicas"] = int(st.get("replicas", 0) or 0)
            result["readyReplicas"] = int(st.get("readyReplicas", 0) or 0)
    return {**{k: v for k, v in result.items() if v is not None}, **obs.replicas_owner}


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fields of `new` that differ from `previous`, or None when nothing changed."""
    changed = {k: v for k, v in new.items() if previous.get(k) != v}
    return changed or None


def condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any]:
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == ctype:
            return cond
    return {}
