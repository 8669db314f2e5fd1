"""DecodeGraphs runs each decode step once: a capture's warm-up runs the step for real (its logits are the step's),
the replay comes from the next step on. Run twice, a step over a V^T pool seals a block it fills twice (garbage): a
bulk on V^T agreed with the defaults on no request. Here the capture is a stand-in with CUDA's semantics (the
warm-up runs, the capture records without running, a replay runs), so the count holds without a GPU."""

import torch
from batchgen.worker.engine import cuda_graphs
from batchgen.worker.engine.cuda_graphs import DecodeGraphs


class _Graph:
    def __init__(self, fn, out: torch.Tensor):
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())

    def pool(self) -> None:
        return None


def _capture(fn, stream, pool):
    first = fn()  # the warm-up runs for real; the capture itself records and runs nothing
    out = torch.full_like(first, float("nan"))
    return _Graph(fn, out), out, first


def test_a_captured_step_runs_once_and_answers_with_the_warm_ups_logits(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "capture", _capture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    runs = []

    def decode(ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        runs.append((ids.tolist(), positions.tolist()))
        return (ids * 100 + positions).float()[:, None]

    graphs = DecodeGraphs(decode, max_rows=8, device=torch.device("cpu"))
    got = graphs.run([3, 4, 5], [10, 11, 12], kv_len=64)  # bucket 4: captured now
    assert runs == [([3, 4, 5, 0], [10, 11, 12, 0])]  # once, padded to the bucket
    assert got[:, 0].tolist() == [310.0, 411.0, 512.0]  # the warm-up's logits, not the unreplayed graph's NaNs
    got = graphs.run([6, 7, 8], [13, 14, 15], kv_len=64)  # the same bucket: replayed
    assert len(runs) == 2 and got[:, 0].tolist() == [613.0, 714.0, 815.0]
    graphs.run([1], [1], kv_len=64)  # a new bucket (1): captured, once
    assert len(runs) == 3 and set(graphs.graphs) == {(4, 64), (1, 64)}
