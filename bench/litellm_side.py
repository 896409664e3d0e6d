"""LiteLLM's proxy (`litellm[proxy]` from PyPI) as a benchmark side, in a venv of its own.

The venv is created on first use (`python -m venv` + `pip install 'litellm[proxy]'`); a failed
install raises with pip's output, so the side fails loudly and is never skipped. LiteLLM runs
without a database, one model (`openai/bench-model`) pointing at the bench backend, and a
master key (it refuses to start without one): requests send it as `Authorization: Bearer`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness import BENCH_DIR, Children, free_port, wait_port
from servers import Server

DEFAULT_VENV = BENCH_DIR / ".litellm-venv"
MODEL = "bench-model"
MASTER_KEY = "sk-bench-litellm-master-key"
CHAT_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
)


def auth_header() -> dict[str, str]:
    return {"Authorization": f"Bearer {MASTER_KEY}"}


def ensure_venv(venv: Path) -> Path:
    """The `litellm` executable of `venv`, installing it there first when it is missing."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"litellm: creating {venv} and installing 'litellm[proxy]' (first use)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
    ]
    for argv in steps:
        done = subprocess.run(  # noqa: S603 - fixed venv/pip argv
            argv, capture_output=True, text=True, timeout=1800, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"the litellm side cannot run: `{' '.join(argv)}` exited with "
                f"{done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
            )
    if not exe.exists():
        raise RuntimeError(f"the litellm side cannot run: no {exe} after installing litellm[proxy]")
    return exe


def version(venv: Path) -> str:
    done = subprocess.run(  # noqa: S603 - our venv's pip
        [str(venv / "bin" / "pip"), "show", "litellm"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def start_litellm(
    kids: Children, work: Path, backend_port: int, workers: int, venv: Path
) -> Server:
    """`litellm --num_workers N` (uvicorn workers), answering chat completions via the backend."""
    exe = ensure_venv(venv)
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"http://127.0.0.1:{backend_port}/v1",
                    "api_key": "bench-no-key",
                },
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": MASTER_KEY},
    }
    path = work / "litellm.yaml"
    path.write_text(json.dumps(config))  # JSON is valid YAML
    port = free_port()
    env = dict(os.environ)
    for var in ("PYTHONPATH", "DATABASE_URL", "LITELLM_MASTER_KEY"):
        env.pop(var, None)
    # No fetch of the model cost map at start (loopback only); errors only in the log.
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", HOME=str(work))
    argv = [str(exe), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", str(workers), "--telemetry", "False"]
    proc = kids.start("litellm", argv, env=env)
    try:
        wait_port(port, 180, proc)
        _wait_chat(port, 120)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- litellm log ---\n{kids.log_tail('litellm', 40)}") from exc
    time.sleep(2.0)  # every uvicorn worker up, not only the first
    return Server("litellm", port, proc.pid)


def _wait_chat(port: int, timeout: float) -> None:
    """A valid chat completion through LiteLLM, or an error saying what came back."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=CHAT_BODY.encode(),
            headers={"Content-Type": "application/json", **auth_header()},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
                answer = json.loads(resp.read())
            if answer.get("choices") and answer.get("usage"):
                return
            last = f"unexpected answer {answer!r}"
        except (OSError, ValueError) as exc:
            last = str(exc)
            if isinstance(exc, urllib.error.HTTPError):
                last += " " + exc.read().decode(errors="replace")[:500]
        time.sleep(1.0)
    raise RuntimeError(f"litellm answered no valid chat completion within {timeout:.0f}s: {last}")
