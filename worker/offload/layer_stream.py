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
from batchgen.worker.offload.plan import resident_layers

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
    """Where one linear's weights sit in its layer's flat byte buffer: int8 (CB at offset, its float32 row scales
    at scb_offset), or dense, kept in the compute dtype by --fp16-modules (the weight at offset, scb_offset None)."""

    name: str
    shape: tuple[int, int]
    offset: int
    scb_offset: int | None = None

    @property
    def int8(self) -> bool:
        return self.scb_offset is not None


# Each run of a layer's flat buffer (a group's CBs, their scales, a dense weight) starts on this many bytes, so a
# view in any dtype is aligned as an allocation's would be for its kernels.
ALIGN = 16


def _align(at: int) -> int:
    return -(-at // ALIGN) * ALIGN


def _int8_of(linear: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(CB, SCB) of a loaded Linear8bitLt, before or after its first forward; None for a dense nn.Linear (one
    --fp16-modules kept in the compute dtype). An Int8Linear (Int8Runtime.convert's, rotated where asked) gives its own."""
    if isinstance(linear, Int8Linear):
        return linear.cb, linear.scb
    try:
        state = Int8State.from_bnb(linear)
    except (ValueError, AttributeError) as exc:
        if type(linear) is torch.nn.Linear and linear.weight.is_floating_point():
            return None
        raise ValueError(f"small-VRAM mode streams bnb int8 or dense weights; {type(linear).__name__} has neither"
                         ) from exc
    return state.cb, state.scb


def _repoint(linear: torch.nn.Module, spec: _LinearSpec, weights: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """The HF module keeps working on the host copy, so its memory is not held twice."""
    if not spec.int8:
        linear.weight.data = weights[spec.name][0]
        return
    cb, scb = weights[spec.name]
    if isinstance(linear, Int8Linear):
        linear.cb, linear.scb = cb, scb
        return
    linear.weight.data = cb
    if getattr(linear.weight, "CB", None) is not None:
        linear.weight.CB = cb
    if getattr(linear.weight, "SCB", None) is not None:
        linear.weight.SCB = scb
    if linear.state.CB is not None:
        linear.state.CB = cb
    if linear.state.SCB is not None:
        linear.state.SCB = scb


def _layer_specs(layer: torch.nn.Module, dtype: torch.dtype) -> tuple[list[_LinearSpec], int]:
    """A layer's flat layout and its size in bytes. Group by group (FUSED: q/k/v lead, so a copy can put them in
    first): an all-int8 group's CBs, then their scales, each run adjacent (the group is one [sum(out), in]
    matrix); in a group with a dense member each linear on its own. Dense weights take the compute dtype."""
    specs, at = [], 0
    for group in FUSED:
        int8 = {name: _int8_of(layer.get_submodule(name)) for name in group}
        shapes = {name: tuple(layer.get_submodule(name).weight.shape) for name in group}
        if all(v is not None for v in int8.values()):
            cb_at = _align(at)
            scb_at = _align(cb_at + sum(r * c for r, c in shapes.values()))
            for name in group:
                rows, cols = shapes[name]
                specs.append(_LinearSpec(name, (rows, cols), cb_at, scb_at))
                cb_at, scb_at = cb_at + rows * cols, scb_at + 4 * rows
            at = scb_at
            continue
        for name in group:
            rows, cols = shapes[name]
            if int8[name] is None:
                specs.append(_LinearSpec(name, (rows, cols), _align(at)))
                at = _align(at) + rows * cols * dtype.itemsize
            else:
                scb_at = _align(_align(at) + rows * cols)
                specs.append(_LinearSpec(name, (rows, cols), _align(at), scb_at))
                at = scb_at + 4 * rows
    return specs, at


def layer_bytes(layer: torch.nn.Module, dtype: torch.dtype) -> int:
    """A decoder layer's weights as streamed: int8 weights with float32 row scales, dense ones (--fp16-modules) in
    the compute dtype; what its pinned host copy holds and what a stage slot holding it needs."""
    return _layer_specs(layer, dtype)[1]


def outlier_bytes(layer: torch.nn.Module, dtype: torch.dtype, slots: int) -> int:
    """Device bytes the outlier kernel keeps for a layer beside its weights, which do not stream: per input (a fused
    group, or an int8 linear of a group with a dense member) `slots` dense rows of its outputs in the compute dtype
    and their column indices, its keep mask (fp16) and the guard's two float32 counters."""
    specs, _ = _layer_specs(layer, dtype)
    by_name, total = {s.name: s for s in specs}, 0
    for group in FUSED:
        members = [by_name[n] for n in group]
        inputs = [members] if all(s.int8 for s in members) else [[s] for s in members if s.int8]
        for owner in inputs:
            out, width = sum(s.shape[0] for s in owner), owner[0].shape[1]
            total += slots * (out * dtype.itemsize + 8) + width * (2 + 4 + 4)
    return total


def _views(specs: list[_LinearSpec], flat: torch.Tensor, dtype: torch.dtype,
           groups: tuple[tuple[str, ...], ...]) -> dict[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """Views of a layer's flat byte buffer: (CB, SCB) of an int8 linear or of a fused all-int8 group (its rows are
    adjacent, so a group is one [sum(out), in] matrix), (weight,) of a dense linear. A group with a dense member
    is viewed linear by linear."""
    by_name = {s.name: s for s in specs}
    out = {}
    for group in groups:
        members = [by_name[n] for n in group]
        if all(s.int8 for s in members):
            out[group] = _int8_view(members, flat)
            continue
        for s in members:
            out[(s.name,)] = _int8_view([s], flat) if s.int8 else (_dense_view(s, flat, dtype),)
    return out


def _int8_view(members: list[_LinearSpec], flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB [sum(out), in], SCB [sum(out)]) of int8 linears laid out adjacent, the first leading."""
    first, rows = members[0], sum(s.shape[0] for s in members)
    cb = flat[first.offset: first.offset + rows * first.shape[1]].view(rows, first.shape[1])
    return cb, flat[first.scb_offset: first.scb_offset + 4 * rows].view(torch.float32)


def _dense_view(spec: _LinearSpec, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    nbytes = spec.shape[0] * spec.shape[1] * dtype.itemsize
    return flat[spec.offset: spec.offset + nbytes].view(dtype).view(spec.shape)


SINGLE = tuple((n,) for n in LINEARS)
FUSED = (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:])


class DenseLinear:
    """A linear --fp16-modules keeps in the compute dtype, over a view of its layer's buffer: nn.Linear's math."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class _DeviceLayer:
    """Duck-types an HF decoder layer for llama.forward_layers, over a layer's flat buffer on the device, with
    the same int8 kernels as the resident engine (int8_linear's fused q/k/v and gate/up, or bnb); dense linears
    (--fp16-modules) run as nn.Linear does, and a group with one runs linear by linear. host_flat: a streamed
    layer's pinned copy, where the outlier kernel reads the weight rows of the columns it adds (the stage slot
    holds another layer most of the time)."""

    def __init__(self, hf_layer: torch.nn.Module, specs: list[_LinearSpec], flat: torch.Tensor,
                 *, device: torch.device, dtype: torch.dtype, kernel: str, threshold: float,
                 host_flat: torch.Tensor | None = None):
        self.input_layernorm = copy.deepcopy(hf_layer.input_layernorm).to(device, dtype)
        self.post_attention_layernorm = copy.deepcopy(hf_layer.post_attention_layernorm).to(device, dtype)
        self._act = hf_layer.mlp.act_fn
        fused = kernel != "bnb"
        by_name = {s.name: s for s in specs}
        groups = FUSED if fused else SINGLE
        host = None if host_flat is None else _views(specs, host_flat, dtype, groups)
        mods = {}
        self.owners: list[Int8Linear] = []  # the Int8Linears, one per input: what the outlier kernel calibrates
        for group, views in _views(specs, flat, dtype, groups).items():
            members = [by_name[n] for n in group]
            biases = [hf_layer.get_submodule(n).bias for n in group]
            if not members[0].int8:
                bias = None if biases[0] is None else biases[0].detach().to(device, dtype)
                mods[group[0]] = DenseLinear(views[0], bias)
                continue
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b.detach().float() if b is not None else torch.zeros(s.shape[0])
                                  for b, s in zip(biases, members, strict=True)])
                bias = bias.to(device)
            state = Int8State(*views, bias)
            if not fused:
                mods[group[0]] = BnbInt8Linear(state, threshold)
                continue
            linear = (FusedInt8Linear(state, [s.shape[0] for s in members], kernel) if len(group) > 1
                      else Int8Linear(state, kernel))
            # members share an input, so a rotated one (Int8Runtime.convert's --int8-rotate) is rotated alone
            linear.rotate_block = getattr(hf_layer.get_submodule(group[0]), "rotate_block", 0)
            linear.dtype, linear.host_weights = dtype, None if host is None else host[group]
            mods[group if len(group) > 1 else group[0]] = linear
            self.owners.append(linear)
        attn = {n.split(".")[1]: mods[n] for n in LINEARS[:4] if n in mods}
        if FUSED[0] in mods:
            attn["qkv_proj"] = mods[FUSED[0]]
        self.self_attn = SimpleNamespace(**attn)
        self._gate_up = mods.get(FUSED[2])
        self._gate, self._up = mods.get(LINEARS[4]), mods.get(LINEARS[5])
        self._down = mods[LINEARS[6]]

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
    A layer streams at its own size (one with --fp16-modules linears weighs more); the slots hold the largest.
    num_slots: how many stage buffers the streamed layers take turns in (plan.STAGE_SLOTS).
    """

    def __init__(self, hf_layers: list[torch.nn.Module], *, device: torch.device, dtype: torch.dtype,
                 num_resident: int, kernel: str, threshold: float, num_slots: int = 2):
        self.num_layers = len(hf_layers)
        layouts = [_layer_specs(layer, dtype) for layer in hf_layers]
        self.specs = [specs for specs, _ in layouts]
        self.layer_bytes = [nbytes for _, nbytes in layouts]
        # q/k/v lead a layer's flat buffer (FUSED's order): copied first, they let its first piece start
        self.head_bytes = [min(s.offset for s in specs if s.name == LINEARS[3]) for specs in self.specs]
        self.resident = resident_layers(self.num_layers, num_resident)
        streamed = [i for i in range(self.num_layers) if i not in self.resident]
        num_slots = max(1, min(num_slots, len(streamed)))  # no slot without a layer to hold
        self.streams = _Streams(device, num_slots)
        self.slot_of = {i: k % num_slots for k, i in enumerate(streamed)}
        self.next_in_slot = _next_in_slot(streamed, self.slot_of)
        self.first_in_slot = [next(i for i in streamed if self.slot_of[i] == slot)
                              for slot in sorted(set(self.slot_of.values()))]
        self._pending: set[int] = set()  # streamed layers the previous forward already prefetched
        self.slot_bytes = max((self.layer_bytes[i] for i in streamed), default=0)
        self.stages = [torch.empty(self.slot_bytes, dtype=torch.int8, device=device)
                       for _ in range(num_slots if streamed else 0)]
        pin = device.type == "cuda"
        self.host: list[torch.Tensor | None] = []
        self.layers: list[_DeviceLayer] = []
        for i, hf_layer in enumerate(hf_layers):
            flat = torch.empty(self.layer_bytes[i], dtype=torch.int8, pin_memory=pin)
            views = _views(self.specs[i], flat, dtype, SINGLE)
            for spec in self.specs[i]:
                linear, dst = hf_layer.get_submodule(spec.name), views[(spec.name,)]
                for d, src in zip(dst, _int8_of(linear) or (linear.weight.detach(),), strict=True):
                    d.copy_(src)
                _repoint(linear, spec, {spec.name: dst})
            if i in self.resident:
                buffer = flat.to(device)
                self.host.append(None)
            else:
                buffer = self.stages[self.slot_of[i]]
                self.host.append(flat)
            self.layers.append(_DeviceLayer(hf_layer, self.specs[i], buffer, device=device, dtype=dtype,
                                            kernel=kernel, threshold=threshold, host_flat=self.host[i]))

    def owners(self) -> list[Int8Linear]:
        """Every layer's int8 linears, one per input, in layer order (none for the bnb kernel)."""
        return [linear for layer in self.layers for linear in layer.owners]

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
            head, stage = self.head_bytes[i], self.stages[slot]
            for a, b in _chunks(0, head):
                stage[a:b].copy_(host[a:b], non_blocking=True)
            self.streams.record_copied(slot, head=True)
            for a, b in _chunks(head, host.numel()):
                stage[a:b].copy_(host[a:b], non_blocking=True)
            self.streams.record_copied(slot)
            self.streams.end_timing(i, start, host.numel())


# A layer's weights cross in copies of at most this many bytes: the step's small host→device copies (the host's
# attention output, in the pieces' CUDA graphs) may queue on the same copy engine behind a weight copy, and wait
# for a chunk rather than a whole layer's MLP (benchmarks/small_vram.py lever ".../0": within noise, costs nothing).
COPY_CHUNK_BYTES = 32 * 2**20


def _chunks(start: int, end: int, size: int | None = None) -> list[tuple[int, int]]:
    """[start, end) in consecutive (a, b) ranges of at most size elements (int8: bytes; COPY_CHUNK_BYTES)."""
    size = size or COPY_CHUNK_BYTES
    return [(a, min(a + size, end)) for a in range(start, end, size)]


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
