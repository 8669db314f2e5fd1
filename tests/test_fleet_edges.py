"""Edges of the worker fleet: the --gpus launcher's signals, the registry, `workers`, `wait`'s rates and the
dashboard's data."""

import signal
import subprocess
import sys
import textwrap
import time

# A launcher of three children that each exit 0 on SIGTERM (else sleep 30 s); the launcher gets its own SIGTERM
# while it starts the first one, as from a supervisor stopping a set that is still starting.
SIGTERM_WHILE_STARTING = textwrap.dedent("""
    import os, signal, subprocess, sys
    from batchgen.worker import launcher

    child = [sys.executable, "-c", "import signal, sys, time; "
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(30)"]
    real_popen, started = subprocess.Popen, []

    def popen(*args, **kw):
        proc = real_popen(*args, **kw)
        started.append(proc)
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return proc

    launcher.subprocess.Popen = popen
    code = launcher.Launcher(launcher.child_specs(["0", "1", "2"], child, "race"), poll_s=0.05).run()
    print(code, sum(p.poll() is None for p in started))
""")


def test_a_sigterm_while_the_launcher_starts_its_children_stops_every_started_child():
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_STARTING], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    code, still_running = out.stdout.split()
    assert still_running == "0"
    assert code in ("0", "143")  # the child's handler may not be installed yet: then SIGTERM ends it
    assert time.monotonic() - t0 < 15, "the launcher waited for a child its SIGTERM never reached"


def test_a_worker_that_died_holding_no_chunks_leaves_the_workers_index(redis_conn):
    """Only the reaper pruned the index, and only of dead workers that held chunks: every kill -9 of an idle worker
    (each launcher start names its children anew) stayed in it for good, read again by every `workers` call."""
    from batchgen.jobs import keys
    from batchgen.jobs.workers import WorkerRegistry

    from tests.cli import eventually

    registry = WorkerRegistry(redis_conn)
    registry.heartbeat("alive", {"name": "alive"}, ttl_s=60)
    registry.heartbeat("killed-idle", {"name": "killed-idle"}, ttl_s=1)
    eventually(lambda: not registry.is_alive("killed-idle"), "the dead worker's heartbeat to expire", timeout_s=10)
    assert [w["name"] for w in registry.live()] == ["alive"]
    assert redis_conn.smembers(keys.workers_index()) == {"alive"}


# Ctrl-C reaches a set where gpu0 still loads its model (no handler yet: KeyboardInterrupt, a non-zero exit) and gpu1
# already serves (it writes down each stop signal it gets and exits 0 a moment after the first).
SERVING_CHILD = textwrap.dedent("""
    import signal, sys, time
    got = []
    def stop(signum, frame):
        got.append(signum)
        with open(sys.argv[1] + ".signals", "a") as f:
            f.write(f"{signum}\\n")
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    open(sys.argv[1] + ".serving", "w").close()
    while not got:
        time.sleep(0.01)
    time.sleep(1.0)
""")
CTRL_C_WHILE_ONE_CHILD_LOADS = textwrap.dedent("""
    import os, signal, sys, threading, time
    from batchgen.worker import launcher

    out, serving_child = sys.argv[1], sys.argv[2]
    loading = [sys.executable, "-c", "import sys, time; open(sys.argv[1] + '.loading', 'w').close(); time.sleep(30)",
               out]
    serving = [sys.executable, "-c", serving_child, out]
    specs = [launcher.ChildSpec(s.gpu, s.name, argv, s.env)
             for s, argv in zip(launcher.child_specs(["0", "1"], [], "set"), [loading, serving])]

    def ctrl_c():
        while not (os.path.exists(out + ".loading") and os.path.exists(out + ".serving")):
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    print(launcher.Launcher(specs, poll_s=0.05).run())
""")


def test_a_child_failing_after_a_forwarded_ctrl_c_gets_no_second_stop_signal_for_the_others(tmp_path):
    """A second stop signal makes a worker requeue its in-flight work at once: after the user's Ctrl-C, a child that
    fails (one still loading dies of KeyboardInterrupt) must not make the launcher send the others another one."""
    out = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_ONE_CHILD_LOADS, str(tmp_path / "o"), SERVING_CHILD],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["130"]  # the loading child's exit, by SIGINT
    assert (tmp_path / "o.signals").read_text().split() == [str(int(signal.SIGINT))], out.stderr
    assert "stopping the others" not in out.stderr


def test_an_idle_workers_token_rate_falls_to_zero_once_its_tokens_leave_the_window(monkeypatch):
    """TokenRate measured between its first and last samples: after work stopped it reported the last rate for
    good (idle workers showed it in `workers` and the dashboard, and `wait` showed a finished batch's rate)."""
    from batchgen.worker.engine import requests as engine_requests

    clock = [100.0]
    monkeypatch.setattr(engine_requests.time, "monotonic", lambda: clock[0])
    rate = engine_requests.TokenRate(window_s=1.0)
    for _ in range(11):
        rate.add(100)
        clock[0] += 0.1
    assert 900 < rate.per_s() < 1100
    clock[0] += 0.5
    assert 0 < rate.per_s() < 900  # half a second idle: the rate falls
    clock[0] += 2.0
    assert rate.per_s() == 0.0
