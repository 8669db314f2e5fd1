"""The int8 outlier guard's snapshots (int8_outliers.OutlierGuard): queued on the stream without a sync and read once
the device has reached them, they find the same columns as the guard's former synchronous poll, over a run of
polls with planted massive, systematic and sporadic columns and a window reset at GUARD_WINDOW_TOKENS; read late
(an event not yet done, as on CUDA), they add the same columns a poll or more later and take no snapshot while one
is pending. The engine no longer runs a decode step synchronously for the guard: on the tiny 8-bit demo Llama every
decode step is queued, greedy output equals the synchronous engine's, and a column that opens an input mid-run
drops the captured graphs before the next decode launch (CPU: no graphs, no CUDA events; what the GPU adds is the
events' timing)."""

import copy

import pytest
import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, convert_model, outlier_guard
from batchgen.worker.engine.int8_outliers import (
    GUARD_WINDOW_TOKENS,
    MASSIVE_FACTOR,
    SYSTEMATIC_RATE,
    OutlierGuard,
    outlier_features,
)
from batchgen.worker.engine.llm_engine import GUARD_POLL_STEPS, LLMEngine
from batchgen.worker.engine.loader import load_model

from tests.test_llm_engine import PROMPTS, completion, run
from tests.test_overlap_decode import outputs

THRESHOLD = 6.0
ROWS = 256  # tokens per poll: a window is 16 polls
POLLS = 3 * GUARD_WINDOW_TOKENS // ROWS
MASSIVE_AT = 3  # the poll whose step carries a massive column
SYSTEMATIC_EVERY = 32  # 1 token in 32 reaches the threshold: above SYSTEMATIC_RATE
LATE_WINDOW = 1  # the window in which the late systematic column starts reaching the threshold


def sync_poll(guard: OutlierGuard, num_tokens: int) -> int:
    """The guard's poll before snapshots: the mask read with a sync; seen kept until a window ends or a column is
    found."""
    guard.num_tokens += num_tokens
    window_full = guard.num_tokens >= GUARD_WINDOW_TOKENS
    if window_full:
        found = outlier_features(guard.seen, guard.hits, guard.num_tokens, guard.threshold)
    else:
        found = guard.seen >= MASSIVE_FACTOR * guard.threshold
    hits = torch.nonzero(found).flatten().tolist()
    if window_full:
        guard.hits.zero_()
        guard.num_tokens = 0
    if window_full or hits:
        guard.seen.zero_()
    return guard._add(hits) if hits else 0


class LateEvent:
    """A CUDA event's host side on CPU: done `delay` polls after it was recorded (polls counted by the test)."""

    def __init__(self, delay: int):
        self.delay, self.now, self.recorded, self.num_records = delay, 0, 0, 0

    def record(self) -> None:
        self.recorded, self.num_records = self.now, self.num_records + 1

    def query(self) -> bool:
        return self.now >= self.recorded + self.delay

    def synchronize(self) -> None:
        self.now = max(self.now, self.recorded + self.delay)


@pytest.fixture(scope="module")
def converted(demo_model_dir) -> torch.nn.Module:
    model = load_model(str(demo_model_dir), device=torch.device("cpu"), dtype=torch.float32, load_in_8bit=True,
                       int8_threshold=THRESHOLD).model
    convert_model(model, OUTLIER_KERNEL, threshold=THRESHOLD)  # no calibration: every slot free
    return model


def guarded(converted: torch.nn.Module) -> tuple[OutlierGuard, torch.nn.Module]:
    model = copy.deepcopy(converted)
    return outlier_guard(model, THRESHOLD), model.model.layers[0]


def planted(poll: int, hidden: int, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's inputs of layer 0's q/k/v and down projections: noise below the threshold, and one planted column
    per row kind (a token records only its largest int8 column)."""
    g = torch.Generator().manual_seed(poll)
    x = torch.randn(ROWS, hidden, generator=g).clamp(-4, 4)
    y = torch.randn(ROWS, inner, generator=g).clamp(-4, 4)
    if poll == MASSIVE_AT:
        x[7, 11] = 30.0  # one token, massive
    x[0::SYSTEMATIC_EVERY, 5] = 9.0  # systematic from the start, never massive
    x[1::ROWS, 40] = 23.0  # just below massive in every step, and sporadic: stays int8
    if poll // (GUARD_WINDOW_TOKENS // ROWS) == LATE_WINDOW:
        x[2::SYSTEMATIC_EVERY, 20] = 9.0  # systematic in one window only: judged in it, not averaged over two
    y[3::SYSTEMATIC_EVERY, 9] = -9.0  # systematic (|x| counts) on another input: a flat index past the first
    y[4::ROWS, 17] = 9.0  # sporadic
    return x, y


def steps(guard: OutlierGuard, layer: torch.nn.Module, poll) -> list[list[list[int]]]:
    """Each poll's columns per input after the planted steps, polled by poll(guard, tokens)."""
    qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
    seen = []
    with torch.inference_mode():
        for i in range(POLLS):
            x, y = planted(i, qkv.in_features, down.in_features)
            qkv(x)
            down(y)
            poll(guard, ROWS)
            seen.append([list(o.columns) for o in guard.inputs])
    return seen


def test_snapshots_find_the_columns_the_synchronous_poll_found(converted):
    sync_guard, sync_layer = guarded(converted)
    guard, layer = guarded(converted)
    window = GUARD_WINDOW_TOKENS // ROWS
    counts: list[int] = []

    def poll(g: OutlierGuard, n: int) -> None:
        counts.append(g.poll(n))
        if len(counts) % window == 0:  # the poll that filled the window judged it and reset the counters
            assert g.num_tokens == 0 and not g.hits.any() and not g.pending

    want = steps(sync_guard, sync_layer, sync_poll)
    got = steps(guard, layer, poll)
    assert got == want
    qkv, down = (guard.inputs.index(m.outliers) for m in (layer.self_attn.qkv_proj, layer.mlp.down_proj))
    assert got[MASSIVE_AT - 1][qkv] == [] and got[MASSIVE_AT][qkv] == [11]  # massive: the poll after its step
    assert got[window - 2][qkv] == [11] and got[window - 1][qkv] == [11, 5]  # systematic: when its window is full
    assert got[window - 1][down] == [9]
    late = (LATE_WINDOW + 1) * window - 1
    assert got[late - 1][qkv] == [11, 5] and got[late][qkv] == [11, 5, 20]  # judged over its own window only
    assert got[-1][qkv] == [11, 5, 20] and got[-1][down] == [9]  # 40 (never massive) and 17 (sporadic) stay int8
    assert counts == [len(b[qkv]) + len(b[down]) - len(a[qkv]) - len(a[down])
                      for a, b in zip([[[]] * len(guard.inputs)] + got, got, strict=False)]
    assert guard.num_added == 4 and guard.num_opened == 2
    hits_per_window = window * ROWS / SYSTEMATIC_EVERY
    assert SYSTEMATIC_RATE * GUARD_WINDOW_TOKENS <= hits_per_window < SYSTEMATIC_RATE * 2 * GUARD_WINDOW_TOKENS


@pytest.mark.parametrize("delay", [1, 2])
def test_a_snapshot_the_device_has_not_reached_is_read_later(converted, delay):
    """delay 1: each poll reads the last poll's snapshot and takes its own, so the columns arrive one poll late;
    delay 2: every other poll finds its snapshot pending and takes none (its tokens join the next one's count)."""
    sync_guard, sync_layer = guarded(converted)
    guard, layer = guarded(converted)
    event = guard.event = LateEvent(delay)
    pending: list[bool] = []

    def poll(g: OutlierGuard, n: int) -> None:
        g.poll(n)
        event.now += 1
        pending.append(g.pending)

    want = steps(sync_guard, sync_layer, sync_poll)
    got = steps(guard, layer, poll)
    assert all(pending)  # never read in the poll that took it
    assert all(set(g) <= set(w) for gs, ws in zip(got, want, strict=True) for g, w in zip(gs, ws, strict=True))
    if delay == 1:
        assert event.num_records == POLLS and got[1:] == want[:-1] and got[0] == [[]] * len(guard.inputs)
    else:
        # the massive step (3) joins the snapshot poll 4 takes, which poll 6 reads
        assert event.num_records == POLLS // 2 and want[MASSIVE_AT] == got[6] != got[5]
    guard.flush()
    assert not guard.pending and [o.columns for o in guard.inputs] == want[-1]
    assert guard.flush() == 0 and guard.poll(0) == 0  # nothing new


@pytest.fixture(scope="module")
def engines(demo_model_dir) -> tuple[LLMEngine, LLMEngine]:
    on = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4))
    off = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4, overlap_decode=False))
    return on, off


@pytest.mark.slow
def test_every_decode_step_is_queued_with_the_guard(engines, monkeypatch):
    on, off = engines
    assert on.int8 is not None and on.int8.guard is not None
    polls, collects = [], []
    poll, collect = on.int8.poll, on.int8.collect
    monkeypatch.setattr(on.int8, "poll", lambda num_tokens: polls.append(num_tokens) or poll(num_tokens))
    monkeypatch.setattr(on.int8, "collect", lambda: collects.append(1) or collect())
    reqs = [completion(f"q{i}", p, max_tokens=3 * GUARD_POLL_STEPS) for i, p in enumerate(PROMPTS[:3])]
    stats = on.step_stats
    decode_before, queued_before = stats.num_decode_steps, stats.num_overlapped_steps
    tokens_before = stats.num_prefill_tokens + stats.num_decode_rows
    want, got = run(off, reqs), run(on, reqs)
    assert outputs(got) == outputs(want)
    decode_steps = stats.num_decode_steps - decode_before
    assert decode_steps >= 3 * GUARD_POLL_STEPS - 1 and stats.num_overlapped_steps - queued_before == decode_steps
    assert len(polls) >= decode_steps // GUARD_POLL_STEPS and collects  # snapshots, and reads in between
    assert sum(polls) == stats.num_prefill_tokens + stats.num_decode_rows - tokens_before  # every token, once
    assert not on.int8.guard.pending and on._unpolled_steps == 0  # drained: the guard judged the run's last tokens


@pytest.mark.slow
def test_a_column_opening_an_input_mid_run_drops_the_graphs_before_the_next_decode(demo_model_dir, monkeypatch):
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), max_batch_size=4))
    guard = engine.int8.guard
    qkv = next(layer.self_attn.qkv_proj for layer in engine.model.model.layers
               if not layer.self_attn.qkv_proj.outliers.columns)
    column = 13
    calls: list[tuple[str, int]] = []  # ("decode" | "drop", the guard's opened inputs then)
    decode, drop = engine.runner.decode, engine.runner.drop_graphs

    def decoding(tokens, positions):
        calls.append(("decode", guard.num_opened))
        return decode(tokens, positions)

    def plant(module, args):  # from the 5th decode on, a massive activation in the column
        if sum(c == "decode" for c, _ in calls) < 5:
            return None
        x = args[0].clone()
        x[..., column] = 40.0
        return (x,)

    monkeypatch.setattr(engine.runner, "decode", decoding)
    monkeypatch.setattr(engine.runner, "drop_graphs", lambda: calls.append(("drop", guard.num_opened)) or drop())
    handle = qkv.register_forward_pre_hook(plant)
    try:
        results = run(engine, [completion("m", PROMPTS[4], max_tokens=2 * GUARD_POLL_STEPS + 8)])
    finally:
        handle.remove()
    assert results["m"].error is None and column in qkv.outliers.columns and guard.num_opened == 1
    assert [c for c in calls if c[0] == "drop"] == [("drop", 1)]
    dropped = calls.index(("drop", 1))
    assert all(opened == 0 for _, opened in calls[:dropped])  # found after the planted steps, dropped at once
    assert calls[dropped + 1:] and all(c == ("decode", 1) for c in calls[dropped + 1:])
    assert engine.step_stats.num_overlapped_steps == engine.step_stats.num_decode_steps
