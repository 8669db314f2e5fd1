"""The weight stream of small-VRAM mode: decoder layers whose int8 weights live in pinned host memory and are
copied, layer by layer, into a ring of device stage slots on a side CUDA stream, overlapping the compute.

LayerStreamer owns the layers (resident ones copied to the device once, streamed ones pointing at a stage slot)
and the schedule that orders copies and compute with CUDA events (_Streams). On CPU the same code copies
between two host buffers and the events are no-ops, which is how the tests run it. build.py makes it from the
plan; the forward gets its layers through it (LlamaParts.layer_executor).
"""

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from batchgen.worker.engine.int8_linear import FusedInt8Linear, Int8Linear, Int8State

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class _Streams:
    """A side copy stream and per-slot events on CUDA; no-ops elsewhere (copies are synchronous there).
    head_copied: the slot's q/k/v weights and scales are in (all its first piece reads); copied: the whole layer.
    Copies are timed on the GPU (busy_s, copied_bytes, gap_by_layer: idle time before each layer's copy), which
    tells a slow bus from an idle one and where in a step it idles."""

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
        return torch.cuda.stream(self.copy) if self.cuda else contextlib.nullcontext()

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
        """Forgets every copy queued so far, timed or not yet, so the next ones are counted on their own."""
        self.timed.clear()
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


def int8_layer_bytes(layer: torch.nn.Module) -> int:
    """A decoder layer's int8 weights and float32 row scales: what its pinned host copy and a stage slot hold."""
    return sum(s.shape[0] * s.shape[1] + 4 * s.shape[0] for s in _layer_specs(layer))


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
    """Duck-types an HF decoder layer for llama.forward_layers, over int8 buffers on the device,
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
    layer has finished computing, so the copy of the next layer overlaps the compute of this one. Resident
    layers are spread evenly between the streamed ones and the slots alternate over the streamed layers,
    cyclically, so the bus never idles: during a resident layer the next streamed one is already copying, and
    the last layers of a forward prefetch the first of the next (weights do not change between steps).
    num_slots: how many stage buffers the streamed layers take turns in (plan.STAGE_SLOTS).
    """

    def __init__(self, hf_layers: list[torch.nn.Module], *, device: torch.device, dtype: torch.dtype,
                 num_resident: int, kernel: str, threshold: float, num_slots: int = 2):
        self.num_layers = len(hf_layers)
        self.specs = _layer_specs(hf_layers[0])
        pin = device.type == "cuda"
        self.host: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.layers: list[_DeviceLayer] = []
        num_cb = sum(s.shape[0] * s.shape[1] for s in self.specs)
        num_scb = sum(s.shape[0] for s in self.specs)
        scb_dtype = _int8_of(hf_layers[0].get_submodule(LINEARS[0]))[1].dtype
        self.layer_bytes = num_cb + num_scb * torch.empty(0, dtype=scb_dtype).element_size()
        # q/k/v lead a layer's flat buffer (LINEARS' order): copied first, they let its first piece start
        self.head_cb = sum(s.shape[0] * s.shape[1] for s in self.specs[:3])
        self.resident = resident_layers(self.num_layers, num_resident)
        streamed = [i for i in range(self.num_layers) if i not in self.resident]
        num_slots = max(1, min(num_slots, len(streamed)))  # no slot without a layer to hold
        self.streams = _Streams(device, num_slots)
        self.slot_of = {i: k % num_slots for k, i in enumerate(streamed)}
        self.next_in_slot = _next_in_slot(streamed, self.slot_of)
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
        released and the slot's next layer starts copying. lag=1 (piecewise): yield i runs the rest of layer
        i − 1 and layer i up to its attention, so it waits for all of layer i − 1 but only layer i's q/k/v,
        which are copied first: the piece starts a quarter of a copy sooner."""
        s = self.streams
        pending, self._pending, prefetched = self._pending, set(), set()
        s.harvest()
        s.start_iteration(keep_events=bool(pending))
        complete = False
        try:
            for i in self.first_in_slot:
                if i not in pending:
                    self._prefetch(i)
            for i in range(self.num_layers + lag):
                if lag == 1 and i > 0 and self.host[i - 1] is not None:
                    s.compute_waits_for_copy(self.slot_of[i - 1])
                if i < self.num_layers and self.host[i] is not None:
                    s.compute_waits_for_copy(self.slot_of[i], head=lag == 1)
                yield i
                done = i - lag
                if done < 0 or self.host[done] is None:
                    continue
                s.record_done(self.slot_of[done])
                nxt = self.next_in_slot[done]
                self._prefetch(nxt)
                if nxt <= done:  # wrapped around: the next forward's first layer in this slot
                    prefetched.add(nxt)
            complete = True
        finally:
            self._pending = prefetched if complete else set()  # after an aborted pass, start afresh

    def stats(self) -> dict[str, float | int | dict[str, float]]:
        """The weight copies, timed on the GPU (none elsewhere)."""
        s = self.streams
        if not s.cuda:
            return {}
        s.harvest()
        return {"offload_copy_busy_s": round(s.busy_s, 3), "offload_copy_bytes": s.copied_bytes,
                "offload_copy_gb_s_while_busy": round(s.copied_bytes / 1e9 / max(s.busy_s, 1e-9), 1),
                "offload_copy_gap_s": round(sum(s.gap_by_layer.values()), 3),
                "offload_copy_gap_s_by_layer": {str(i): round(g, 3) for i, g in sorted(s.gap_by_layer.items())}}

    def reset_timing(self) -> None:
        self.streams.reset_timing()

    def _prefetch(self, i: int) -> None:
        host, slot = self.host[i], self.slot_of[i]
        with self.streams.copying():
            self.streams.copy_waits_for_compute(slot)
            start = self.streams.start_timing()
            head, stage = self.head_cb, self.stages[slot][0]
            self.stages[slot][1].copy_(host[1], non_blocking=True)
            for a, b in _chunks(0, head):
                stage[a:b].copy_(host[0][a:b], non_blocking=True)
            self.streams.record_copied(slot, head=True)
            for a, b in _chunks(head, stage.numel()):
                stage[a:b].copy_(host[0][a:b], non_blocking=True)
            self.streams.record_copied(slot)
            self.streams.end_timing(i, start, self.layer_bytes)


# A layer's weights cross in copies of at most this many bytes: the step's small host→device copies (the host's
# attention output, in the pieces' CUDA graphs) may queue on the same copy engine behind a weight copy, and wait
# for a chunk rather than a whole layer's MLP (benchmarks/small_vram.py lever ".../0": within noise, costs nothing).
COPY_CHUNK_BYTES = 32 * 2**20


def _chunks(start: int, end: int, size: int | None = None) -> list[tuple[int, int]]:
    """[start, end) in consecutive (a, b) ranges of at most size elements (int8: bytes; COPY_CHUNK_BYTES)."""
    size = size or COPY_CHUNK_BYTES
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def resident_layers(num_layers: int, num_resident: int) -> set[int]:
    """Which layers stay on the device: evenly spread, so streamed copies keep running through them."""
    if num_resident >= num_layers:
        return set(range(num_resident))
    return {(2 * k + 1) * num_layers // (2 * num_resident) for k in range(num_resident)}


def device_kv_layers(num_layers: int, resident: set[int], count: int) -> tuple[int, ...]:
    """Which layers keep their KV on the device: spread over the streamed ones, whose weight copy then runs
    while the host attends the layers around them (resident ones only when more are asked for)."""
    streamed = [i for i in range(num_layers) if i not in resident]
    if count <= len(streamed):
        return tuple(streamed[(2 * k + 1) * len(streamed) // (2 * count)] for k in range(count))
    return tuple(sorted(streamed + sorted(resident)[: count - len(streamed)]))


def _next_in_slot(streamed: list[int], slot_of: dict[int, int]) -> dict[int, int]:
    """For each streamed layer, the next streamed layer using its slot (wrapping to the next forward)."""
    out: dict[int, int] = {}
    for slot in set(slot_of.values()):
        users = [i for i in streamed if slot_of[i] == slot]
        for k, i in enumerate(users):
            out[i] = users[(k + 1) % len(users)]
    return out
