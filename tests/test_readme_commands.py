"""The README's commands work in a fresh shell: the CLIs live in `.venv/bin`, which is not on
PATH until the venv is activated, so every command that runs one shows that path."""

from __future__ import annotations

import re

from tests.tools import REPO_ROOT

# A CLI starting a command (a code line, a `$ ` prompt or an inline code span) with an argument
# after it; release and image names (`helm install gpuproxy-operator charts/...`) are not.
COMMAND = re.compile(
    r"(?:^\$ |`|^)(\S*?)(gpuproxy-(?:proxy|operator) (?:-|run|crd|render|plan)\S*)", re.MULTILINE)


def test_readme_commands_run_from_the_venv() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = COMMAND.findall(readme)
    assert len(commands) >= 8
    bare = [f"{prefix}{command}" for prefix, command in commands if prefix != ".venv/bin/"]
    assert bare == []
    assert "source .venv/bin/activate" in readme
