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


def load_model(
    model: str, *, device: torch.device, dtype: torch.dtype, load_in_8bit: bool, int8_threshold: float
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    kwargs: dict = {"dtype": dtype}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold)
        kwargs["device_map"] = {"": device}
        if dtype != torch.float16:
            # bnb casts every non-fp16 input to fp16 and logs a warning per matmul call; the cast is expected here.
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    hf_model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if not load_in_8bit:
        hf_model = hf_model.to(device)
    hf_model.eval()
    weights_bytes = sum(t.numel() * t.element_size() for t in (*hf_model.parameters(), *hf_model.buffers()))
    return LoadedModel(hf_model, tokenizer, device, dtype, weights_bytes)
