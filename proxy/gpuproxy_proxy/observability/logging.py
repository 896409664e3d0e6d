"""JSON log lines (one object per line) carrying request ids; the optional access log is
written by http/frontend.py to the `gpuproxy.access` logger."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from gpuproxy_proxy.config import LoggingConfig

# Where unhandled exceptions (500s) are logged: its own level is pinned at ERROR, so no
# logging.level, nor a level set on a parent logger, can silence them.
UNHANDLED_LOGGER = "gpuproxy.unhandled"
# Attributes every LogRecord has; anything else was passed via `extra=` and is emitted.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message",
                                                                              "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._static: dict[str, Any] = {"pid": os.getpid()}
        if worker is not None:
            self._static["worker"] = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self._static,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _ProcessHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The process's one log handler; remembers the worker index for a new formatter."""

    def __init__(self, worker: int | None) -> None:
        super().__init__(sys.stderr)
        self.worker = worker

    def use(self, config: LoggingConfig) -> None:
        if config.json_format:
            self.setFormatter(JsonFormatter(self.worker))
        else:
            self.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))


def setup_logging(config: LoggingConfig, worker: int | None = None) -> None:
    handler = _ProcessHandler(worker)
    handler.use(config)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    _pin_unhandled()
    # aiohttp logs every unhandled client disconnect at ERROR; they are routine for a proxy.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def reconfigure_logging(config: LoggingConfig) -> None:
    """A config reload: level and format apply to the next line (the access log does not:
    it is bound to each connection, so it is restart-only)."""
    root = logging.getLogger()
    root.setLevel(config.level)
    _pin_unhandled()
    for handler in root.handlers:
        if isinstance(handler, _ProcessHandler):
            handler.use(config)


def _pin_unhandled() -> None:
    # It logs at ERROR only: its own level makes the root's and any parent's irrelevant.
    logging.getLogger(UNHANDLED_LOGGER).setLevel(logging.ERROR)
