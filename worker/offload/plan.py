"""How a small-VRAM model is laid out: which decoder layers stay on the device, where the KV cache lives, how
many rows a step takes. Pure arithmetic on sizes the engine measures or reads from the config (offload.py
turns a StreamPlan into buffers and copies), so every choice here is tested without a GPU.
"""

from dataclasses import dataclass

from batchgen.worker.engine.llama import head_dim_of

# A decode step's compute per weight byte, in "streamed byte" units: HBM is ~50x faster than PCIe,
# bitsandbytes' kernels are slower than that; used only to rank plans whose streamed bytes tie (e.g. 0).
COMPUTE_BYTES_RATIO = 0.05
KV_PLACEMENTS = ("auto", "device", "host", "cpu")
# The share of max_model_len a CPU-attention step reads per row: the kernel covers every row up to the step's
# longest one (continuous batching keeps one near the end); the streamed "host" KV is counted at 1/2.
CPU_ATTENTION_LENGTH = 0.75


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


def prefill_peak(kv_placement: str, prefill_bytes: int, masked_prefill_bytes: int | None) -> int:
    """A plan's prefill peak: "host" prefills through masked sdpa (the runner attends with sdpa there, as its
    decode reads a strided device view), so it pays the T×T scores; the others prefill as the runner attends."""
    return masked_prefill_bytes if kv_placement == "host" and masked_prefill_bytes is not None else prefill_bytes


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
    masked_prefill_bytes: int | None = None,
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
    resident layers; STAGE_SLOTS stage buffers hold the streamed ones (two for a streamed KV).
    attention_bytes_per_row: the share of activation_bytes_per_row that only attention on the device takes,
    spared where the CPU attends every layer. masked_prefill_bytes: the prefill's peak where it attends through
    masked sdpa (T×T scores), as "host" always does (its decode reads a strided device view); None: prefill_bytes.
    None: not even one row fits.
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
        prefill = prefill_peak(placement, prefill_bytes, masked_prefill_bytes)
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
                left = budget_bytes - prefill - rows * act_row - kv_device
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
                    used = prefill + rows * act_row + kv_device + resident * layer_bytes + stages
                    best, best_score = StreamPlan(rows, placement, int(resident), int(streamed), int(used), x), score
                if most_first:
                    break  # the fewest device-KV layers
            if most_first and feasible:
                break
    return best
