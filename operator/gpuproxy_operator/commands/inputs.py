"""Reading the YAML files the offline commands take, and reporting unusable input the same way."""

from __future__ import annotations

import sys
from typing import Any

import yaml

from gpuproxy_operator.api.cluster import InvalidSpecError

EXIT_INVALID = 2

# What a bad input file raises; each is reported by `report_input_error`, never as a traceback.
INPUT_ERRORS = (OSError, yaml.YAMLError, InvalidSpecError, ValueError)


def read_documents(filename: str) -> list[Any]:
    """Every YAML document of FILE ('-' for stdin)."""
    if filename == "-":
        return list(yaml.safe_load_all(sys.stdin))
    with open(filename, encoding="utf-8") as fh:
        return list(yaml.safe_load_all(fh))


def report_input_error(filename: str, exc: Exception) -> int:
    """Print what is wrong with the input, naming fields where known; returns the exit status."""
    if isinstance(exc, InvalidSpecError):
        print(f"error: {exc.obj} is invalid:", file=sys.stderr)
        for path, reason in exc.problems:
            print(f"  {path}: {reason}", file=sys.stderr)
    elif isinstance(exc, OSError):
        print(f"error: cannot read {filename}: {exc.strerror}", file=sys.stderr)
    elif isinstance(exc, yaml.YAMLError):
        print(f"error: {filename} is not valid YAML: {exc}", file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_INVALID
