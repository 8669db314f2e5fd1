"""How a small-VRAM model is laid out: which decoder layers stay on the device, where the KV cache lives, how
many rows a step takes. Pure arithmetic on sizes the builder measures or reads from the config, so every choice
is tested without a GPU.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from batchgen.worker.engine.llama import head_dim_of
from batchgen.worker.offload.piecewise import split_slots

# A decode step's compute per weight byte, in "streamed byte" units: HBM is ~50x faster than PCIe,
# bitsandbytes' kernels are slower than that; used only to rank plans whose streamed bytes tie (e.g. 0).
COMPUTE_BYTES_RATIO = 0.05
KV_PLACEMENTS = ("auto", "device", "cpu")
# The share of max_model_len a CPU-attention step reads per row: the kernel covers every row up to the step's
# longest one (continuous batching keeps one near the end).
CPU_ATTENTION_LENGTH = 0.75
# Device buffers the streamed layers' weights take turns in (LayerStreamer's num_slots): piecewise decode holds a
# layer's weights through two pieces; a third slot measured slower (it costs a resident layer, and the busier
# copies take host memory bandwidth from the host attention kernel; docs/benchmarks.md).
STAGE_SLOTS = 2


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


@dataclass(frozen=True)
class StreamPlan:
    max_rows: int
    kv_placement: str  # "device", or "cpu": in host memory, attended by the host CPU
    num_resident: int  # decoder layers that stay on the device (LayerStreamer decides which)
    streamed_bytes_per_step: int  # weights crossing the bus per decode step
    device_bytes: int  # stage buffers + resident layers + KV on the device + activations
    num_device_kv_layers: int = 0  # "cpu": layers whose KV stays on the device, attended there
    num_slots: int = STAGE_SLOTS  # stage buffers the streamed layers take turns in
    slot_bytes: int = 0  # one stage buffer: the largest streamed layer (0: every layer resident)

    @property
    def kv_on_host(self) -> bool:
        return self.kv_placement != "device"

    @property
    def tokens_per_streamed_gb(self) -> float:
        return self.max_rows / max(1, self.streamed_bytes_per_step) * 1e9

    def stats(self) -> dict[str, int]:
        return {"offload_kv_on_host": int(self.kv_on_host), "offload_cpu_attention": int(self.kv_placement == "cpu"),
                "offload_resident_layers": self.num_resident, "offload_device_kv_layers": self.num_device_kv_layers,
                "offload_streamed_bytes_per_step": self.streamed_bytes_per_step}


def plan_streaming(
    *,
    budget_bytes: int,
    layer_bytes: int | Sequence[int],
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
    num_slots: int = STAGE_SLOTS,
) -> StreamPlan | None:
    """The plan with the most rows per streamed byte (throughput ≈ rows ÷ streamed bytes per step); None: not even
    one row fits.

    budget_bytes is what the device may hold beyond embeddings/lm_head and the reserve. KV placements: "device"
    costs rows × full-length KV there; "cpu" keeps it in host memory (cpu_kv_bytes_per_token_layer, its own dtype,
    at most host_bytes) and the host CPU reads it while the weights copy: cpu_attention_cost (measured: PCIe
    bytes/s ÷ CPU attention bytes/s) converts those reads into streamed-byte time and the step costs the larger
    of the two. Without a cost "cpu" is only taken when asked for. "cpu" keeps some layers' KV on the device
    (num_device_kv_layers, attended there) only where the host cannot hold every layer's K/V for the rows, or
    when asked: the kernel and the weight copies read the same host memory, so for speed it did not pay
    (docs/benchmarks.md). What is left holds resident layers; num_slots stage buffers hold the streamed ones.
    attention_bytes_per_row: the share of activation_bytes_per_row that only attention on the device takes,
    spared where the CPU attends every layer.
    layer_bytes: one decoder layer's weights, or each layer's where they differ (--fp16-modules keeps some linears
    in the compute dtype); the stage buffers then hold the largest streamed layer.
    """
    if kv_placement not in KV_PLACEMENTS:
        raise ValueError(f"kv_placement must be one of {KV_PLACEMENTS}, got {kv_placement!r}")
    placements = {"auto": ("device",) + (("cpu",) if cpu_attention_cost else ()),
                  "device": ("device",), "cpu": ("cpu",)}[kv_placement]
    sizes = [layer_bytes] * num_layers if isinstance(layer_bytes, int) else list(layer_bytes)
    if len(sizes) != num_layers:
        raise ValueError(f"layer_bytes has {len(sizes)} sizes for {num_layers} layers")
    layouts = [_Layout.of(sizes, r, num_slots) for r in range(num_layers + 1)]
    # the most resident layers whose layout fits: bisect over each count's cheapest layout with at least as many
    cheapest = [min(lay.device_bytes for lay in layouts[r:]) for r in range(num_layers + 1)]
    total_bytes = sum(sizes)
    kv_row_layer = kv_bytes_per_token_layer * max_model_len
    host_row_layer = (cpu_kv_bytes_per_token_layer or kv_bytes_per_token_layer) * max_model_len
    best, best_score = None, -1.0
    for placement in placements:
        cpu = placement == "cpu"
        # "cpu": x layers may keep their KV on the device after all, attended there: each costs about a resident
        # layer's memory and spares the host a layer's attention and its host memory; the fewest that let the rows
        # fit the host are taken
        choices = [num_device_kv_layers] if num_device_kv_layers is not None else range(num_layers + 1)
        choices = choices if cpu else (0,)
        host_limit = host_bytes if cpu else None
        # "cpu": rows cost the device next to nothing, so a plan takes the most that fit: a step a little faster
        # for fewer rows loses a whole extra wave of steps on a batch's last requests
        for rows in range(max_rows, 0, -1) if cpu else range(1, max_rows + 1):
            if host_limit is not None and rows * host_row_layer * (num_layers - max(choices)) > host_limit:
                continue
            feasible = False
            for x in choices:
                if host_limit is not None and rows * host_row_layer * (num_layers - x) > host_limit:
                    continue  # the host cache holds the other layers' K/V
                # "cpu": the device layers' K/V has a row for each of the piecewise halves' (padded) rows
                kv_device = (split_slots(rows) * kv_row_layer * x) if cpu else rows * kv_row_layer * num_layers
                act_row = activation_bytes_per_row - (attention_bytes_per_row if cpu and x == 0 else 0)
                left = budget_bytes - prefill_bytes - rows * act_row - kv_device
                if num_resident is None:
                    resident = bisect.bisect_right(cheapest, left) - 1
                else:
                    fits = num_resident <= num_layers and layouts[num_resident].device_bytes <= left
                    resident = num_resident if fits else -1
                if resident < 0:
                    continue
                layout, feasible = layouts[resident], True
                streamed = step = layout.streamed_bytes
                if cpu:  # the kernel reads every row up to the step's longest while the weights stream
                    reads = rows * host_row_layer * num_layers * CPU_ATTENTION_LENGTH * (cpu_attention_cost or 1.0)
                    step = max(streamed, reads * (num_layers - x) / num_layers)
                score = rows / (step + COMPUTE_BYTES_RATIO * total_bytes)
                if score > best_score:
                    used = prefill_bytes + rows * act_row + kv_device + layout.device_bytes
                    best, best_score = StreamPlan(rows, placement, int(resident), int(streamed), int(used), x,
                                                  num_slots, layout.slot_bytes), score
                if cpu:
                    break  # the fewest device-KV layers
            if cpu and feasible:
                break
    return best


@dataclass(frozen=True)
class _Layout:
    """What the weights take on the device and across the bus with num_resident layers kept there."""

    device_bytes: int  # the resident layers and the stage buffers
    streamed_bytes: int  # the other layers, copied in once per forward
    slot_bytes: int  # one stage buffer: the largest streamed layer

    @classmethod
    def of(cls, sizes: list[int], num_resident: int, num_slots: int) -> "_Layout":
        resident = resident_layers(len(sizes), num_resident)
        streamed = [b for i, b in enumerate(sizes) if i not in resident]
        slot = max(streamed, default=0)
        slots = min(num_slots, len(streamed))  # LayerStreamer makes no slot without a layer to hold
        return cls(sum(sizes[i] for i in resident) + slots * slot, sum(streamed), slot)


def resident_layers(num_layers: int, num_resident: int) -> set[int]:
    """Which layers stay on the device: evenly spread, so streamed copies keep running through them."""
    if num_resident >= num_layers:
        return set(range(num_resident))
    return {(2 * k + 1) * num_layers // (2 * num_resident) for k in range(num_resident)}
