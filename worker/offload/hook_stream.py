"""Small-VRAM mode for the generic path: any HF causal LM whose int8 weights do not fit the VRAM cap.

The embeddings and output head stay on the host (host_head.py: the head streams in chunks), everything else but the
decoder layers moves to the device; the layers' tensors (int8 weights, their scales, norms,
biases, whatever their dtype: --fp16-modules keeps some in the compute dtype) stay in pinned host memory, each
layer packed in one buffer of its own size. A forward pre-hook on each layer of the model's layer list points the
layer at one of two device stage slots, after the side CUDA stream has copied it in, and starts copying the next
layer into the other slot, so the copy of layer i + 1 overlaps the compute of layer i (double buffering). The
HF forward runs unchanged; the generic engine's large batches amortise each layer's copy over many rows. On
CPU the "device" slots are host tensors too and the copies are plain copies (the tests).

Chosen over accelerate's offload, which copies each weight in on the compute stream when it is first used: the
bus and the compute then take turns instead of overlapping.
"""

import logging
from dataclasses import dataclass, replace

import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.families import Family
from batchgen.worker.engine.generic import GenericEngine
from batchgen.worker.engine.int8_linear import Int8Linear, Int8Runtime
from batchgen.worker.engine.loader import kept_in_fp16, load_model, resolve_device, resolve_dtype
from batchgen.worker.offload.host_head import keep_head_on_host
from batchgen.worker.offload.kv_stream import KVStream
from batchgen.worker.offload.side_copy import copy_ahead

log = logging.getLogger(__name__)

NUM_SLOTS = 2
STREAMING_PREFILL_TOKENS = 1024
STREAM_KV_PREFILL_TOKENS = 2048  # --stream-kv: the rows' K/V lives on the host, so a prefill may take their room


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers: the ModuleList holding the most parameters (an expert list lives
    inside a layer, so the layer list always holds more)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to stream")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


@dataclass(frozen=True)
class _Entry:
    """One tensor of a layer: module._parameters[name], module._buffers[name], or a bnb 8-bit state's SCB."""

    module: torch.nn.Module
    kind: str  # "param" | "buffer" | "scb"
    name: str

    def get(self) -> torch.Tensor:
        if self.kind == "scb":
            return self.module.state.SCB
        return (self.module._parameters if self.kind == "param" else self.module._buffers)[self.name]

    def point(self, tensor: torch.Tensor) -> None:
        if self.kind == "scb":
            self.module.state.SCB = tensor
        elif self.kind == "param":
            self.module._parameters[self.name].data = tensor
            if _is_bnb_int8(self.module) and self.name == "weight":
                self.module.state.CB = tensor  # bnb's matmul reads the weight from its state
        else:
            self.module._buffers[self.name] = tensor


def _is_bnb_int8(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def _point_int8_at_host(entries: list[_Entry], host_views: list[torch.Tensor]) -> None:
    """An Int8Linear's cb/scb are a slot's view, which holds another layer most of the time: the outlier kernel
    reads the weight rows of a newly found outlier column from the layer's host copy instead."""
    views = {(id(e.module), e.name): view for e, view in zip(entries, host_views, strict=True)}
    for module in {id(e.module): e.module for e in entries if isinstance(e.module, Int8Linear)}.values():
        module.host_weights = (views[id(module), "cb"], views[id(module), "scb"])


def _entries(layer: torch.nn.Module) -> list[_Entry]:
    out = []
    for module in layer.modules():
        if _is_bnb_int8(module) and getattr(module.weight, "CB", None) is not None:
            module.init_8bit_state()  # what its first forward does: the int8 weight and scales move to its state
        out += [_Entry(module, "param", n) for n, p in module._parameters.items() if p is not None]
        out += [_Entry(module, "buffer", n) for n, b in module._buffers.items() if b is not None]
        if _is_bnb_int8(module) and module.state.SCB is not None:
            out.append(_Entry(module, "scb", "SCB"))
    return out


# Each tensor of a layer's flat buffer starts on this many bytes, so its view is aligned as an allocation's would be.
ALIGN = 16


@dataclass(frozen=True)
class _Slice:
    """Where one tensor of a layer sits in the layer's flat byte buffer."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * torch.Size(self.shape).numel()

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset: self.offset + self.nbytes].view(self.dtype).view(self.shape)


def _layout(tensors: list[torch.Tensor]) -> tuple[list[_Slice], int]:
    """The tensors packed one after the other (each aligned) and the buffer's size in bytes."""
    slices, at = [], 0
    for t in tensors:
        at = -(-at // ALIGN) * ALIGN
        slices.append(_Slice(at, tuple(t.shape), t.dtype))
        at += slices[-1].nbytes
    return slices, at


class HookStreamer:
    """Streams `layers` through NUM_SLOTS device slots from host copies, each layer at its own size (layers
    differ where --fp16-modules keeps some linears in the compute dtype; a slot holds the largest).

    host: each layer's tensors packed in one flat host buffer (pinned on CUDA), copied in as one; slots: flat
    device buffers. A layer's module always points at views of a slot while it runs and at nothing the host must
    keep otherwise."""

    def __init__(self, layers: torch.nn.ModuleList, device: torch.device):
        self.layers, self.device = layers, device
        self.cuda = device.type == "cuda"
        self.entries = [_entries(layer) for layer in layers]
        self.host: list[torch.Tensor] = []
        slices = []
        for entries in self.entries:
            tensors = [e.get() for e in entries]
            layout, nbytes = _layout(tensors)
            flat = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
            for piece, tensor in zip(layout, tensors, strict=True):
                piece.view(flat).copy_(tensor.detach())
            self.host.append(flat)
            slices.append(layout)
        self.layer_bytes = [flat.numel() for flat in self.host]
        self.slots = [torch.empty(max(self.layer_bytes), dtype=torch.uint8, device=device) for _ in range(NUM_SLOTS)]
        self.views = [[[piece.view(slot) for piece in layout] for slot in self.slots] for layout in slices]
        for entries, views, layout, flat in zip(self.entries, self.views, slices, self.host, strict=True):
            for entry, tensor in zip(entries, views[0], strict=True):
                entry.point(tensor)  # the loaded tensor is freed now: host memory holds one copy of the layers
            _point_int8_at_host(entries, [piece.view(flat) for piece in layout])
        self.holding: list[int | None] = [None] * NUM_SLOTS  # which layer each slot holds (or is receiving)
        self.copied: list[torch.cuda.Event | None] = [None] * NUM_SLOTS
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.current = NUM_SLOTS - 1  # the slot the running layer uses: the first layer takes slot 0
        self.num_copies = 0
        self.copied_bytes = 0
        for i, layer in enumerate(layers):  # nothing points at the host copies: a layer always reads a slot
            layer.register_forward_pre_hook(self._hook(i))

    @property
    def slot_bytes(self) -> int:
        return NUM_SLOTS * self.slots[0].numel()

    def _hook(self, i: int):
        def before_layer(module, args):
            self.before(i)
        return before_layer

    def before(self, i: int) -> None:
        """Layer i is about to run: point it at the slot holding it (copying it now if no prefetch did), then
        start copying the next layer into the other slot."""
        slot = self.holding.index(i) if i in self.holding else None
        if slot is None:
            slot = (self.current + 1) % NUM_SLOTS
            self._copy(i, slot)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        for entry, tensor in zip(self.entries[i], self.views[i][slot], strict=True):
            entry.point(tensor)
        self.current = slot
        following = (i + 1) % len(self.layers)  # after the last layer: the next forward's first
        other = (slot + 1) % NUM_SLOTS
        if self.holding[other] != following:
            self._copy(following, other)

    def _copy(self, i: int, slot: int) -> None:
        """Layer i's host buffer into slot, on the side stream, after all compute queued so far (the layer that
        used the slot last is queued before this one)."""
        self.holding[slot] = i
        self.copied[slot] = copy_ahead(self.copy_stream, self.device,
                                       [(self.slots[slot][: self.layer_bytes[i]], self.host[i])])
        self.num_copies += 1
        self.copied_bytes += self.layer_bytes[i]

    def stats(self) -> dict[str, int | float]:
        return {"offload_layer_copies": self.num_copies, "offload_copied_gib": round(self.copied_bytes / 2**30, 3),
                "offload_slot_bytes": self.slot_bytes}


def move_all_but_layers(model: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device,
                        host: list[torch.nn.Module] = ()) -> None:
    """The final norm and every other tensor outside the layer list (and outside host's modules) onto the device."""
    inside = {id(m) for m in layers.modules()} | {id(m) for module in host for m in module.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
        if _is_bnb_int8(module):
            state = module.state
            state.CB = None if state.CB is None else module.weight.data
            state.SCB = None if state.SCB is None else state.SCB.to(device)


def stream_layers(model: torch.nn.Module, device: torch.device) -> HookStreamer:
    """Turns a host-loaded model into a streamed one: the layers hooked, the embeddings and output head on the host
    (host_head.py), the rest on the device."""
    layers = decoder_layers(model)
    host = keep_head_on_host(model, device)
    move_all_but_layers(model, layers, device, host=host)
    log.info("small-VRAM (generic path): %s on the host (%.2f GiB)", " and ".join(type(m).__name__ for m in host),
             sum(p.numel() * p.element_size() for p in {id(p): p for m in host for p in m.parameters()}.values())
             / 2**30)
    streamer = HookStreamer(layers, device)
    log.info("small-VRAM (generic path): %d %s layers streamed through %d slots of %.1f MiB", len(layers),
             type(layers[0]).__name__, NUM_SLOTS, streamer.slots[0].numel() / 2**20)
    return streamer


def int8_model_bytes(config, dtype_bytes: int, fp16_modules: tuple[str, ...] = ()) -> int:
    """What a causal LM weighs loaded in 8-bit, from its config alone: the model built on the meta device, the
    decoder layers' 2-D weights at one byte plus a float32 scale per row, everything else (and what fp16_modules
    names, with all inside it) in the compute dtype."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    inside = {id(p) for p in layers.parameters()}
    kept = {id(p) for name, p in model.named_parameters() if kept_in_fp16(name.rpartition(".")[0], fp16_modules)}
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in inside and p.dim() == 2 and id(p) not in kept:
            total += p.numel() + 4 * p.shape[0]
        else:
            total += p.numel() * dtype_bytes
    return total


def wants_hook_streaming(cfg: EngineConfig, config, device: torch.device, dtype: torch.dtype) -> bool:
    """offload=None (auto): stream when the model's int8 weights plus the reserve exceed max_vram_bytes on CUDA."""
    if cfg.offload is not None:
        return cfg.offload
    if cfg.max_vram_bytes is None or device.type != "cuda":
        return False
    weights = int8_model_bytes(config, torch.empty(0, dtype=dtype).element_size(), cfg.fp16_modules)
    return weights + cfg.vram_reserve_bytes > cfg.max_vram_bytes


def build_hook_streaming_engine(cfg: EngineConfig, family: Family) -> GenericEngine:
    """The generic engine over a host-loaded model whose decoder layers stream in through hooks."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.compute_dtype, device)
    loaded = load_model(cfg.model, device=torch.device("cpu"), dtype=dtype, load_in_8bit=cfg.load_in_8bit,
                        int8_threshold=cfg.int8_threshold, fp16_modules=cfg.fp16_modules)
    int8 = None
    if cfg.load_in_8bit:  # unfused: each linear's own tensors stream with its layer
        int8 = Int8Runtime.convert(loaded.model, cfg.int8_kernel, threshold=cfg.int8_threshold, device=device,
                                   fuse_projections=False, rotate=cfg.int8_rotate)
    streamer = stream_layers(loaded.model, device)
    if int8 is not None:  # outlier columns found on the device, through the streamed layers
        int8.calibrate(loaded.model, threshold=cfg.int8_threshold, device=device, tokenizer=loaded.tokenizer)
    log.info("engine path: model %r (%s): generic path in small-VRAM mode (decoder layers streamed through "
             "forward pre-hooks)%s", family.model, family.model_type,
             "" if family.path != "fast" else "; its fast path's layer streamer rebuilds plain Llama layers only")
    # Each prefill streams every layer once: pack a thousand prompt tokens into it, but not so many that
    # its activations (and its own K/V, on the device until the join) take the rows' KV room under the cap.
    default_prefill = STREAM_KV_PREFILL_TOKENS if cfg.stream_kv else STREAMING_PREFILL_TOKENS
    cfg = replace(cfg, max_prefill_tokens=cfg.max_prefill_tokens or default_prefill)
    kv_stream = KVStream(decoder_layers(loaded.model), device) if cfg.stream_kv else None
    engine = GenericEngine(cfg, loaded.model, loaded.tokenizer, device=device, dtype=dtype,
                           weights_bytes=loaded.weights_bytes, int8=int8, kv_stream=kv_stream)
    engine.streamer = streamer  # kept alive with the engine (the hooks hold it too); tests and benchmarks read it
    if kv_stream is not None and device.type == "cuda":  # on CPU (tests) host slots grow on demand instead
        engine.reserve_host_slots()
    return engine
