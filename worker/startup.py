"""The block a worker and `batchgen run` log once the engine is up: what runs where, and how big.

Everything comes from the engine's own stats(); what an engine does not report is derived from the
config the engine was built from (the same resolution the engine used), never guessed.
"""

import logging
from typing import Any

from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.protocol import Engine, EngineStats

log = logging.getLogger("batchgen.startup")
GIB = 2**30


def startup_facts(stats: EngineStats, cfg: WorkerConfig) -> dict[str, Any]:
    """The start-up facts as plain values: the block's content."""
    extra, ecfg = stats.extra, cfg.engine_config
    if cfg.engine == "echo":
        return {"engine_path": "echo (no model)", "device": "none", "max_rows": stats.max_batch_size}
    streaming = any(k.startswith("offload_") for k in extra)
    device = str(extra.get("device", ecfg.device))
    facts: dict[str, Any] = {
        "engine_path": extra.get("engine_path") or ("small-vram (streamed layers)" if streaming else "fast"),
        "device": device,
        "compute_dtype": extra.get("compute_dtype") or _compute_dtype(cfg, streaming),
        "int8_kernel": extra.get("int8_kernel") or ("bnb" if ecfg.load_in_8bit else "none (not 8-bit)"),
        "vram_total_bytes": stats.vram_used_bytes + stats.vram_free_bytes,
        "vram_free_bytes": stats.vram_free_bytes,
        "vram_reserve_bytes": ecfg.vram_reserve_bytes,
        "max_vram_bytes": ecfg.max_vram_bytes,
        "kv_bytes_per_token": extra.get("kv_bytes_per_token"),
        "kv_cache_dtype": extra.get("kv_cache_dtype"),
        "max_rows": extra.get("max_rows", stats.max_batch_size),
        "max_model_len": extra.get("max_model_len"),
        "num_kv_blocks": extra.get("num_kv_blocks"),
        "kv_block_size": extra.get("kv_block_size"),
        "pooling": extra.get("pooling"),  # the embedding engine's: how a text's token states become its vector
        "decode_steps": extra.get("decode_steps") or (
            None if "cuda_graphs" not in extra else "CUDA graphs" if extra["cuda_graphs"] else "eager"),
    }
    if facts["decode_steps"] and extra.get("mixed_steps"):
        facts["decode_steps"] += ", mixed into prefills"
    if device.startswith("cuda"):
        facts["device"] = f"{device} ({_gpu_name(device)})"
        if not facts["pooling"]:  # the embedding engine runs bnb's own kernels
            facts["tuned_launches"] = _tuned_launches(device)
    return facts


def startup_block(stats: EngineStats, cfg: WorkerConfig) -> str:
    """One multi-line block: device, dtype, int8 kernel, VRAM, KV bytes per token, rows, context, engine path."""
    f = startup_facts(stats, cfg)
    lines = [f"engine up: {cfg.served_name!r} ({cfg.engine_config.model})", f"  engine path    {f['engine_path']}",
             f"  device         {f['device']}"]
    if cfg.engine != "echo":
        vram = "n/a (not a GPU)" if not f["vram_total_bytes"] else (
            f"total {_size(f['vram_total_bytes'])}, free {_size(f['vram_free_bytes'])}")
        vram += f", reserve {_size(f['vram_reserve_bytes'])}"
        if f["max_vram_bytes"]:
            vram += f", cap {_size(f['max_vram_bytes'])}"
        lines += [f"  compute dtype  {f['compute_dtype']}", f"  int8 kernel    {f['int8_kernel']}",
                  f"  VRAM           {vram}"]
        if f["pooling"]:  # embeddings keep no KV cache
            lines.append(f"  pooling        {f['pooling']}")
        else:
            lines.append(f"  KV bytes/token {_or_dash(f['kv_bytes_per_token'])}"
                         + (f" ({f['kv_cache_dtype']})" if f["kv_cache_dtype"] not in (None, "auto") else ""))
        lines.append(f"  max_model_len  {_or_dash(f['max_model_len'])}")
        if f["decode_steps"]:
            lines.append(f"  decode steps   {f['decode_steps']}")
        if f.get("tuned_launches"):
            lines.append(f"  int8 launches  {f['tuned_launches']}")
        if f["num_kv_blocks"]:  # a paged cache: rows reserve blocks for what they reach, not max_model_len each
            lines.append(f"  KV blocks      {f['num_kv_blocks']:,} of {f['kv_block_size']} tokens (paged)")
    lines.append(f"  rows           {f['max_rows']} (max batch size)")
    return "\n".join(lines)


def log_startup(engine: Engine, cfg: WorkerConfig) -> None:
    log.info("%s", startup_block(engine.stats(), cfg))


def _tuned_launches(device: str) -> str:
    """Which table of tuned int8 launches serves this GPU (kernels.tuned, as the engine's build set it)."""
    import torch
    from batchgen.worker.engine.kernels import tuned

    return tuned.describe(tuned.device_name(torch.device(device)))


def _size(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB else f"{num_bytes / 2**20:.0f} MiB"


def _or_dash(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _compute_dtype(cfg: WorkerConfig, streaming: bool) -> str:
    from batchgen.worker.engine.setup import resolve_device_dtype

    return str(resolve_device_dtype(cfg.engine_config, streaming=streaming)[1]).removeprefix("torch.")


def _gpu_name(device: str) -> str:
    import torch

    try:
        return torch.cuda.get_device_name(torch.device(device))
    except (RuntimeError, AssertionError):
        return "unknown GPU"
