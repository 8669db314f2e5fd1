"""Which engine path serves a model, and why: decided from config.json alone, before any weight loads.

The fast path (worker/engine/llm_engine.py) drives the decoder layers of a few families with its own slot-KV
forward; every other causal LM that AutoModelForCausalLM knows runs on the generic path (generic.py), which
calls the HF model itself. Encoders and encoder-decoders are refused here, as is a model that cannot be found,
so a user learns it in one line instead of after a long weight load.
"""

import logging
import os
from dataclasses import dataclass

# Model types whose decoder layer is exactly Llama's (pre-norm, RoPE, q/k/v/o projections, gated MLP):
# the model runner drives their HF submodules with its own slot-KV-cache forward.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})

FAST, GENERIC = "fast", "generic"

log = logging.getLogger("batchgen.engine")


class ModelNotFound(ValueError):
    """The model's config.json could not be read: no such local directory, no network, unknown or gated repo.
    A ValueError so the CLI reports it in one line (exit 2, a usage error) rather than a traceback."""


class UnsupportedModel(ValueError):
    """A model neither engine path can serve (not a causal LM), refused before its weights load."""


@dataclass(frozen=True)
class Family:
    model: str
    model_type: str
    path: str  # FAST | GENERIC
    reason: str
    config: object  # the transformers config read from config.json

    def describe(self) -> str:
        return f"model {self.model!r} ({self.model_type}): {self.path} path, {self.reason}"


def read_config(model: str):
    """config.json through AutoConfig (local directory or hub id); any failure becomes a one-line ModelNotFound."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=False)  # never prompt, never run repo code
    except (OSError, ValueError) as exc:
        if os.path.isfile(os.path.join(model, "config.json")):  # found, but unreadable (e.g. needs remote code)
            raise UnsupportedModel(f"model {model!r}: its config.json cannot be read: {_first_line(exc)}") from exc
        raise ModelNotFound(_not_found_message(model, exc)) from exc


def choose_family(model: str) -> Family:
    """Reads config.json and picks the path; raises ModelNotFound / UnsupportedModel. Logs the choice in one line."""
    family = classify(model, read_config(model))
    log.info("engine path: %s", family.describe())
    return family


def classify(model: str, config) -> Family:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModel(f"model {model!r} ({model_type}) is not a causal language model "
                               "(AutoModelForCausalLM has no class for it); batchgen generates text with decoders only")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"model {model!r} ({model_type}) is an encoder-decoder; batchgen runs decoder-only "
                               "causal language models")
    # bert & co. have a causal head class, but as encoders (is_decoder unset) they attend both ways.
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise UnsupportedModel(f"model {model!r} ({model_type}) is an encoder (masked LM), not a text generator")
    window = sliding_window(config)
    if model_type in SUPPORTED_MODEL_TYPES and window is not None and window < _context_length(config):
        return Family(model, model_type, GENERIC, f"sliding window {window} < context {_context_length(config)}: "
                      "the fast path attends to whole rows, HF's attention applies the window", config)
    if model_type in SUPPORTED_MODEL_TYPES:
        return Family(model, model_type, FAST, "its decoder layer is Llama's (slot-KV forward)", config)
    return Family(model, model_type, GENERIC,
                  f"no fast path for {model_type!r} (fast: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); "
                  "HF forward with a left-padded KV cache", config)


def sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _context_length(config) -> int:
    return getattr(config, "max_position_embeddings", None) or 0


def _not_found_message(model: str, exc: BaseException) -> str:
    causes = {type(e).__name__ for e in _chain(exc)}
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model:
        return f"model {model!r} not found: no such local directory (and not a hub id)"
    if os.path.isdir(model):
        return f"model {model!r} not found: the local directory {os.path.abspath(model)!r} has no readable config.json"
    if "GatedRepoError" in causes:
        why = "the hub repo is gated: accept its licence on huggingface.co and set HF_TOKEN"
    elif "RepositoryNotFoundError" in causes:
        why = "no such hub repo (or it is private: set HF_TOKEN)"
    elif causes & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError",
                   "ConnectTimeout", "Timeout"}:
        why = "the hub could not be reached and it is not in the local cache"
    else:
        why = _first_line(exc)
    return f"model {model!r} not found: no local directory {os.path.abspath(model)!r}, and as a hub id: {why}"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
