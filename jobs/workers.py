"""WorkerRegistry: which workers are alive. Each worker's heartbeat hash expires after its TTL, so a
killed worker disappears on its own; the index lists the names to look for (and is pruned of the dead)."""

from collections.abc import Iterable, Mapping
from typing import Any

from batchgen.jobs import keys
from redis import Redis


class WorkerRegistry:
    def __init__(self, connection: Redis):
        self.connection = connection

    def heartbeat(self, name: str, info: Mapping[str, Any], ttl_s: int) -> None:
        """Writes a worker's state and keeps it alive for ttl_s more seconds."""
        with self.connection.pipeline() as pipe:
            pipe.hset(keys.worker_key(name), mapping=dict(info))
            pipe.expire(keys.worker_key(name), ttl_s)
            pipe.sadd(keys.workers_index(), name)
            pipe.execute()

    def register(self, name: str) -> None:
        self.connection.sadd(keys.workers_index(), name)

    def unregister(self, name: str) -> None:
        """A worker that stops cleanly leaves at once rather than after its TTL."""
        with self.connection.pipeline() as pipe:
            pipe.srem(keys.workers_index(), name)
            pipe.delete(keys.worker_key(name))
            pipe.execute()

    def forget(self, names: Iterable[str]) -> None:
        """Drops dead workers from the index (their heartbeat hash already expired)."""
        names = list(names)
        if names:
            self.connection.srem(keys.workers_index(), *names)

    def is_alive(self, name: str) -> bool:
        return bool(self.connection.exists(keys.worker_key(name)))

    def last_heartbeats(self, names: Iterable[str]) -> dict[str, int | None]:
        """Unix time of each worker's last heartbeat; None when its hash expired."""
        names = list(names)
        pipe = self.connection.pipeline(transaction=False)
        for name in names:
            pipe.hget(keys.worker_key(name), "last_heartbeat")
        return {name: None if beat is None else int(beat) for name, beat in zip(names, pipe.execute(), strict=True)}

    def live(self) -> list[dict[str, str]]:
        """The state of every live worker, by name; the dead (a kill -9'd idle worker, whose chunks no reaper
        looks for) leave the index here. A worker pruned between two beats is back at its next one."""
        names = sorted(self.connection.smembers(keys.workers_index()))
        pipe = self.connection.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.worker_key(name))
        infos = pipe.execute()
        self.forget(name for name, info in zip(names, infos, strict=True) if not info)
        return [info for info in infos if info]
