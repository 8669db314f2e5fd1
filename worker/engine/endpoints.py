"""The urls an engine answers. A request for any other url fails alone (unsupported_endpoint) before the engine
sees it, so a file or queue mixing generation and embeddings lines never takes a worker down."""

from collections.abc import Collection, Iterable

from batchgen.jobs.schema import ErrorInfo
from batchgen.worker.engine.protocol import Engine, EngineStats, GenerationRequest, GenerationResult


class ServedEndpoints:
    """engine behind its urls; refusal says what this worker does and where the request belongs instead."""

    def __init__(self, engine: Engine, urls: Collection[str], refusal: str):
        self.engine, self.urls, self.refusal = engine, frozenset(urls), refusal
        self.model_name = engine.model_name

    def add(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        requests = list(requests)
        refused = [GenerationResult(r.key, error=ErrorInfo(
            code="unsupported_endpoint", message=f"{r.request.url}: {self.refusal.format(model=self.model_name)}"))
            for r in requests if r.request.url not in self.urls]
        served = [r for r in requests if r.request.url in self.urls]
        return refused + (self.engine.add(served) if served else [])

    def step(self) -> list[GenerationResult]:
        return self.engine.step()

    def abort(self, keys: Iterable[str]) -> None:
        self.engine.abort(keys)

    @property
    def num_unfinished(self) -> int:
        return self.engine.num_unfinished

    @property
    def num_wanted(self) -> int:
        return self.engine.num_wanted

    @property
    def next_step_is_full(self) -> bool:
        return self.engine.next_step_is_full

    def stats(self) -> EngineStats:
        return self.engine.stats()
