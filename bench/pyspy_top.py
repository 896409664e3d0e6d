"""Summarises py-spy `--format raw` (collapsed stack) profiles: where the CPU time goes.

Prints self time by area (aiohttp client / server, gpuproxy module, redis, asyncio, ...),
inclusive time of each gpuproxy function that is on the stack, and the top self-time frames.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")

# Modules used by several callers (aiohttp client and server, redis): charged to the caller.
_SHARED = (
    "aiohttp/http_",
    "aiohttp/helpers",
    "aiohttp/streams",
    "aiohttp/base_protocol",
    "asyncio/streams",
    "aiohttp/tcp_helpers",
    "aiohttp/payload",
    "aiohttp/_http",
)
# Python frames that sit directly on the event loop's native run loop.
_LOOP_ENTRIES = {"run_app", "run_forever", "run_until_complete", "run", "_run_once", "Runner.run"}
AREAS = (
    ("aiohttp client", ("aiohttp/client", "aiohttp/connector")),
    ("aiohttp server", ("aiohttp/web",)),
    ("aiohttp other", ("aiohttp/",)),
    ("multidict/yarl", ("multidict/", "yarl/")),
    ("redis", ("redis/",)),
    ("jwt", ("jwt/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("logging", ("logging/",)),
    ("asyncio", ("asyncio/",)),
)


def leaf_area(frames: list[tuple[str, str]]) -> str:
    """The area a sample's self time is charged to (shared aiohttp code goes to its caller)."""
    func, path = frames[-1]
    if func in _LOOP_ENTRIES and "gpuproxy_proxy/" not in path:
        return "event loop (native, incl. syscalls)"
    if any(s in path for s in _SHARED):
        for _f, caller in reversed(frames[:-1]):
            if any(s in caller for s in _SHARED):
                continue
            return area(caller)
    return area(path)


def area(path: str) -> str:
    if "gpuproxy_proxy/" in path:
        return "gpuproxy:" + path.rsplit("gpuproxy_proxy/", 1)[1].removesuffix(".py")
    for name, needles in AREAS:
        if any(n in path for n in needles):
            return name
    if "<" in path or path.endswith((".pyx", ".c")):
        return "event loop / native"
    return "other: " + path.rsplit("/", 1)[-1]


def parse(lines: list[str]) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in lines:
        line = line.rstrip()
        if not line or " " not in line:
            continue
        stack_text, _, count = line.rpartition(" ")
        frames = []
        for raw in stack_text.split(";"):
            m = _FRAME.match(raw.strip())
            frames.append((m.group("func"), m.group("file")) if m else (raw.strip(), "<native>"))
        stacks.append((frames, int(count)))
    return stacks


def summarise(paths: list[Path], top: int) -> None:
    stacks = parse([ln for p in paths for ln in p.read_text().splitlines()])
    total = sum(n for _f, n in stacks) or 1
    self_area: Counter[str] = Counter()
    self_frame: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    idle = 0
    for frames, count in stacks:
        func, path = frames[-1]
        if func in ("select", "poll", "epoll_wait", "run_forever") and len(frames) <= 4:
            idle += count
        self_area[leaf_area(frames)] += count
        self_frame[f"{func} ({path.rsplit('/', 2)[-2:][-1]})"] += count
        for f, p in {(f, p) for f, p in frames if "gpuproxy_proxy/" in p}:
            inclusive[f"{area(p)}.{f}"] += count
    print(f"{total} samples from {len(paths)} profile(s); idle-looking samples {idle}")
    print("\nself time by area:")
    for name, n in self_area.most_common():
        print(f"  {100.0 * n / total:5.1f}%  {name}")
    print("\ninclusive time of gpuproxy functions (on the stack):")
    for name, n in inclusive.most_common(top):
        print(f"  {100.0 * n / total:5.1f}%  {name}")
    print(f"\ntop {top} self-time frames:")
    for name, n in self_frame.most_common(top):
        print(f"  {100.0 * n / total:5.1f}%  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path, help="py-spy --format raw outputs")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    summarise(args.profiles, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
