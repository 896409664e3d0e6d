"""Runs wrk once and parses requests/s, p99, max latency, request count and errors.

`post_script()` writes the Lua script that turns every request into a JSON POST.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    non_2xx: int
    raw: str


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse(out: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    latency = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)", out)
    count = re.search(r"(\d+) requests in", out)
    if rps is None or count is None:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return WrkResult(
        rps=float(rps.group(1)),
        p99_ms=_ms(*p99.groups()) if p99 else float("nan"),
        max_ms=_ms(*latency.groups()) if latency else float("nan"),
        requests=int(count.group(1)),
        errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        raw=out,
    )


def post_script(path: Path, body: str) -> Path:
    """A wrk Lua script sending `body` (JSON) as a POST on every request."""
    quoted = body.replace("\\", "\\\\").replace('"', '\\"')
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{quoted}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


def run(
    url: str,
    connections: int,
    threads: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    argv += ["--timeout", "10s"]
    if script is not None:
        argv += ["-s", str(script)]
    for key, value in (headers or {}).items():
        argv += ["-H", f"{key}: {value}"]
    argv.append(url)
    done = subprocess.run(  # noqa: S603 - fixed wrk argv against loopback
        argv, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)
