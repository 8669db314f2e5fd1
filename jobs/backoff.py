"""Back-off while Redis is unreachable (restart, failover) or refuses writes (OOM, READONLY, NOPERM, MISCONF),
shared by the worker loop and `wait`."""

import time

import redis
from redis._parsers.base import BaseParser
from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError


class CannotPersistError(redis.ResponseError):
    """MISCONF: an RDB save failed (disk full, directory gone) and Redis stops writes until one succeeds."""


# redis-py raises a bare ResponseError for error codes it does not know: name this one, as it does OOM and READONLY
BaseParser.EXCEPTION_CLASSES.setdefault("MISCONF", CannotPersistError)

# AuthenticationError is a ConnectionError too: callers that must not retry bad credentials catch it first.
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)

# Redis answered but said no: full under noeviction, a replica, an ACL user lacking a command or key, a disk it cannot
# save to. An operator can fix each without restarting us, so a worker waits; a one-shot command exits.
REFUSED = (OutOfMemoryError, ReadOnlyError, NoPermissionError, CannotPersistError)


def redis_said(exc: redis.RedisError) -> str:
    """Redis's own words: redis-py prefixes a pipeline's error with the whole command ("Command # 1 (HSET ...) of
    pipeline caused error: ...")."""
    return str(exc).split(" caused error: ", 1)[-1].rstrip(".")


def refusal_reason(exc: redis.RedisError) -> str:
    """One line naming what Redis refused and what fixes it."""
    said = redis_said(exc)
    if isinstance(exc, OutOfMemoryError):
        return f"Redis is out of memory ({said}); free memory or raise maxmemory"
    if isinstance(exc, ReadOnlyError):
        return f"Redis is a read-only replica ({said}); point REDIS_URL at the primary"
    if isinstance(exc, CannotPersistError):
        return (f"Redis cannot save to disk and refuses writes ({said[:80]}...); free its disk or fix its dir "
                "(its log says why)")
    return f"the Redis user lacks a permission ({said}); grant it in the ACL"


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
