"""Back-off while Redis is unreachable (restart, failover), shared by the worker loop and `wait`."""

import time

import redis

# AuthenticationError is a ConnectionError too: callers that must not retry bad credentials catch it first.
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


class Backoff:
    """0.5 s, doubling to 10 s between tries; a success resets it."""

    def __init__(self, first_s: float = 0.5, max_s: float = 10.0):
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s

    def reset(self) -> None:
        self.delay_s = self.first_s

    def sleep(self, deadline: float | None = None) -> None:
        """Sleeps the current delay (never past a time.monotonic() deadline), then doubles it."""
        time.sleep(self.delay_s if deadline is None else max(0.0, min(self.delay_s, deadline - time.monotonic())))
        self.delay_s = min(self.delay_s * 2, self.max_s)
