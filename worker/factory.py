"""Builds the engine a WorkerConfig asks for; the only place the worker side picks an implementation."""

from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.protocol import Engine


def build_engine(cfg: WorkerConfig) -> Engine:
    if cfg.engine == "echo":
        from batchgen.worker.engine.echo import EchoEngine

        return EchoEngine(cfg.served_name, max_batch_size=cfg.max_batch_size or 64,
                          step_delay_s=cfg.echo_step_delay_s)
    from batchgen.worker.engine.config import EngineConfig

    return build_llm_engine(EngineConfig(
        model=cfg.model, served_model_name=cfg.served_name, device=cfg.device, load_in_8bit=cfg.load_in_8bit,
        vram_reserve_bytes=cfg.vram_reserve_bytes, max_vram_bytes=cfg.max_vram_bytes,
        max_batch_size=cfg.max_batch_size, max_model_len=cfg.max_model_len, int8_threshold=cfg.int8_threshold,
        inject_oom=cfg.inject_oom,
    ))


def build_llm_engine(cfg) -> Engine:
    """The resident engine, or the small-VRAM one when the int8 weights do not fit the VRAM cap."""
    from batchgen.worker.engine.families import GENERIC, choose_family

    family = choose_family(cfg.model)  # config.json only: not found / not a causal LM fail here, before weights
    if family.path == GENERIC:
        from batchgen.worker.engine.generic import GenericEngine

        return GenericEngine.from_config(cfg, family)
    from batchgen.worker.engine.llm_engine import LLMEngine
    from batchgen.worker.engine.loader import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    if cfg.offload or (cfg.offload is None and cfg.max_vram_bytes is not None and device.type == "cuda"):
        from batchgen.worker.offload.engine import StreamingLLMEngine, wants_streaming

        if wants_streaming(cfg, device, resolve_dtype(cfg.compute_dtype, device)):
            return StreamingLLMEngine.from_config(cfg)
    return LLMEngine.from_config(cfg)
