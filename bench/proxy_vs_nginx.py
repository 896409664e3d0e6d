"""Throughput side by side: gpuproxy (bare; JWT auth + Redis rate limits; full: API keys in
PostgreSQL via PgBouncer + Redis limits + usage metering) vs nginx and vs LiteLLM's proxy.

Same fast backend, same worker count, wrk in alternating-order rounds; prints requests/s,
p99 and CPU microseconds per request (from /proc) per round, then medians and paired ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import litellm_side
import pyspy_top
import servers
import wrk
from harness import (
    VENV_BIN,
    Children,
    code_version,
    cpu_seconds,
    load_average,
    median,
    process_tree,
)
from sides import BASES, REFERENCES, Rig, Side, dependency_pids, report_proofs, start_side

PYSPY = str(VENV_BIN / "py-spy") if (VENV_BIN / "py-spy").exists() else "py-spy"


@dataclass(frozen=True)
class Sample:
    side: str
    round: int
    rps: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    non_2xx: int
    cpu_s: float
    cpu_us_per_req: float
    backend_cpu_us_per_req: float
    # Redis + PgBouncer + PostgreSQL (not in the side's own CPU), 0 for sides not using them.
    deps_cpu_us_per_req: float


def run_wrk(side: Side, args: argparse.Namespace, seconds: float) -> wrk.WrkResult:
    url = f"http://127.0.0.1:{side.server.port}{args.path}"
    result = wrk.run(url, args.connections, args.threads, seconds, side.headers, args.script)
    side.served.append(result.requests)
    return result


def measure(side: Side, rig: Rig, rnd: int) -> Sample:
    args = rig.args
    pids = process_tree(side.server.pid)
    deps = dependency_pids(side, rig)
    cpu0, bcpu0, dcpu0 = cpu_seconds(pids), cpu_seconds([rig.backend.pid]), cpu_seconds(deps)
    result = run_wrk(side, args, args.duration)
    cpu = cpu_seconds(pids) - cpu0
    bcpu = cpu_seconds([rig.backend.pid]) - bcpu0
    dcpu = cpu_seconds(deps) - dcpu0
    served = max(result.requests, 1)
    return Sample(
        side=side.name,
        round=rnd,
        rps=result.rps,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
        requests=result.requests,
        errors=result.errors,
        non_2xx=result.non_2xx,
        cpu_s=cpu,
        cpu_us_per_req=cpu * 1e6 / served,
        backend_cpu_us_per_req=bcpu * 1e6 / served,
        deps_cpu_us_per_req=dcpu * 1e6 / served,
    )


def print_sample(s: Sample) -> None:
    bad = f"  errors={s.errors} non2xx={s.non_2xx}" if s.errors or s.non_2xx else ""
    deps = f", redis/pg {s.deps_cpu_us_per_req:.1f}" if s.deps_cpu_us_per_req else ""
    print(
        f"round {s.round}  {s.side:<13} {s.rps:>9.0f} req/s  p99 {s.p99_ms:>7.2f} ms  "
        f"max {s.max_ms:>7.1f} ms  cpu {s.cpu_us_per_req:>6.1f} us/req  "
        f"(backend {s.backend_cpu_us_per_req:.1f}{deps}){bad}",
        flush=True,
    )


def summarise(samples: list[Sample], names: list[str]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [s for s in samples if s.side == name]
        cpu_us = median([s.cpu_us_per_req for s in mine])
        summary[name] = {
            "rps": median([s.rps for s in mine]),
            "p99_ms": median([s.p99_ms for s in mine]),
            "max_ms": max(s.max_ms for s in mine),
            "cpu_us_per_req": cpu_us,
            "rps_per_core": 1e6 / cpu_us if cpu_us > 0 else float("nan"),
            "deps_cpu_us_per_req": median([s.deps_cpu_us_per_req for s in mine]),
            "failed_requests": sum(s.errors + s.non_2xx for s in mine),
        }
    for ref_name in REFERENCES:
        if ref_name not in names:
            continue
        ref = {s.round: s for s in samples if s.side == ref_name}
        for name in names:
            if name in REFERENCES:
                continue
            mine = [s for s in samples if s.side == name]
            # Paired per round: each round's proxy run against the same round's reference run.
            row = summary[name]
            row[f"rps_vs_{ref_name}"] = median([s.rps / ref[s.round].rps for s in mine])
            row[f"per_core_vs_{ref_name}"] = median(
                [ref[s.round].cpu_us_per_req / s.cpu_us_per_req for s in mine]
            )
            row[f"p99_vs_{ref_name}"] = median([s.p99_ms / ref[s.round].p99_ms for s in mine])
    return summary


def print_summary(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(
        f"\n== summary: medians over {args.rounds} rounds x {args.duration:g}s, {args.request} "
        f"{args.path}, {args.connections} connections, wrk -t{args.threads}, {args.workers} "
        f"worker(s) each; {load_average()}"
    )
    print(
        f"{'side':<18} {'req/s':>9} {'p99 ms':>8} {'CPU us/req':>10} {'req/s/core':>10} "
        f"{'redis/pg us':>11}  ratios (paired per round)"
    )
    for name, row in summary.items():
        ratios = "  ".join(
            f"vs {ref}: req/s x{row[f'rps_vs_{ref}']:.3f} per-core x{row[f'per_core_vs_{ref}']:.3f}"
            f" p99 x{row[f'p99_vs_{ref}']:.2f}"
            for ref in REFERENCES
            if f"rps_vs_{ref}" in row
        )
        print(
            f"{name:<18} {row['rps']:>9.0f} {row['p99_ms']:>8.2f} {row['cpu_us_per_req']:>10.1f} "
            f"{row['rps_per_core']:>10.0f} {row['deps_cpu_us_per_req']:>11.1f}  {ratios}"
        )
        if row["failed_requests"]:
            print(f"  !! {name}: {row['failed_requests']:.0f} failed or non-2xx responses")


def profile(side: Side, args: argparse.Namespace, out_dir: Path) -> list[Path]:
    """py-spy every process of a Python side during one extra wrk run (not a measured round)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []
    seconds = int(args.duration)
    try:
        for pid in process_tree(side.server.pid):
            out = out_dir / f"{side.name}-{pid}.txt"
            argv = [PYSPY, "record", "--pid", str(pid), "--duration", str(seconds)]
            argv += ["--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"]
            quiet = subprocess.DEVNULL
            spy = subprocess.Popen(argv, stdout=quiet, stderr=quiet)  # noqa: S603 - own argv
            spies.append((spy, out))
        time.sleep(0.5)
        run_wrk(side, args, seconds)
        for proc, _out in spies:
            proc.wait(timeout=seconds + 30)
    finally:
        for proc, _out in spies:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [out for _proc, out in spies if out.exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="workers of every side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--request",
        choices=("get", "chat"),
        default="get",
        help="get: GET --path (fixed 77-byte answer); chat: POST /v1/chat/completions JSON "
        "(a chat completion with usage; needed by the litellm side)",
    )
    parser.add_argument("--path", default="/v1/bench", help="GET path (proxied to backend)")
    parser.add_argument(
        "--sides",
        default="nginx,proxy-bare,proxy-auth",
        help=f"comma list of {', '.join(BASES)}; a gpuproxy side may name a tree: "
        "proxy-bare@old (with --source old=DIR)",
    )
    parser.add_argument(
        "--proxy-source",
        type=Path,
        help="tree the gpuproxy sides without @ run from (a checkout or worktree root); "
        "default this repository",
    )
    parser.add_argument(
        "--source", action="append", default=[], help="LABEL=DIR for sides named NAME@LABEL"
    )
    parser.add_argument(
        "--litellm-venv",
        type=Path,
        default=litellm_side.DEFAULT_VENV,
        help="venv with litellm[proxy] (created and installed on first use)",
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per side")
    parser.add_argument("--json", type=Path, help="also write all samples and medians here")
    parser.add_argument(
        "--py-spy", type=Path, dest="pyspy", help="after the rounds, profile Python sides here"
    )
    parser.add_argument(
        "--hold", type=float, default=0.0, help="after starting, sleep this long (for py-spy)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.duration <= 60:
        parser.error("--rounds must be 1-20 and --duration 1-60 s (bounded benchmark)")
    sources = servers.parse_sources(args.source)
    names = [n.strip() for n in args.sides.split(",") if n.strip()]
    unknown = {n for n in names if n.partition("@")[0] not in BASES}
    if unknown:
        parser.error(f"--sides: unknown {sorted(unknown)}; use {', '.join(BASES)}")
    if any(n.partition("@")[0] == "litellm" for n in names) and args.request != "chat":
        parser.error("the litellm side answers chat completions only: add --request chat")
    if args.request == "chat":
        args.path = "/v1/chat/completions"

    with tempfile.TemporaryDirectory(prefix="gpuproxy-bench-") as tmp:
        work = Path(tmp)
        kids = Children(work)
        args.script = (
            wrk.post_script(work / "chat.lua", litellm_side.CHAT_BODY)
            if args.request == "chat"
            else None
        )
        print(f"proxy code: {code_version(args.proxy_source)}", flush=True)
        for label, tree in sources.items():
            print(f"proxy code @{label}: {code_version(tree)}", flush=True)
        rig: Rig | None = None
        try:
            rig = Rig(kids, work, servers.start_backend(kids), args, sources)
            sides = [start_side(rig, name) for name in names]
            for side in sides:
                print(f"{side.name}: port {side.server.port}, pids {process_tree(side.server.pid)}")
            if any(s.name.startswith("litellm") for s in sides):
                release = litellm_side.version(args.litellm_venv)
                print(f"litellm {release}, --num_workers {args.workers}")
            if args.hold:
                time.sleep(args.hold)
            for side in sides:
                warm = run_wrk(side, args, args.warmup)
                if warm.non_2xx or warm.errors:
                    print(f"!! warm-up {side.name}: non2xx={warm.non_2xx} errors={warm.errors}")
            samples: list[Sample] = []
            rounds_started = time.time()
            for rnd in range(1, args.rounds + 1):
                order = sides if rnd % 2 else list(reversed(sides))
                for side in order:
                    sample = measure(side, rig, rnd)
                    print_sample(sample)
                    samples.append(sample)
            summary = summarise(samples, names)
            for side in sides:
                pauses = servers.gc_pauses(side.server.gc_dir, rounds_started, time.time())
                if pauses["processes"]:
                    summary[side.name]["gc_window_max_ms"] = pauses["window_max_ms"]
                    print(
                        f"{side.name}: longest GC pause during the rounds "
                        f"{pauses['window_max_ms']:.1f} ms (generation "
                        f"{pauses['window_max_generation']:.0f}), "
                        f"{pauses['window_over_50ms']:.0f} over "
                        f"50 ms (since start: {pauses['gen2_count']:.0f} full collections, "
                        f"longest {pauses['max_gen2_ms']:.1f} ms)"
                    )
            proofs = report_proofs(rig, sides)
            print_summary(summary, args)
            if args.pyspy:
                for side in sides:
                    if not side.name.startswith(("nginx", "litellm")):
                        profiles = profile(side, args, args.pyspy)
                        print(f"\n== py-spy: {side.name} ({len(profiles)} processes)", flush=True)
                        pyspy_top.summarise(profiles, 20)
            if args.json:
                payload = {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "code": code_version(args.proxy_source),
                    "summary": summary,
                    "proofs": proofs,
                    "samples": [asdict(s) for s in samples],
                }
                args.json.write_text(json.dumps(payload, indent=2, default=str))
        finally:
            kids.close()
            if rig is not None and rig.pg is not None:
                rig.pg.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
