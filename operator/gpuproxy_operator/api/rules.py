"""Cross-field rules written once: a Python check for the models and a CEL rule for the CRD,
so `render` and the API server refuse the same specs, all problems reported in one pass."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

Values = Mapping[str, Any]


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule over several fields of a model.

    `check` gets the model's validated field values by Python name and returns True when the
    rule holds. `cel` is the same condition for the CRD's `x-kubernetes-validations`, or None
    when the API server enforces it otherwise (e.g. unique list-map keys). `reads` are the
    camelCase field paths `cel` dereferences: the generated rule holds vacuously while one is
    absent, because the API server evaluates rules against object defaults exactly as written
    (`default: {}`), where reading a missing key is an error, not false.
    """

    check: Callable[[Values], bool]
    message: str
    cel: str | None = None
    reads: tuple[str, ...] = ()
    field_path: str = ""
    detail: Callable[[Values], str] | None = None
    """Optional specifics for the error (e.g. which names repeat), after the message."""

    def describe(self, values: Values) -> str:
        return f"{self.message}; {self.detail(values)}" if self.detail else self.message

    def to_crd(self) -> dict[str, str] | None:
        """The `x-kubernetes-validations` entry, guarded by has() for every path it reads."""
        if self.cel is None:
            return None
        guards: list[str] = []
        for path in self.reads:
            parts = path.split(".")
            for depth in range(1, len(parts) + 1):
                guard = "!has(self." + ".".join(parts[:depth]) + ")"
                if guard not in guards:
                    guards.append(guard)
        rule = " || ".join([*guards, f"({self.cel})"]) if guards else self.cel
        entry = {"rule": rule, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry


def rules_of(model: type[BaseModel]) -> tuple[CrossFieldRule, ...]:
    """The cross-field rules a model class declares (`cross_field_rules`)."""
    rules = model.__dict__.get("cross_field_rules", ())
    return tuple(rules)


def _field_adapter(field: FieldInfo) -> TypeAdapter[Any]:
    annotation: Any = field.annotation
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation)


def _values_from_raw(model: type[BaseModel], data: Any, strict: bool) -> dict[str, Any]:
    """The fields of raw data (that failed validation as a whole) that are valid on their
    own, by Python name, plus the defaults of those not given."""
    values: dict[str, Any] = {}
    if not isinstance(data, Mapping):
        return values
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if alias not in data and name not in data:
            if not field.is_required():
                values[name] = field.get_default(call_default_factory=True)
            continue
        raw = data[alias] if alias in data else data[name]
        adapter = _field_adapter(field)
        try:
            # JSON input is validated strictly, as the API server types it (see parse_cluster).
            values[name] = (adapter.validate_json(json.dumps(raw), strict=True) if strict
                            else adapter.validate_python(raw))
        except (ValidationError, TypeError, ValueError):
            continue
    return values


def _holds_on_partial(rule: CrossFieldRule, values: Values) -> bool:
    """A rule over partially valid input: it holds unless every field it needs is valid and
    it fails (a rule reading an invalid field is skipped; that field has its own error)."""
    try:
        return rule.check(values)
    except (KeyError, AttributeError, TypeError):
        return True


def _violation(rule: CrossFieldRule, values: Values, data: Any) -> InitErrorDetails:
    return InitErrorDetails(type=_literal_error("cross_field", rule.describe(values)), loc=(),
                            input=data)


def _literal_error(kind: str, message: str) -> PydanticCustomError:
    # Through the context, so braces in user-supplied values are not read as a template.
    return PydanticCustomError(kind, "{message}", {"message": message})


def _reraise(exc: ValidationError, extra: list[InitErrorDetails]) -> ValidationError:
    details: list[InitErrorDetails] = []
    for err in exc.errors():
        kind: Any = err["type"]
        if kind in ("value_error", "assertion_error"):
            # These carry the exception object in ctx, which cannot be rebuilt from data.
            kind = _literal_error(kind, err["msg"].removeprefix("Value error, "))
            details.append(InitErrorDetails(type=kind, loc=err["loc"], input=err["input"]))
        else:
            details.append(InitErrorDetails(type=kind, loc=err["loc"], input=err["input"],
                                            ctx=err.get("ctx", {})))
    return ValidationError.from_exception_data(exc.title, [*details, *extra])


def apply_rules(model: type[BaseModel], data: Any, handler: Callable[[Any], Any],
                strict: bool) -> Any:
    """Body of the models' wrap validator: field validation, then every rule. When fields
    fail, rules whose own inputs are valid are still checked, so one pass reports all."""
    rules = rules_of(model)
    if not rules:
        return handler(data)
    try:
        instance = handler(data)
    except ValidationError as exc:
        values = _values_from_raw(model, data, strict)
        extra = [_violation(rule, values, data) for rule in rules
                 if not _holds_on_partial(rule, values)]
        if not extra:
            raise
        raise _reraise(exc, extra) from None
    values = {name: getattr(instance, name) for name in type(instance).model_fields}
    failed = [_violation(rule, values, data) for rule in rules if not rule.check(values)]
    if failed:
        raise ValidationError.from_exception_data(model.__name__, failed)
    return instance
