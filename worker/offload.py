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
no-ops; that is how the tests run it.
"""

import copy
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from batchgen.worker import budget as budget_math
from batchgen.worker.host_attention import Kernel, cache_bytes, length_bias, quantize, sample_inputs
from batchgen.worker.int8_linear import KERNELS, FusedInt8Linear, Int8Linear, Int8State
from batchgen.worker.llm_engine import EngineConfig, LLMEngine, _available_ram_bytes, resolve_int8_kernel
from batchgen.worker.model_loader import load_model, resolve_device, resolve_dtype
from batchgen.worker.model_runner import KVStore, ModelRunner, cache_store, head_dim_of
from batchgen.worker.piecewise import PiecewiseDecode, split_slots

log = logging.getLogger(__name__)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# A decode step's compute per weight byte, in "streamed byte" units: HBM is ~50x faster than PCIe,
# bitsandbytes' kernels are slower than that; used only to rank plans whose streamed bytes tie (e.g. 0).
COMPUTE_BYTES_RATIO = 0.05
KV_PLACEMENTS = ("auto", "device", "host", "cpu")
# The share of max_model_len a CPU-attention step reads per row: the kernel covers every row up to the step's
# longest one (continuous batching keeps one near the end); the streamed "host" KV is counted at 1/2.
CPU_ATTENTION_LENGTH = 0.75
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

# -- sizing: pure arithmetic, no torch devices ------------------------------------------------------

def int8_weights_bytes(config, dtype_bytes: int = 2) -> int:
    """What a Llama-family model weighs loaded in 8-bit: int8 linears + float32 row scales, embeddings,
    lm_head and norms in the compute dtype. From the HF config alone, before loading."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = head_dim_of(config)
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    out_features = q + 2 * kv + h + 2 * inter + h
    linear = h * (q + 2 * kv) + q * h + 3 * h * inter
    embeddings = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * (linear + 4 * out_features + 2 * h * dtype_bytes) + (embeddings + h) * dtype_bytes


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


@dataclass(frozen=True)
class StreamPlan:
    max_rows: int
    kv_placement: str  # "device"; "host": streamed to the GPU each step; "cpu": attended on the host CPU
    num_resident: int  # decoder layers that stay on the device (LayerStreamer decides which)
    streamed_bytes_per_step: int  # weights (+ host KV at half length) crossing the bus per decode step
    device_bytes: int  # stage buffers + resident layers + KV on the device + activations
    num_device_kv_layers: int = 0  # "cpu": layers whose KV stays on the device, attended there

    @property
    def kv_on_host(self) -> bool:
        return self.kv_placement != "device"

    @property
    def tokens_per_streamed_gb(self) -> float:
        return self.max_rows / max(1, self.streamed_bytes_per_step) * 1e9


# Device buffers the streamed layers' weights take turns in (LayerStreamer's num_slots). Piecewise decode
# holds a layer's weights through two pieces, so with two the next copy starts only after the piece after
# it; a third lets it start earlier but costs a resident layer, and on the H100 host (same lease) it was
# slower: 211 vs 236 tok/s, the host attention kernel 245 vs 207 ms a step, as the busier DMA took more of
# the host memory bandwidth the kernel reads the KV with (benchmarks/small_vram.py, 2026-11-25 10:39 UTC:
# three slots and 6 resident layers, against the lever "cpu/auto/auto/0/2": two slots, 7 resident).
STAGE_SLOTS = 2


def stage_slots(kv_placement: str) -> int:
    """Stage buffers a plan's streamed layers take turns in: a streamed KV cache goes through two (layer i
    in slot i % 2), weights alone through STAGE_SLOTS."""
    return 2 if kv_placement == "host" else STAGE_SLOTS


def plan_streaming(
    *,
    budget_bytes: int,
    layer_bytes: int,
    num_layers: int,
    kv_bytes_per_token_layer: int,
    max_model_len: int,
    activation_bytes_per_row: int,
    prefill_bytes: int,
    max_rows: int,
    host_bytes: int | None = None,
    kv_placement: str = "auto",
    num_resident: int | None = None,
    cpu_kv_bytes_per_token_layer: int | None = None,
    cpu_attention_cost: float | None = None,
    num_device_kv_layers: int | None = None,
    attention_bytes_per_row: int = 0,
) -> StreamPlan | None:
    """The plan with the most rows per streamed byte (throughput ≈ rows ÷ streamed bytes per step).

    budget_bytes is what the device may hold beyond embeddings/lm_head and the reserve. KV placements:
    "device" costs rows × full-length KV there; "host" keeps two per-layer KV stage buffers on the device
    and streams every row's KV each step (counted at half of max_model_len); "cpu" keeps nothing on the
    device and reads the host KV (cpu_kv_bytes_per_token_layer, its own dtype) on the CPU, in parallel with the
    weight copies: cpu_attention_cost (measured: PCIe bytes/s ÷ CPU attention bytes/s) converts those
    reads into streamed-byte time, and the step costs the larger of the two. Without a cost "cpu" is only
    taken when asked for. "cpu" keeps some layers' KV on the device (num_device_kv_layers, attended there)
    only where the host cannot hold every layer's K/V for the rows, or when asked: for speed it did not pay
    on the H100 hosts, where the kernel and the weight copies read the same host memory and a device-KV
    layer trades ~0.23 GB of KV reads a step for 0.32 GB more weights to copy (one H100 machine, 2026-11-25
    11:43 and 11:47 UTC: 0, 2, 4, 9 such layers 234.3, 225.3, 223.4, 217.4 tok/s). Whatever is left holds
    resident layers; STAGE_SLOTS stage buffers hold the streamed ones (two for a streamed KV). attention_bytes_per_row: the share of
    activation_bytes_per_row that only attention on the device takes, spared where the CPU attends every
    layer. None: not even one row fits.
    """
    if kv_placement not in KV_PLACEMENTS:
        raise ValueError(f"kv_placement must be one of {KV_PLACEMENTS}, got {kv_placement!r}")
    placements = {"auto": ("device", "host") + (("cpu",) if cpu_attention_cost else ()),
                  "device": ("device",), "host": ("host",), "cpu": ("cpu",)}[kv_placement]
    cpu_kv_token_layer = cpu_kv_bytes_per_token_layer or kv_bytes_per_token_layer
    kv_row_layer = kv_bytes_per_token_layer * max_model_len
    best, best_score = None, -1.0
    for placement in placements:
        host_row_layer = (cpu_kv_token_layer if placement == "cpu" else kv_bytes_per_token_layer) * max_model_len
        # "cpu": x layers may keep their KV on the device after all, attended there: each costs about a
        # resident layer's memory and spares the host a layer's attention and its host memory; the fewest that
        # let the rows fit the host are taken
        choices = [num_device_kv_layers] if num_device_kv_layers is not None else range(num_layers + 1)
        choices = choices if placement == "cpu" else (0,)
        host_limit = None if placement == "device" else host_bytes
        # "cpu": rows cost the device next to nothing (their KV is on the host), so a plan takes the most that
        # fit: a step that is a little faster for fewer rows loses a whole extra wave of steps on the last few
        # requests of a batch (measured: 60 rows and 10 device-KV layers, 120 tok/s for 64 requests, against
        # 226 with 64 rows and 2)
        most_first = placement == "cpu"
        for rows in range(max_rows, 0, -1) if most_first else range(1, max_rows + 1):
            if host_limit is not None and rows * host_row_layer * (num_layers - max(choices)) > host_limit:
                if most_first:
                    continue
                break
            feasible = False
            for x in choices:
                if host_limit is not None and rows * host_row_layer * (num_layers - x) > host_limit:
                    continue  # the host cache holds the other layers' K/V
                kv_device = {"device": rows * kv_row_layer * num_layers, "host": 2 * rows * kv_row_layer,
                             "cpu": rows * kv_row_layer * x}[placement]
                act_row = activation_bytes_per_row - (attention_bytes_per_row if placement == "cpu" and x == 0 else 0)
                left = budget_bytes - prefill_bytes - rows * act_row - kv_device
                slots = stage_slots(placement)
                resident = min(num_layers, max(0, left) // layer_bytes)  # every layer resident: no stage buffers
                if resident < num_layers:
                    resident = (left - slots * layer_bytes) // layer_bytes
                if left < 0 or resident < 0 or (num_resident is not None and num_resident > resident):
                    continue
                resident, feasible = resident if num_resident is None else num_resident, True
                stages = 0 if resident == num_layers else slots * layer_bytes
                streamed = (num_layers - resident) * layer_bytes
                if placement == "host":
                    streamed += rows * kv_bytes_per_token_layer * num_layers * max_model_len // 2
                step = streamed  # "cpu": the CPU reads the host KV while the weights stream; the slower one counts
                if placement == "cpu":  # the kernel reads every row up to the step's longest: ~3/4 of max_model_len
                    cpu = rows * host_row_layer * num_layers * CPU_ATTENTION_LENGTH * (cpu_attention_cost or 1.0)
                    step = max(streamed, cpu * (num_layers - x) / num_layers)
                score = rows / (step + COMPUTE_BYTES_RATIO * num_layers * layer_bytes)
                if score > best_score:
                    used = prefill_bytes + rows * act_row + kv_device + resident * layer_bytes + stages
                    best, best_score = StreamPlan(rows, placement, int(resident), int(streamed), int(used), x), score
                if most_first:
                    break  # the fewest device-KV layers
            if most_first and feasible:
                break
    return best


# -- the device side ------------------------------------------------------------------------------

class _Streams:
    """A side copy stream and per-slot events on CUDA; no-ops elsewhere (copies are synchronous there)."""

    def __init__(self, device: torch.device, num_slots: int = 2):
        self.cuda, self.num_slots = device.type == "cuda", num_slots
        self.copy = torch.cuda.Stream(device) if self.cuda else None
        self.copied = [None] * num_slots
        self.done = [None] * num_slots

    def copying(self):
        return torch.cuda.stream(self.copy) if self.cuda else _NullContext()

    def start_iteration(self, keep_events: bool = False) -> None:
        """Stage buffers are reused: copies wait for all compute already queued (also after an aborted pass).
        keep_events: copies the previous forward issued for this one are in flight; compute must wait on them."""
        if self.cuda:
            self.copy.wait_stream(torch.cuda.current_stream())
            if not keep_events:
                self.copied, self.done = [None] * self.num_slots, [None] * self.num_slots

    def copy_waits_for_compute(self, slot: int) -> None:
        if self.cuda and self.done[slot] is not None:
            self.copy.wait_event(self.done[slot])

    def record_copied(self, slot: int) -> None:
        if self.cuda:
            self.copied[slot] = self.copy.record_event()

    def compute_waits_for_copy(self, slot: int) -> None:
        if self.cuda and self.copied[slot] is not None:
            torch.cuda.current_stream().wait_event(self.copied[slot])

    def record_done(self, slot: int) -> None:
        if self.cuda:
            self.done[slot] = torch.cuda.current_stream().record_event()


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
        released and the slot's next layer starts copying. lag=1: a layer's work spans two yields (piecewise)."""
        s = self.streams
        kv = self.kv is not None and self.kv.decoding
        pending, self._pending, prefetched = self._pending, set(), set()
        s.start_iteration(keep_events=bool(pending))
        complete = False
        try:
            for i in [0, 1][: self.num_layers] if kv else self.first_in_slot:
                if i not in pending:
                    self._prefetch(i, kv)
            for i in range(self.num_layers + lag):
                if i < self.num_layers and (kv or self.host[i] is not None):
                    s.compute_waits_for_copy(self.slot(i))
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
            if host is not None:
                self.stages[slot][0].copy_(host[0], non_blocking=True)
                self.stages[slot][1].copy_(host[1], non_blocking=True)
            if kv:
                self.kv.prefetch(i, slot)
            self.streams.record_copied(slot)


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


class _HostCacheView:
    """K or V of a HostKV or CpuAttention, seen by model_runner's decode/prefill as its
    [layers, rows, max_len, kv_heads, head_dim] cache."""

    def __init__(self, owner: "_HostCache", which: int):
        self.owner, self.which = owner, which

    @property
    def shape(self) -> tuple[int, ...]:
        return self.owner.cache_shape

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self.owner.layer_view(self.which, key[0])[key[1:]]
        return self.owner.layer_view(self.which, key)


class _HostCache:
    """What HostKV and CpuAttention share: the host cache's shape as model_runner sees it, the pinned staging
    area prefill writes land in, and each step's rows/positions."""

    def __init__(self, *, num_layers: int, max_rows: int, num_kv_heads: int, max_model_len: int, head_dim: int,
                 max_tokens: int, dtype: torch.dtype, device: torch.device):
        staging = (num_layers, max(max_tokens, max_rows), num_kv_heads, head_dim)
        self.staging = [torch.empty(staging, dtype=dtype, pin_memory=device.type == "cuda") for _ in range(2)]
        self.cache_shape = (num_layers, max_rows, max_model_len, num_kv_heads, head_dim)
        self.device = device
        self.k, self.v = _HostCacheView(self, 0), _HostCacheView(self, 1)
        self.decoding = self.prefilling = False
        self._rows = self._positions = None
        self._kv_len = 0

    def begin(self, rows: list[int], positions: list[int], *, decode: bool) -> None:
        """rows/positions: where each token of the step goes (decode: one per row; prefill: every prompt token)."""
        self.decoding, self.prefilling = decode, not decode
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._positions = torch.tensor(positions, dtype=torch.long)
        self._kv_len = max(positions) + 1

    def store_prompt(self, layer: int, tokens: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prefill's K/V [t, kv_heads, head_dim] of tokens (of the rows/positions given to begin()) -> staging."""
        for which, value in enumerate((k, v)):
            self.staging[which][layer, tokens].copy_(value, non_blocking=True)

    def _wait_for_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def reset(self) -> None:
        self.decoding = self.prefilling = False


class HostKV(_HostCache):
    """The KV cache in (pinned) host memory, position-major [layers, max_len, rows, kv_heads, head_dim], so
    the keys of every row up to the step's longest position are one contiguous copy per layer.

    Decode: layer i's [:kv_len] streams into device slot i % 2 (LayerStreamer), the step writes its new
    K/V there, and after the layer they are gathered into a pinned staging area; end_step() scatters them
    into the host cache. Prefill: the prompts' K/V go to staging as computed and are scattered likewise.
    Only masked ("sdpa") decode attention reads it: its device view is strided, not one flat row block.
    """

    def __init__(self, *, num_layers: int, max_rows: int, num_kv_heads: int, max_model_len: int, head_dim: int,
                 max_tokens: int, dtype: torch.dtype, device: torch.device):
        super().__init__(num_layers=num_layers, max_rows=max_rows, num_kv_heads=num_kv_heads,
                         max_model_len=max_model_len, head_dim=head_dim, max_tokens=max_tokens, dtype=dtype,
                         device=device)
        shape = (num_layers, max_model_len, max_rows, num_kv_heads, head_dim)
        # zeros: masked-out keys must still be finite (0 × NaN is NaN in the attention sum)
        self.host = [torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda") for _ in range(2)]
        self.slots = [[torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(2)] for _ in range(2)]
        self._rows_device = self._positions_device = None

    def begin(self, rows: list[int], positions: list[int], *, decode: bool) -> None:
        super().begin(rows, positions, decode=decode)
        if decode:
            self._rows_device, self._positions_device = self._rows.to(self.device), self._positions.to(self.device)

    def prefetch(self, layer: int, slot: int) -> None:
        for which in range(2):
            self.slots[which][slot][: self._kv_len].copy_(self.host[which][layer, : self._kv_len], non_blocking=True)

    def layer_view(self, which: int, layer: int):
        if not self.decoding:
            raise RuntimeError("the host KV cache is read through a decode step only (prefill: store_prompt)")
        return self.slots[which][layer % 2].transpose(0, 1)  # [rows, max_len, kv_heads, head_dim]

    def after_layer(self, layer: int) -> None:
        if not self.decoding:
            return
        n = len(self._rows)
        for which in range(2):
            new = self.slots[which][layer % 2][self._positions_device, self._rows_device]
            self.staging[which][layer, :n].copy_(new, non_blocking=True)

    def end_step(self) -> None:
        """Waits for the step's device→host copies and puts them into the host cache."""
        self._wait_for_device()
        n = len(self._rows)
        for which in range(2):
            self.host[which][:, self._positions, self._rows] = self.staging[which][:, :n]
        self.reset()


class CpuAttention(_HostCache):
    """The KV cache in host memory, attended on the host CPU (FlexGen's CPU attention): a decode step sends
    each layer's q/k/v of the new tokens to the host (a few MB) and gets the attention output back, so the
    cache itself never crosses PCIe and the bus carries only weights.

    K and V are [layers, rows, kv_heads, max_len, head_dim], read by host_attention's fused kernel. Stored in
    kv_dtype: the compute dtype by default (exact), or int8 with a float32 scale per (row, head, token).
    Prefill writes go through staging, one strided copy per prompt and layer. A decode step's layer is split
    in send (device), compute (host: waits for its q/k/v, stores, attends) and receive (device), so
    PiecewiseDecode can put the device parts in CUDA graphs; the weight copies keep running meanwhile.
    """

    def __init__(self, *, num_layers: int, max_rows: int, num_heads: int, num_kv_heads: int, max_model_len: int,
                 head_dim: int, max_tokens: int, scaling: float, dtype: torch.dtype, device: torch.device,
                 kv_dtype: torch.dtype | None = None, kernel: Kernel | None = None, device_layers: tuple[int, ...] = (),
                 device_attention: str = "sdpa"):
        super().__init__(num_layers=num_layers, max_rows=max_rows, num_kv_heads=num_kv_heads,
                         max_model_len=max_model_len, head_dim=head_dim, max_tokens=max_tokens, dtype=dtype,
                         device=device)
        pin = device.type == "cuda"
        self.kv_dtype = kv_dtype or dtype
        # Layers whose K/V the planner put on the device after all (where host memory would not hold every
        # layer's for the rows, or asked for): attended there, inside the GPU work (model_runner.CacheAttention).
        # The host cache holds only the others' (host_index: layer -> its index there).
        self.device_layers = tuple(sorted(device_layers))
        self.device_index = {layer: j for j, layer in enumerate(self.device_layers)}
        self.host_index = {layer: j for j, layer in enumerate(i for i in range(num_layers) if i not in self.device_index)}
        shape = (len(self.host_index), max_rows, num_kv_heads, max_model_len, head_dim)
        self.keys, self.values = (torch.zeros(shape, dtype=self.kv_dtype) for _ in range(2))
        self.scales = None  # int8: K and V scales [host layers, rows, kv_heads, max_len]
        if self.kv_dtype == torch.int8:  # prefill quantizes on the device: int8 + scales cross the bus
            self.scales = [torch.zeros(shape[:4]) for _ in range(2)]
            self.staging = [torch.empty_like(t, dtype=torch.int8) for t in self.staging]
            self.scale_staging = [torch.empty(t.shape[:3], pin_memory=pin) for t in self.staging]
            self.kv8 = torch.empty(split_slots(max_rows), 2 * num_kv_heads, head_dim, dtype=torch.int8, pin_memory=pin)
            self.kv_scales = torch.empty(split_slots(max_rows), 2 * num_kv_heads, pin_memory=pin)
        self.host = [self.keys, self.values]
        # the new tokens' q/k/v as send() copies them to the host: q only for int8 (K/V go through kv8). Each
        # copy fills a whole leading slice: a copy into a strided host slice is staged on the host, which a CUDA
        # graph cannot hold (that turned the int8 path's graphs off)
        width = num_heads + (0 if self.kv_dtype == torch.int8 else 2 * num_kv_heads)
        slots = split_slots(max_rows)  # PiecewiseDecode's two halves, the second padded as the first
        self.qkv = torch.empty(slots, width, head_dim, dtype=dtype, pin_memory=pin)
        self.out = torch.empty(slots, num_heads, head_dim, dtype=dtype, pin_memory=pin)
        self.num_heads, self.num_kv_heads, self.scaling = num_heads, num_kv_heads, scaling
        self.kernel = kernel or Kernel.build(self.kv_dtype, num_kv_heads=num_kv_heads,
                                             group=num_heads // num_kv_heads, head_dim=head_dim)
        self._bias = None
        self._segments: list[tuple[int, int, int, int]] = []
        self._prompt_copied: dict[int, torch.cuda.Event] = {}  # layer -> event after its prefill copies
        # where a decode step's host time goes (seconds, summed over steps): waiting for the GPU's q/k/v
        # (its compute and the weight copy before it), writing the new K/V, the kernel, and the whole forward
        # (the rest of it: launching the layers' GPU work)
        self.seconds = {"wait": 0.0, "store": 0.0, "kernel": 0.0, "forward": 0.0}
        device_shape = (len(self.device_layers), split_slots(max_rows), max_model_len, num_kv_heads, head_dim)
        self.device_k, self.device_v = (torch.zeros(device_shape, dtype=dtype, device=device) for _ in range(2))
        self.device_attention = device_attention  # "flash" or "sdpa", as the resident engine's
        self._device_store: KVStore | None = None  # a prefill's writes into those layers' device cache

    def begin(self, rows: list[int], positions: list[int], *, decode: bool) -> None:
        super().begin(rows, positions, decode=decode)
        self._segments = [] if decode else _segments(rows, positions)
        self._prompt_copied = {}
        if not decode and self.device_layers:  # prefill writes the device layers' K/V straight into their cache
            self._device_store = cache_store(self.device_k, self.device_v, self._rows.to(self.device),
                                             self._positions.to(self.device))
        self._bias = length_bias(self._positions + 1, self._kv_len) if decode else None

    def layer_view(self, which: int, layer: int):
        raise RuntimeError("CPU attention: decode goes through send/compute/receive, prefill through store_prompt")

    def on_device(self, layer: int) -> bool:
        return layer in self.device_index

    def store_prompt(self, layer: int, tokens: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer in self.device_index:
            return self._device_store(self.device_index[layer], tokens, k, v)
        if self.scales is None:
            super().store_prompt(layer, tokens, k, v)
        else:
            for which, value in enumerate((k, v)):
                q8, scale = quantize(value)
                self.staging[which][layer, tokens].copy_(q8, non_blocking=True)
                self.scale_staging[which][layer, tokens].copy_(scale, non_blocking=True)
        if self.device.type == "cuda":  # the layer's last group's copies: end_step waits for them
            self._prompt_copied[layer] = torch.cuda.current_stream().record_event()

    def _store(self, layer, rows, positions, k: torch.Tensor, v: torch.Tensor,
               scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Writes K/V [..., d] at cache[layer, rows, :, positions]: decode passes index tensors, prefill a layer
        slice, one row and a position slice; for an int8 cache they come quantized on the device, with their
        scales."""
        layer = self.host_index[layer]
        if self.scales is None:
            self.keys[layer, rows, :, positions] = k.to(self.kv_dtype)
            self.values[layer, rows, :, positions] = v.to(self.kv_dtype)
            return
        self.keys[layer, rows, :, positions], self.scales[0][layer, rows, :, positions] = k, scales[0]
        self.values[layer, rows, :, positions], self.scales[1][layer, rows, :, positions] = v, scales[1]

    def send(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int = 0) -> None:
        """Device side of a decode step's layer: q [b, heads, 1, d] and k/v [b, kv_heads, 1, d] of the new
        tokens of rows [lo, lo + b) -> the pinned buffers (int8 K/V quantized first, where it is a few small
        kernels instead of host passes). Only device ops and copies: a CUDA graph can hold it."""
        rows = slice(lo, lo + q.shape[0])
        if self.scales is None:
            self.qkv[rows].copy_(torch.cat([q, k, v], dim=1)[:, :, 0], non_blocking=True)
            return
        self.qkv[rows].copy_(q[:, :, 0], non_blocking=True)
        kv8, kv_scales = quantize(torch.cat([k, v], dim=1)[:, :, 0])
        self.kv8[rows].copy_(kv8, non_blocking=True)
        self.kv_scales[rows].copy_(kv_scales, non_blocking=True)

    def compute(self, layer: int, lo: int, hi: int, ready: torch.cuda.Event | None = None) -> None:
        """Host side: waits for send's copies (the `ready` event recorded after them, or the whole stream),
        writes rows [lo, hi)'s new K/V into the cache and attends over it; the output goes to the pinned `out`
        buffer, which receive() brings back."""
        heads, kv_heads, length, n = self.num_heads, self.num_kv_heads, self._kv_len, hi - lo
        t0 = time.perf_counter()
        if ready is not None:
            ready.synchronize()
        else:
            self._wait_for_device()
        t1 = time.perf_counter()
        rows, where = slice(lo, hi), (self._rows[lo:hi], self._positions[lo:hi])
        if self.scales is None:
            q_host, k_host, v_host = self.qkv[rows].split([heads, kv_heads, kv_heads], dim=1)
            self._store(layer, *where, k_host, v_host)
        else:
            q_host = self.qkv[rows]
            (k8, v8), scales = self.kv8[rows].chunk(2, dim=1), self.kv_scales[rows].chunk(2, dim=1)
            self._store(layer, *where, k8, v8, scales)
        t2 = time.perf_counter()
        j = self.host_index[layer]  # a decode step's rows are cache rows 0 … n − 1
        scales = (None, None) if self.scales is None else (s[j, rows, :, :length] for s in self.scales)
        o = self.kernel(q_host.float().view(n, kv_heads, heads // kv_heads, -1), self.keys[j, rows, :, :length],
                        self.values[j, rows, :, :length], *scales, self._bias[rows], self.scaling)
        self.out[rows].copy_(o.view(n, heads, -1))
        t3 = time.perf_counter()
        for key, dt in (("wait", t1 - t0), ("store", t2 - t1), ("kernel", t3 - t2)):
            self.seconds[key] += dt

    def receive(self, b: int, lo: int = 0) -> torch.Tensor:
        """Device side: rows [lo, lo + b) of the attention output, [b, heads, 1, d] on the device. On CUDA the copy
        is queued before the next layer's wait, so `out` is free again by the time compute() writes it."""
        return self.out[lo:lo + b].to(self.device, non_blocking=True)[:, :, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """send, compute, receive in a row: model_runner's Attend, for one layer run eagerly."""
        self.send(q, k, v)
        self.compute(layer, 0, q.shape[0])
        return self.receive(q.shape[0])

    def end_step(self) -> None:
        """After a prefill: puts its K/V into the host cache layer by layer, each as soon as that layer's
        device→host copies are done, so the host's copying overlaps the GPU's later layers."""
        if self.prefilling:
            for layer in range(self.cache_shape[0]):
                if layer in self.device_index:
                    continue
                if layer in self._prompt_copied:
                    self._prompt_copied[layer].synchronize()
                for row, start, first, length in self._segments:  # one strided copy per prompt, not per token
                    k, v = (self.staging[which][layer, start: start + length].transpose(0, 1) for which in range(2))
                    scales = None
                    if self.scales is not None:
                        scales = tuple(t[layer, start: start + length].transpose(0, 1) for t in self.scale_staging)
                    self._store(layer, row, slice(first, first + length), k, v, scales)
            self._wait_for_device()
        self._prompt_copied = {}
        self.reset()


def _segments(rows: list[int], positions: list[int]) -> list[tuple[int, int, int, int]]:
    """(row, first token index, first position, length) of each run of consecutive positions in one row."""
    out: list[list[int]] = []
    for i, (row, pos) in enumerate(zip(rows, positions, strict=True)):
        if out and out[-1][0] == row and out[-1][2] + out[-1][3] == pos:
            out[-1][3] += 1
        else:
            out.append([row, i, pos, 1])
    return [tuple(x) for x in out]


def measure_cpu_attention_cost(device: torch.device, kernel: Kernel, kv_dtype: torch.dtype, *, num_kv_heads: int,
                               group: int, head_dim: int, seconds: float = 0.3) -> float:
    """PCIe bytes/s ÷ CPU attention bytes/s on this host, measured (CUDA only): how many streamed bytes one
    byte of host KV read by CpuAttention costs. plan_streaming weighs the "cpu" KV placement with it. The
    kernel is timed while host→device copies run, as in a decode step: both read host memory (measured on an
    H100 host: 4.6 ms a 13B layer alone, 8.2 ms beside the copies; the copies kept 97 % of their rate)."""
    src = torch.empty(256 * 2**20, dtype=torch.int8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(8):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    pcie = 8 * src.numel() / (time.perf_counter() - start)
    # a layer's cache is a few hundred MB and a step reads every layer's once, so nothing of it is in the L3
    # cache when it is read again: the kernel rotates over 4 such samples (one alone, 335 MB for a 13B in
    # bf16, nearly fits the H100 host's 300 MiB L3 and read faster than a decode step does). Built before the
    # copies are queued: building them outlasts the copies (a probe that queued the copies first timed the
    # kernel mostly after them: 0.82–1.11 on H100 hosts, against 1.82 beside them)
    rows, length = 64, 256
    args = itertools.cycle([sample_inputs(kv_dtype, rows, num_kv_heads, group, length, head_dim) for _ in range(4)])
    kernel(*next(args))
    for _ in range(int(2 * pcie * seconds / src.numel()) + 4):  # queued: they outlast the kernel's timing below
        dst.copy_(src, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 2:
        kernel(*next(args))
        runs += 1
    elapsed, outlasted = time.perf_counter() - start, not copied.query()
    torch.cuda.synchronize(device)
    if not outlasted:
        log.warning("CPU attention cost probe: the copies ran out before the kernel's timing ended")
    return pcie / (runs * rows * length * cache_bytes(kv_dtype, num_kv_heads, head_dim) / elapsed)


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
            num_heads=parts.num_heads, max_model_len=self.max_model_len, dtype_bytes=dtype_bytes)
        group = min(max_prefill_tokens, STREAMING_PREFILL_GROUP_TOKENS)  # each layer runs over groups this size
        prefill_bytes = budget_math.estimate_prefill_bytes(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=parts.num_heads,
            num_tokens=group, dtype_bytes=dtype_bytes)
        prefill_bytes += 2 * max_prefill_tokens * c.hidden_size * dtype_bytes  # the whole batch's residual stream
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
            max_rows=cfg.max_batch_size or budget_math.MAX_ROWS_CEILING,
            host_bytes=None if host is None else host // 2, kv_placement=self.kv_placement,
            num_resident=self.num_resident, num_device_kv_layers=self.num_device_kv_layers,
            cpu_kv_bytes_per_token_layer=cache_bytes(runner.host_kv_dtype, parts.num_kv_heads, parts.head_dim),
            cpu_attention_cost=cost,
            attention_bytes_per_row=budget_math.estimate_decode_attention_bytes(
                num_heads=parts.num_heads, head_dim=parts.head_dim, max_model_len=self.max_model_len,
                dtype_bytes=dtype_bytes))
        kv_per_token = budget_math.kv_bytes_per_token(parts.num_layers, parts.num_kv_heads, parts.head_dim,
                                                      dtype_bytes)
        if plan is not None:
            self.plan = plan
            runner.configure(plan, max_prefill_tokens)
            self.attention = runner.attention
            log.info("small-VRAM plan: %s", plan)
        return budget_math.Budget(total, kv_per_token, kv_per_token * self.max_model_len, act_per_row,
                                  prefill_bytes, 0 if plan is None else plan.max_rows)

    def stats(self):
        s = super().stats()
        if self.plan is not None:
            host_kv = getattr(self.runner, "host_kv", None)
            for key, seconds in getattr(host_kv, "seconds", {}).items():
                s.extra[f"offload_cpu_attention_{key}_s"] = round(seconds, 3)
            if self.overhead_at_plan is not None:
                s.extra["offload_overhead_at_plan_gib"] = round(self.overhead_at_plan / 2**30, 3)
            if self.cpu_attention_cost is not None:  # measured (CUDA, auto placement)
                s.extra["offload_cpu_attention_cost"] = round(self.cpu_attention_cost, 3)
            piecewise = getattr(self.runner, "piecewise", None)
            if piecewise is not None:
                s.extra.update(offload_piecewise_graphs=int(piecewise.use_graphs))
            s.extra.update(offload_kv_on_host=int(self.plan.kv_on_host),
                           offload_cpu_attention=int(self.plan.kv_placement == "cpu"),
                           offload_resident_layers=self.plan.num_resident,
                           offload_device_kv_layers=self.plan.num_device_kv_layers,
                           offload_streamed_bytes_per_step=self.plan.streamed_bytes_per_step)
        return s
