"""What kube-apiserver does with a custom resource and with a CRD's defaults, offline: unknown
fields, structural defaulting, OpenAPI validation, list-map keys and CEL rules (cel-python with
the API server's semantics: reading a missing key is an error, not false)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import celpy
import jsonschema
import lark
from celpy import celtypes
from celpy.evaluation import CELEvalError, Evaluator
from tests.api.crd_schema import to_jsonschema

Schema = dict[str, Any]


# --- CEL with cel-go's semantics ---------------------------------------------------------------


def _member_dot(tree: lark.Tree) -> lark.Tree | None:
    """The `e.f` node under has()'s argument, through the grammar's single-child wrappers."""
    node: Any = tree
    while isinstance(node, lark.Tree):
        if node.data == "member_dot":
            return cast(lark.Tree, node)
        if len(node.children) != 1:
            return None
        node = node.children[0]
    return None


class _ApiServerEvaluator(Evaluator):  # type: ignore[misc]
    """cel-go's has(e.f): e is evaluated normally (a missing e is an error, as on the API
    server), then f is looked up; celpy would answer false for a missing e."""

    def macro_has_eval(self, exprlist: lark.Tree) -> Any:
        member = _member_dot(exprlist)
        if member is None:
            return super().macro_has_eval(exprlist)
        operand_tree, name = member.children
        operand = self.visit(operand_tree)
        if isinstance(operand, CELEvalError):
            return operand
        if isinstance(operand, celtypes.MapType):
            return celtypes.BoolType(celtypes.StringType(str(name)) in operand)
        return CELEvalError(f"has() on a {type(operand).__name__}", TypeError, None)


class _Runner(celpy.InterpretedRunner):  # type: ignore[misc]
    def evaluate(self, context: Any) -> Any:
        return _ApiServerEvaluator(ast=self.ast, activation=self.new_activation()).evaluate(
            context)


@dataclass
class CelRules:
    """Compiles each rule once."""

    env: Any = field(default_factory=lambda: celpy.Environment(runner_class=_Runner))
    programs: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, rule: str, value: Any) -> str | None:
        """None when the rule holds; otherwise why not (its message is added by the caller)."""
        program = self.programs.get(rule)
        if program is None:
            program = self.programs[rule] = self.env.program(self.env.compile(rule))
        try:
            result = program.evaluate({"self": value})
        except CELEvalError as exc:
            return f"{exc.args[0]} evaluating rule: {rule}"
        if isinstance(result, CELEvalError):
            return f"{result.args[0]} evaluating rule: {rule}"
        if not isinstance(result, celtypes.BoolType):
            return f"rule did not evaluate to a bool: {rule}"
        return None if bool(result) else "failed"


def to_cel(value: Any, schema: Schema) -> Any:
    """A JSON value as the API server types it for CEL: integer and number fields differ."""
    if value is None:
        return None
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return celpy.json_to_cel(value)
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return celtypes.IntType(value)
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(value)
    if kind == "boolean" and isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "string" and isinstance(value, str):
        return celtypes.StringType(value)
    if kind == "array" and isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            out[celtypes.StringType(key)] = to_cel(item, sub)
        return celtypes.MapType(out)
    return celpy.json_to_cel(value)


def _children(value: Any, schema: Schema, path: str) -> Iterator[tuple[Any, Schema, str]]:
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                yield item, props[key], f"{path}.{key}"
            elif isinstance(extra, dict):
                yield item, extra, f"{path}[{key}]"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield item, schema["items"], f"{path}[{i}]"


def cel_errors(value: Any, schema: Schema, path: str, rules: CelRules,
               root_meta: dict[str, Any] | None = None) -> list[str]:
    """Every rule at this node and below, for the value as given (nothing defaulted)."""
    errors: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        target = to_cel(value, schema)
        if root_meta is not None and isinstance(target, celtypes.MapType):
            # Rules at a resource's root see metadata.name and generateName.
            target[celtypes.StringType("metadata")] = celpy.json_to_cel(root_meta)
        why = rules.evaluate(rule["rule"], target)
        if why is not None:
            message = rule.get("message", rule["rule"])
            where = path + rule.get("fieldPath", "")
            errors.append(f"{where}: {message}" if why == "failed" else f"{where}: {why}")
    for item, sub, sub_path in _children(value, schema, path):
        errors += cel_errors(item, sub, sub_path, rules)
    return errors


# --- Structural schema behaviour ---------------------------------------------------------------


def apply_defaults(value: Any, schema: Schema) -> Any:
    """The API server's defaulting: a non-nullable null is dropped, a missing property gets a
    copy of its default, then defaulting recurses into every present value (defaults too)."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if item is None and sub is not None and not sub.get("nullable"):
                continue
            out[key] = item
        for key, sub in props.items():
            if "default" in sub and key not in out:
                out[key] = copy.deepcopy(sub["default"])
        for key, item in list(out.items()):
            if key in props:
                out[key] = apply_defaults(item, props[key])
            elif isinstance(extra, dict):
                out[key] = apply_defaults(item, extra)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def unknown_fields(value: Any, schema: Schema, path: str) -> list[str]:
    """Fields the schema does not declare: `kubectl apply` (fieldValidation Strict) refuses
    them; otherwise the API server would silently prune them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        if "additionalProperties" not in schema:
            out += [f'{path}.{k}: unknown field "{k}"' for k in value if k not in props]
    for item, sub, sub_path in _children(value, schema, path):
        out += unknown_fields(item, sub, sub_path)
    return out


def list_key_errors(value: Any, schema: Schema, path: str) -> list[str]:
    """Duplicate keys in `x-kubernetes-list-type: map` lists and duplicates in sets."""
    out: list[str] = []
    if isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        seen: list[Any] = []
        for i, item in enumerate(value):
            if kind == "map" and isinstance(item, dict):
                key = tuple(item.get(k) for k in schema.get("x-kubernetes-list-map-keys", []))
            elif kind == "set":
                key = item
            else:
                continue
            if key in seen:
                out.append(f"{path}[{i}]: Duplicate value: {key!r}")
            seen.append(key)
    for item, sub, sub_path in _children(value, schema, path):
        out += list_key_errors(item, sub, sub_path)
    return out


def schema_errors(value: Any, schema: Schema, path: str) -> list[str]:
    """OpenAPI validation (types, enums, bounds, patterns, required)."""
    validator = jsonschema.Draft202012Validator(to_jsonschema(schema))
    out = []
    for err in validator.iter_errors(value):
        where = path + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                               for p in err.absolute_path)
        out.append(f"{where}: {err.message}")
    return out


# --- Admission of a custom resource -------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """What the API server answers to a create: the stored object, or the reasons it refuses."""

    stored: dict[str, Any] | None
    errors: list[str]

    @property
    def accepted(self) -> bool:
        return not self.errors


def admit(body: dict[str, Any], root: Schema, rules: CelRules | None = None) -> Admission:
    """Create `body` against the CRD version schema `root` (its openAPIV3Schema)."""
    rules = rules or CelRules()
    # metadata is the API server's own ObjectMeta, not described by the CRD schema.
    errors = unknown_fields({k: v for k, v in body.items() if k != "metadata"}, root, "")
    if errors:
        return Admission(None, errors)
    defaulted = apply_defaults(body, root)
    errors = schema_errors(defaulted, root, "") + list_key_errors(defaulted, root, "")
    meta = {k: v for k, v in (body.get("metadata") or {}).items()
            if k in ("name", "generateName")}
    errors += cel_errors(defaulted, root, "", rules, root_meta=meta)
    return Admission(None if errors else defaulted, errors)


# --- What the API server checks of the CRD's own defaults ---------------------------------------


def schema_nodes(node: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (properties, items, additionalProperties)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.properties[{name}]")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}.items")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}.additionalProperties")


def default_errors(root: Schema, *, with_nested_defaults: bool,
                   rules: CelRules | None = None) -> list[str]:
    """Every `default` in the schema must validate, be pruned and satisfy the CEL rules at its
    level and below. Written as is, this is what the API server checks when the CRD is
    created; with nested defaults applied, what an object that omits the field becomes."""
    rules = rules or CelRules()
    out: list[str] = []
    for path, node in schema_nodes(root):
        if "default" not in node:
            continue
        value = copy.deepcopy(node["default"])
        if with_nested_defaults:
            value = apply_defaults(value, node)
        where = f"{path}.default"
        problems = (unknown_fields(value, node, where) + schema_errors(value, node, where)
                    + cel_errors(value, node, where, rules))
        out += problems
    return out
