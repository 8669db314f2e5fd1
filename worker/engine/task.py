"""Whether a worker generates text or embeds it, decided before any weight loads and logged in one line.

--task auto embeds when the model says it is an embedding model: it ships sentence-transformers' modules.json,
it is an encoder (which cannot generate), or its weights are a base model without an LM head (e5-mistral's
MistralModel); every other model generates. --task generate / embed decide it outright (Qwen3-Embedding, say,
is saved as a causal LM, and like vLLM we need to be told).
"""

import logging

from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.families import read_config
from batchgen.worker.engine.pooling import MODULES_FILE, model_file

GENERATE, EMBED = "generate", "embed"

log = logging.getLogger("batchgen.engine")


def choose_task(cfg: EngineConfig) -> str:
    if cfg.task != "auto":
        log.info("task: %s (--task %s)", cfg.task, cfg.task)
        return cfg.task
    why = embedding_evidence(cfg.model, read_config(cfg.model))
    task = EMBED if why else GENERATE
    log.info("task: %s (auto: %s)", task, why or "a causal LM; --task embed embeds with it")
    return task


def embedding_evidence(model: str, config) -> str | None:
    """Why the model is an embedding model, or None when nothing says so."""
    if model_file(model, MODULES_FILE) is not None:
        return "it ships sentence-transformers' modules.json"
    if not is_decoder_only(config):
        return f"{config.model_type} is not a decoder-only causal LM"
    architectures = getattr(config, "architectures", None) or []
    if architectures and all(a.endswith("Model") and not a.endswith("LMHeadModel") for a in architectures):
        return f"its weights are a base model ({architectures[0]}) without an LM head"
    return None


def is_decoder_only(config) -> bool:
    """A causal LM that attends one way (bert & co. have a causal class too, but attend both ways unless is_decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        return False
    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))
