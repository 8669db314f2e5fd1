"""Small-VRAM mode: serve a model whose int8 weights do not fit the VRAM cap, by streaming decoder layers.

The model loads in 8-bit on the CPU (bitsandbytes: an int8 CB matrix and float32 SCB row scales per
linear). As many decoder layers as the budget allows are copied to the GPU for good; the others live
in pinned CPU memory and stream in, still int8, into two stage buffers (STAGE_SLOTS) on a side CUDA stream: the copy
of layer i+1 overlaps the compute of layer i, and events order the two streams. A streamed byte is
paid once per forward whatever the batch, so micro-batches are made large: throughput ≈ rows ÷
(bytes streamed per step ÷ host→device bandwidth). When the KV cache of that many rows does not fit
on the GPU either, it lives in pinned CPU memory, position-major, streams in beside its layer, and
each step's new K/V go back once per layer (`HostKV`), or, what the planner picks when the host is fast
enough, stays there and decode attention runs on the host CPU (`CpuAttention`, host_attention's kernel):
then only weights cross the bus, resident layers are spread between the streamed ones so the copies never
stop, the GPU work between two host attentions replays from CUDA graphs (piecewise.PiecewiseDecode), and
where the host cannot hold every layer's K/V for the rows the planner keeps a few layers' KV on the device,
attended there. The embedding table stays on the host (`HostEmbedding`).

Layers run the resident engine's int8 kernels (int8_linear; bitsandbytes' own matmul with int8_kernel "bnb")
on the streamed CB/SCB, so a streamed layer computes what the resident one would. The device is a
parameter: on CPU the same code moves weights between two CPU buffers and the stream/event calls are
no-ops; that is how the tests run it. The plan is pure arithmetic (stream_plan.py); the host KV caches and
their cost probe are host_kv.py.
"""

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from batchgen.worker import budget as budget_math
from batchgen.worker.host_attention import Kernel, cache_bytes
from batchgen.worker.host_kv import CpuAttention, HostKV, measure_cpu_attention_cost
from batchgen.worker.int8_linear import KERNELS, FusedInt8Linear, Int8Linear, Int8State
from batchgen.worker.llm_engine import EngineConfig, LLMEngine, _available_ram_bytes, resolve_int8_kernel
from batchgen.worker.model_loader import load_model, resolve_device, resolve_dtype
from batchgen.worker.model_runner import KVStore, ModelRunner, head_dim_of
from batchgen.worker.piecewise import PiecewiseDecode
from batchgen.worker.stream_plan import (
    StreamPlan,
    int8_weights_bytes,
    plan_streaming,
    prefill_peak,
    stage_slots,
)

log = logging.getLogger(__name__)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# A prefill streams every weight once whatever its size, so it takes all the prompts it can (up to this many
# tokens: ~host staging of 3.4 GB for a 13B model in fp16) and runs each layer over groups of whole prompts
# of at most STREAMING_PREFILL_GROUP_TOKENS, which bounds its activations on the device.
STREAMING_MAX_PREFILL_TOKENS = 8192
STREAMING_PREFILL_GROUP_TOKENS = 1024


# Device memory a streaming process takes after its plan is made, outside PyTorch's allocator: kernels loaded on
# first use (cuBLAS, FlashAttention, the Triton int8 kernels) and the piecewise decode's CUDA graph execs (~500
# for a 13B model). Counted up front, or it comes out of the reserve: on an H100 (2026-11-25 11:56 UTC, 13B) the
# process had 0.68 GiB outside the allocator when it planned and 1.39 GiB at its peak (NVML 5.70 − 4.31 GiB
# reserved); an earlier plan that counted none of it peaked at 5.99 of its 6 GiB.
LATE_OVERHEAD_BYTES = 700 * 2**20

# -- whether to stream ----------------------------------------------------------------------------

def process_overhead_bytes(device: torch.device) -> int:
    """Device memory in use outside PyTorch's allocator (CUDA context, library workspaces, other processes).

    A --max-vram cap models a whole card, so this counts against it too; measured, not guessed. On a
    shared GPU it also counts other processes' memory, which errs on the safe side.
    """
    free, total = torch.cuda.mem_get_info(device)
    return max(0, (total - free) - torch.cuda.memory_reserved(device))


def wants_streaming(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """offload=None (auto): stream when the int8 weights plus the reserve exceed max_vram_bytes on CUDA."""
    if cfg.offload is not None:
        return cfg.offload
    if cfg.max_vram_bytes is None or device.type != "cuda":
        return False
    from transformers import AutoConfig

    weights = int8_weights_bytes(AutoConfig.from_pretrained(cfg.model), torch.empty(0, dtype=dtype).element_size())
    return weights + cfg.vram_reserve_bytes > cfg.max_vram_bytes


# -- the device side ------------------------------------------------------------------------------

class _Streams:
    """A side copy stream and per-slot events on CUDA; no-ops elsewhere (copies are synchronous there).
    head_copied: the slot's layer's q/k/v weights (and every scale) are in, which is all its first piece
    reads; copied: the whole layer is. Each layer's copies are also timed on the GPU (busy_s, copied_bytes):
    the stream's rate while it copies, and how much of a step it copies at all, tell a slow bus from idle one;
    gap_by_layer: how long the stream sat idle before each layer's copy began (waiting for its slot to be
    released, or for the host to issue it; between batches too), which says where in a step the bus idles."""

    def __init__(self, device: torch.device, num_slots: int = 2):
        self.cuda, self.num_slots = device.type == "cuda", num_slots
        self.copy = torch.cuda.Stream(device) if self.cuda else None
        self.copied = [None] * num_slots
        self.head_copied = [None] * num_slots
        self.done = [None] * num_slots
        self.timed: list[tuple[int, torch.cuda.Event, torch.cuda.Event, int]] = []  # (layer, start, end, bytes) unread
        self.busy_s, self.copied_bytes = 0.0, 0
        self.gap_by_layer: dict[int, float] = {}
        self._last_end: torch.cuda.Event | None = None  # the end of the last copy harvested

    def copying(self):
        return torch.cuda.stream(self.copy) if self.cuda else _NullContext()

    def start_iteration(self, keep_events: bool = False) -> None:
        """Stage buffers are reused: copies wait for all compute already queued (also after an aborted pass).
        keep_events: copies the previous forward issued for this one are in flight; compute must wait on them."""
        if self.cuda:
            self.copy.wait_stream(torch.cuda.current_stream())
            if not keep_events:
                self.copied, self.done = [None] * self.num_slots, [None] * self.num_slots
                self.head_copied = [None] * self.num_slots

    def copy_waits_for_compute(self, slot: int) -> None:
        if self.cuda and self.done[slot] is not None:
            self.copy.wait_event(self.done[slot])

    def record_copied(self, slot: int, *, head: bool = False) -> None:
        if self.cuda:
            (self.head_copied if head else self.copied)[slot] = self.copy.record_event()

    def compute_waits_for_copy(self, slot: int, *, head: bool = False) -> None:
        event = (self.head_copied if head else self.copied)[slot] if self.cuda else None
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def record_done(self, slot: int) -> None:
        if self.cuda:
            self.done[slot] = torch.cuda.current_stream().record_event()

    def start_timing(self) -> torch.cuda.Event | None:
        """On the copy stream, before a layer's copies (after its wait for the slot): when they start."""
        return self.copy.record_event(torch.cuda.Event(enable_timing=True)) if self.cuda else None

    def end_timing(self, layer: int, start: torch.cuda.Event | None, nbytes: int) -> None:
        if start is not None:
            self.timed.append((layer, start, self.copy.record_event(torch.cuda.Event(enable_timing=True)), nbytes))

    def reset_timing(self) -> None:
        """Forgets every copy queued so far (they are waited for), so the next ones are counted on their own."""
        if self.cuda:
            self.copy.synchronize()
        self.harvest()
        self.busy_s, self.copied_bytes, self.gap_by_layer, self._last_end = 0.0, 0, {}, None

    def harvest(self) -> None:
        """Adds the finished timed copies to busy_s / copied_bytes / gap_by_layer; the others wait for a later call
        (one stream: they finish in the order they were queued, so the finished ones are a prefix)."""
        done = 0
        for layer, start, end, nbytes in self.timed:
            if not end.query():
                break
            self.busy_s += start.elapsed_time(end) / 1e3
            self.copied_bytes += nbytes
            if self._last_end is not None:
                gap = self._last_end.elapsed_time(start) / 1e3
                self.gap_by_layer[layer] = self.gap_by_layer.get(layer, 0.0) + gap
            self._last_end, done = end, done + 1
        del self.timed[:done]


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class BnbInt8Linear:
    """int8_kernel "bnb": bitsandbytes' own int8 matmul (with its outlier columns) over CB/SCB views."""

    def __init__(self, state: Int8State, threshold: float):
        from bitsandbytes.autograd._functions import MatmulLtState

        self.cb, self.bias = state.cb, state.bias
        self.state = MatmulLtState()
        self.state.CB, self.state.SCB, self.state.threshold = state.cb, state.scb, threshold
        self.state.has_fp16_weights = self.state.is_training = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul(x, self.cb, bias=self.bias, state=self.state)


@dataclass(frozen=True)
class _LinearSpec:
    name: str
    shape: tuple[int, int]
    cb_offset: int
    scb_offset: int


def _int8_of(linear: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB) of a loaded Linear8bitLt, before or after its first forward."""
    try:
        state = Int8State.from_bnb(linear)
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"small-VRAM mode streams bnb int8 weights; {type(linear).__name__} has none") from exc
    return state.cb, state.scb


def _repoint(linear: torch.nn.Module, cb: torch.Tensor, scb: torch.Tensor) -> None:
    """The HF module keeps working on the host copy, so its memory is not held twice."""
    linear.weight.data = cb
    if getattr(linear.weight, "CB", None) is not None:
        linear.weight.CB = cb
    if getattr(linear.weight, "SCB", None) is not None:
        linear.weight.SCB = scb
    if linear.state.CB is not None:
        linear.state.CB = cb
    if linear.state.SCB is not None:
        linear.state.SCB = scb


def _layer_specs(layer: torch.nn.Module) -> list[_LinearSpec]:
    specs, cb_at, scb_at = [], 0, 0
    for name in LINEARS:
        cb, _ = _int8_of(layer.get_submodule(name))
        specs.append(_LinearSpec(name, tuple(cb.shape), cb_at, scb_at))
        cb_at += cb.numel()
        scb_at += cb.shape[0]
    return specs


def _views(specs: list[_LinearSpec], cb_flat: torch.Tensor, scb_flat: torch.Tensor,
           groups: tuple[tuple[str, ...], ...]) -> dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]]:
    """Views of the flat buffers for each group of consecutive linears with the same input (q/k/v,
    gate/up): their rows are adjacent in the flat layout, so a group is one [sum(out), in] matrix."""
    by_name = {s.name: s for s in specs}
    out = {}
    for group in groups:
        first, rows = by_name[group[0]], sum(by_name[n].shape[0] for n in group)
        cb = cb_flat[first.cb_offset: first.cb_offset + rows * first.shape[1]].view(rows, first.shape[1])
        out[group] = (cb, scb_flat[first.scb_offset: first.scb_offset + rows])
    return out


SINGLE = tuple((n,) for n in LINEARS)
FUSED = (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:])


class _DeviceLayer:
    """Duck-types an HF decoder layer for model_runner.forward_layers, over int8 buffers on the device,
    with the same int8 kernels as the resident engine (int8_linear's fused q/k/v and gate/up, or bnb)."""

    def __init__(self, hf_layer: torch.nn.Module, specs: list[_LinearSpec], cb: torch.Tensor, scb: torch.Tensor,
                 *, device: torch.device, dtype: torch.dtype, kernel: str, threshold: float):
        self.input_layernorm = copy.deepcopy(hf_layer.input_layernorm).to(device, dtype)
        self.post_attention_layernorm = copy.deepcopy(hf_layer.post_attention_layernorm).to(device, dtype)
        self._act = hf_layer.mlp.act_fn
        fused = kernel != "bnb"
        mods = {}
        for group, (cb_view, scb_view) in _views(specs, cb, scb, FUSED if fused else SINGLE).items():
            biases = [hf_layer.get_submodule(n).bias for n in group]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b.detach().float() if b is not None else torch.zeros(s.shape[0])
                                  for b, s in zip(biases, [x for x in specs if x.name in group], strict=True)])
                bias = bias.to(device)
            state = Int8State(cb_view, scb_view, bias)
            if not fused:
                mods[group[0]] = BnbInt8Linear(state, threshold)
            elif len(group) > 1:
                mods[group] = FusedInt8Linear(state, [s.shape[0] for s in specs if s.name in group], kernel)
            else:
                mods[group[0]] = Int8Linear(state, kernel)
        if fused:
            self.self_attn = SimpleNamespace(qkv_proj=mods[FUSED[0]], o_proj=mods[LINEARS[3]])
            self._gate_up, self._down = mods[FUSED[2]], mods[LINEARS[6]]
        else:
            self.self_attn = SimpleNamespace(**{n.split(".")[1]: mods[n] for n in LINEARS[:4]})
            self._gate, self._up, self._down = (mods[n] for n in LINEARS[4:])
            self._gate_up = None

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None:
            gate, up = self._gate_up(x).split(self._gate_up.split_sizes, dim=-1)
        else:
            gate, up = self._gate(x), self._up(x)
        return self._down(self._act(gate) * up)


class LayerStreamer:
    """The layer executor: yields each decoder layer ready to run, streaming the non-resident ones.

    Each streamed layer owns one of the stage slots; its copy into the slot waits until the slot's previous
    layer has finished computing, so the copy of the next layer overlaps the compute of this one. Weights
    only (KV on the device or attended on the CPU): resident layers are spread evenly between the streamed
    ones and the slots alternate over the streamed layers, cyclically, so the bus never idles: during a
    resident layer the next streamed one is already copying, and the last layers of a forward prefetch the
    first of the next (weights do not change between steps). With a streamed host KV cache ("host") every
    layer's K/V goes through slot i % 2 in decode, so the first num_resident layers are the resident ones and
    nothing is prefetched across forwards (the next step's KV is not written yet). num_slots: how many
    stage buffers the streamed layers take turns in (weights only; see STAGE_SLOTS).
    """

    def __init__(self, hf_layers: list[torch.nn.Module], *, device: torch.device, dtype: torch.dtype,
                 num_resident: int, kernel: str, threshold: float, kv_streamed: bool = False, num_slots: int = 2):
        self.device, self.num_layers, self.num_resident = device, len(hf_layers), num_resident
        self.specs = _layer_specs(hf_layers[0])
        self.cyclic = not kv_streamed
        if kv_streamed and num_slots != 2:
            raise ValueError("a streamed KV cache goes through two slots (layer i in slot i % 2)")
        pin = device.type == "cuda"
        self.host: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.layers: list[_DeviceLayer] = []
        self.kv: HostKV | None = None
        num_cb = sum(s.shape[0] * s.shape[1] for s in self.specs)
        num_scb = sum(s.shape[0] for s in self.specs)
        scb_dtype = _int8_of(hf_layers[0].get_submodule(LINEARS[0]))[1].dtype
        self.layer_bytes = num_cb + num_scb * torch.empty(0, dtype=scb_dtype).element_size()
        # q/k/v lead a layer's flat buffer (LINEARS' order): copied first, they let its first piece start
        self.head_cb = sum(s.shape[0] * s.shape[1] for s in self.specs[:3])
        self.resident = resident_layers(self.num_layers, num_resident, spread=self.cyclic)
        streamed = [i for i in range(self.num_layers) if i not in self.resident]
        num_slots = max(1, min(num_slots, len(streamed))) if self.cyclic else 2  # no slot without a layer to hold
        self.streams = _Streams(device, num_slots)
        self.slot_of = {i: (k % num_slots if self.cyclic else i % 2) for k, i in enumerate(streamed)}
        self.next_in_slot = _next_in_slot(streamed, self.slot_of, cyclic=self.cyclic)
        self.first_in_slot = [next(i for i in streamed if self.slot_of[i] == slot)
                              for slot in sorted(set(self.slot_of.values()))]
        self._pending: set[int] = set()  # streamed layers the previous forward already prefetched
        self.stages = [(torch.empty(num_cb, dtype=torch.int8, device=device),
                        torch.empty(num_scb, dtype=scb_dtype, device=device)) for _ in range(num_slots if streamed else 0)]
        for i, hf_layer in enumerate(hf_layers):
            if _layer_specs(hf_layer) != self.specs:
                raise ValueError(f"decoder layer {i} has other shapes than layer 0; cannot share stage buffers")
            cb = torch.empty(num_cb, dtype=torch.int8, pin_memory=pin)
            scb = torch.empty(num_scb, dtype=scb_dtype, pin_memory=pin)
            for (name,), (cb_view, scb_view) in _views(self.specs, cb, scb, SINGLE).items():
                src_cb, src_scb = _int8_of(hf_layer.get_submodule(name))
                cb_view.copy_(src_cb)
                scb_view.copy_(src_scb)
                _repoint(hf_layer.get_submodule(name), cb_view, scb_view)
            if i in self.resident:
                buffers = (cb.to(device), scb.to(device))
                self.host.append(None)
            else:
                buffers = self.stages[self.slot_of[i]]
                self.host.append((cb, scb))
            self.layers.append(_DeviceLayer(hf_layer, self.specs, *buffers, device=device, dtype=dtype, kernel=kernel,
                                            threshold=threshold))

    def iter_layers(self) -> Iterator[_DeviceLayer]:
        for i in self.schedule():
            yield self.layers[i]

    def schedule(self, lag: int = 0) -> Iterator[int]:
        """Yields 0 … num_layers − 1 + lag. Before yielding a layer, the compute stream waits for its weights;
        when the consumer comes back after yielding i, the work of layer i − lag is queued: its slot is
        released and the slot's next layer starts copying. lag=1: a layer's work spans two yields (piecewise):
        yield i runs layer i − 1 from its attention on and layer i up to it, so it waits for all of layer
        i − 1 and only layer i's q/k/v (a quarter of a Llama layer), which are copied first. With two slots
        the copy of layer i + 1 starts only when yield i's work is done, so this lets its first piece start a
        quarter of a copy later instead of a whole one (the host attends meanwhile)."""
        s = self.streams
        kv = self.kv is not None and self.kv.decoding
        pending, self._pending, prefetched = self._pending, set(), set()
        s.harvest()
        s.start_iteration(keep_events=bool(pending))
        complete = False
        try:
            for i in [0, 1][: self.num_layers] if kv else self.first_in_slot:
                if i not in pending:
                    self._prefetch(i, kv)
            split = lag == 1 and not kv
            for i in range(self.num_layers + lag):
                if split and i > 0 and self.host[i - 1] is not None:
                    s.compute_waits_for_copy(self.slot(i - 1))
                if i < self.num_layers and (kv or self.host[i] is not None):
                    s.compute_waits_for_copy(self.slot(i), head=split)
                yield i
                done = i - lag
                if done < 0:
                    continue
                if self.kv is not None:
                    self.kv.after_layer(done)
                if kv or self.host[done] is not None:
                    s.record_done(self.slot(done))
                    nxt = (done + 2 if done + 2 < self.num_layers else None) if kv else self.next_in_slot[done]
                    if nxt is not None:
                        self._prefetch(nxt, kv)
                        if nxt <= done:  # wrapped around: the next forward's first layer in this slot
                            prefetched.add(nxt)
            complete = True
        finally:
            self._pending = prefetched if complete else set()  # after an aborted pass, start afresh

    def slot(self, i: int) -> int:
        return self.slot_of.get(i, i % 2)

    def _prefetch(self, i: int, kv: bool) -> None:
        host = self.host[i]
        if host is None and not kv:
            return
        slot = self.slot(i)
        with self.streams.copying():
            self.streams.copy_waits_for_compute(slot)
            start = self.streams.start_timing()
            if host is not None:
                head, stage = self.head_cb, self.stages[slot][0]
                self.stages[slot][1].copy_(host[1], non_blocking=True)
                for a, b in _chunks(0, head):
                    stage[a:b].copy_(host[0][a:b], non_blocking=True)
                self.streams.record_copied(slot, head=True)
                for a, b in _chunks(head, stage.numel()):
                    stage[a:b].copy_(host[0][a:b], non_blocking=True)
            nbytes = self.layer_bytes if host is not None else 0
            if kv:
                nbytes += self.kv.prefetch(i, slot)
            self.streams.record_copied(slot)
            self.streams.end_timing(i, start, nbytes)


# A layer's weights cross in copies of at most this many bytes. The step's small host→device copies (the host's
# attention output, in the pieces' CUDA graphs) may queue on the same copy engine behind a weight copy; in pieces
# they wait for a chunk (~0.6 ms at 54 GB/s) rather than a whole layer's MLP (~4.4 ms for a 13B layer). Not
# measured on a GPU yet (2026-11-25: the device time ran out); benchmarks/small_vram.py's lever ".../0" copies
# whole parts, for the A/B.
COPY_CHUNK_BYTES = 32 * 2**20


def _chunks(start: int, end: int, size: int | None = None) -> list[tuple[int, int]]:
    """[start, end) in consecutive (a, b) ranges of at most size elements (int8: bytes; COPY_CHUNK_BYTES)."""
    size = size or COPY_CHUNK_BYTES
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def resident_layers(num_layers: int, num_resident: int, *, spread: bool) -> set[int]:
    """Which layers stay on the device: evenly spread (so streamed copies keep running through them), or the first."""
    if not spread or num_resident >= num_layers:
        return set(range(num_resident))
    return {(2 * k + 1) * num_layers // (2 * num_resident) for k in range(num_resident)}


def device_kv_layers(num_layers: int, resident: set[int], count: int) -> tuple[int, ...]:
    """Which layers keep their KV on the device: spread over the streamed ones, whose weight copy then runs
    while the host attends the layers around them (resident ones only when more are asked for)."""
    streamed = [i for i in range(num_layers) if i not in resident]
    if count <= len(streamed):
        return tuple(streamed[(2 * k + 1) * len(streamed) // (2 * count)] for k in range(count))
    return tuple(sorted(streamed + sorted(resident)[: count - len(streamed)]))


def _next_in_slot(streamed: list[int], slot_of: dict[int, int], *, cyclic: bool) -> dict[int, int | None]:
    """For each streamed layer, the next streamed layer using its slot (wrapping to the next forward if cyclic)."""
    out: dict[int, int | None] = {}
    for slot in set(slot_of.values()):
        users = [i for i in streamed if slot_of[i] == slot]
        for k, i in enumerate(users):
            out[i] = users[(k + 1) % len(users)] if cyclic or k + 1 < len(users) else None
    return out


class HostEmbedding(torch.nn.Module):
    """The token embedding table in host memory, its looked-up rows sent to the device.

    A step reads a few rows of it (64 × 10 KB for a 13B decode step), so keeping the table (328 MB for a 13B
    model) on a 6 GB card would take the room of a resident decoder layer for nothing. The lookup is the
    same gather wherever it runs; CUDA token ids cost one sync (prefill and the eager decode paths; the
    piecewise decode passes host ids).
    """

    def __init__(self, embed: torch.nn.Embedding, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(embed.weight.detach().to("cpu", dtype), requires_grad=False)
        self.padding_idx, self.device = embed.padding_idx, device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(ids.cpu(), self.weight, self.padding_idx)
        return rows.to(self.device, non_blocking=True)


class StreamingRunner(ModelRunner):
    """ModelRunner whose decoder layers come from a LayerStreamer and whose KV may live on the host.

    A streamed step has host-side work between layers (events, copies, CPU attention), so it is not one CUDA
    graph: with CPU attention the GPU work between two host attentions is (piecewise.PiecewiseDecode, where
    cuda_graphs and the int8 kernel allow: bnb's outlier columns have data-dependent shapes); the other
    placements launch eagerly.
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, max_model_len: int,
                 attention: str, kernel: str, threshold: float, host_kv_dtype: torch.dtype | None = None,
                 cpu_kernel: Kernel | None = None, cuda_graphs: bool = True):
        super().__init__(model, device=device, dtype=dtype, max_model_len=max_model_len, attention=attention)
        self.host_kv_dtype = host_kv_dtype or dtype  # CPU attention's cache
        self._cpu_kernel = cpu_kernel  # built on first use unless the engine built it while loading
        p = self.parts
        # in the compute dtype whatever the loader left them in: while CpuAttention's kernel compiles in another
        # thread, dynamo restoring the process default dtype can race with from_pretrained setting it (seen:
        # a float32 lm_head on a first, cold compile)
        p.norm, p.lm_head = (copy.deepcopy(m).to(device, dtype) for m in (p.norm, p.lm_head))
        p.embed = HostEmbedding(p.embed, device, dtype)
        p.rotary = copy.deepcopy(p.rotary).to(device)  # its inverse frequencies stay float32
        self.kernel, self.threshold = kernel, threshold
        self.streamer: LayerStreamer | None = None
        self.host_kv: HostKV | CpuAttention | None = None
        self.piecewise: PiecewiseDecode | None = None
        self.piecewise_graphs = cuda_graphs and kernel != "bnb"
        self.kv_placement = "device"
        self.num_device_kv_layers = 0  # CPU attention: layers whose KV stays on the device after all
        self.max_prefill_tokens = max_model_len

    @property
    def fixed_bytes(self) -> int:
        """lm_head and the final norm: always on the device (the embedding table stays on the host)."""
        mods = (self.parts.norm, self.parts.lm_head)
        return sum(t.numel() * t.element_size() for m in mods for t in (*m.parameters(), *m.buffers()))

    def host_layer_bytes(self) -> int:
        specs = _layer_specs(self.parts.layers[0])
        return sum(s.shape[0] * s.shape[1] + 4 * s.shape[0] for s in specs)

    def cpu_attention_kernel(self) -> Kernel:
        """host_attention's kernel for this model's attention shape and the host KV dtype, compiled once."""
        if self._cpu_kernel is None:
            p = self.parts
            self._cpu_kernel = Kernel.build(self.host_kv_dtype, num_kv_heads=p.num_kv_heads,
                                            group=p.num_heads // p.num_kv_heads, head_dim=p.head_dim)
        return self._cpu_kernel

    def configure(self, plan: StreamPlan, max_prefill_tokens: int) -> None:
        self.streamer = LayerStreamer(self.parts.layers, device=self.device, dtype=self.dtype,
                                      num_resident=plan.num_resident,
                                      kernel=self.kernel, threshold=self.threshold,
                                      kv_streamed=plan.kv_placement == "host",
                                      num_slots=stage_slots(plan.kv_placement))
        self.parts.layer_executor = self.streamer
        self.kv_placement = plan.kv_placement
        self.num_device_kv_layers = plan.num_device_kv_layers
        if plan.kv_placement == "host":  # decode reads a strided device view of the streamed KV
            self.attention = "sdpa"
        self.max_prefill_tokens = max(max_prefill_tokens, self.max_model_len)  # the first prompt is always admitted
        self.prefill_group_tokens = STREAMING_PREFILL_GROUP_TOKENS

    def allocate_kv(self, max_rows: int) -> None:
        self.host_kv = self.piecewise = None
        if self.streamer is not None:
            self.streamer.kv = None
        if self.kv_placement == "device" or max_rows == 0:
            return super().allocate_kv(max_rows)
        p = self.parts
        self.k_cache = self.v_cache = torch.empty(0)
        shape = dict(num_layers=p.num_layers, max_rows=max_rows, num_kv_heads=p.num_kv_heads,
                     max_model_len=self.max_model_len, head_dim=p.head_dim, max_tokens=self.max_prefill_tokens,
                     dtype=self.dtype, device=self.device)
        if self.kv_placement == "cpu":
            on_device = device_kv_layers(p.num_layers, self.streamer.resident, self.num_device_kv_layers)
            self.host_kv = CpuAttention(num_heads=p.num_heads, scaling=p.scaling, kv_dtype=self.host_kv_dtype,
                                        kernel=self.cpu_attention_kernel(), device_layers=on_device,
                                        device_attention=self.attention, **shape)
            self.piecewise = PiecewiseDecode(p, self.streamer.layers, self.host_kv, max_rows=max_rows,
                                             device=self.device, dtype=self.dtype, graphs=self.piecewise_graphs)
        else:
            self.host_kv = HostKV(**shape)
            self.streamer.kv = self.host_kv
        self.k_cache, self.v_cache = self.host_kv.k, self.host_kv.v
        self.max_rows = max_rows

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        if self.host_kv is None:
            return super().prefill(rows, prompts)
        token_rows = [r for r, p in zip(rows, prompts, strict=True) for _ in p]
        positions = [i for p in prompts for i in range(len(p))]
        return self._with_host_kv(token_rows, positions, False, lambda: super(StreamingRunner, self).prefill(rows, prompts))

    def capture_graphs(self) -> float:
        return 0.0 if self.piecewise is None else self.piecewise.capture_all()

    def prompt_store(self, rows: list[int], prompts: list[list[int]], positions: torch.Tensor) -> KVStore:
        if self.host_kv is None:
            return super().prompt_store(rows, prompts, positions)
        return self.host_kv.store_prompt

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        if self.host_kv is None:
            return super().decode(tokens, positions)
        forward = self._decode_cpu_attention if self.kv_placement == "cpu" else self.decode_eager
        return self._with_host_kv(list(range(len(tokens))), positions, True, lambda: forward(tokens, positions))

    def _decode_cpu_attention(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.piecewise.run(tokens, positions, self.streamer.schedule(lag=1))
        self.host_kv.seconds["forward"] += time.perf_counter() - start
        return logits

    def _with_host_kv(self, rows: list[int], positions: list[int], decode: bool, forward) -> torch.Tensor:
        try:
            self.host_kv.begin(rows, positions, decode=decode)
            logits = forward()
            self.host_kv.end_step()
            return logits
        finally:
            self.host_kv.reset()


def host_kv_dtype(cfg: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The CPU-attention cache's dtype: cfg.host_kv_dtype, "auto" being the compute dtype (exact)."""
    return dtype if cfg.host_kv_dtype == "auto" else getattr(torch, cfg.host_kv_dtype)


def streaming_prefill_tokens(config, dtype_bytes: int, host_bytes: int | None) -> int:
    """Tokens a small-VRAM prefill admits: STREAMING_MAX_PREFILL_TOKENS, fewer where their pinned K/V staging
    would take more than 1/8 of the host's free memory (a 6 GB card's host may have 32 GB, most of it
    holding the pinned weights); never fewer than one group."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * dtype_bytes
    if host_bytes is None:
        return STREAMING_MAX_PREFILL_TOKENS
    return max(STREAMING_PREFILL_GROUP_TOKENS, min(STREAMING_MAX_PREFILL_TOKENS, host_bytes // 8 // per_token))


class StreamingLLMEngine(LLMEngine):
    """LLMEngine over a StreamingRunner: the model is loaded in 8-bit on the host, the budget is a StreamPlan.

    kv_placement, num_resident and num_device_kv_layers override the planner's choice (tests, benchmarks).
    """

    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, tokenizer, *, device: torch.device,
                 dtype: torch.dtype, weights_bytes: int, kv_placement: str = "auto", num_resident: int | None = None,
                 num_device_kv_layers: int | None = None, cpu_kernel: Kernel | None = None):
        self.kv_placement, self.num_resident, self._cpu_kernel = kv_placement, num_resident, cpu_kernel
        self.num_device_kv_layers = num_device_kv_layers
        self.cpu_attention_cost: float | None = None  # measured at start-up for the planner (CUDA, "auto")
        self.plan: StreamPlan | None = None
        self.overhead_at_plan: int | None = None  # CUDA: device memory outside the allocator when planning
        if cfg.max_prefill_tokens is None:
            cfg = dataclasses.replace(cfg, max_prefill_tokens=streaming_prefill_tokens(
                model.config, torch.empty(0, dtype=dtype).element_size(), _available_ram_bytes()))
        super().__init__(cfg, model, tokenizer, device=device, dtype=dtype, weights_bytes=weights_bytes)

    @classmethod
    def from_config(cls, cfg: EngineConfig, **kwargs) -> "StreamingLLMEngine":
        if not cfg.load_in_8bit:
            raise ValueError("small-VRAM mode streams int8 weights: load_in_8bit must be on")
        from transformers import AutoConfig

        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.compute_dtype, device)
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)  # sm80+
        if cfg.compute_dtype is None and native_bf16:
            # the host CPU reads a bfloat16 KV cache faster than a float16 one (H100 host, 13B, 64 rows: 207 vs
            # 235 ms of attention a step), and the cache holds exactly what the GPU computed; older cards
            # (a 6 GB Turing) only emulate bfloat16 and keep float16
            dtype = torch.bfloat16
        placement = kwargs.get("kv_placement", "auto")
        # the CPU attention kernel is needed for "cpu", and for "auto" on CUDA (its start-up cost probe)
        needs_kernel = placement == "cpu" or (placement == "auto" and device.type == "cuda")
        with ThreadPoolExecutor(1) as pool:  # inductor's first build takes about as long as loading a 13B model
            kernel = None
            if needs_kernel and "cpu_kernel" not in kwargs:
                c = AutoConfig.from_pretrained(cfg.model)
                kernel = pool.submit(Kernel.build, host_kv_dtype(cfg, dtype), num_kv_heads=c.num_key_value_heads,
                                     group=c.num_attention_heads // c.num_key_value_heads, head_dim=head_dim_of(c))
            loaded = load_model(cfg.model, device=torch.device("cpu"), dtype=dtype, load_in_8bit=True,
                                int8_threshold=cfg.int8_threshold)
            if kernel is not None:
                kwargs["cpu_kernel"] = kernel.result()
        return cls(cfg, loaded.model, loaded.tokenizer, device=device, dtype=dtype,
                   weights_bytes=loaded.weights_bytes, **kwargs)

    def _make_runner(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> ModelRunner:
        if self.cfg.inject_oom:
            log.warning("BATCHGEN_INJECT_OOM is ignored in small-VRAM mode")
        kernel = resolve_int8_kernel(self.cfg.int8_kernel, device)
        if kernel != "bnb" and device.type == "cuda":
            KERNELS.compile()
        return StreamingRunner(model, device=device, dtype=dtype, max_model_len=self.max_model_len,
                               attention=self.attention, kernel=kernel, threshold=self.cfg.int8_threshold,
                               host_kv_dtype=host_kv_dtype(self.cfg, dtype), cpu_kernel=self._cpu_kernel,
                               cuda_graphs=self.cfg.cuda_graphs)

    def _plan_budget(self, weights_bytes: int, max_prefill_tokens: int) -> budget_math.Budget:
        cfg, c, runner = self.cfg, self.model.config, self.runner
        parts, dtype_bytes = runner.parts, runner.kv_dtype_bytes
        act_per_row = budget_math.estimate_decode_activation_bytes(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
            num_heads=parts.num_heads, max_model_len=self.max_model_len, dtype_bytes=dtype_bytes,
            head_dim=parts.head_dim)
        attention_per_row = budget_math.estimate_decode_attention_bytes(  # its share of act_per_row
            num_heads=parts.num_heads, head_dim=parts.head_dim, max_model_len=self.max_model_len,
            dtype_bytes=dtype_bytes)
        # each layer runs over groups of whole prompts of at most this many tokens, or one longer prompt
        group = min(max_prefill_tokens, max(STREAMING_PREFILL_GROUP_TOKENS, self.max_model_len))
        residual = 2 * max_prefill_tokens * c.hidden_size * dtype_bytes  # the whole batch's residual stream
        prefill_bytes, masked_prefill_bytes = (residual + budget_math.estimate_prefill_bytes(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=parts.num_heads,
            num_tokens=group, dtype_bytes=dtype_bytes, scores=scores) for scores in (runner.attention != "flash", True))
        if self.device.type == "cuda":
            _, free = runner.memory_info()
            self.overhead_at_plan = process_overhead_bytes(self.device)
            fixed = torch.cuda.memory_allocated(self.device) + self.overhead_at_plan + LATE_OVERHEAD_BYTES
        else:
            free, fixed = _available_ram_bytes(), runner.fixed_bytes
        total = budget_math.budget_bytes(free_bytes=free, reserve_bytes=cfg.vram_reserve_bytes,
                                         max_bytes=cfg.max_vram_bytes, weights_bytes=fixed)
        host = _available_ram_bytes()
        cost = None
        if self.device.type == "cuda" and self.kv_placement == "auto":
            cost = measure_cpu_attention_cost(
                self.device, runner.cpu_attention_kernel(), runner.host_kv_dtype, num_kv_heads=parts.num_kv_heads,
                group=parts.num_heads // parts.num_kv_heads, head_dim=parts.head_dim)
            log.info("CPU attention costs %.2f streamed bytes per host KV byte", cost)
        self.cpu_attention_cost = cost
        kv_elements = 2 * parts.num_kv_heads * parts.head_dim  # K and V of one token in one layer
        plan = plan_streaming(
            budget_bytes=total, layer_bytes=runner.host_layer_bytes(), num_layers=parts.num_layers,
            kv_bytes_per_token_layer=kv_elements * dtype_bytes,
            max_model_len=self.max_model_len, activation_bytes_per_row=act_per_row, prefill_bytes=prefill_bytes,
            masked_prefill_bytes=masked_prefill_bytes,
            max_rows=cfg.max_batch_size or budget_math.MAX_ROWS_CEILING,
            host_bytes=None if host is None else host // 2, kv_placement=self.kv_placement,
            num_resident=self.num_resident, num_device_kv_layers=self.num_device_kv_layers,
            cpu_kv_bytes_per_token_layer=cache_bytes(runner.host_kv_dtype, parts.num_kv_heads, parts.head_dim),
            cpu_attention_cost=cost, attention_bytes_per_row=attention_per_row)
        kv_per_token = budget_math.kv_bytes_per_token(parts.num_layers, parts.num_kv_heads, parts.head_dim,
                                                      dtype_bytes)
        if plan is not None:
            self.plan = plan
            runner.configure(plan, max_prefill_tokens)
            self.attention = runner.attention
            log.info("small-VRAM plan: %s", plan)
        if plan is not None:
            prefill_bytes = prefill_peak(plan.kv_placement, prefill_bytes, masked_prefill_bytes)
        return budget_math.Budget(total, kv_per_token, kv_per_token * self.max_model_len, act_per_row,
                                  prefill_bytes, 0 if plan is None else plan.max_rows)

    def reset_offload_stats(self) -> None:
        """Zeroes the cumulative host-attention and copy timings (a benchmark's warm-up apart from its timed run)."""
        host_kv = getattr(self.runner, "host_kv", None)
        if host_kv is not None:
            host_kv.seconds = dict.fromkeys(host_kv.seconds, 0.0)
            if hasattr(host_kv, "wait_by_layer"):
                host_kv.wait_by_layer = [0.0] * len(host_kv.wait_by_layer)
        streams = getattr(getattr(self.runner, "streamer", None), "streams", None)
        if streams is not None:
            streams.reset_timing()

    def stats(self):
        s = super().stats()
        if self.plan is not None:
            host_kv = getattr(self.runner, "host_kv", None)
            for key, seconds in getattr(host_kv, "seconds", {}).items():
                s.extra[f"offload_cpu_attention_{key}_s"] = round(seconds, 3)
            if hasattr(host_kv, "wait_by_layer"):  # CPU attention: which layers the host waited for
                s.extra["offload_cpu_attention_wait_s_by_layer"] = [round(w, 3) for w in host_kv.wait_by_layer]
            if self.overhead_at_plan is not None:  # and now: what LATE_OVERHEAD_BYTES stands for, measured
                s.extra["offload_overhead_at_plan_gib"] = round(self.overhead_at_plan / 2**30, 3)
                s.extra["offload_overhead_now_gib"] = round(process_overhead_bytes(self.device) / 2**30, 3)
            if self.cpu_attention_cost is not None:  # measured (CUDA, auto placement)
                s.extra["offload_cpu_attention_cost"] = round(self.cpu_attention_cost, 3)
            streams = getattr(self.runner.streamer, "streams", None)
            if streams is not None and streams.cuda:  # the weight stream's copies, timed on the GPU
                streams.harvest()
                s.extra.update(offload_copy_busy_s=round(streams.busy_s, 3),
                               offload_copy_bytes=streams.copied_bytes,
                               offload_copy_gb_s_while_busy=round(streams.copied_bytes / 1e9 / max(streams.busy_s, 1e-9), 1),
                               offload_copy_gap_s=round(sum(streams.gap_by_layer.values()), 3),
                               offload_copy_gap_s_by_layer={str(i): round(g, 3) for i, g in sorted(streams.gap_by_layer.items())})
            kernel = getattr(self.runner, "_cpu_kernel", None)  # the one the host attention runs
            if kernel is not None:
                s.extra["offload_cpu_attention_native"] = int(kernel.native)
            piecewise = getattr(self.runner, "piecewise", None)
            if piecewise is not None:  # each graph holds some device memory outside the allocator
                s.extra.update(offload_piecewise_graphs=int(piecewise.use_graphs),
                               offload_piecewise_graph_count=len(piecewise.graphs))
            s.extra.update(offload_kv_on_host=int(self.plan.kv_on_host),
                           offload_cpu_attention=int(self.plan.kv_placement == "cpu"),
                           offload_resident_layers=self.plan.num_resident,
                           offload_device_kv_layers=self.plan.num_device_kv_layers,
                           offload_streamed_bytes_per_step=self.plan.streamed_bytes_per_step)
        return s
