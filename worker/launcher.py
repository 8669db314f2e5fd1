"""One worker process per GPU: `batchgen worker --gpus 0,1,...`.

The parent loads nothing. It starts one ordinary `batchgen worker` per GPU with CUDA_VISIBLE_DEVICES
set to that GPU and a distinct `--name`, forwards SIGTERM/SIGINT to them once, and exits when they
have all exited. A child that dies abnormally stops the others (gracefully) and the parent exits with
its code (128 + N for a child killed by signal N), so the supervisor (systemd, `restart: unless-stopped`)
restarts the whole set instead of leaving a GPU idle behind a parent that still looks healthy.
"""

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import click

log = logging.getLogger("batchgen.launcher")

_PR_SET_PDEATHSIG = 1


def parse_gpus(text: str) -> list[str]:
    """'0,1,3' -> ['0', '1', '3']; entries may be indexes or GPU/MIG UUIDs (what CUDA_VISIBLE_DEVICES takes)."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus:
        raise ValueError(f"--gpus needs a comma-separated list of GPUs, got {text!r}")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus lists a GPU twice: {text!r}")
    return gpus


def command_line_args(ctx: click.Context, exclude: Sequence[str] = ("gpus", "name")) -> list[str]:
    """The options the user gave on the command line, as argv again (env settings reach children as env)."""
    args: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in exclude:
            continue
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        opt = max(param.opts, key=len)
        value = ctx.params[param.name]
        if param.is_flag and param.secondary_opts:  # an on/off pair such as --cuda-graphs/--no-cuda-graphs
            args.append(opt if value else max(param.secondary_opts, key=len))
        elif param.is_flag:
            if value:
                args.append(opt)
        elif param.multiple:
            for v in value:
                args += [opt, str(v)]
        else:
            args += [opt, str(value)]
    return args


@dataclass(frozen=True)
class ChildSpec:
    gpu: str
    name: str
    argv: list[str]
    env: dict[str, str]


def child_specs(gpus: Sequence[str], worker_argv: Sequence[str], base_name: str | None) -> list[ChildSpec]:
    """What to run per GPU: the same worker command (the caller's, without --gpus/--name) plus a per-GPU name."""
    base = base_name or f"{socket.gethostname()}.{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHGEN_GPUS", "CUDA_VISIBLE_DEVICES")}
    specs = []
    for gpu in gpus:
        name = f"{base}.gpu{gpu}"
        specs.append(ChildSpec(gpu, name, [*worker_argv, "--name", name],
                               {**env, "CUDA_VISIBLE_DEVICES": gpu}))
    return specs


_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the launcher dies without forwarding (kill -9 of the parent). It also
    takes the stop signals again, which the launcher blocks while it starts a child."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Launcher:
    def __init__(self, specs: Sequence[ChildSpec], poll_s: float = 0.2):
        self.specs = list(specs)
        self.poll_s = poll_s
        self.children: dict[str, subprocess.Popen] = {}
        self._forwarded: set[int] = set()

    def run(self) -> int:
        """Starts the children, waits for all of them; returns 0 or the first abnormal exit code."""
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        for spec in self.specs:
            if self._forwarded:  # stopped while starting: the rest would never get the signal
                log.info("stop signal during start-up: not starting the remaining workers")
                break
            # Own session: a terminal's Ctrl-C reaches only the launcher, which forwards it once
            # (a worker takes a second SIGINT as "requeue in-flight work now"). A stop signal that comes while
            # the child starts waits until it is in self.children, so the forwarding reaches it too.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                self.children[spec.name] = subprocess.Popen(spec.argv, env=spec.env, start_new_session=True,
                                                            preexec_fn=_die_with_parent)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            log.info("started worker %s on CUDA_VISIBLE_DEVICES=%s (pid %d)", spec.name, spec.gpu,
                     self.children[spec.name].pid)
        exit_code = 0
        live = dict(self.children)
        while live:
            for name, proc in list(live.items()):
                code = proc.poll()
                if code is None:
                    continue
                del live[name]
                code = 128 - code if code < 0 else code  # killed by a signal: shell convention
                log.info("worker %s exited with %d", name, code)
                if code != 0 and exit_code == 0:
                    exit_code = code
                    if live and not self._forwarded:  # after a forwarded stop, another signal means "requeue now"
                        log.error("worker %s failed: stopping the others so the set restarts together", name)
                        self._send(signal.SIGTERM, live.values())
            time.sleep(self.poll_s)
        return exit_code

    def _forward(self, signum: int, frame: object = None) -> None:
        self._forwarded.add(signum)
        self._send(signum, self.children.values())

    @staticmethod
    def _send(signum: int, procs) -> None:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)


def launch(gpus: str, worker_argv: Sequence[str], base_name: str | None = None) -> int:
    return Launcher(child_specs(parse_gpus(gpus), worker_argv, base_name)).run()
