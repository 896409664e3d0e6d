"""`gpuproxy-operator`: run the operator, print the CRD, render manifests offline, plan capacity."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand -> module with `add_arguments(parser)` and `main(args) -> int`. Command modules
# import heavy dependencies (kopf, clients) inside `main`, so `crd` and `render` stay offline.
COMMANDS = {
    "run": ("gpuproxy_operator.commands.run", "run the operator against the current cluster"),
    "crd": ("gpuproxy_operator.commands.crd", "print the CustomResourceDefinition as YAML"),
    "render": (
        "gpuproxy_operator.commands.render",
        "print every child manifest of a GpuProxyCluster file, with no cluster",
    ),
    "plan": (
        "gpuproxy_operator.commands.plan",
        "print the capacity plan for a connection target",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only `command`'s module is imported, so one command's heavy or
    missing dependencies never break another."""
    parser = argparse.ArgumentParser(prog="gpuproxy-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
            cmd.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    code: int = args._module.main(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
