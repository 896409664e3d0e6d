"""What a real kube-apiserver (v1.36) accepts, checked offline on kmock's request log.

kmock validates nothing: it served `?timeoutSeconds=270.0` and a `text/plain` DELETE body,
both of which a real API server refuses (400 and 415). `request_problems(req)` encodes the
server's rules for one request as the operator sends it (query parameters, content types,
bodies, label/field selectors, and what the GpuProxyCluster's status and scale subresources
accept); `log_problems(requests, agents=...)` applies it to every request of some user agents
in a log and adds the client-side rules that span requests (watches resume from a
resourceVersion).

Sources, cited at each rule (paths in kubernetes/kubernetes, staging/src/k8s.io/...):
  [types]      apimachinery/pkg/apis/meta/v1/types.go: ListOptions, GetOptions, CreateOptions,
               UpdateOptions, PatchOptions, DeleteOptions (the query parameters of each verb)
  [convert]    apimachinery/pkg/runtime/conversion.go: how query strings become those fields
               (Convert_Slice_string_To_int64 = strconv.ParseInt(s, 10, 64);
               Convert_Slice_string_To_bool: only "false"/"0" are false, anything else true)
  [metaval]    apimachinery/pkg/apis/meta/v1/validation/validation.go: ValidatePatchOptions,
               ValidateFieldManager, ValidateDryRun, ValidateFieldValidation, ValidateDeleteOptions
  [listval]    apimachinery/pkg/apis/meta/internalversion/validation/validation.go:
               ValidateListOptions / validateWatchOptions (resourceVersionMatch, sendInitialEvents)
  [labels]     apimachinery/pkg/labels/selector.go (Parse) and apimachinery/pkg/util/validation/
               validation.go (IsQualifiedName, IsValidLabelValue)
  [fields]     apimachinery/pkg/fields/selector.go (ParseSelector, UnescapeValue) and
               apimachinery/pkg/runtime/conversion.go (DefaultMetaV1FieldSelectorConversion)
  [installer]  apiserver/pkg/endpoints/installer.go: PATCH consumes json-patch, merge-patch,
               strategic-merge-patch and apply-patch+yaml for built-in kinds
  [crdhandler] apiextensions-apiserver/pkg/apiserver/customresource_handler.go: custom resources
               accept json-patch, merge-patch and apply-patch+yaml only (strategic merge: 415),
               and JSON/YAML bodies only (no protobuf)
  [patch]      apiserver/pkg/endpoints/handlers/patch.go: an unsupported patch Content-Type is 415
  [negotiate]  apiserver/pkg/endpoints/handlers/negotiation/negotiate.go (NegotiateInputSerializer,
               used by create.go, update.go, delete.go): bodies must be JSON, YAML or protobuf
               (415 otherwise); an absent Content-Type means the first, JSON
  [deadline]   apiserver/pkg/endpoints/filters/request_deadline.go: `timeout` is a Go duration
  [subres]     https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
               custom-resource-definitions/#subresources: with the status subresource the main
               resource ignores `status` and /status ignores everything but `status`;
               /scale takes an autoscaling/v1 Scale
  [conv]       https://github.com/kubernetes/community/blob/master/contributors/devel/
               sig-architecture/api-conventions.md#concurrency-control-and-consistency
               (resourceVersion preconditions) and RFC 7386 (a merge patch replaces lists)
  [sharding]   KEP-5866 (v1.36 alpha): ListOptions.shardSelector
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml
import yarl

from gpuproxy_operator.api.base import GROUP, PLURAL


class LoggedRequest(Protocol):
    """What the checker reads of a request: kmock's log entries and `Request` below fit."""

    @property
    def method(self) -> Any: ...  # kmock's method enum (its .value is the verb) or a str
    @property
    def url(self) -> yarl.URL: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def body(self) -> bytes: ...  # as sent: kmock's parsed `.data` may be mutated by fakes


@dataclass(frozen=True)
class Request:
    """A hand-made request (unit tests), shaped like a kmock log entry."""

    method: str
    url: yarl.URL
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


def request(method: str, url: str, body: Any = None, content_type: str | None = None,
            **headers: str) -> Request:
    """A `Request`: dict/list bodies become JSON, str bodies UTF-8 (the caller names their
    Content-Type, as aiohttp would have to)."""
    raw = b"" if body is None else body.encode() if isinstance(body, str) else (
        body if isinstance(body, bytes) else json.dumps(body).encode())
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    return Request(method.upper(), yarl.URL(url), hdrs, raw)


# --- Where a request goes ---------------------------------------------------------------------

# Custom resources (CRDs) the operator talks to; everything else under a dotted group that is not
# *.k8s.io is treated as a custom resource too (Gateway API and *.x-k8s.io are CRDs as well).
CUSTOM_GROUPS = frozenset({GROUP, "monitoring.coreos.com", "gateway.networking.k8s.io"})
# Kinds whose main resource ignores `status` because they have a status subresource [subres].
STATUS_SUBRESOURCE = frozenset({
    ("", "pods"), ("", "services"), ("", "namespaces"), ("apps", "deployments"),
    ("apps", "statefulsets"), ("apps", "daemonsets"), ("apps", "replicasets"),
    ("policy", "poddisruptionbudgets"), ("batch", "jobs"),
    ("autoscaling", "horizontalpodautoscalers"), (GROUP, PLURAL),
})


def is_custom_group(group: str) -> bool:
    return group in CUSTOM_GROUPS or group.endswith(".x-k8s.io") or (
        "." in group and not group.endswith(".k8s.io"))


@dataclass(frozen=True)
class Target:
    """A request path: a resource (group "" is core) or a non-resource path (group None)."""

    group: str | None
    version: str = ""
    plural: str = ""
    namespace: str | None = None
    name: str | None = None
    sub: str | None = None
    watch_path: bool = False  # the deprecated /watch/ prefix

    @property
    def is_resource(self) -> bool:
        return self.group is not None and bool(self.plural)

    @property
    def is_cluster(self) -> bool:
        """A GpuProxyCluster (any subresource)."""
        return (self.group, self.plural) == (GROUP, PLURAL)

    @property
    def custom(self) -> bool:
        return self.group is not None and is_custom_group(self.group)


def parse_path(path: str) -> Target:
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return Target(None)  # /api, /apis, /apis/<group>, /version, /openapi/..., /healthz
    watch_path = rest[:1] == ["watch"]
    rest = rest[1:] if watch_path else rest
    namespace = None
    # /namespaces/<ns>/<plural>...: namespaced; /namespaces/<ns>[/status|/finalize]: the
    # Namespace object itself.
    if rest[:1] == ["namespaces"] and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return Target(group, version)  # the group-version's discovery document
    return Target(group, version, rest[0], namespace, rest[1] if len(rest) > 1 else None,
                  "/".join(rest[2:]) or None, watch_path)


def _method(req: LoggedRequest) -> str:
    return str(getattr(req.method, "value", req.method)).upper()


def header(req: LoggedRequest, name: str) -> str | None:
    for key, value in req.headers.items():
        if key.lower() == name.lower():
            return value
    return None


def media_type(req: LoggedRequest) -> str | None:
    """The Content-Type without parameters (patch.go drops everything after ';')."""
    value = header(req, "Content-Type")
    return None if value is None else value.split(";", 1)[0].strip().lower()


def go_bool(value: str) -> bool:
    """[convert] Convert_Slice_string_To_bool: only "false" and "0" (any case) are false."""
    return value.lower() not in ("false", "0")


def is_watch(req: LoggedRequest, target: Target | None = None) -> bool:
    target = target or parse_path(req.url.path)
    values = req.url.query.getall("watch", [])
    return _method(req) == "GET" and (target.watch_path or bool(values and go_bool(values[0])))


def verb_of(req: LoggedRequest, target: Target) -> str:
    """The Kubernetes verb (as in RBAC) of a resource request."""
    method = _method(req)
    if method == "GET":
        if is_watch(req, target):
            return "watch"
        return "get" if target.name else "list"
    if method == "DELETE":
        return "delete" if target.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


# --- Query parameters -------------------------------------------------------------------------

Check = Callable[[str, str], str | None]  # (name, value) -> problem or None

_INT = re.compile(r"[+-]?[0-9]+")


def int_param(name: str, value: str) -> str | None:
    """[convert] int64 fields (timeoutSeconds, limit, gracePeriodSeconds) go through
    strconv.ParseInt(s, 10, 64): "270.0", "1e3" or " 5" get HTTP 400."""
    if _INT.fullmatch(value) and -(2**63) <= int(value) < 2**63:
        return None
    return (f"{name}={value!r} is not a base-10 int64: the API server answers HTTP 400 "
            f'(strconv.ParseInt: parsing "{value}": invalid syntax)')


def bool_param(name: str, value: str) -> str | None:
    """[convert] The server reads anything but "false"/"0" as true (so `watch=no` watches):
    send true/false/1/0 only."""
    if value.lower() in ("true", "false", "1", "0"):
        return None
    return (f"{name}={value!r} is not true/false/1/0: the API server reads it as "
            f"{str(go_bool(value)).lower()}")


def string_param(name: str, value: str) -> str | None:
    """resourceVersion and continue are opaque strings [types]: any value parses."""
    return None


def one_of(*allowed: str) -> Check:
    def check(name: str, value: str) -> str | None:
        if value in allowed:
            return None
        return f"{name}={value!r} is not one of {', '.join(allowed)} (HTTP 400/422)"
    return check


def field_manager_param(name: str, value: str) -> str | None:
    """[metaval] ValidateFieldManager: at most 128 bytes, printable characters. We hold our
    managers to printable ASCII (a subset of what the server allows)."""
    problems = []
    if len(value.encode()) > 128:
        problems.append(f"{name} is {len(value.encode())} bytes long, at most 128 are allowed")
    if any(not " " <= c <= "~" for c in value):
        problems.append(f"{name}={value!r} has characters outside printable ASCII")
    return "; ".join(problems) or None


_GO_DURATION = re.compile(r"0|([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)"
                          r"(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h))*")


def duration_param(name: str, value: str) -> str | None:
    """[deadline] `timeout` is parsed by time.ParseDuration ("30s", not "30"); HTTP 400."""
    if _GO_DURATION.fullmatch(value):
        return None
    return f"{name}={value!r} is not a Go duration such as 30s (HTTP 400)"


def label_selector_param(name: str, value: str) -> str | None:
    problems = label_selector_problems(value)
    return f"{name}={value!r}: {'; '.join(problems)} (HTTP 400)" if problems else None


def field_selector_param(name: str, value: str) -> str | None:
    problems = field_selector_problems(value)
    return f"{name}={value!r}: {'; '.join(problems)} (HTTP 400)" if problems else None


def custom_field_selector_param(name: str, value: str) -> str | None:
    problems = field_selector_problems(value, custom=True)
    return f"{name}={value!r}: {'; '.join(problems)} (HTTP 400)" if problems else None


# [types] ListOptions (+ [sharding] shardSelector, alpha in v1.36).
LIST_PARAMS: dict[str, Check] = {
    "labelSelector": label_selector_param, "fieldSelector": field_selector_param,
    "watch": bool_param, "allowWatchBookmarks": bool_param, "resourceVersion": string_param,
    "resourceVersionMatch": one_of("NotOlderThan", "Exact"), "timeoutSeconds": int_param,
    "limit": int_param, "continue": string_param, "sendInitialEvents": bool_param,
    "shardSelector": string_param,
}
GET_PARAMS: dict[str, Check] = {"resourceVersion": string_param}  # [types] GetOptions
WRITE_PARAMS: dict[str, Check] = {  # [types] CreateOptions, UpdateOptions; [metaval]
    "dryRun": one_of("All"), "fieldManager": field_manager_param,
    "fieldValidation": one_of("Ignore", "Warn", "Strict"),
}
PATCH_PARAMS: dict[str, Check] = {**WRITE_PARAMS, "force": bool_param}  # [types] PatchOptions
DELETE_PARAMS: dict[str, Check] = {  # [types] DeleteOptions
    "gracePeriodSeconds": int_param, "orphanDependents": bool_param,
    "propagationPolicy": one_of("Orphan", "Background", "Foreground"), "dryRun": one_of("All"),
    "ignoreStoreReadErrorWithClusterBreakingPotential": bool_param,
}
# Every endpoint takes `pretty`; non-watch requests take `timeout` [deadline].
COMMON: dict[str, Check] = {"pretty": bool_param}
VERB_PARAMS: dict[str, dict[str, Check]] = {
    "list": {**LIST_PARAMS, "timeout": duration_param},
    "watch": LIST_PARAMS,
    "get": {**GET_PARAMS, "timeout": duration_param},
    "create": {**WRITE_PARAMS, "timeout": duration_param},
    "update": {**WRITE_PARAMS, "timeout": duration_param},
    "patch": {**PATCH_PARAMS, "timeout": duration_param},
    "delete": {**DELETE_PARAMS, "timeout": duration_param},
    "deletecollection": {**DELETE_PARAMS, **LIST_PARAMS, "timeout": duration_param},
}


def _query_problems(req: LoggedRequest, target: Target, verb: str) -> list[str]:
    query = req.url.query
    if not target.is_resource:
        # Discovery and OpenAPI documents: /openapi/v3/<gv>?hash=... only.
        allowed: dict[str, Check] = {"hash": string_param} if req.url.path.startswith(
            "/openapi/") else {}
    else:
        allowed = VERB_PARAMS.get(verb, {})
    allowed = {**COMMON, **allowed}
    problems = []
    for name in dict.fromkeys(query.keys()):
        values = query.getall(name)
        check = allowed.get(name)
        if check is None:
            # The server ignores parameters it does not know: a typo is a silent no-op.
            problems.append(f"{name!r} is not a query parameter of {verb}: the API server "
                            "ignores it, so whatever it was meant to do does not happen")
            continue
        if len(values) > 1 and name != "dryRun":
            problems.append(f"{name} given {len(values)} times: the server reads only the first")
        if name == "fieldSelector" and target.custom:
            check = custom_field_selector_param
        for value in values[:1] if name != "dryRun" else values:
            problem = check(name, value)
            if problem:
                problems.append(problem)
    if target.is_resource and verb in ("list", "watch", "deletecollection"):
        problems += _list_option_problems(query, watch=verb == "watch")
    return problems


def _list_option_problems(query: Any, *, watch: bool) -> list[str]:
    """[listval] ValidateListOptions and validateWatchOptions; [types] field comments."""
    rv = query.get("resourceVersion", "")
    match = query.get("resourceVersionMatch", "")
    cont = query.get("continue", "")
    send_initial = query.get("sendInitialEvents")
    problems = []
    if watch:
        if send_initial is not None and match != "NotOlderThan":
            problems.append("sendInitialEvents requires resourceVersionMatch=NotOlderThan "
                            "(HTTP 422)")
        if match and send_initial is None:
            problems.append("resourceVersionMatch is forbidden for watch unless "
                            "sendInitialEvents is provided (HTTP 422)")
        if match and cont:
            problems.append("resourceVersionMatch is forbidden with continue (HTTP 422)")
        if cont:
            problems.append("continue is not supported on a watch (ignored)")
        if "limit" in query:
            problems.append("limit is not supported on a watch (ignored)")
        return problems
    if match:
        if not rv:
            problems.append("resourceVersionMatch is forbidden unless resourceVersion is "
                            "provided (HTTP 422)")
        if cont:
            problems.append("resourceVersionMatch is forbidden with continue (HTTP 422)")
        if match == "Exact" and rv == "0":
            problems.append('resourceVersionMatch=Exact is forbidden for resourceVersion "0" '
                            "(HTTP 422)")
    if cont and rv not in ("", "0"):
        # storage/etcd3 list: "specifying resource version is not allowed when using continue"
        problems.append("resourceVersion is not allowed together with continue (HTTP 400)")
    if send_initial is not None:
        problems.append("sendInitialEvents is forbidden for list (HTTP 422)")
    if "allowWatchBookmarks" in query:
        problems.append("allowWatchBookmarks without watch=true (ignored: this is a list)")
    return problems


# --- Label and field selectors ----------------------------------------------------------------

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SPECIAL = "=!(),<>"  # [labels] isSpecialSymbol


def label_key_problems(key: str) -> list[str]:
    """[labels] IsQualifiedName: [prefix/]name, the prefix a DNS subdomain of at most 253
    characters, the name at most 63 alphanumerics, '-', '_' or '.' inside."""
    parts = key.split("/")
    if len(parts) > 2:
        return [f"label key {key!r} has more than one '/'"]
    name = parts[-1]
    problems = []
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            problems.append(f"label key {key!r} has an empty prefix")
        elif len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix):
            problems.append(f"label key prefix {prefix!r} is not a DNS subdomain")
    if not name or len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        problems.append(f"label key name {name!r} is not a qualified name (at most 63 "
                        "characters [A-Za-z0-9_.-], alphanumeric at both ends)")
    return problems


def label_value_problems(value: str) -> list[str]:
    """[labels] IsValidLabelValue: empty, or at most 63 characters [A-Za-z0-9_.-] that start
    and end alphanumeric."""
    if len(value) <= 63 and _LABEL_VALUE.fullmatch(value):
        return []
    return [f"label value {value!r} is not valid (at most 63 characters [A-Za-z0-9_.-], "
            "alphanumeric at both ends)"]


def _lex_labels(selector: str) -> list[tuple[str, str]]:
    """[labels] Lexer: identifiers run until whitespace or one of =!(),<>; `in` and `notin`
    are keywords; operators are = == != ! < >."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(selector):
        c = selector[i]
        if c.isspace():
            i += 1
        elif selector[i:i + 2] in ("==", "!="):
            tokens.append(("op", selector[i:i + 2]))
            i += 2
        elif c in "=!<>":
            tokens.append(("op", c))
            i += 1
        elif c in "(),":
            tokens.append((c, c))
            i += 1
        else:
            j = i
            while j < len(selector) and not selector[j].isspace() and selector[j] not in _SPECIAL:
                j += 1
            word = selector[i:j]
            tokens.append((word if word in ("in", "notin") else "id", word))
            i = j
    return tokens


def label_selector_problems(selector: str) -> list[str]:
    """[labels] Parse: comma-separated requirements `k`, `!k`, `k=v`, `k==v`, `k!=v`,
    `k in (a,b)`, `k notin (a)`, `k>1`, `k<1`; empty means everything."""
    tokens = _lex_labels(selector)
    if not tokens:
        return []
    problems: list[str] = []
    pos = 0

    def peek() -> tuple[str, str]:
        return tokens[pos] if pos < len(tokens) else ("end", "")

    while True:
        negate = peek() == ("op", "!")
        if negate:
            pos += 1
        kind, key = peek()
        if kind != "id":
            return [*problems, f"expected a label key, found {key or 'the end'!r}"]
        pos += 1
        problems += label_key_problems(key)
        kind, op = peek()
        if negate or kind in (",", "end"):
            if negate and kind not in (",", "end"):
                return [*problems, f"unexpected {op!r} after !{key}"]
        elif kind == "op" and op in ("=", "==", "!="):
            pos += 1
            kind, value = peek()
            if kind == "id":
                pos += 1
                problems += label_value_problems(value)
            elif kind not in (",", "end"):  # `k=` is the empty value
                return [*problems, f"expected a value after {key}{op}, found {value!r}"]
        elif kind == "op" and op in ("<", ">"):
            pos += 1
            kind, value = peek()
            pos += 1
            if kind != "id" or not _INT.fullmatch(value):
                return [*problems, f"{key}{op} needs an integer value, found {value!r}"]
        elif kind in ("in", "notin"):
            pos += 1
            if peek()[0] != "(":
                return [*problems, f"expected '(' after {key} {kind}"]
            pos += 1
            values: list[str] = []
            expect_value = True
            while peek()[0] != ")":
                tkind, tval = peek()
                if tkind == "id" and expect_value:
                    values.append(tval)
                    expect_value = False
                elif tkind == ",":
                    if expect_value:
                        values.append("")
                    expect_value = True
                else:
                    return [*problems, f"unexpected {tval or 'end'!r} in the values of {key}"]
                pos += 1
            pos += 1
            if expect_value and values:
                values.append("")  # `k in (a,)`
            if not values:
                return [*problems, f"{key} {kind} () needs at least one value"]
            for value in values:
                problems += label_value_problems(value)
        else:
            return [*problems, f"unexpected {op!r} after the key {key!r}"]
        kind, tok = peek()
        if kind == "end":
            return problems
        if kind != ",":
            return [*problems, f"expected ',' between requirements, found {tok!r}"]
        pos += 1
        if peek()[0] == "end":
            return [*problems, "a selector must not end with ','"]


def _split_unescaped(text: str, sep: str) -> list[str]:
    out, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur += text[i:i + 2]
            i += 2
            continue
        if text[i] == sep:
            out.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    out.append(cur)
    return out


def _split_term(term: str) -> tuple[str, str, str] | None:
    """[fields] splitTerm: the first position where one of !=, ==, = starts."""
    for i in range(len(term)):
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return term[:i], op, term[i + len(op):]
    return None


def _value_escape_problem(value: str) -> str | None:
    """[fields] UnescapeValue: only \\\\, \\, and \\= are escapes; an unescaped , or = is an
    error, and so is a trailing backslash."""
    escaped = False
    for c in value:
        if escaped:
            if c not in "\\,=":
                return f"{value!r} has the invalid escape \\{c}"
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in ",=":
            return f"{value!r} has an unescaped {c!r}"
    return f"{value!r} ends with a lone backslash" if escaped else None


_FIELD_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)+")


def field_selector_problems(selector: str, *, custom: bool = False) -> list[str]:
    """[fields] ParseSelector: comma-separated `key=value`, `key==value` or `key!=value`.
    Custom resources select only on metadata.name and metadata.namespace
    (DefaultMetaV1FieldSelectorConversion; CRD selectableFields aside)."""
    problems = []
    for term in _split_unescaped(selector, ","):
        if not term:
            continue
        parts = _split_term(term)
        if parts is None:
            problems.append(f"{term!r} is not key=value, key==value or key!=value")
            continue
        key, _, value = parts
        if not _FIELD_KEY.fullmatch(key):
            problems.append(f"{key!r} is not a field path")
        elif custom and key not in ("metadata.name", "metadata.namespace"):
            problems.append(f"{key!r} is not a field a custom resource can be selected on")
        problem = _value_escape_problem(value)
        if problem:
            problems.append(problem)
    return problems


# --- Content types and bodies -----------------------------------------------------------------

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
# [installer] built-in kinds; [crdhandler] custom resources (apply-patch+cbor only behind the
# CBORServingAndStorage gate, off by default).
BUILTIN_PATCH_TYPES: tuple[str, ...] = (JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH, APPLY_PATCH)
CUSTOM_PATCH_TYPES: tuple[str, ...] = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH)
# [negotiate] create/update bodies; [crdhandler] custom resources are not served as protobuf.
BUILTIN_BODY_TYPES: tuple[str, ...] = (
    "application/json", "application/yaml", "application/vnd.kubernetes.protobuf")
CUSTOM_BODY_TYPES: tuple[str, ...] = ("application/json", "application/yaml")
# [negotiate] delete.go decodes DeleteOptions with metainternalversionscheme.Codecs.
DELETE_BODY_TYPES = BUILTIN_BODY_TYPES
JSON_PATCH_OPS = ("add", "remove", "replace", "move", "copy", "test")  # RFC 6902


def _is_json_type(mtype: str) -> bool:
    return mtype == "application/json" or mtype.endswith("+json")


_NO_BODY = object()


def _decode(req: LoggedRequest, mtype: str | None) -> tuple[Any, list[str]]:
    """The parsed body (or _NO_BODY) and why it does not parse as its declared type."""
    if not req.body:
        return _NO_BODY, []
    kind = mtype or "application/json"  # [negotiate]: no Content-Type means JSON
    try:
        text = req.body.decode()
    except UnicodeDecodeError:
        return _NO_BODY, [] if kind.endswith("protobuf") else [f"the {kind} body is not UTF-8"]
    if _is_json_type(kind):
        try:
            return json.loads(text), []
        except ValueError as exc:
            return _NO_BODY, [f"the body is not valid JSON although the Content-Type is {kind} "
                              f"({exc}); HTTP 400"]
    if kind.endswith("yaml"):
        try:
            return yaml.safe_load(text), []
        except yaml.YAMLError as exc:
            return _NO_BODY, [f"the body is not valid YAML ({exc}); HTTP 400"]
    return _NO_BODY, []


def _content_type_problems(req: LoggedRequest, target: Target, verb: str,
                           mtype: str | None) -> list[str]:
    if verb == "patch":
        allowed = CUSTOM_PATCH_TYPES if target.custom else BUILTIN_PATCH_TYPES
        if mtype in allowed:
            return []
        if mtype == STRATEGIC_PATCH:  # and a custom resource
            return [f"{STRATEGIC_PATCH} on a custom resource ({target.group}/{target.plural}): "
                    "HTTP 415, strategic merge is for built-in kinds only [crdhandler]"]
        return [f"PATCH with Content-Type {mtype or '(none)'}: HTTP 415, the server takes "
                f"{', '.join(allowed)} [patch]"]
    if verb in ("create", "update") or (verb in ("delete", "deletecollection") and req.body):
        if verb in ("create", "update"):
            allowed = CUSTOM_BODY_TYPES if target.custom else BUILTIN_BODY_TYPES
        else:
            allowed = DELETE_BODY_TYPES
        if mtype is None or mtype in allowed:
            return []
        return [f"{_method(req)} body with Content-Type {mtype}: HTTP 415 Unsupported Media "
                f"Type, the server takes {', '.join(allowed)} [negotiate]"]
    return []


def _api_version(target: Target) -> str:
    return f"{target.group}/{target.version}" if target.group else target.version


def _object_problems(body: Any, target: Target, verb: str, *, apply: bool = False) -> list[str]:
    """A full object (create, update, server-side apply) against the URL it goes to."""
    if not isinstance(body, dict):
        return [f"the {verb} body is a {type(body).__name__}, not an object (HTTP 400)"]
    problems = []
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if (apply or target.custom) and target.sub is None and (not api_version or not kind):
        # Unstructured decoding (custom resources, apply) needs both: "Object 'Kind' is missing".
        problems.append(f"the {verb} body lacks apiVersion/kind (HTTP 400)")
    if api_version and target.sub is None and api_version != _api_version(target):
        problems.append(f"apiVersion {api_version!r} in the body does not match the URL's "
                        f"{_api_version(target)!r} (HTTP 400)")
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict):
        return [*problems, "metadata is not an object (HTTP 400)"]
    if target.namespace and meta.get("namespace") not in (None, target.namespace):
        problems.append(f"metadata.namespace {meta.get('namespace')!r} does not match the URL's "
                        f"{target.namespace!r} (HTTP 400)")
    if target.name and meta.get("name") not in (None, target.name):
        problems.append(f"metadata.name {meta.get('name')!r} does not match the URL's "
                        f"{target.name!r} (HTTP 400)")
    if verb == "create" and not target.name and not (meta.get("name") or meta.get("generateName")):
        problems.append("the object has neither metadata.name nor metadata.generateName (422)")
    return problems


def _json_patch_problems(body: Any) -> list[str]:
    """RFC 6902: a list of operations, each with op and path (value for add/replace/test,
    from for move/copy)."""
    if not isinstance(body, list):
        return [f"a JSON patch must be a list of operations, not {type(body).__name__} (400)"]
    problems = []
    for i, op in enumerate(body):
        if not isinstance(op, dict) or op.get("op") not in JSON_PATCH_OPS:
            problems.append(f"JSON patch operation {i} has no valid op: {op!r}")
            continue
        if not isinstance(op.get("path"), str) or not (op["path"] == "" or
                                                       op["path"].startswith("/")):
            problems.append(f"JSON patch operation {i} has no JSON pointer path: {op!r}")
        if op["op"] in ("add", "replace", "test") and "value" not in op:
            problems.append(f"JSON patch operation {i} ({op['op']}) lacks a value")
        if op["op"] in ("move", "copy") and not isinstance(op.get("from"), str):
            problems.append(f"JSON patch operation {i} ({op['op']}) lacks from")
    return problems


def _delete_options_problems(body: Any) -> list[str]:
    """[types] DeleteOptions; [metaval] ValidateDeleteOptions."""
    if not isinstance(body, dict):
        return [f"the DELETE body is a {type(body).__name__}, not DeleteOptions (HTTP 400)"]
    problems = []
    if body.get("kind") not in (None, "DeleteOptions"):
        problems.append(f"the DELETE body is a {body.get('kind')!r}, not DeleteOptions")
    policy = body.get("propagationPolicy")
    if policy is not None and policy not in ("Orphan", "Background", "Foreground"):
        problems.append(f"propagationPolicy {policy!r} is not Orphan, Background or Foreground")
    if policy is not None and body.get("orphanDependents") is not None:
        problems.append("orphanDependents and propagationPolicy are mutually exclusive (422)")
    grace = body.get("gracePeriodSeconds")
    if grace is not None and (not isinstance(grace, int) or isinstance(grace, bool)):
        problems.append(f"gracePeriodSeconds {grace!r} is not an integer (HTTP 400)")
    return problems


# --- What the GpuProxyCluster's endpoints take ------------------------------------------------

# The operator is not meant to write a GpuProxyCluster's replicas at all: spec.proxy.replicas
# (the scale subresource's specReplicasPath) belongs to users (`kubectl scale gpc`) and HPAs;
# the autoscaler records its decision in status.desiredReplicas and scales the Deployment.
OPERATOR_WRITES_CLUSTER_SCALE = False
# Preconditions that may ride along in a /status body (everything else there is ignored).
STATUS_META_KEYS = frozenset({"resourceVersion", "uid"})


def _changed_top_level(body: Any, mtype: str | None) -> set[str]:
    """The top-level fields a patch or object body changes (json-patch: the first path
    segment of every non-test operation)."""
    if mtype == JSON_PATCH and isinstance(body, list):
        return {op["path"].split("/")[1] if op["path"].count("/") else ""
                for op in body if isinstance(op, dict) and op.get("op") != "test"
                and isinstance(op.get("path"), str)}
    if isinstance(body, dict):
        return set(body) - {"apiVersion", "kind"}
    return set()


def _has_rv_precondition(body: Any, mtype: str | None) -> bool:
    if mtype == JSON_PATCH and isinstance(body, list):
        return any(isinstance(op, dict) and op.get("op") == "test"
                   and op.get("path") == "/metadata/resourceVersion" and op.get("value")
                   for op in body)
    meta = body.get("metadata") if isinstance(body, dict) else None
    return isinstance(meta, dict) and isinstance(meta.get("resourceVersion"), str) and bool(
        meta["resourceVersion"])


def _replaces_conditions(body: Any, mtype: str | None) -> bool:
    if mtype == JSON_PATCH and isinstance(body, list):
        return any(isinstance(op, dict) and op.get("op") != "test"
                   and isinstance(op.get("path"), str)
                   and (op["path"] == "/status" or op["path"].startswith("/status/conditions"))
                   for op in body)
    status = body.get("status") if isinstance(body, dict) else None
    return isinstance(status, dict) and "conditions" in status


def _status_summary(body: Any) -> str:
    """Which write this is: its status keys and condition types (to find the call site)."""
    status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(status, dict):
        return "a JSON patch"
    types = [str(c.get("type")) for c in status.get("conditions") or [] if isinstance(c, dict)]
    return (f"status keys: {', '.join(sorted(status))}; condition types: "
            f"{', '.join(types) or 'none'}")


def _status_write_problems(body: Any, target: Target, mtype: str | None) -> list[str]:
    """[subres] /status keeps only `status`: anything else the body sets is silently lost."""
    problems = []
    lost = _changed_top_level(body, mtype) - {"status", "metadata"}
    if lost:
        problems.append(f"a /status write that sets {', '.join(sorted(lost))}: ignored by the "
                        "API server (only status is written through /status)")
    meta = body.get("metadata") if isinstance(body, dict) else None
    extra_meta = sorted(set(meta) - STATUS_META_KEYS) if isinstance(meta, dict) else []
    if extra_meta and mtype != APPLY_PATCH:
        problems.append(f"a /status write that sets metadata {', '.join(extra_meta)}: ignored "
                        "by the API server")
    if mtype == JSON_PATCH and isinstance(body, list):
        problems += [f"a /status JSON patch of {op['path']}: ignored by the API server"
                     for op in body if isinstance(op, dict) and op.get("op") != "test"
                     and str(op.get("path", "")).startswith("/metadata")]
    if target.is_cluster and mtype != APPLY_PATCH and _replaces_conditions(body, mtype) \
            and not _has_rv_precondition(body, mtype):
        # [conv] A merge patch replaces the whole conditions list (RFC 7386; the CRD's
        # x-kubernetes-list-type=map matters only to server-side apply): without a
        # resourceVersion precondition it overwrites another writer's newer conditions.
        how = ("a test of /metadata/resourceVersion" if mtype == JSON_PATCH
               else "metadata.resourceVersion in the body")
        problems.append(f"replaces status.conditions of a GpuProxyCluster without a "
                        f"resourceVersion precondition ({how}): it can overwrite another "
                        f"writer's newer conditions ({_status_summary(body)})")
    return problems


def _scale_write_problems(body: Any, target: Target, mtype: str | None) -> list[str]:
    """[subres] /scale takes an autoscaling/v1 Scale: spec.replicas only."""
    problems = []
    if target.is_cluster and not OPERATOR_WRITES_CLUSTER_SCALE:
        problems.append("the operator writes the GpuProxyCluster's /scale: spec.proxy.replicas "
                        "belongs to users and HPAs (the autoscaler writes status.desiredReplicas "
                        "and the proxy Deployment)")
    if isinstance(body, dict) and mtype != JSON_PATCH:
        extra = set(body) - {"apiVersion", "kind", "metadata", "spec"}
        spec = body.get("spec") or {}
        if extra or not isinstance(spec, dict) or set(spec) - {"replicas"}:
            problems.append(f"a /scale body that is not a Scale (spec.replicas only): {body!r}")
        replicas = spec.get("replicas") if isinstance(spec, dict) else None
        if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool)
                                     or replicas < 0):
            problems.append(f"spec.replicas {replicas!r} is not a non-negative integer")
    return problems


def _main_write_problems(body: Any, target: Target, verb: str, mtype: str | None) -> list[str]:
    problems = []
    changed = _changed_top_level(body, mtype if verb == "patch" else None)
    if (target.group, target.plural) in STATUS_SUBRESOURCE and "status" in changed and (
            verb == "patch" or (isinstance(body, dict) and body.get("status"))):
        # [subres] The main resource of a kind with a status subresource drops `status` on
        # create, update and patch.
        problems.append(f"{verb} of {target.plural} carries status: ignored by the main "
                        "resource (status goes through /status)")
    if target.is_cluster and verb in ("patch", "update"):
        others = changed - {"metadata", "status"}
        if verb == "update":
            problems.append("the operator replaces (PUT) a GpuProxyCluster: it must only patch "
                            "its metadata (a PUT re-sends a possibly stale spec)")
        elif others:
            problems.append(f"the operator changes {', '.join(sorted(others))} of a "
                            "GpuProxyCluster: it writes only metadata there (spec is the "
                            "user's, status goes through /status, replicas through /scale)")
    return problems


# --- One request, a whole log -----------------------------------------------------------------

def request_problems(req: LoggedRequest) -> list[str]:
    """Why a real kube-apiserver v1.36 would refuse (or silently ignore part of) this request
    as the operator sends it; empty when it is fine."""
    target = parse_path(req.url.path)
    if not target.is_resource:
        if _method(req) != "GET":
            return [f"{_method(req)} of a non-resource path {req.url.path}"]
        return _query_problems(req, target, "get")
    verb = verb_of(req, target)
    if verb not in VERB_PARAMS:
        return [f"HTTP method {_method(req)} is not a Kubernetes verb"]
    mtype = media_type(req)
    problems = _query_problems(req, target, verb)
    problems += _content_type_problems(req, target, verb, mtype)
    if verb in ("create", "update", "patch", "delete", "deletecollection"):
        body, decode_problems = _decode(req, mtype)
        problems += decode_problems
        if not req.body and verb in ("create", "update", "patch"):
            problems.append(f"{verb} without a body (HTTP 400)")
        if body is _NO_BODY:  # none, undecodable, or opaque (protobuf)
            return problems
        if verb in ("create", "update"):
            problems += _object_problems(body, target, verb)
        elif verb == "patch":
            if mtype == JSON_PATCH:
                problems += _json_patch_problems(body)
            elif mtype == APPLY_PATCH:
                problems += _object_problems(body, target, "apply", apply=True)
                if not req.url.query.get("fieldManager"):
                    # [metaval] ValidatePatchOptions: "fieldManager: Required value: is
                    # required for apply patch"
                    problems.append("server-side apply without fieldManager (HTTP 422)")
            elif not isinstance(body, dict):
                problems.append(f"a merge patch must be an object, not {type(body).__name__}")
            if "force" in req.url.query and mtype != APPLY_PATCH:
                problems.append("force is only for apply patches (HTTP 422) [metaval]")
        else:
            problems += _delete_options_problems(body)
        if verb in ("update", "patch"):
            if target.sub == "status":
                problems += _status_write_problems(body, target, mtype)
            elif target.sub == "scale":
                problems += _scale_write_problems(body, target, mtype)
            elif target.sub is None:
                problems += _main_write_problems(body, target, verb, mtype)
        elif verb == "create" and target.sub is None:
            problems += _main_write_problems(body, target, verb, mtype)
    return problems


def describe(req: LoggedRequest) -> str:
    query = f"?{req.url.query_string}" if req.url.query_string else ""
    return f"{_method(req)} {req.url.path}{query}"


def log_problems(requests: Iterable[LoggedRequest], *, agents: Sequence[str]) -> list[str]:
    """`request_problems` of every request whose User-Agent starts with one of `agents`, as
    "<request> [<agent>]: <problem>", plus a client rule: a watch starts (or resumes) from the
    resourceVersion of the list before it or the last event it saw, unless it asks for the
    initial state as a stream (sendInitialEvents); a watch without one replays the world."""
    out = []
    for req in requests:
        agent = header(req, "User-Agent") or ""
        if not agent.startswith(tuple(agents)):
            continue
        problems = request_problems(req)
        target = parse_path(req.url.path)
        if target.is_resource and is_watch(req, target):
            query = req.url.query
            if not query.get("resourceVersion") and not go_bool(
                    query.get("sendInitialEvents", "false")):
                problems.append("a watch without resourceVersion (nor sendInitialEvents): it "
                                "does not resume where the list or the last event left off")
        out += [f"{describe(req)} [{agent}]: {p}" for p in problems]
    return out


__all__ = [
    "APPLY_PATCH",
    "JSON_PATCH",
    "MERGE_PATCH",
    "STRATEGIC_PATCH",
    "LoggedRequest",
    "Request",
    "Target",
    "field_selector_problems",
    "label_selector_problems",
    "log_problems",
    "parse_path",
    "request",
    "request_problems",
]
