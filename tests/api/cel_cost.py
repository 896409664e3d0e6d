"""Offline worst-case cost of a CRD's CEL rules as kube-apiserver estimates it at CRD create time
(cel-go checker/cost.go over Kubernetes' schema DeclTypes), plus the structural checks we add."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NamedTuple

from celpy.celparser import CELParser
from celpy.evaluation import celbytes, celstr

MAX_REQUEST_BYTES = 3 * 1024 * 1024  # apiserver DefaultMaxRequestSizeBytes
MAX_STRING = MAX_REQUEST_BYTES - 2  # an unbounded string fills a request, less its quotes
UNKNOWN = 2**64 - 1  # cel-go's unknown size, and where its uint64 arithmetic saturates
PER_CALL_LIMIT = 1_000_000  # celconfig.PerCallLimit: one evaluation is aborted above this
STATIC_COST_LIMIT = 10_000_000  # StaticEstimatedCostLimit: per rule, times its cardinality
STATIC_CRD_COST_LIMIT = 100_000_000  # StaticEstimatedCRDCostLimit: sum over a version's rules
_SCALARS = frozenset({"bool", "double", "duration", "int", "timestamp", "uint"})
_RESERVED = frozenset({
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function",
    "if", "import", "let", "loop", "package", "namespace", "return", "var", "void", "while"})
_BINARY = MappingProxyType({
    "relation_lt": "<", "relation_le": "<=", "relation_gt": ">", "relation_ge": ">=",
    "relation_eq": "==", "relation_ne": "!=", "relation_in": "in", "addition_add": "+",
    "addition_sub": "-", "multiplication_mul": "*", "multiplication_div": "/",
    "multiplication_mod": "%"})
_LITERALS = MappingProxyType({"INT_LIT": "int", "UINT_LIT": "uint", "FLOAT_LIT": "double",
                              "BOOL_LIT": "bool", "NULL_LIT": "null"})
_MACROS = MappingProxyType({"all": (2,), "exists": (2,), "exists_one": (2,), "map": (2, 3),
                            "filter": (2,)})


@dataclass(frozen=True)
class DeclType:
    """apiserver's cel.DeclType for a schema node: its CEL kind and size bounds."""

    kind: str  # object map list string bytes int double bool dyn duration timestamp
    max_elements: int = 0  # what the size estimator answers: runes/bytes, items or entries
    min_size: int = 1  # MinSerializedSize: the smallest JSON encoding
    fields: dict[str, DeclType] = field(default_factory=dict)
    elem: DeclType | None = None
    key: DeclType | None = None
    bounded: bool = True  # the schema itself bounds it: maxLength/Items/Properties, enum, format


@dataclass(frozen=True)
class RuleCost:
    version: str
    path: str  # the schema node carrying the rule, as in crd_schema.walk()
    rule: str
    cost: int  # the estimated max cost of one evaluation
    cardinality: int  # how often the rule can run per object

    @property
    def total(self) -> int:
        return min(self.cost * self.cardinality, UNKNOWN)  # getExpressionCost


def _sat(value: int) -> int:
    return min(value, UNKNOWN)


def _factor(size: int, factor: float) -> int:
    # cel-go multiplyByCostFactor, in float64 like Go: ceil(30 * 0.1) is 4 there too.
    return min(math.ceil(float(size) * factor), UNKNOWN)


def _escape(name: str) -> str | None:
    """apiserver cel.Escape: a property's name in CEL, None when CEL cannot address it."""
    if not name or name[0] in "0123456789" or re.search(r"[^a-zA-Z0-9\-./_]", name):
        return None
    if name in _RESERVED:
        return f"__{name}__"
    subs = {"__": "__underscores__", ".": "__dot__", "-": "__dash__", "/": "__slash__"}
    return re.sub(r"__|[-./]", lambda m: subs[m.group()], name)


def _with_object_meta(schema: dict[str, Any]) -> dict[str, Any]:
    """WithTypeAndObjectMeta: a resource root always exposes kind, apiVersion, metadata.name
    and metadata.generateName; unless all four are declared, as unbounded strings."""
    props = schema.get("properties") or {}
    meta = props.get("metadata") or {}
    names = meta.get("properties") or {}
    strings = [(props.get(k) or {}).get("type") for k in ("kind", "apiVersion")]
    strings += [(names.get(k) or {}).get("type") for k in ("name", "generateName")]
    if strings == ["string"] * 4 and meta.get("type") == "object":
        return schema
    string = {"type": "string"}
    meta = {"type": "object", "properties": {"name": string, "generateName": string}}
    return {**schema, "properties": {**props, "kind": string, "apiVersion": string,
                                     "metadata": meta}}


def declared_type(schema: dict[str, Any], root: bool = False) -> DeclType | None:
    """SchemaDeclType: None where CEL cannot see the node (no type, items or values unseen)."""
    if schema.get("x-kubernetes-int-or-string"):
        bound = schema.get("maxLength")
        return DeclType("dyn", MAX_STRING if bound is None else 4 * max(bound, 0), 1,
                        bounded=bound is not None)
    schema = _with_object_meta(schema) if root else schema
    kind, fmt = schema.get("type"), schema.get("format")
    if kind == "array":
        items = schema.get("items")
        elem = _child_type(items) if isinstance(items, dict) else None
        if elem is None:
            return None
        bound = schema.get("maxItems")
        count = (MAX_STRING // (elem.min_size + 1)) if bound is None else max(bound, 0)
        return DeclType("list", count, 2, elem=elem, bounded=bound is not None)
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        value = _child_type(schema["additionalProperties"])
        if value is None:
            return None
        bound = schema.get("maxProperties")
        count = (MAX_STRING // (value.min_size + 6)) if bound is None else max(bound, 0)
        # Kubernetes keys are its plain StringType, MaxElements 0: a key's size estimate is 0.
        key = DeclType("string", 0, 2, bounded=bound is not None)
        return DeclType("map", count, 2, elem=value, key=key, bounded=bound is not None)
    if kind == "object":
        fields: dict[str, DeclType] = {}
        min_size, required = 2, set(schema.get("required") or ())
        for name, prop in (schema.get("properties") or {}).items():
            if (prop_type := _child_type(prop)) is None:
                continue
            if (escaped := _escape(name)) is not None:
                fields[escaped] = prop_type
            if name in required and "default" not in prop:  # defaults are filled server-side
                min_size += len(name) + prop_type.min_size + 4
        return DeclType("object", 0, min_size, fields=fields)
    if kind == "string" and fmt in ("duration", "date", "date-time"):
        # maxLength is ignored: the size is the longest value the format allows.
        sizes = {"duration": (32, 3), "date": (12, 12), "date-time": (32, 21)}[fmt]
        return DeclType("duration" if fmt == "duration" else "timestamp", *sizes)
    if kind == "string":
        bound, enum = schema.get("maxLength"), schema.get("enum") or []
        longest = max((len(v.encode()) for v in enum if isinstance(v, str)), default=0)
        size = (4 if fmt != "byte" else 1) * max(bound, 0) if bound is not None else (
            longest if enum and fmt != "byte" else MAX_STRING)  # maxLength counts runes
        return DeclType("bytes" if fmt == "byte" else "string", size, 2,
                        bounded=bound is not None or bool(enum and fmt != "byte"))
    simple = {"boolean": DeclType("bool", 0, 4), "number": DeclType("double"),
              "integer": DeclType("int")}
    return simple.get(str(kind))


def _child_type(schema: dict[str, Any]) -> DeclType | None:
    return declared_type(schema, bool(schema.get("x-kubernetes-embedded-resource")))


@dataclass(frozen=True)
class _N:
    """A parsed CEL expression with the macros expanded the way cel-go's parser does it."""

    op: str  # lit id sel has call list map comp
    name: str = ""  # literal kind, identifier, field, function, or a comprehension's variable
    # Operands, a member call's target first; comp: range, init, condition, step, result.
    kids: tuple[_N, ...] = ()
    size: int = 0  # a literal's size
    member: bool = False


def _call(name: str, *kids: _N) -> _N:
    return _N("call", name, kids)


def _convert(tree: Any) -> _N:
    """celpy's lark tree -> _N."""
    kind, kids = tree.data, tree.children
    if len(kids) == 1 and kind in ("expr", "conditionalor", "conditionaland", "relation",
                                   "addition", "multiplication", "unary", "member", "primary",
                                   "paren_expr"):
        return _convert(kids[0])
    last: Any = kids[-1] if kids else None
    args = tuple(map(_convert, last.children)) if getattr(last, "data", "") == "exprlist" else ()
    if kind == "expr":
        return _call("?:", *map(_convert, kids))
    if kind in ("conditionalor", "conditionaland"):
        return _call("||" if kind == "conditionalor" else "&&", *map(_convert, kids))
    if kind in ("relation", "addition", "multiplication"):
        return _call(_BINARY[kids[0].data], _convert(kids[0].children[0]), _convert(kids[1]))
    if kind == "unary":
        return _call("!" if kids[0].data == "unary_not" else "-", _convert(kids[1]))
    if kind == "member_dot":
        return _N("sel", str(kids[1]), (_convert(kids[0]),))
    if kind == "member_index":
        return _call("[]", _convert(kids[0]), _convert(kids[1]))
    if kind == "member_dot_arg":
        return _member_call(str(kids[1]), _convert(kids[0]), args)
    if kind == "ident_arg" and str(kids[0]) == "has":
        if len(args) != 1 or args[0].op != "sel":
            raise ValueError("invalid argument to has() macro")
        return _N("has", args[0].name, args[0].kids)
    if kind == "ident_arg":
        return _call(str(kids[0]), *args)
    if kind == "ident":
        return _N("id", str(kids[0]))
    if kind == "list_lit":
        return _N("list", kids=args)
    if kind == "map_lit":
        return _N("map", kids=tuple(map(_convert, kids[0].children)) if kids else ())
    if kind == "literal" and kids[0].type in ("STRING_LIT", "MLSTRING_LIT"):
        return _N("lit", "string", size=len(celstr(kids[0])))  # runes, as cel-go counts
    if kind == "literal" and kids[0].type == "BYTES_LIT":
        return _N("lit", "bytes", size=len(celbytes(kids[0])))
    if kind == "literal":
        return _N("lit", _LITERALS[kids[0].type], size=1)
    raise ValueError(f"unsupported CEL syntax: {kind}")


def _member_call(name: str, target: _N, args: tuple[_N, ...]) -> _N:
    """cel-go parser/macro.go: all, exists, exists_one, map and filter as comprehensions."""
    if len(args) not in _MACROS.get(name, ()):
        return _N("call", name, (target, *args), member=True)
    if args[0].op != "id":
        raise ValueError(f"{name}(): the iteration variable must be a simple name")
    accu, true, one = _N("id", "@result"), _N("lit", "bool", size=1), _N("lit", "int", size=1)
    if name == "all":
        init, cond, step = true, _call("@not_strictly_false", accu), _call("&&", accu, args[1])
    elif name == "exists":
        init, cond = true, _call("@not_strictly_false", _call("!", accu))
        step = _call("||", accu, args[1])
    elif name == "exists_one":
        init, cond, step = one, true, _call("?:", args[1], _call("+", accu, one), accu)
    else:  # map(x, [filter,] transform), filter(x, predicate): accu + [item], maybe guarded
        item = args[0] if name == "filter" else args[-1]
        init, cond, step = _N("list"), true, _call("+", accu, _N("list", kids=(item,)))
        if len(args) == 3 or name == "filter":
            step = _call("?:", args[1], step, accu)
    result = _call("==", accu, one) if name == "exists_one" else accu
    return _N("comp", args[0].name, (target, init, cond, step, result))


class _Val(NamedTuple):
    cost: int
    kind: str
    decl: DeclType | None = None
    path: tuple[str, ...] | None = None  # cel-go's field path: variable, fields, @items...
    size: int | None = None  # a size cel-go computed (literals, call results)


class _Coster:
    """cel-go's coster for one expression, with Kubernetes' sizeEstimator, and our findings."""

    def __init__(self, root: DeclType, text: str, where: str, resource_root: bool) -> None:
        self.root, self.text, self.where, self.resource_root = root, text, where, resource_root
        self.scopes: dict[str, list[_Val]] = {}
        self.max_cost = 0
        self.undefined: list[str] = []
        self.unbounded: list[str] = []

    def _lookup(self, path: tuple[str, ...]) -> DeclType | None:
        node: DeclType | None = self.root
        for name in path[1:]:  # the estimator skips the variable and starts at self's type
            if node is not None:
                node = node.elem if name in ("@items", "@values") else (
                    node.key if name == "@keys" else node.fields.get(name))
        return node

    def size(self, v: _Val) -> int:
        """computeSize: the computed size or the schema's bound at the path, else 1 for
        scalars. cel-go prefers the computed one where both exist (e.g. items of a literal,
        whose path Kubernetes resolves to self's own bound); the larger is conservative."""
        decl = self._lookup(v.path) if v.path else None
        known = [s for s in (v.size, decl.max_elements if decl else None) if s is not None]
        return max(known) if known else 1 if v.kind in _SCALARS else UNKNOWN

    def _render(self, path: tuple[str, ...] | None) -> str:
        marks = {"@items": "[]", "@values": "{}", "@keys": "{keys}"}
        return (self.where + "".join(marks.get(p, f".{p}") for p in path[1:])) if path else (
            "a computed value")

    def _note(self, problem: str) -> None:
        self.unbounded.append(f"{self.where or '(root)'}: {self.text!r} {problem}")

    def cost(self, n: _N) -> _Val:
        if n.op == "lit":
            return _Val(0, n.name, size=n.size)
        if n.op == "id":
            if self.scopes.get(n.name):
                return self.scopes[n.name][-1]
            if n.name in ("self", "oldSelf"):
                return _Val(1, self.root.kind, self.root, (n.name,))
            raise ValueError(f"undeclared reference to {n.name!r}")
        if n.op in ("sel", "has"):
            return self._select(n)
        if n.op in ("list", "map"):
            vals = [self.cost(k) for k in n.kids]
            keys, elems = (vals[0::2], vals[1::2]) if n.op == "map" else ([], vals)
            decl = DeclType(n.op, len(elems), elem=self._literal_elem(elems),
                            key=self._literal_elem(keys))
            base = 10 if n.op == "list" else 30  # ListCreateBaseCost, MapCreateBaseCost
            return _Val(_sat(base + sum(v.cost for v in vals)), n.op, decl, None, len(elems))
        if n.op == "comp":
            return self._comprehension(n)
        return self._function(n)

    def _literal_elem(self, vals: list[_Val]) -> DeclType | None:
        # Literals are homogeneous: the first entry gives the type, all give the size.
        if not vals:
            return None
        size = max(map(self.size, vals))
        return replace(vals[0].decl, max_elements=size) if vals[0].decl else DeclType(
            vals[0].kind, size)

    def _select(self, n: _N) -> _Val:
        op = self.cost(n.kids[0])
        decl = None
        if op.kind == "object" and op.decl is not None:
            if (decl := op.decl.fields.get(n.name)) is None:
                self.undefined.append(f"{self.where or '(root)'}: {self.text!r}: undefined field "
                                      f"{n.name!r} of {self._render(op.path)}")
        elif op.kind == "map" and op.decl is not None:
            decl = op.decl.elem
        elif op.kind != "dyn":
            raise ValueError(f"cannot select {n.name!r} from a {op.kind}")
        if n.op == "has":  # Kubernetes sets PresenceTestHasCost(false)
            return _Val(op.cost, "bool")
        cost = op.cost + (1 if op.kind in ("object", "map") else 0) + self._computed(op)
        return _Val(cost, decl.kind if decl else "dyn", decl, (*(op.path or ()), n.name))

    @staticmethod
    def _computed(operand: _Val) -> int:
        # Newer cel-go charges 1 more to select from or index a computed value (a literal, a
        # call's result) than an attribute; charging it always is the conservative choice.
        return 1 if operand.path is None else 0

    def _check_strings(self, fn: str, vals: list[_Val]) -> None:
        for v in vals:
            # The apiserver bounds object names itself; the estimator cannot see it.
            meta = self.resource_root and v.path in (("self", "metadata", "name"),
                                                     ("self", "metadata", "generateName"))
            unbounded = (v.decl is not None and not v.decl.bounded) or self.size(v) >= MAX_STRING
            if v.kind in ("string", "dyn") and unbounded and not meta:
                self._note(f"calls {fn}() on {self._render(v.path)}, a string without maxLength")

    def _function(self, n: _N) -> _Val:
        fn, vals = n.name, [self.cost(k) for k in n.kids]
        member = n.member or (fn == "matches" and len(vals) == 2)  # global matches(): see below
        target, args = (vals[0], vals[1:]) if member else (None, vals)
        base = _sat(sum(v.cost for v in vals))  # costCall adds the target's cost to the args'
        kinds = [v.kind for v in args if v.kind != "dyn"] or ["dyn"]
        if fn in ("&&", "||"):
            return _Val(base, "bool")
        if fn == "?:":
            test, yes, no = args
            decl = no.decl if yes.decl is None or (no.decl and not no.decl.bounded) else yes.decl
            kind = yes.kind if yes.kind != "dyn" else no.kind
            return _Val(_sat(test.cost + max(yes.cost, no.cost)), kind, decl, None,
                        max(self.size(yes), self.size(no)))
        if fn == "dyn" and len(args) == 1:  # cel-go keeps the operand's sizes (and entries)
            return _Val(base + 1, args[0].kind, args[0].decl, None, self.size(args[0]))
        if fn in ("==", "!=") or (fn in ("<", "<=", ">", ">=")
                                  and kinds[0] in ("string", "bytes", "dyn")):
            smaller = min(self.size(args[0]), self.size(args[1]))
            return _Val(_sat(base + _factor(smaller, 0.1)), "bool")
        if fn in ("<", "<=", ">", ">=", "!", "@not_strictly_false"):
            return _Val(base + 1, "bool")
        if fn == "in":  # InList is O(n); dyn may be a list
            return _Val(_sat(base + (1 if args[1].kind == "map" else self.size(args[1]))), "bool")
        if fn == "[]":
            coll = args[0]
            decl = coll.decl.elem if coll.decl is not None else None
            size = decl.max_elements if decl is not None and coll.path is None else None
            part = "@items" if coll.kind == "list" else "@values"
            return _Val(base + 1 + self._computed(coll), decl.kind if decl else "dyn", decl,
                        (*(coll.path or ()), part), size)
        if fn == "size" and len(vals) == 1:
            self._check_strings(fn, vals)
            return _Val(base + 1, "int")
        if fn == "+" and kinds[0] in ("string", "bytes", "list", "dyn"):
            size = _sat(self.size(args[0]) + self.size(args[1]))
            decls = [v.decl for v in args if v.decl is not None]
            decl = DeclType(kinds[0], size, elem=decls[-1].elem if decls else None,
                            bounded=all(d.bounded for d in decls))
            extra = 1 if kinds[0] == "list" else _factor(size, 0.1)  # concatenation
            return _Val(_sat(base + extra), kinds[0], decl, None, size)
        if fn in ("+", "-", "*", "/", "%"):
            return _Val(base + 1, kinds[0])
        if fn in ("matches", "contains", "startsWith", "endsWith") and target and len(args) == 1:
            self._check_strings(fn, vals)
            arg = self.size(args[0])
            if fn == "matches":  # the string (+1) times a guess at the regex's states
                # Global matches(s, re) is O(1) in cel-go; costed like s.matches(re) here.
                extra = _factor(_sat(self.size(target) + 1), 0.1) * _factor(arg, 0.25)
            elif fn == "contains":
                extra = _factor(self.size(target), 0.1) * _factor(arg, 0.1)
            else:
                extra = _factor(arg, 0.1)
            return _Val(_sat(base + _sat(extra)), "bool")
        raise ValueError(f"no cost model for {fn}() here; extend tests/api/cel_cost.py")

    def _comprehension(self, n: _N) -> _Val:
        range_n, init_n, cond_n, step_n, result_n = n.kids
        rng, init = self.cost(range_n), self.cost(init_n)
        if rng.kind not in ("list", "map", "dyn"):
            raise ValueError(f"cannot iterate over a {rng.kind}")
        bounded = range_n.op in ("list", "map") or (rng.decl is not None and rng.decl.bounded)
        if not bounded:
            self._note(f"iterates {self._render(rng.path)} without maxItems/maxProperties")
        decl = None if rng.decl is None else rng.decl.elem if rng.kind == "list" else rng.decl.key
        part = "@items" if rng.kind == "list" else "@keys"  # a map's macros see its keys
        self.scopes.setdefault("@result", []).append(_Val(1, init.kind, None, None,
                                                          self.size(init)))
        entry = decl.max_elements if decl is not None and rng.path is None else None
        self.scopes.setdefault(n.name, []).append(
            _Val(1, decl.kind if decl else "dyn", decl, (*(rng.path or ()), part), entry))
        loop, step = self.cost(cond_n), self.cost(step_n)
        self.scopes[n.name].pop()
        result = self.cost(result_n)
        self.scopes["@result"].pop()
        count = self.size(rng)
        total = _sat(rng.cost + init.cost + result.cost + _sat(count * (loop.cost + step.cost)))
        if init.kind != "list":
            return _Val(total, result.kind, None, None, self.size(init))
        elem = step.decl.elem if step.decl is not None else None
        return _Val(total, "list", DeclType("list", count, elem=elem, bounded=bounded), None,
                    count)


def _analyse(text: str, schema: dict[str, Any], where: str, root: bool) -> _Coster:
    decl = declared_type(schema, root)
    if decl is None:
        raise ValueError(f"{where or '(root)'}: CEL cannot see this schema node")
    coster = _Coster(decl, text, where, root)
    coster.max_cost = coster.cost(_convert(CELParser().parse(text))).cost
    return coster


def estimate_rule_cost(rule: str, schema: dict[str, Any], *, root: bool = False) -> int:
    """The max cost cel-go estimates for `rule` with `self` typed by `schema`."""
    return _analyse(rule, schema, "", root).max_cost


def _walk(node: dict[str, Any], path: str, cardinality: int | None, root: bool) -> Iterator[
        tuple[str, dict[str, Any], dict[str, Any], int | None, bool]]:
    """(path, node, rule, cardinality, resource root) per rule; cardinality is the product of
    the enclosing maxItems/maxProperties (extractMaxElements), None when one is unbounded."""
    root = root or bool(node.get("x-kubernetes-embedded-resource"))
    for rule in node.get("x-kubernetes-validations") or ():
        yield path, node, rule, cardinality, root
    kind = node.get("type")
    bound = node.get("maxItems") if kind == "array" else node.get("maxProperties") if (
        kind == "object" and "additionalProperties" in node) else 1
    inner = None if cardinality is None or bound is None else cardinality * max(bound, 0)
    children = [(f".{name}", sub) for name, sub in (node.get("properties") or {}).items()]
    for key, mark in (("items", "[]"), ("additionalProperties", "{}")):
        children += [(mark, node[key])] if isinstance(node.get(key), dict) else []
    for mark, sub in children:  # CRDs allow no rules under allOf/anyOf/oneOf/not
        yield from _walk(sub, path + mark, inner, False)


def _expressions(crd: dict[str, Any]) -> Iterator[tuple[str, str, int | None, _Coster]]:
    """(version, path, cardinality, analysed coster) per rule and messageExpression."""
    for version in crd["spec"]["versions"]:
        schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
        for path, node, rule, cardinality, root in _walk(schema, "", 1, True) if schema else ():
            for key in ("rule", "messageExpression"):
                if text := rule.get(key):
                    # messageExpression costs count once towards the total, not per occurrence.
                    once = 1 if key == "messageExpression" else cardinality
                    yield version["name"], path, once, _analyse(text, node, path, root)


def crd_rule_costs(crd: dict[str, Any]) -> list[RuleCost]:
    """Every rule (and messageExpression) of every version with its cost and cardinality."""
    out = []
    for version, path, cardinality, coster in _expressions(crd):
        if cardinality is None:  # maxCardinality: as many as fit into one request
            cardinality = MAX_REQUEST_BYTES // (coster.root.min_size + 1)
        out.append(RuleCost(version, path or "(root)", coster.text, coster.max_cost, cardinality))
    return out


def crd_total_cost(costs: list[RuleCost]) -> int:
    """The largest per-version sum: the apiserver budgets each version's schema apart."""
    totals: dict[str, int] = {}
    for cost in costs:
        totals[cost.version] = _sat(totals.get(cost.version, 0) + cost.total)
    return max(totals.values(), default=0)


def unbounded_iterations(crd: dict[str, Any]) -> list[str]:
    """Rules iterating a list/map without maxItems/maxProperties, or running string functions
    on strings without maxLength (map keys count as bounded by their map's maxProperties)."""
    return [problem for *_, coster in _expressions(crd) for problem in coster.unbounded]


def unknown_fields(crd: dict[str, Any]) -> list[str]:
    """Selections of fields the schema does not declare: the apiserver's 'undefined field'."""
    return [problem for *_, coster in _expressions(crd) for problem in coster.undefined]
