"""The pure planner: observed children + desired manifests -> the API writes that converge them.
Creates what is missing, patches only what differs, deletes owned children no longer desired."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from gpuproxy_operator.naming import LAST_APPLIED_ANNOTATION, SPEC_HASH_ANNOTATION

Key = tuple[str, str]  # (kind, name) within the cluster's namespace
# "replace" = delete + create: the change touches a field the API server refuses to update.
Verb = Literal["create", "patch", "delete", "replace"]
Reason = Literal["Created", "Updated", "Repaired", "Scaled", "Deleted", "Replaced"]

# Top-level fields that are not the desired state of a child.
_NOT_CONTENT = {"apiVersion", "kind", "metadata", "status"}


@dataclass(frozen=True)
class Action:
    """One API write; `body` is the manifest (create) or a JSON merge patch (patch)."""

    verb: Verb
    kind: str
    name: str
    body: dict[str, Any]
    reason: Reason
    detail: str
    spec_hash: str = ""
    # The desired manifest behind a create/replace/patch, to check what the server kept.
    desired: dict[str, Any] | None = None
    without_replicas: bool = False

    @property
    def key(self) -> Key:
        return (self.kind, self.name)

    def describe(self) -> str:
        return f"{self.kind} {self.name} {self.detail}".strip()


@dataclass(frozen=True)
class Blocked:
    """A replacement (delete + create) the planner refused to plan: `fields` are immutable."""

    kind: str
    name: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    actions: list[Action] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.actions)


def key_of(obj: Mapping[str, Any]) -> Key:
    return (str(obj.get("kind", "")), str((obj.get("metadata") or {}).get("name", "")))


def spec_hash(obj: Mapping[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION, ""))


def is_controlled_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    """True when `owner_uid` is the controller of `obj` (we never touch anyone else's objects)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner_uid and r.get("controller") for r in refs)


# --- comparing a desired body with what the API server returned -------------------------------

_QUANTITY = re.compile(
    r"^([+-]?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_SUFFIX = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"), "Ki": Decimal(2**10), "Mi": Decimal(2**20),
    "Gi": Decimal(2**30), "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}


def _quantity(text: str) -> Decimal | None:
    match = _QUANTITY.match(text)
    if not match:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
    except InvalidOperation:
        return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
    # Go decodes an integral JSON float (1.0) of a custom resource and writes it back as 1.
    if _number(want) and _number(have):
        return bool(want == have)
    # The API server canonicalises quantities ("0.5" -> "500m", "1024Mi" -> "1Gi").
    if isinstance(want, str) and isinstance(have, str):
        a, b = _quantity(want), _quantity(have)
        return a is not None and a == b
    return False


def _is_zero(value: Any) -> bool:
    # The API server omits empty and zero `omitempty` fields ({}, [], "", 0, false) on output.
    return value is None or (not isinstance(value, Decimal) and value in ({}, [], "", 0))


def contains(have: Any, want: Any) -> bool:
    """Whether `have` holds everything in `want`: dict keys the server added (defaults, status)
    are ignored, a missing key matches an empty/zero wanted value, lists must match item by
    item, scalars by value."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            contains(have[k], v) if k in have else _is_zero(v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(contains(h, w) for h, w in zip(have, want, strict=True)))
    return _same_scalar(want, have)


def not_kept(result: Mapping[str, Any], desired: Mapping[str, Any], *,
             without_replicas: bool = False) -> list[str]:
    """Paths of `desired` that the server's answer to our write does not hold: dropped (a
    disabled feature's field) or changed (a mutating admission webhook). Empty when kept."""
    out: list[str] = []

    def walk(have: Any, want: Any, path: str) -> None:
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            for k, v in want.items():
                if k in have:
                    walk(have[k], v, f"{path}.{k}" if path else str(k))
                elif not _is_zero(v):
                    out.append(f"{path}.{k}" if path else str(k))
        elif (isinstance(want, list) and isinstance(have, list) and len(want) == len(have)):
            for i, (h, w) in enumerate(zip(have, want, strict=True)):
                walk(h, w, f"{path}[{i}]")
        elif not contains(have, want):
            out.append(path)

    walk(_content(result, without_replicas=without_replicas),
         _content(desired, without_replicas=without_replicas), "")
    return out


def fingerprint(obj: Mapping[str, Any]) -> str:
    """Identifies the content of a live child (what `_content` compares), to notice that it
    is still exactly what the server answered to our last write."""
    text = json.dumps(_content(obj, without_replicas=False), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _content(manifest: Mapping[str, Any], *, without_replicas: bool) -> dict[str, Any]:
    body = {k: v for k, v in manifest.items() if k not in _NOT_CONTENT}
    meta = manifest.get("metadata") or {}
    body["metadata"] = {k: meta[k] for k in ("labels", "annotations", "ownerReferences")
                        if k in meta}
    if without_replicas and isinstance(body.get("spec"), dict):
        body["spec"] = {k: v for k, v in body["spec"].items() if k != "replicas"}
    return body


_DATA_FIELDS = ("data", "binaryData", "stringData")


def last_applied(manifest: Mapping[str, Any], *, without_replicas: bool = False) -> str:
    """What LAST_APPLIED_ANNOTATION records for `manifest`: its content without the data maps
    (wholly ours, compared key by key anyway; and a Secret's data must not leak into an
    annotation) and without a replica count the autoscaler owns."""
    body = _content(manifest, without_replicas=without_replicas)
    for data_field in _DATA_FIELDS:
        body.pop(data_field, None)
    meta = dict(body["metadata"])
    annotations = dict(meta.get("annotations") or {})
    annotations.pop(LAST_APPLIED_ANNOTATION, None)
    meta["annotations"] = annotations
    body["metadata"] = meta
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def with_last_applied(manifest: Mapping[str, Any], *, without_replicas: bool = False
                      ) -> dict[str, Any]:
    """`manifest` carrying LAST_APPLIED_ANNOTATION: the body reconcile creates."""
    meta = dict(manifest.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}),
                           LAST_APPLIED_ANNOTATION: last_applied(
                               manifest, without_replicas=without_replicas)}
    return {**manifest, "metadata": meta}


def _applied_before(observed: Mapping[str, Any]) -> dict[str, Any]:
    text = ((observed.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED_ANNOTATION)
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}  # edited by hand into garbage: behave as for a child from before the annotation
    return value if isinstance(value, dict) else {}


def removals(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge-patch nulls that delete map keys `old` had and `new` has not (a dropped
    nodeSelector entry, annotation, label, ...). Lists need none: a merge patch replaces them."""
    out: dict[str, Any] = {}
    for key, value in old.items():
        if key not in new:
            out[key] = None
        elif isinstance(value, Mapping) and isinstance(new[key], Mapping):
            nested = removals(value, new[key])
            if nested:
                out[key] = nested
    return out


def _merge_nulls(patch: dict[str, Any], nulls: Mapping[str, Any]) -> None:
    for key, value in nulls.items():
        if value is None:
            patch.setdefault(key, None)
        elif isinstance(patch.get(key), dict):
            _merge_nulls(patch[key], value)


def merge_patch(desired: Mapping[str, Any], observed: Mapping[str, Any], *,
                without_replicas: bool = False) -> dict[str, Any]:
    """The JSON merge patch that makes `observed` hold `desired`: our labels, annotations,
    owner references and every content field, plus a null for every map key we applied last
    time (LAST_APPLIED_ANNOTATION) and no longer want; keys of ConfigMap/Secret data we no
    longer render are removed too, since the data maps are wholly ours."""
    patch = _content(desired, without_replicas=False)
    for data_field in _DATA_FIELDS:
        have = observed.get(data_field)
        if isinstance(have, Mapping):
            want = desired.get(data_field) or {}
            removed = {k: None for k in have if k not in want}
            if removed:
                patch[data_field] = {**want, **removed}
    before = _applied_before(observed)
    if before:
        now = json.loads(last_applied(desired, without_replicas=without_replicas))
        _merge_nulls(patch, removals(before, now))
    meta = patch.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), LAST_APPLIED_ANNOTATION:
                           last_applied(desired, without_replicas=without_replicas)}
    return patch


# Spec fields the API server refuses to update (422): changing one needs delete + create.
# The flag says the server defaults the field when it is absent (absent is then no change).
_IMMUTABLE: dict[str, dict[str, bool]] = {
    "Deployment": {"selector": False},
    "DaemonSet": {"selector": False},
    # "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template',
    # 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and
    # 'minReadySeconds' are forbidden"
    "StatefulSet": {"selector": False, "serviceName": False, "volumeClaimTemplates": False,
                    "podManagementPolicy": True},
    "Service": {"clusterIP": True},
}


_KEPT_CLAIMS = ("; existing PersistentVolumeClaims are kept as they are (resize or delete "
                "them yourself if the storage settings changed)")


def immutable_changes(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> list[str]:
    """The immutable fields (paths) on which `observed` differs from `desired`."""
    rules = _IMMUTABLE.get(str(desired.get("kind")), {})
    want_spec, have_spec = desired.get("spec") or {}, observed.get("spec") or {}
    changed = []
    for name, defaulted in rules.items():
        want, have = want_spec.get(name), have_spec.get(name)
        if name == "clusterIP":
            # Allocated by the server unless we ask for a headless Service ("None").
            differs = (want == "None") != (have == "None") or (
                want is not None and not _same_scalar(want, have))
        elif want is None:
            differs = not defaulted and not _is_zero(have)
        elif name == "selector":
            differs = not (contains(have, want) and contains(want, have))
        else:
            # The server adds defaults inside (a claim template's volumeMode, status).
            differs = have is None or not contains(have, want)
        if differs:
            changed.append(f"spec.{name}")
    return changed


def plan(
    desired: Iterable[dict[str, Any]],
    observed: Mapping[Key, dict[str, Any]],
    owner_uid: str,
    *,
    replicas_key: Key | None = None,
    reconciled_before: bool = False,
    hold: Collection[Key] = frozenset(),
    no_replace: Collection[Key] = frozenset(),
) -> Plan:
    """Actions converging `observed` (the owner's children, by key) to `desired` (in apply
    order). `replicas_key` names the workload whose spec.replicas is compared on its own (the
    autoscaler changes it without changing its spec hash). `reconciled_before` says this spec
    generation was applied already, so a difference now is drift and the Event says Repaired.
    Children in `hold` are neither created, changed nor deleted; a child in `no_replace` that
    needs a replacement is left as it is and reported in `blocked`."""
    actions: list[Action] = []
    blocked: list[Blocked] = []
    wanted: set[Key] = set(hold)
    for manifest in desired:
        key = key_of(manifest)
        wanted.add(key)
        kind, name = key
        if key in hold:
            continue
        want_hash = spec_hash(manifest)
        have = observed.get(key)
        is_scaled = key == replicas_key
        if have is None:
            actions.append(Action("create", kind, name,
                                  with_last_applied(manifest, without_replicas=is_scaled),
                                  "Repaired" if reconciled_before else "Created",
                                  "recreated after it was deleted" if reconciled_before
                                  else "created", want_hash, manifest, is_scaled))
            continue
        frozen = immutable_changes(manifest, have)
        if frozen and key in no_replace:
            blocked.append(Blocked(kind, name, tuple(frozen)))
            continue
        if frozen:
            actions.append(Action(
                "replace", kind, name, with_last_applied(manifest, without_replicas=is_scaled),
                "Replaced", f"replaced (deleted and re-created): {', '.join(frozen)} cannot be "
                "changed in place" + (_KEPT_CLAIMS if "spec.volumeClaimTemplates" in frozen
                                      else ""), want_hash, manifest, is_scaled))
            continue
        drifted = spec_hash(have) != want_hash or not contains(
            _content(have, without_replicas=is_scaled),
            _content(manifest, without_replicas=is_scaled),
        )
        want_replicas = (manifest.get("spec") or {}).get("replicas")
        have_replicas = (have.get("spec") or {}).get("replicas")
        rescale = is_scaled and want_replicas is not None and want_replicas != have_replicas
        if drifted:
            body = merge_patch(manifest, have, without_replicas=is_scaled)
            if is_scaled and not rescale:
                body.get("spec", {}).pop("replicas", None)
            detail = ("reverted an out-of-band change" if reconciled_before
                      else "updated to the new spec")
            actions.append(Action("patch", kind, name, body,
                                  "Repaired" if reconciled_before else "Updated", detail,
                                  want_hash, manifest, is_scaled))
        elif rescale:
            actions.append(Action("patch", kind, name, {"spec": {"replicas": want_replicas}},
                                  "Scaled", f"scaled from {have_replicas} to {want_replicas} "
                                  "replicas", want_hash))
    for key, have in observed.items():
        if key not in wanted and is_controlled_by(have, owner_uid):
            actions.append(Action("delete", key[0], key[1], {}, "Deleted",
                                  "deleted: no longer part of the spec"))
    return Plan(actions, blocked)
