"""Spend: the model a request names, its cost in USD from the price table (`budgets.prices`),
and the per-process spend and token counters, whose labels are bounded (team, and a model of
the price table or "other")."""

from __future__ import annotations

import json
import re

from prometheus_client import Counter

from gpuproxy_proxy.config import BudgetsConfig
from gpuproxy_proxy.limits.reservation import price_for
from gpuproxy_proxy.metering.usage import Usage

MAX_MODEL_CHARS = 200
OTHER_MODEL = "other"

# The first `"model": "<string>"` of the body: a quoted "model" followed by a colon is a key
# (inside a JSON string every quote is escaped), and the top-level one comes first in every
# client we know of. One C-level scan, not a JSON parse of a large prompt per request.
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){0,%d})"' % MAX_MODEL_CHARS)


def request_model(body: bytes) -> str | None:
    match = _MODEL.search(body)
    if match is None:
        return None
    raw = match.group(1)
    if b"\\" not in raw:
        return raw.decode("utf-8", "replace")
    try:
        value = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def cost_usd(config: BudgetsConfig, model: str | None, prompt: int, completion: int) -> float:
    """Prices are USD per one million tokens; a model not in the table costs `default_price`."""
    price = price_for(config, model or "")
    return (prompt * price.input + completion * price.output) / 1_000_000


class SpendCounters:
    """gpuproxy_spend_usd_total{team, model} and gpuproxy_tokens_total{team, model, kind},
    counted as each request settles. Children are cached per (team, model) label pair; a model
    outside the price table is counted as "other", so a client sending random model names
    cannot create series."""

    def __init__(self, spend: Counter, tokens: Counter, config: BudgetsConfig) -> None:
        self._spend = spend
        self._tokens = tokens
        self._children: dict[tuple[str, str], tuple[Counter, Counter, Counter]] = {}
        self.configure(config)
        # One series from the start, so the families are visible (with their labels) before
        # any spend and increase() over a window sees the first increment.
        self._child(("", OTHER_MODEL))

    def configure(self, config: BudgetsConfig) -> None:
        self.config = config
        self._priced = frozenset(config.prices)

    def _label(self, model: str | None) -> str:
        return model if model is not None and model in self._priced else OTHER_MODEL

    def _child(self, labels: tuple[str, str]) -> tuple[Counter, Counter, Counter]:
        children = (self._spend.labels(*labels), self._tokens.labels(*labels, "prompt"),
                    self._tokens.labels(*labels, "completion"))
        self._children[labels] = children
        return children

    def count(self, team: str | None, model: str | None, usage: Usage) -> None:
        prompt = usage.prompt_tokens or 0
        completion = usage.completion_tokens or 0
        if not prompt and not completion:
            return
        labels = (team or "", self._label(model))
        spend, prompt_counter, completion_counter = (self._children.get(labels)
                                                     or self._child(labels))
        cost = cost_usd(self.config, model if labels[1] != OTHER_MODEL else None, prompt,
                        completion)
        if cost:
            spend.inc(cost)
        if prompt:
            prompt_counter.inc(prompt)
        if completion:
            completion_counter.inc(completion)
