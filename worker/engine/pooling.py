"""How an embedding model's token states become one vector per text, read from the model's own files.

A sentence-transformers model says it in modules.json and its Pooling module's config.json (read here by hand,
without the package): mean, cls or lasttoken pooling, and its Transformer module's max_seq_length and lower-casing.
Without them the model's kind decides: a decoder-only model's last token is the one that attends to the whole
text; an encoder's tokens are averaged (BERT-style). Vectors are L2-normalised after pooling, as OpenAI's are.
"""

import json
import os
from dataclasses import dataclass

import torch

MODULES_FILE = "modules.json"
MODES = ("mean", "cls", "lasttoken")
ST = "sentence_transformers.models."
# sentence-transformers' modules we reproduce: the model itself, its pooling, and the normalisation we always apply
KNOWN_MODULES = (ST + "Transformer", ST + "Pooling", ST + "Normalize")
# Pooling/config.json's flags; more than one set concatenates the poolings, which no OpenAI-shaped vector is
ST_MODE_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_lasttoken": "lasttoken", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean"}


class UnsupportedPooling(ValueError):
    """A sentence-transformers pipeline this engine would not reproduce: refused at start-up, before weights load."""


@dataclass(frozen=True)
class Pooling:
    mode: str  # one of MODES
    why: str  # where the mode came from, for the start-up log
    max_seq_length: int | None = None  # sentence_bert_config.json: inputs past it are refused, as vLLM caps them
    lowercase: bool = False  # sentence_bert_config.json's do_lower_case: sentence-transformers lower-cases inputs

    def describe(self) -> str:
        return f"{self.mode} ({self.why})"


def model_file(model: str, name: str) -> str | None:
    """The path of one of the model's files (local directory or hub id, the hub's cache included), or None."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    try:
        return cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False)
    except OSError:
        return None


def read_pooling(model: str, decoder_only: bool) -> Pooling:
    """The model's pooling: sentence-transformers' when it ships modules.json, else its kind's usual one."""
    modules_path = model_file(model, MODULES_FILE)
    if modules_path is None:
        if decoder_only:
            return Pooling("lasttoken", "a decoder-only model without a sentence-transformers config")
        return Pooling("mean", "an encoder without a sentence-transformers config")
    modules = _read_json(modules_path)
    for module in modules:
        if module.get("type") not in KNOWN_MODULES:
            raise UnsupportedPooling(f"model {model!r}: sentence-transformers module {module.get('path')!r} "
                                     f"({module.get('type')}) is not supported (only Transformer, Pooling and "
                                     "Normalize are), so its vectors would differ from sentence-transformers'")
    paths = {m["type"]: m.get("path", "") for m in modules}
    if ST + "Pooling" not in paths:
        raise UnsupportedPooling(f"model {model!r}: its modules.json has no Pooling module")
    config_name = os.path.join(paths[ST + "Pooling"], "config.json")
    mode = _st_mode(model, _read_json(model_file(model, config_name), config_name))
    bert_config = model_file(model, os.path.join(paths.get(ST + "Transformer", ""), "sentence_bert_config.json"))
    st = _read_json(bert_config) if bert_config else {}
    return Pooling(mode, f"sentence-transformers {config_name}", st.get("max_seq_length"),
                   bool(st.get("do_lower_case", False)))


def _st_mode(model: str, config: dict) -> str:
    if isinstance(config.get("pooling_mode"), str):  # the single-string form some configs carry
        modes = [{"cls_token": "cls", "mean_tokens": "mean"}.get(config["pooling_mode"], config["pooling_mode"])]
    else:
        modes = [mode for flag, mode in ST_MODE_FLAGS.items() if config.get(flag)]
    if len(modes) != 1 or modes[0] not in MODES:
        raise UnsupportedPooling(f"model {model!r}: sentence-transformers pooling {'+'.join(modes) or 'none'} is "
                                 f"not supported (one of {', '.join(MODES)})")
    return modes[0]


def _read_json(path: str | None, name: str = MODULES_FILE):
    if path is None:
        raise UnsupportedPooling(f"{name} is named by modules.json but missing")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[rows, tokens, hidden] states of right-padded rows (mask 1 on real tokens) -> [rows, hidden] in float32."""
    hidden = hidden.float()
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def normalise(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
