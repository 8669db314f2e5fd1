"""Checks of the Redis server itself that both submit and workers run before writing.

An evicting maxmemory-policy drops batch keys under memory pressure: requests vanish and chunks are
never run. Both sides refuse such a server rather than lose work silently.
"""

import logging

import redis
from redis import Redis

log = logging.getLogger("batchgen.redis")

SAFE_POLICIES = ("noeviction",)


class EvictingRedis(RuntimeError):
    """The server may evict keys (allkeys-*, volatile-*): batches would lose requests."""

    def __init__(self, policy: str):
        self.policy = policy
        super().__init__(
            f"Redis maxmemory-policy is {policy!r}: it may evict batch keys and lose requests; "
            "set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, or in redis.conf)"
        )


def eviction_policy(connection: Redis) -> str | None:
    """The server's maxmemory-policy, or None where CONFIG is not allowed (restricted ACL, managed Redis)."""
    try:
        reply = connection.config_get("maxmemory-policy")
    except redis.ResponseError as exc:  # NOPERM, or CONFIG renamed/disabled: unknown command
        log.warning("cannot read Redis maxmemory-policy (%s); make sure it is noeviction", exc)
        return None
    value = reply.get("maxmemory-policy") or reply.get(b"maxmemory-policy")
    return value.decode() if isinstance(value, bytes) else value


def refuse_evicting(connection: Redis) -> None:
    """Raises EvictingRedis when the server's policy may evict keys; an unreadable policy only warns."""
    policy = eviction_policy(connection)
    if policy is not None and policy not in SAFE_POLICIES:
        raise EvictingRedis(policy)
