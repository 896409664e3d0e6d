"""Shared benchmark plumbing: child processes ended by PID, /proc CPU and memory accounting.

Every server a benchmark starts goes through `Children`, whose `close()` (called from a
`finally`) ends each process tree it started, by PID, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses; fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """The root and all its descendants, from the ppid field of every /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the given processes (live ones only), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kib(pids: Iterable[int]) -> int:
    """Resident memory summed over the given processes, in KiB (from /proc/PID/statm)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f}s")


class Children:
    """Starts child processes and ends each one's process tree by PID on close()."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        user: int | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """`user` (a uid) runs the child under that account, for servers that refuse root."""
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(  # noqa: S603 - argv is built by the benchmark itself
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            user=user,
            group=None if user is None else pwd.getpwuid(user).pw_gid,
            extra_groups=None if user is None else [],
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        for _name, proc in reversed(self.procs):
            tree = process_tree(proc.pid) if proc.poll() is None else []
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=8)
            # Whatever of the tree survived SIGTERM (or a grace period) is killed by its PID.
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self.procs.clear()


def proxy_package_dir(source: Path | None) -> Path:
    """The directory holding `gpuproxy_proxy` for a source tree: a checkout (or worktree) root
    or its `proxy/` directory; None is this repository."""
    root = REPO if source is None else source.resolve()
    for candidate in (root / "proxy", root):
        if (candidate / "gpuproxy_proxy" / "__init__.py").is_file():
            return candidate
    raise SystemExit(f"--proxy-source {root}: no gpuproxy_proxy package in it or in its proxy/")


def code_version(source: Path | None = None) -> str:
    """The commit the proxy code comes from, and whether its proxy/ has uncommitted edits."""
    tree = proxy_package_dir(source).parent

    def git(*argv: str) -> str:
        done = subprocess.run(  # noqa: S603 - fixed git argv
            ["git", "-C", str(tree), *argv],  # noqa: S607 - git from PATH
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip()

    dirty = " + uncommitted edits in proxy/" if git("status", "--porcelain", "proxy") else ""
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return f"{git('rev-parse', '--short', 'HEAD')}{dirty} ({tree}), {when}, {load_average()}"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation), NaN for no samples."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]
