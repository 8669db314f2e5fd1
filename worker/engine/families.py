"""Which engine path serves a model, and why: decided from config.json alone, before any weight loads.

The fast path (worker/engine/llm_engine.py) drives the decoder layers of a few families with its own slot-KV
forward; every other causal LM that AutoModelForCausalLM knows runs on the generic path (generic.py), which
calls the HF model itself. Encoders and encoder-decoders are refused here, as is a model that cannot be found,
so a user learns it in one line instead of after a long weight load.
"""

import logging
import os
from dataclasses import dataclass, field

# Model types whose decoder layer is Llama's up to a FamilySpec (pre-norm, RoPE, q/k/v/o projections, gated
# MLP): the model runner drives their HF submodules with its own slot-KV-cache forward.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})
# Those small-VRAM streaming (worker/offload/layer_stream.py) rebuilds on the device: exactly Llama's layer,
# named q/k/v and gate/up, no window. Other fast-path families stream on the generic path's layer hooks.
STREAMABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
# RoPE whose frequencies depend on the longest position in the batch: a packed batch would rope a row
# differently from generate on that row alone.
BATCH_DEPENDENT_ROPE = frozenset({"longrope", "su", "dynamic"})
# Models whose recurrent state lives in their own modules, not in the cache a forward is handed: it cannot follow
# rows that join or leave a batch (and is not reset for a new one).
MODULE_STATE_MODEL_TYPES = frozenset({"recurrent_gemma"})

FAST, GENERIC = "fast", "generic"

log = logging.getLogger("batchgen.engine")


class ModelNotFound(ValueError):
    """The model's config.json could not be read: no such local directory, no network, unknown or gated repo.
    The CLI reports it in one line with its own exit code (10) rather than a traceback."""


class UnsupportedModel(ValueError):
    """A model neither engine path can serve (not a causal LM), refused before its weights load."""


@dataclass(frozen=True)
class FamilySpec:
    """How a fast-path family's decoder differs from Llama's, read from config.json. What the HF submodules the
    forward reuses already do (Gemma's sqrt(hidden) embedding scale and (1 + w) RMSNorm, GeGLU's tanh gelu, a
    tied lm_head, Phi-3's chunked gate_up MLP, llama3/yarn/linear RoPE) needs no option here."""

    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k, before RoPE
    post_norms: bool = False  # Gemma2: norms after attention and after the MLP, a separate pre-MLP norm
    attn_softcap: float | None = None  # Gemma2: scores -> tanh(scores / c) * c before the mask
    final_softcap: float | None = None  # Gemma2: the same on the logits
    window: int | None = None  # a sliding layer attends to the last `window` positions (itself included)
    sliding_layers: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of(cls, config) -> "FamilySpec":
        window = sliding_window(config)
        return cls(qk_norm=config.model_type == "qwen3", post_norms=config.model_type == "gemma2",
                   attn_softcap=getattr(config, "attn_logit_softcapping", None),
                   final_softcap=getattr(config, "final_logit_softcapping", None),
                   window=window, sliding_layers=_sliding_layers(config) if window else frozenset())

    def window_of(self, layer: int) -> int | None:
        return self.window if layer in self.sliding_layers else None

    @property
    def is_llama(self) -> bool:
        return self == FamilySpec()


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
    if getattr(config.get_text_config(), "num_attention_heads", None) is None:
        raise UnsupportedModel(f"model {model!r} ({model_type}) has no attention heads (a state-space or recurrent "
                               "model): batchgen sizes and batches rows by their K/V cache")
    if model_type in MODULE_STATE_MODEL_TYPES:
        raise UnsupportedModel(f"model {model!r} ({model_type}) keeps its recurrent state in its own modules, not in "
                               "a cache: batchgen cannot batch its rows")
    rope = rope_types(config)
    if model_type in SUPPORTED_MODEL_TYPES and rope & BATCH_DEPENDENT_ROPE:
        return Family(model, model_type, GENERIC, f"{'/'.join(sorted(rope & BATCH_DEPENDENT_ROPE))} RoPE scaling "
                      "depends on the batch's longest sequence, which the packed fast path cannot reproduce per "
                      "row", config)
    if model_type in SUPPORTED_MODEL_TYPES:
        spec = FamilySpec.of(config)
        differences = [name for name, on in (("q/k norms", spec.qk_norm), ("post norms", spec.post_norms),
                                             ("softcaps", spec.attn_softcap or spec.final_softcap),
                                             (f"window {spec.window}", spec.window)) if on]
        return Family(model, model_type, FAST, "its decoder layer is Llama's" +
                      (f" with {', '.join(differences)}" if differences else "") + " (slot-KV forward)", config)
    return Family(model, model_type, GENERIC,
                  f"no fast path for {model_type!r} (fast: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); "
                  "HF forward with a left-padded KV cache", config)


def sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _sliding_layers(config) -> frozenset[int]:
    """The layers a window applies to: config.layer_types where the model has them (Gemma2 alternates, Qwen2
    from max_window_layers on), else every layer (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types:
        return frozenset(i for i, t in enumerate(types) if t == "sliding_attention")
    return frozenset(range(config.num_hidden_layers))


def rope_types(config) -> set[str]:
    """The RoPE variants a config names (rope_parameters, or the older rope_scaling; per layer type or not)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)] or [params]
    return {p.get("rope_type") or p.get("type") or "default" for p in nested}


def _not_found_message(model: str, exc: BaseException) -> str:
    causes = {type(e).__name__ for e in _chain(exc)}
    if os.path.isdir(model):  # before the path test below: an existing absolute directory is not "no such"
        return f"model {model!r} not found: the local directory {os.path.abspath(model)!r} has no readable config.json"
    if os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model:
        return f"model {model!r} not found: no such local directory (and not a hub id)"
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
