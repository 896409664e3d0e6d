"""The cost of TLS termination, plain vs TLS side by side, gpuproxy and nginx (reference).

Handshakes: clients open a new connection for each small request (TLS: `openssl s_time -new`,
full handshakes; plain: wrk with `Connection: close`); the result is connections per second
and per CPU-second of the server (one worker: per core).
Memory: N idle keep-alive connections (one request each) on a freshly started server; the RSS
growth of its process tree per connection. Medians of --rounds rounds; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import servers
import wrk
from harness import (
    BENCH_DIR,
    PYTHON,
    Children,
    code_version,
    cpu_seconds,
    free_port,
    median,
    process_tree,
    rss_kib,
    wait_port,
)

SIDES = ("proxy", "proxy-tls", "nginx", "nginx-tls")
REQUEST = b"GET /v1/bench HTTP/1.1\r\nHost: bench\r\n"
# The proxy's TLS 1.2 cipher list (http/tls.py), so both servers offer the same.
sys.path.insert(0, str(BENCH_DIR.parent / "proxy"))
from gpuproxy_proxy.http.tls import TLS12_CIPHERS  # noqa: E402


def make_cert(work: Path, key: str) -> tuple[Path, Path]:
    """A self-signed leaf for 127.0.0.1: P-256 (ECDSA) or RSA 2048 (cert-manager's default)."""
    key_args = ["-newkey", "rsa:2048"] if key == "rsa" else [
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    cert, keyfile = work / f"{key}.crt", work / f"{key}.key"
    subprocess.run(["openssl", "req", "-x509", *key_args, "-nodes", "-keyout", str(keyfile),  # noqa: S603,S607
                    "-out", str(cert), "-subj", "/CN=localhost", "-days", "2",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, keyfile


def start_proxy(kids: Children, work: Path, name: str, backend: int,
                pem: tuple[Path, Path] | None) -> servers.Server:
    port, admin = free_port(), free_port()
    config: dict[str, Any] = servers.proxy_config(port, admin, backend, 1, servers.ProxyRun())
    if pem is not None:
        config["listen"]["tls"] = {"cert_file": str(pem[0]), "key_file": str(pem[1])}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config))
    env, gc_dir = servers.gcwatch_env(work, name, source=BENCH_DIR.parent / "proxy")
    proc = kids.start(name, [PYTHON, "-m", "gpuproxy_proxy.cli", "--config", str(path)], env=env)
    wait_port(port, 30, proc)
    return servers.Server(name, port, proc.pid, admin, gc_dir)


def start_nginx(kids: Children, work: Path, name: str, backend: int,
                pem: tuple[Path, Path] | None) -> servers.Server:
    prefix = work / name
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = servers.nginx_conf(prefix, port, backend, 1, 19500)
    if pem is not None:
        # Mozilla intermediate, as the proxy: TLS 1.2+, the same ECDHE+AEAD list, no tickets.
        conf = conf.replace(f"listen 127.0.0.1:{port} reuseport backlog=4096;",
                            f"listen 127.0.0.1:{port} ssl reuseport backlog=4096;\n"
                            f"        ssl_certificate {pem[0]};\n"
                            f"        ssl_certificate_key {pem[1]};\n"
                            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
                            f"        ssl_ciphers {TLS12_CIPHERS};\n"
                            "        ssl_session_tickets off;")
    (prefix / "nginx.conf").write_text(conf)
    proc = kids.start(name, [servers.NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                             "-e", "stderr"])
    wait_port(port, 10, proc)
    return servers.Server(name, port, proc.pid)


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the client's verification cost is not what is measured
    return ctx


# --- client subcommands (run in their own processes) ---------------------------------------

async def _read_answer(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)


async def hold(port: int, tls: bool, count: int, concurrency: int) -> None:
    """Open `count` keep-alive connections (one request each), print READY, hold until stdin
    closes."""
    ctx = client_context() if tls else None
    held: list[asyncio.StreamWriter] = []
    failed = 0
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                writer.write(REQUEST + b"\r\n")
                await _read_answer(reader)
                held.append(writer)
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                failed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    print(f"READY {len(held)} {failed}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in held:
        writer.close()


def client_main(argv: list[str]) -> None:
    import uvloop

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("hold",))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--count", type=int, default=5000)
    args = p.parse_args(argv)
    uvloop.run(hold(args.port, args.tls, args.count, args.concurrency))


# --- the benchmark ---------------------------------------------------------------------------

def _client(*argv: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - our own client
        [PYTHON, __file__, "client", *argv], stdout=subprocess.PIPE, text=True,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)


def _s_time(port: int, args: argparse.Namespace) -> subprocess.Popen[str]:
    """openssl s_time: one full handshake per connection (-new: never a resumed session; wrk
    would resume), one HTTP/1.0 GET, sequential; several run side by side."""
    return subprocess.Popen(  # noqa: S603 - fixed argv against loopback
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",  # noqa: S607
         f"-tls{args.tls_version.replace('.', '_')}", "-time", str(int(args.seconds)),
         "-www", "/v1/bench"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def measure_handshakes(server: servers.Server, tls: bool, args: argparse.Namespace
                       ) -> dict[str, float]:
    """New connections per second and per CPU-second of the server (one worker: per core).
    Plain: wrk with `Connection: close` (a new TCP connection per request)."""
    pids = process_tree(server.pid)
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    if tls:
        clients = [_s_time(server.port, args) for _ in range(args.clients)]
        outs = [c.communicate(timeout=args.seconds + 120)[0] for c in clients]
        counts = [re.search(r"(\d+) connections in [\d.]+s;", out) for out in outs]
        if not all(counts):
            raise RuntimeError(f"s_time failed: {outs[0][-2000:]}")
        done = sum(int(m.group(1)) for m in counts if m)
    else:
        result = wrk.run(f"http://127.0.0.1:{server.port}/v1/bench", args.clients * 4,
                         args.clients, args.seconds, headers={"Connection": "close"})
        done = result.requests
    wall, cpu = time.monotonic() - t0, cpu_seconds(pids) - cpu0
    return {"per_second": done / wall, "per_cpu_second": done / cpu if cpu else float("nan"),
            "server_cpu_share": cpu / wall}


def measure_memory(server: servers.Server, tls: bool, args: argparse.Namespace
                   ) -> dict[str, float]:
    pids = process_tree(server.pid)
    time.sleep(1.0)  # a fresh server: let start-up allocations settle before the baseline
    before = rss_kib(pids)
    holder = _client("hold", "--port", str(server.port), "--count", str(args.connections),
                     "--concurrency", str(args.concurrency), *(["--tls"] if tls else []),
                     stdin=True)
    try:
        assert holder.stdout is not None
        ready = holder.stdout.readline().split()
        if not ready or ready[0] != "READY":
            raise RuntimeError(f"holder did not get ready: {ready}")
        opened = int(ready[1])
        time.sleep(2.0)  # the proxy's periodic gc.freeze and the allocator settle
        after = rss_kib(process_tree(server.pid))
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    return {"opened": opened, "failed": int(ready[2]),
            "kib_per_conn": (after - before) / opened if opened else float("nan")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"handshakes": {}, "memory": {}}
    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        work = Path(tmp)
        pem = make_cert(work, args.key)
        kids, backend_kids = Children(work), Children(work)
        try:
            backend = servers.start_backend(backend_kids)
            for side in args.sides:
                tls = side.endswith("-tls")
                start = start_proxy if side.startswith("proxy") else start_nginx

                def fresh(n: int, side: str = side, tls: bool = tls,
                          start: Any = start) -> servers.Server:
                    return start(kids, work, f"{side}-{n}", backend.port, pem if tls else None)

                if "handshakes" in args.measure:
                    server = fresh(0)
                    measure_handshakes(server, tls, argparse.Namespace(  # warm-up
                        **{**vars(args), "seconds": 1.0}))
                    rounds = [measure_handshakes(server, tls, args) for _ in range(args.rounds)]
                    results["handshakes"][side] = rounds
                    print(side, "handshakes", json.dumps(rounds), flush=True)
                if "memory" in args.measure:
                    rounds = []
                    for n in range(args.rounds):  # a fresh server per round: a clean baseline
                        server = fresh(n + 1)
                        rounds.append(measure_memory(server, tls, args))
                    results["memory"][side] = rounds
                    print(side, "memory", json.dumps(rounds), flush=True)
                kids.close()  # this side's servers, by PID
        finally:
            kids.close()
            backend_kids.close()
    return results


def summary(results: dict[str, Any]) -> list[str]:
    lines = ["== summary (medians)"]
    hs = {s: (median([r["per_second"] for r in rs]), median([r["per_cpu_second"] for r in rs]))
          for s, rs in results["handshakes"].items()}
    if hs:
        lines.append(f"{'side':<10} {'conn/s':>9} {'conn/CPU-s':>11} {'vs plain':>9}")
        for side, (rate, per_cpu) in hs.items():
            plain = hs.get(side.removesuffix("-tls"))
            ratio = f"{per_cpu / plain[1]:.2f}x" if plain and side.endswith("-tls") else ""
            lines.append(f"{side:<10} {rate:>9.0f} {per_cpu:>11.0f} {ratio:>9}")
    mem = {s: median([r["kib_per_conn"] for r in rs]) for s, rs in results["memory"].items()}
    if mem:
        lines.append(f"{'side':<10} {'KiB/idle conn':>14} {'vs plain':>9}")
        for side, kib in mem.items():
            plain_kib = mem.get(side.removesuffix("-tls"))
            ratio = (f"{kib / plain_kib:.2f}x" if plain_kib and side.endswith("-tls") else "")
            lines.append(f"{side:<10} {kib:>14.2f} {ratio:>9}")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sides", default=",".join(SIDES), type=lambda s: s.split(","))
    p.add_argument("--measure", default="handshakes,memory", type=lambda s: s.split(","))
    p.add_argument("--key", choices=("ec", "rsa"), default="ec",
                   help="certificate key: ECDSA P-256 or RSA 2048")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="per handshake round")
    p.add_argument("--clients", type=int, default=8,
                   help="openssl s_time processes (TLS), wrk threads (plain, 4 conns each)")
    p.add_argument("--tls-version", choices=("1.2", "1.3"), default="1.3",
                   help="what the handshake clients negotiate")
    p.add_argument("--concurrency", type=int, default=64,
                   help="connections the idle holder opens at once")
    p.add_argument("--connections", type=int, default=5000, help="idle connections held")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        p.error(f"unknown sides {sorted(unknown)}; choose from {', '.join(SIDES)}")
    print(f"proxy code: {code_version()}; key {args.key}, clients TLS {args.tls_version}",
          flush=True)
    results = run(args)
    print("\n".join(summary(results)))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
