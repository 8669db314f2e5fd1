"""Loads the model once: 8-bit bitsandbytes weights, fp16 compute on CUDA (float32 on CPU), and its tokenizer."""

import logging
from dataclasses import dataclass

import torch
from batchgen.worker.engine.families import SUPPORTED_MODEL_TYPES  # noqa: F401 - llm_engine reads it from here


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    weights_bytes: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda:0")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown compute_dtype {name!r}")
    return dtype


def skip_modules(model: str, fp16_modules: tuple[str, ...]) -> list[str] | None:
    """bnb's llm_int8_skip_modules for fp16_modules: naming any replaces transformers' default list, so the
    defaults (the output head, e.g. lm_head or embed_out) are added back, read off a weightless copy."""
    if not fp16_modules:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # transformers 5
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # transformers 4
        from transformers.integrations import get_keys_to_not_convert

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sorted({*get_keys_to_not_convert(skeleton), *fp16_modules})


def kept_in_fp16(module_name: str, fp16_modules: tuple[str, ...]) -> bool:
    """Whether llm_int8_skip_modules=fp16_modules leaves this module unquantised, matched as transformers matches
    them when it loads (prefix at a module boundary, regex, or suffix), so size estimates agree with the load."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # transformers 4: prefixes
        return any(module_name == m or module_name.startswith(m + ".") for m in fp16_modules)
    return bool(fp16_modules) and not should_convert_module(module_name, list(fp16_modules))


def load_model(
    model: str, *, device: torch.device, dtype: torch.dtype, load_in_8bit: bool, int8_threshold: float,
    fp16_modules: tuple[str, ...] = (),
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    skip = skip_modules(model, fp16_modules) if load_in_8bit else None
    hf_model = load_weights(AutoModelForCausalLM, model, device=device, dtype=dtype, load_in_8bit=load_in_8bit,
                            int8_threshold=int8_threshold, skip=skip)
    return LoadedModel(hf_model, tokenizer, device, dtype, weights_bytes(hf_model))


def load_weights(auto_class, model: str, *, device: torch.device, dtype: torch.dtype, load_in_8bit: bool,
                 int8_threshold: float, skip: list[str] | None) -> torch.nn.Module:
    """auto_class's model on device in eval mode: bnb 8-bit linears (skip: modules kept in dtype) or dtype whole."""
    from transformers import BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=int8_threshold, llm_int8_skip_modules=skip)
        kwargs["device_map"] = {"": device}
        if dtype != torch.float16:
            # bnb casts every non-fp16 input to fp16 and logs a warning per matmul call; the cast is expected here.
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    hf_model = auto_class.from_pretrained(model, **kwargs)
    if not load_in_8bit:
        hf_model = hf_model.to(device)
    return hf_model.eval()


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
