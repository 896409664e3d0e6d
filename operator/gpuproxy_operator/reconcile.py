"""The pure planner: observed children + desired manifests -> the API writes that converge them.
Creates what is missing, patches only what differs, deletes owned children no longer desired."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from gpuproxy_operator.naming import SPEC_HASH_ANNOTATION

Key = tuple[str, str]  # (kind, name) within the cluster's namespace
Verb = Literal["create", "patch", "delete"]
Reason = Literal["Created", "Updated", "Repaired", "Scaled", "Deleted"]

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

    @property
    def key(self) -> Key:
        return (self.kind, self.name)

    def describe(self) -> str:
        return f"{self.kind} {self.name} {self.detail}".strip()


@dataclass(frozen=True)
class Plan:
    actions: list[Action] = field(default_factory=list)

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


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have and type(want) is type(have):
        return True
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


def _content(manifest: Mapping[str, Any], *, without_replicas: bool) -> dict[str, Any]:
    body = {k: v for k, v in manifest.items() if k not in _NOT_CONTENT}
    meta = manifest.get("metadata") or {}
    body["metadata"] = {k: meta[k] for k in ("labels", "annotations", "ownerReferences")
                        if k in meta}
    if without_replicas and isinstance(body.get("spec"), dict):
        body["spec"] = {k: v for k, v in body["spec"].items() if k != "replicas"}
    return body


def merge_patch(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that makes `observed` hold `desired`: our labels, annotations, owner
    references and every content field; keys of ConfigMap/Secret data we no longer render are
    removed (null), since the data maps are wholly ours."""
    patch = _content(desired, without_replicas=False)
    for data_field in ("data", "binaryData", "stringData"):
        have = observed.get(data_field)
        if isinstance(have, Mapping):
            want = desired.get(data_field) or {}
            removed = {k: None for k in have if k not in want}
            if removed:
                patch[data_field] = {**want, **removed}
    return patch


def plan(
    desired: Iterable[dict[str, Any]],
    observed: Mapping[Key, dict[str, Any]],
    owner_uid: str,
    *,
    replicas_key: Key | None = None,
    reconciled_before: bool = False,
) -> Plan:
    """Actions converging `observed` (the owner's children, by key) to `desired` (in apply
    order). `replicas_key` names the workload whose spec.replicas is compared on its own (the
    autoscaler changes it without changing its spec hash). `reconciled_before` says this spec
    generation was applied already, so a difference now is drift and the Event says Repaired."""
    actions: list[Action] = []
    wanted: set[Key] = set()
    for manifest in desired:
        key = key_of(manifest)
        wanted.add(key)
        kind, name = key
        want_hash = spec_hash(manifest)
        have = observed.get(key)
        if have is None:
            actions.append(Action("create", kind, name, manifest,
                                  "Repaired" if reconciled_before else "Created",
                                  "recreated after it was deleted" if reconciled_before
                                  else "created", want_hash))
            continue
        is_scaled = key == replicas_key
        drifted = spec_hash(have) != want_hash or not contains(
            _content(have, without_replicas=is_scaled),
            _content(manifest, without_replicas=is_scaled),
        )
        want_replicas = (manifest.get("spec") or {}).get("replicas")
        have_replicas = (have.get("spec") or {}).get("replicas")
        rescale = is_scaled and want_replicas is not None and want_replicas != have_replicas
        if drifted:
            body = merge_patch(manifest, have)
            if is_scaled and not rescale:
                body.get("spec", {}).pop("replicas", None)
            detail = ("reverted an out-of-band change" if reconciled_before
                      else "updated to the new spec")
            actions.append(Action("patch", kind, name, body,
                                  "Repaired" if reconciled_before else "Updated", detail,
                                  want_hash))
        elif rescale:
            actions.append(Action("patch", kind, name, {"spec": {"replicas": want_replicas}},
                                  "Scaled", f"scaled from {have_replicas} to {want_replicas} "
                                  "replicas", want_hash))
    for key, have in observed.items():
        if key not in wanted and is_controlled_by(have, owner_uid):
            actions.append(Action("delete", key[0], key[1], {}, "Deleted",
                                  "deleted: no longer part of the spec"))
    return Plan(actions)
