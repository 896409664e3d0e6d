"""The one Kubernetes API client of the operator: a small aiohttp client authenticated with kopf's
login credentials, a registry of the kinds we use, and API errors mapped to typed exceptions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from gpuproxy_operator.api.base import GROUP, KIND, PLURAL, VERSION
from gpuproxy_operator.naming import Component, selector_labels
from gpuproxy_operator.ratelimit import TokenBucket


def plain(obj: Any) -> Any:
    """kopf hands out Mapping views of bodies; pydantic and JSON want dicts and lists."""
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class ResourceKind:
    """Where a kind lives in the API."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if sub:
            base += f"/{sub}"
        return base


_KINDS = [
    ResourceKind("ServiceAccount", "", "v1", "serviceaccounts"),
    ResourceKind("ConfigMap", "", "v1", "configmaps"),
    ResourceKind("Secret", "", "v1", "secrets"),
    ResourceKind("Service", "", "v1", "services"),
    ResourceKind("Pod", "", "v1", "pods"),
    ResourceKind("Event", "", "v1", "events"),
    ResourceKind("Deployment", "apps", "v1", "deployments"),
    ResourceKind("StatefulSet", "apps", "v1", "statefulsets"),
    ResourceKind("DaemonSet", "apps", "v1", "daemonsets"),
    ResourceKind("CronJob", "batch", "v1", "cronjobs"),
    ResourceKind("PodDisruptionBudget", "policy", "v1", "poddisruptionbudgets"),
    ResourceKind("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies"),
    ResourceKind("Role", "rbac.authorization.k8s.io", "v1", "roles"),
    ResourceKind("RoleBinding", "rbac.authorization.k8s.io", "v1", "rolebindings"),
    ResourceKind("Lease", "coordination.k8s.io", "v1", "leases"),
    ResourceKind("PrometheusRule", "monitoring.coreos.com", "v1", "prometheusrules"),
    ResourceKind("ServiceMonitor", "monitoring.coreos.com", "v1", "servicemonitors"),
    ResourceKind(KIND, GROUP, VERSION, PLURAL),
]
REGISTRY: dict[str, ResourceKind] = {k.kind: k for k in _KINDS}
CLUSTER = REGISTRY[KIND]
# Kinds no builder emits any more, observed only so reconcile deletes what an older operator
# created (the per-cluster node-tuning DaemonSet): RBAC grants them no create or patch.
CLEANUP_ONLY_KINDS: tuple[str, ...] = ("DaemonSet",)
# The kinds a GpuProxyCluster owns, in apply order; reconcile observes exactly these.
CHILD_KINDS: tuple[str, ...] = (
    "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "Service", "Deployment",
    "StatefulSet", "DaemonSet", "CronJob", "PodDisruptionBudget", "NetworkPolicy", "PrometheusRule",
    "ServiceMonitor",
)


def kind_of(manifest: dict[str, Any]) -> ResourceKind:
    """The registry entry of a manifest; a kind we do not know is a programming error."""
    kind = REGISTRY.get(manifest.get("kind", ""))
    if kind is None or kind.api_version != manifest.get("apiVersion"):
        raise KeyError(f"unregistered kind {manifest.get('apiVersion')}/{manifest.get('kind')}")
    return kind


class KubeError(Exception):
    """An API call failed; `status` is the HTTP code (0 without a response)."""

    def __init__(self, verb: str, what: str, status: int, message: str) -> None:
        self.verb, self.what, self.status, self.message = verb, what, status, message
        super().__init__(f"{verb} {what}: HTTP {status}: {message}" if status else
                         f"{verb} {what}: {message}")


class NotFound(KubeError):
    """The object (or its namespace) does not exist."""


class Conflict(KubeError):
    """409: the object already exists, or a stale resourceVersion."""


class Invalid(KubeError):
    """422: the API server rejected the body; `causes` are (field path, reason) pairs."""

    def __init__(self, verb: str, what: str, status: int, message: str,
                 causes: list[tuple[str, str]]) -> None:
        super().__init__(verb, what, status, message)
        self.causes = causes


class Forbidden(KubeError):
    """403: the operator's RBAC does not allow the call."""


class MissingAPI(KubeError):
    """The kind is not served by this cluster (e.g. no prometheus-operator CRDs)."""


class Transient(KubeError):
    """5xx, 429, timeouts and connection errors: worth retrying later."""

    def __init__(self, verb: str, what: str, status: int, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(verb, what, status, message)
        self.retry_after = retry_after


class Fenced(KubeError):
    """A write refused locally: this operator lost its leader lease, so another one may be
    writing already (never two writers)."""


CallHook = Callable[[str, str, str], None]  # (verb, kind, code) for metrics


def _status_body(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    return body if isinstance(body, dict) and body.get("kind") == "Status" else {}


def map_error(verb: str, kind: ResourceKind, name: str | None, status: int, text: str,
              retry_after: str | None = None) -> KubeError:
    """Turn an error response into the typed exception the callers branch on."""
    what = f"{kind.kind} {name}" if name else kind.plural
    body = _status_body(text)
    message = str(body.get("message") or text.strip()[:300] or "no message")
    details = body.get("details") or {}
    if status == 404:
        # A missing collection, or kmock's/apiserver's "resource unknown" answer: the API is absent.
        unknown = not body or body.get("reason") == "Resource Not Found"
        if details.get("kind") != "namespaces" and (name is None or unknown):
            return MissingAPI(verb, what, status, f"{kind.api_version} {kind.kind} is not served")
        return NotFound(verb, what, status, message)
    if status == 409:
        return Conflict(verb, what, status, message)
    if status == 422:
        causes = [(str(c.get("field", "")), str(c.get("message", "")))
                  for c in details.get("causes") or []]
        return Invalid(verb, what, status, message, causes or [("", message)])
    if status == 401:
        # Expired credentials (a rotated service-account token), not RBAC: kopf re-runs the
        # login handlers on its own 401s and hands us the new ones; retry meanwhile.
        return Transient(verb, what, status, f"credentials rejected ({message}); retrying "
                         "after the operator re-authenticates")
    if status == 403:
        return Forbidden(verb, what, status, message)
    if status == 429 or status >= 500:
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        return Transient(verb, what, status, message, delay)
    return KubeError(verb, what, status, message)


READS = frozenset({"get", "list", "watch"})
WatchHandler = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class KubeClient:
    """Kubernetes API calls for the kinds in REGISTRY, with merge patches only, behind a
    client-side rate limit (`limiter`), and refusing writes once fenced."""

    credentials: kopf.ConnectionInfo | None = None
    on_call: CallHook | None = None
    timeout: float = 30.0
    limiter: TokenBucket | None = None
    user_agent: str = "gpuproxy-operator"
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _watch_session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _fenced: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.credentials is not None:
            self._ready.set()

    def set_credentials(self, info: kopf.ConnectionInfo) -> None:
        """Called from the login handler (at start and whenever kopf re-authenticates)."""
        old = [s for s in (self._session, self._watch_session) if s is not None]
        self._session = self._watch_session = None
        self.credentials = info
        for session in old:
            # Close outside the caller: a login handler must not wait for in-flight requests.
            asyncio.get_running_loop().create_task(session.close())
        self._ready.set()

    def fence(self, reason: str) -> None:
        """Refuse every write from now on (reads still work)."""
        self._fenced = reason

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    def _new_session(self, info: kopf.ConnectionInfo, *, watch: bool) -> aiohttp.ClientSession:
        ssl = info.as_ssl_context() if info.server.startswith("https") else False
        return aiohttp.ClientSession(
            # Watches hold their connection for minutes: a pool of their own, unbounded, so
            # they never take the connections requests need.
            connector=aiohttp.TCPConnector(ssl=ssl, limit=0 if watch else 100),
            headers={**info.as_http_headers(), "User-Agent": self.user_agent},
            timeout=aiohttp.ClientTimeout(total=None if watch else self.timeout,
                                          sock_connect=10.0 if watch else None),
        )

    async def _get_session(self, *, watch: bool = False) -> tuple[aiohttp.ClientSession, str]:
        if not self._ready.is_set():
            await asyncio.wait_for(self._ready.wait(), timeout=self.timeout)
        info = self.credentials
        assert info is not None
        if watch:
            if self._watch_session is None or self._watch_session.closed:
                self._watch_session = self._new_session(info, watch=True)
            return self._watch_session, info.server.rstrip("/")
        if self._session is None or self._session.closed:
            self._session = self._new_session(info, watch=False)
        return self._session, info.server.rstrip("/")

    async def _admit(self, verb: str, what: str) -> None:
        """The fence, then the rate limit: every request passes here first."""
        if self._fenced is not None and verb not in READS:
            raise Fenced(verb, what, 0, self._fenced)
        if self.limiter is not None:
            await self.limiter.acquire()

    async def request(self, verb: str, kind: ResourceKind, namespace: str | None,
                      name: str | None = None, *, sub: str | None = None,
                      body: Any = None, params: dict[str, str] | None = None) -> Any:
        method, content_type = {
            "list": ("GET", None), "get": ("GET", None), "create": ("POST", "application/json"),
            "patch": ("PATCH", "application/merge-patch+json"),
            # The DeleteOptions body: without a JSON content type aiohttp labels a str body
            # text/plain, which kube-apiserver refuses with 415 Unsupported Media Type.
            "delete": ("DELETE", "application/json"),
        }[verb]
        path = kind.path(namespace, name, sub)
        what = f"{kind.kind} {namespace}/{name}" if name else f"{kind.plural} in {namespace}"
        code = "error"
        try:
            await self._admit(verb, what)
            session, server = await self._get_session()
            url = server + path + (f"?{urlencode(params)}" if params else "")
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if content_type else {}
            async with session.request(method, url, data=data, headers=headers) as resp:
                code = str(resp.status)
                text = await resp.text()
                if resp.status >= 400:
                    raise map_error(verb, kind, name, resp.status, text,
                                    resp.headers.get("Retry-After"))
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Transient(verb, what, 0, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.on_call is not None:
                self.on_call(verb, kind.kind, code)

    async def watch(self, kind: str, namespace: str | None, params: dict[str, str],
                    on_event: WatchHandler, *, seconds: float) -> None:
        """One watch request: `on_event` gets each event ({"type", "object"}) until the server
        ends the stream, `seconds` pass (a stream a proxy silently dropped), or it raises."""
        res = REGISTRY[kind]
        what = f"watch of {res.plural} in {namespace}"
        code = "error"
        try:
            await self._admit("watch", what)
            session, server = await self._get_session(watch=True)
            url = f"{server}{res.path(namespace)}?{urlencode({**params, 'watch': 'true'})}"
            async with session.get(url, timeout=aiohttp.ClientTimeout(
                    total=seconds, sock_connect=10.0)) as resp:
                code = str(resp.status)
                if resp.status >= 400:
                    raise map_error("watch", res, None, resp.status, await resp.text(),
                                    resp.headers.get("Retry-After"))
                buffer = b""
                async for chunk in resp.content.iter_any():
                    # Split ourselves: one event (a large Secret) may exceed aiohttp's line limit.
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            await on_event(json.loads(line))
        except TimeoutError:
            return  # our own bound on the stream: the caller resumes from its last version
        except aiohttp.ClientError as exc:
            raise Transient("watch", what, 0, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.on_call is not None:
                self.on_call("watch", res.kind, code)

    async def served(self, group: str, version: str) -> set[str]:
        """Discovery: the resources (plurals) the API server serves in group/version, empty
        when it serves none (e.g. the prometheus-operator CRDs are not installed)."""
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        code = "error"
        try:
            await self._admit("get", path)
            session, server = await self._get_session()
            async with session.get(server + path) as resp:
                code = str(resp.status)
                if resp.status == 404:
                    return set()
                text = await resp.text()
                if resp.status >= 400:
                    raise map_error("get", ResourceKind(path, group, version, ""), None,
                                    resp.status, text, resp.headers.get("Retry-After"))
                body = json.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Transient("get", path, 0, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.on_call is not None:
                self.on_call("discovery", group or "core", code)
        return {str(r.get("name")) for r in body.get("resources") or [] if "/" not in
                str(r.get("name"))}

    async def list(self, kind: str, namespace: str | None,
                   labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Objects of a kind; the label selector is also applied here, since not every server
        (or test double) honours it."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} \
            if labels else None
        result = await self.request("list", REGISTRY[kind], namespace, params=params)
        items: list[dict[str, Any]] = result.get("items") or []
        if labels:
            items = [i for i in items if _labels_match(i, labels)]
        for item in items:  # lists omit kind/apiVersion on items
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", REGISTRY[kind].api_version)
        return items

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = await self.request("get", REGISTRY[kind], namespace, name)
        return obj

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind = kind_of(manifest)
        obj: dict[str, Any] = await self.request(
            "create", kind, manifest["metadata"].get("namespace"), body=manifest)
        return obj

    async def patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any],
                    *, sub: str | None = None) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): dicts merge, lists and scalars replace, null deletes."""
        obj: dict[str, Any] = await self.request(
            "patch", REGISTRY[kind], namespace, name, sub=sub, body=patch)
        return obj

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        with contextlib.suppress(NotFound):  # already gone is what we wanted
            await self.request("delete", REGISTRY[kind], namespace, name, body=body)


def _labels_match(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


# --- Plain functions for the autoscaler and the handlers ---------------------------------------


@dataclass(frozen=True)
class PodInfo:
    """A pod of a component, as the autoscaler needs it."""

    name: str
    ip: str | None
    ready: bool
    phase: str
    terminating: bool = False  # metadata.deletionTimestamp is set: draining, not counted
    deletion_cost: str | None = None  # its controller.kubernetes.io/pod-deletion-cost


POD_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def _pod_ready(pod: dict[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def list_component_pods(client: KubeClient, namespace: str, cluster: str,
                              component: Component) -> list[PodInfo]:
    """The pods of one component of a cluster (selected by its selector labels), sorted."""
    pods = await client.list("Pod", namespace, selector_labels(cluster, component))
    return sorted(
        (PodInfo(name=p["metadata"]["name"], ip=(p.get("status") or {}).get("podIP"),
                 ready=_pod_ready(p), phase=(p.get("status") or {}).get("phase", "Unknown"),
                 terminating=bool(p["metadata"].get("deletionTimestamp")),
                 deletion_cost=(p["metadata"].get("annotations") or {}).get(POD_DELETION_COST))
         for p in pods),
        key=lambda p: p.name,
    )


async def patch_deployment_replicas(client: KubeClient, namespace: str, name: str,
                                    replicas: int) -> None:
    """Set a Deployment's spec.replicas and nothing else."""
    await client.patch("Deployment", namespace, name, {"spec": {"replicas": replicas}})


async def patch_cluster_status(client: KubeClient, namespace: str, name: str,
                               status: dict[str, Any], *,
                               resource_version: str | None = None) -> dict[str, Any]:
    """Merge-patch a GpuProxyCluster's status (camelCase keys; `conditions` replaces the list).
    With `resource_version`, the API server refuses (Conflict) if the object changed since it
    was read, so a list like `conditions` never overwrites another writer's newer entries."""
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    return await client.patch(KIND, namespace, name, body, sub="status")


def object_reference(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    ref = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
           "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")}
    return {k: v for k, v in ref.items() if v}


async def post_event(client: KubeClient, involved: dict[str, Any], type_: str, reason: str,
                     message: str, *, component: str = "gpuproxy-operator") -> None:
    """Post a core/v1 Event about `involved` (a GpuProxyCluster body); never raises for API
    errors, since a lost Event must not fail a reconcile."""
    ref = object_reference(involved)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    now = now.replace("+00:00", "Z")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{ref.get('name', 'gpc')}.{uuid.uuid4().hex[:16]}",
                     "namespace": ref.get("namespace", "default")},
        "involvedObject": ref,
        "type": type_,
        "reason": reason,
        # The API's note limit is 1024 bytes, not characters; cut on a character boundary.
        "message": message.encode()[:1024].decode(errors="ignore"),
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": component,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    with contextlib.suppress(KubeError):
        await client.create(event)
