"""Builds the engine a WorkerConfig asks for; the only place the worker side picks an implementation."""

from batchgen.jobs.schema import EMBEDDINGS_URL, GENERATION_URLS
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.endpoints import ServedEndpoints
from batchgen.worker.engine.protocol import Engine

EMBEDDINGS_ONLY = ("model {model!r} is served for embeddings (task embed): it answers /v1/embeddings only; send "
                   "generation requests to a generation worker's model name")
GENERATION_ONLY = ("model {model!r} is served for text generation (task generate): embeddings need a worker "
                   "started with --task embed")


def build_engine(cfg: WorkerConfig) -> Engine:
    """The engine for cfg's task, behind the urls it answers."""
    if cfg.engine == "echo":
        from batchgen.worker.engine.echo import EchoEngine

        echo = EchoEngine(cfg.served_name, max_batch_size=cfg.engine_config.max_batch_size or 64,
                          step_delay_s=cfg.echo_step_delay_s)
        return ServedEndpoints(echo, GENERATION_URLS, GENERATION_ONLY)
    from batchgen.worker.engine.task import EMBED, choose_task

    if choose_task(cfg.engine_config) == EMBED:
        from batchgen.worker.engine.embedding import EmbeddingEngine

        return ServedEndpoints(EmbeddingEngine.from_config(cfg.engine_config), (EMBEDDINGS_URL,), EMBEDDINGS_ONLY)
    return ServedEndpoints(build_llm_engine(cfg.engine_config), GENERATION_URLS, GENERATION_ONLY)


def refuse_stream_kv(cfg, why: str) -> None:
    if cfg.stream_kv:
        raise ValueError(f"--stream-kv is the generic path's small-VRAM mode; here {why}")


def build_llm_engine(cfg) -> Engine:
    """The resident engine, or the small-VRAM one when the int8 weights do not fit the VRAM cap: the fast path's
    layer streamer for plain Llama layers, the generic path's layer hooks for every other model."""
    from batchgen.worker.engine.config import INT8_KV_SCALES
    from batchgen.worker.engine.families import GENERIC, STREAMABLE_MODEL_TYPES, FamilySpec, choose_family
    from batchgen.worker.engine.kernels import attention, compiled, tuned
    from batchgen.worker.engine.setup import resolve_device_dtype

    family = choose_family(cfg.model)  # config.json only: not found / not a causal LM fail here, before weights
    device, dtype = resolve_device_dtype(cfg)
    tuned.ENABLED = cfg.tuned_kernels  # process-wide, as the kernels read them: one engine per worker
    compiled.SHAPES = cfg.compile_shapes  # the start-up block names the table of tuned launches
    attention.INT8_V_SCALES = tuned.int8_kv_scales(cfg.int8_kv_scales, tuned.device_name(device),
                                                   attention.DEFAULT_INT8_V_SCALES, INT8_KV_SCALES)
    may_stream = cfg.offload or (cfg.offload is None and cfg.max_vram_bytes is not None and device.type == "cuda")
    streamable = family.model_type in STREAMABLE_MODEL_TYPES and FamilySpec.of(family.config).is_llama
    if may_stream and (family.path == GENERIC or not streamable):
        from batchgen.worker.offload.hook_stream import build_hook_streaming_engine, wants_hook_streaming

        if wants_hook_streaming(cfg, family.config, device, dtype):  # its K/V slots on the device, fp8 or not
            return build_hook_streaming_engine(cfg, family)
    elif may_stream:
        from batchgen.worker.offload.build import build_streaming_engine, wants_streaming

        if wants_streaming(cfg, device, dtype):
            refuse_stream_kv(cfg, "the fast path's small-VRAM mode has its own host KV cache (--host-kv-dtype)")
            return build_streaming_engine(cfg)
    refuse_stream_kv(cfg, "the model's int8 weights fit the card: its K/V stays there")
    if family.path == GENERIC:
        from batchgen.worker.engine.generic import GenericEngine

        return GenericEngine.from_config(cfg, family)
    from batchgen.worker.engine.llm_engine import LLMEngine

    return LLMEngine.from_config(cfg)
