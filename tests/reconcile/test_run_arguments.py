"""The numeric flags of `gpuproxy-operator run`: out-of-range values, from the command line or
the environment, are usage errors naming the flag (exit 2), never a busy loop or a traceback."""

from __future__ import annotations

import argparse

import pytest

from gpuproxy_operator.cli import build_parser


def parse_run(*argv: str) -> argparse.Namespace:
    return build_parser("run").parse_args(["run", *argv])


@pytest.mark.parametrize(("flag", "value"), [
    ("--resync-seconds", "0"),
    ("--resync-seconds", "-1"),
    ("--resync-seconds", "nan"),
    ("--watch-inactivity-timeout", "0"),
    ("--watch-inactivity-timeout", "inf"),
    ("--metrics-port", "-1"),
    ("--metrics-port", "65536"),
    ("--metrics-port", "http"),
])
def test_run_rejects_out_of_range_numbers(flag: str, value: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_run(f"{flag}={value}")
    assert exit_info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_run_checks_environment_defaults_too(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GPUPROXY_RESYNC_SECONDS", "0")
    with pytest.raises(SystemExit):
        parse_run()
    assert "argument --resync-seconds:" in capsys.readouterr().err


def test_run_accepts_its_defaults_and_metrics_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GPUPROXY_RESYNC_SECONDS", "GPUPROXY_WATCH_INACTIVITY_TIMEOUT",
                "GPUPROXY_METRICS_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = parse_run("--metrics-port", "0")
    assert (args.metrics_port, args.resync_seconds, args.watch_inactivity_timeout) == (
        0, 600.0, 300.0)
