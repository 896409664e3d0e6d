"""Benchmark-only GC pause recorder, loaded into every Python server process the benchmarks start.

Active only when BENCH_GC_DIR is set (the benchmark puts this directory on PYTHONPATH): times
every collection with `gc.callbacks` and writes `gc-PID.json` there whenever a new per-generation
maximum or a pause over 10 ms happens, so the proxy's own code needs no instrumentation.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

_DIR = os.environ.get("BENCH_GC_DIR")
_LOGGED_MS = 10.0  # pauses at least this long are kept with their wall-clock time
_MAX_EVENTS = 500


def _install(out_dir: str) -> None:
    state: dict[str, Any] = {}

    def reset() -> None:
        state.update(
            pid=os.getpid(),
            count=[0, 0, 0],
            total_ms=[0.0, 0.0, 0.0],
            max_ms=[0.0, 0.0, 0.0],
            events=[],  # [wall time, generation, ms] for pauses >= _LOGGED_MS
        )

    started = [0.0]

    def dump() -> None:
        # The pid is read each time: a forked worker writes its own file.
        path = os.path.join(out_dir, f"gc-{os.getpid()}.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1000.0
        gen = info.get("generation", 0)
        state["count"][gen] += 1
        state["total_ms"][gen] += ms
        changed = gen == 2
        if ms > state["max_ms"][gen]:
            state["max_ms"][gen] = ms
            changed = True
        if ms >= _LOGGED_MS and len(state["events"]) < _MAX_EVENTS:
            state["events"].append([time.time(), gen, round(ms, 2)])
            changed = True
        if changed:
            dump()

    reset()
    os.register_at_fork(after_in_child=reset)
    gc.callbacks.append(callback)
    dump()


if _DIR:
    _install(_DIR)
