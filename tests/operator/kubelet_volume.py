"""A ConfigMap or Secret volume laid out and updated the way the kubelet's atomic writer does
it: the files in a new `..<timestamp>` directory, then an atomic rename of the `..data`
symlink onto it; each key is a symlink `<key> -> ..data/<key>` that never changes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tests.services import RunAs, write_file


class KubeletVolume:
    """One mounted volume directory; `update()` projects a new version of all its files."""

    def __init__(self, root: Path, run_as: RunAs | None) -> None:
        self.root = root
        self.run_as = run_as
        self._version = 0
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def update(self, files: dict[str, str]) -> None:
        self._version += 1
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        new_dir = self.root / f"..{stamp}.{os.getpid()}{self._version:09d}"
        new_dir.mkdir()
        for key, text in files.items():
            write_file(new_dir / key, text, self.run_as)
        data = self.root / "..data"
        old_dir = data.resolve() if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new_dir.name)
        os.replace(tmp, data)  # rename(2): readers see the old or the new set, never a mix
        for key in files:
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        if old_dir is not None:
            shutil.rmtree(old_dir)
