"""Helpers for tests that drive the real `batchgen` command and real worker subprocesses."""

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BATCHGEN = [sys.executable, "-m", "batchgen.producer.cli"]


def cli_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def batchgen(*args: str, redis_url: str, check: bool = False, timeout: float = 120, input: bytes | None = None,
             **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BATCHGEN, *args], capture_output=True, env=cli_env(redis_url, **env),
                          timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"batchgen {args} exited {proc.returncode}:\n{proc.stdout!r}\n{proc.stderr!r}")
    return proc


def start_worker(*args: str, redis_url: str, log: Path, **env: str) -> subprocess.Popen:
    """A real worker process (its own session, so a test can kill -9 it without touching pytest)."""
    fh = open(log, "ab")  # noqa: SIM115 - the file lives as long as the process
    return subprocess.Popen([*BATCHGEN, "worker", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=cli_env(redis_url, **env), start_new_session=True)


def eventually(check: Callable[[], object], what: str, timeout_s: float = 90, poll_s: float = 0.02):
    """Polls until check() is truthy; the timeout only turns a hang into a clear failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"gave up after {timeout_s}s waiting for {what}")
