"""A daemon thread that keeps a worker's heartbeat going while its loop is busy in an engine step.

A step can outlast the worker TTL (a huge prompt's prefill, a slow first CUDA graph capture); if the
heartbeat waited for the loop, other workers would reap chunks that are still being worked on.
"""

import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger("batchgen.worker")


class HeartbeatThread:
    def __init__(self, beat: Callable[[], None], interval_s: float):
        self.beat = beat
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchgen-heartbeat", daemon=True)

    def start(self) -> "HeartbeatThread":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as exc:  # unreachable or refusing: the loop backs off and reports it
                log.warning("heartbeat failed (%s); retrying in %.1fs", exc, self.interval_s)
            except Exception:  # a heartbeat must never die quietly while the worker holds claims
                log.exception("heartbeat failed; retrying in %.1fs", self.interval_s)
