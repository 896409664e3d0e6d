"""Replay of the spools dead processes left behind (a SIGKILL, an OOM kill, a container restart):
settled records as they were, admitted ones never settled as `interrupted` with what was
counted so far; inserts are idempotent, so a replay cut short is simply done again.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gpuproxy_proxy.metering.records import UsageRecord, from_settled, interrupted
from gpuproxy_proxy.metering.spool import LOCK_SUFFIX, SEGMENT_SUFFIX, decode_lines
from gpuproxy_proxy.observability.metrics import ProxyMetrics

log = logging.getLogger(__name__)

Writer = Callable[[list[UsageRecord]], Awaitable[int]]


def _segments(directory: Path) -> dict[str, list[Path]]:
    owners: dict[str, list[Path]] = {}
    for path in directory.glob("*" + SEGMENT_SUFFIX):
        owners.setdefault(path.name.split(".", 1)[0], []).append(path)
    for paths in owners.values():
        paths.sort()  # <owner>.<zero-padded seq>.seg: name order is write order
    return owners


def _take_lock(path: Path) -> int | None:
    """flock the owner's lock file without waiting: success means its owner is gone."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def load(paths: list[Path]) -> list[UsageRecord]:
    """One record per admitted request id: its settled line if it was written, else an
    interrupted record from its last admitted or progress line (each carries the admission)."""
    settled: dict[str, UsageRecord] = {}
    latest: dict[str, dict[str, Any]] = {}  # the last admitted or progress line
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for entry in decode_lines(data):
            kind, rid = entry.get("t"), entry.get("id")
            if not isinstance(rid, str):
                continue
            try:
                if kind == "s":
                    settled[rid] = from_settled(entry)
                elif kind in ("a", "p"):
                    latest[rid] = entry
            except (KeyError, TypeError, ValueError):
                log.error("skipped a malformed spool line in %s", path.name)
    records = list(settled.values())
    for rid, entry in latest.items():
        if rid not in settled:
            try:
                records.append(interrupted(entry))
            except (KeyError, TypeError, ValueError):
                log.error("skipped a malformed admitted line in a spool")
    return records


def _claim(directory: Path, own_owner: str) -> list[tuple[str, int, list[Path]]]:
    """The dead owners' spools, each locked (owner, lock fd, segments); stale locks removed."""
    claims = []
    owners = _segments(directory)
    for owner, paths in owners.items():
        if owner == own_owner:
            continue
        fd = _take_lock(directory / (owner + LOCK_SUFFIX))
        if fd is not None:  # else alive
            claims.append((owner, fd, paths))
    # Lock files without segments: owners that died before their first write, or whose
    # replay was cut between deleting the segments and the lock.
    for lock_path in directory.glob("*" + LOCK_SUFFIX):
        owner = lock_path.name[: -len(LOCK_SUFFIX)]
        if owner == own_owner or owner in owners:
            continue
        fd = _take_lock(lock_path)
        if fd is not None:
            lock_path.unlink(missing_ok=True)
            os.close(fd)
    return claims


def _finish(directory: Path, owner: str, paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    (directory / (owner + LOCK_SUFFIX)).unlink(missing_ok=True)  # last: see _claim


async def replay_dead(directory: Path, own_owner: str, write: Writer, batch_size: int,
                      metrics: ProxyMetrics | None = None) -> int:
    """Replay every dead owner's spool in `directory`, then delete it; returns the records
    written. Raises on a database error (the spool stays for the next attempt)."""
    total = 0
    claims = _claim(directory, own_owner)
    try:
        for owner, _fd, paths in claims:
            records = load(paths)
            for start in range(0, len(records), batch_size):
                total += await write(records[start:start + batch_size])
            interrupted_count = sum(r.outcome == "interrupted" for r in records)
            if metrics is not None:
                metrics.metering_replayed.labels("interrupted").inc(interrupted_count)
                metrics.metering_replayed.labels("complete").inc(
                    len(records) - interrupted_count)
            log.warning("replayed a metering spool left by a process that did not exit "
                        "cleanly: %d records, %d of them interrupted",
                        len(records), interrupted_count, extra={"spool_owner": owner})
            _finish(directory, owner, paths)
    finally:
        for _owner, fd, _paths in claims:
            os.close(fd)
    return total
