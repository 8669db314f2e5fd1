"""Builds the engine a WorkerConfig asks for; the only place the worker side picks an implementation."""

from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine import Engine


def build_engine(cfg: WorkerConfig) -> Engine:
    if cfg.engine == "echo":
        from batchgen.worker.echo import EchoEngine

        return EchoEngine(cfg.served_name, max_batch_size=cfg.max_batch_size or 64,
                          step_delay_s=cfg.echo_step_delay_s)
    from batchgen.worker.llm_engine import EngineConfig, LLMEngine

    return LLMEngine.from_config(EngineConfig(
        model=cfg.model, served_model_name=cfg.served_name, device=cfg.device, load_in_8bit=cfg.load_in_8bit,
        vram_reserve_bytes=cfg.vram_reserve_bytes, max_vram_bytes=cfg.max_vram_bytes,
        max_batch_size=cfg.max_batch_size, max_model_len=cfg.max_model_len, int8_threshold=cfg.int8_threshold,
        inject_oom=cfg.inject_oom,
    ))
