"""Tiny random causal LMs of many architectures (2 layers, hidden 64), saved with the demo model's trained
tokenizer so they load by path like any real model. Output is gibberish; what matters is that the engine
produces the same gibberish as HF `generate` on the same weights.
"""

from pathlib import Path

HIDDEN, LAYERS, HEADS, FFN, MAX_POS = 64, 2, 4, 128, 512
WINDOW = 8  # sliding window of the windowed models: shorter than the test prompts


def _configs() -> dict:
    from transformers import (
        BertConfig,
        BloomConfig,
        FalconConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPT2Config,
        GPTBigCodeConfig,
        GPTNeoXConfig,
        MistralConfig,
        MixtralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2MoeConfig,
        Qwen3Config,
    )

    llama_like = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=2, max_position_embeddings=MAX_POS)
    return {
        "gpt2": lambda: GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS),
        "bloom": lambda: BloomConfig(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
        "opt": lambda: OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                                 max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN),
        "gpt_neox": lambda: GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          intermediate_size=FFN, max_position_embeddings=MAX_POS),
        "falcon": lambda: FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       max_position_embeddings=MAX_POS),
        "gemma": lambda: GemmaConfig(head_dim=16, **llama_like),
        # soft caps small enough to bend these tiny models' scores and logits (the defaults, 50 and 30, never bite)
        "gemma2": lambda: Gemma2Config(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=0.02,
                                       final_logit_softcapping=2.0, **llama_like),
        "phi3": lambda: Phi3Config(**llama_like),
        "qwen3": lambda: Qwen3Config(head_dim=16, **llama_like),
        "mixtral": lambda: MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **llama_like),
        # beyond the issue's list: multi-query attention, MoE with a shared expert, Gemma 3's scaled-embedding module
        # with alternating sliding layers (all on the generic path)
        "gpt_bigcode": lambda: GPTBigCodeConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS),
        "qwen2_moe": lambda: Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=32, **llama_like),
        "gemma3_text": lambda: Gemma3TextConfig(head_dim=16, sliding_window=WINDOW, **llama_like),
        **_more_generic(llama_like),
        "mistral_window": lambda: MistralConfig(sliding_window=WINDOW, **llama_like),
        "bert": lambda: BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   intermediate_size=FFN, max_position_embeddings=MAX_POS),
    }


def _more_generic(llama_like: dict) -> dict:
    """More architectures the generic path runs unchanged (rotary variants, parallel blocks, fused qkv, ALiBi in
    MPT, local attention in GPT-Neo, Granite's multipliers): each answers like HF generate."""
    import transformers as t

    no_gqa = {k: v for k, v in llama_like.items() if k != "num_key_value_heads"}
    gpt = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS)
    return {
        "gptj": lambda: t.GPTJConfig(rotary_dim=8, **gpt),
        "codegen": lambda: t.CodeGenConfig(rotary_dim=8, **gpt),
        "stablelm": lambda: t.StableLmConfig(**llama_like),
        "olmo2": lambda: t.Olmo2Config(**llama_like),
        "starcoder2": lambda: t.Starcoder2Config(**llama_like),
        "cohere": lambda: t.CohereConfig(**llama_like),
        "phi": lambda: t.PhiConfig(**no_gqa),
        "gpt_neo": lambda: t.GPTNeoConfig(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                          max_position_embeddings=MAX_POS, window_size=WINDOW,
                                          attention_types=[[["global", "local"], 1]]),
        "mpt": lambda: t.MptConfig(d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=MAX_POS),
        "persimmon": lambda: t.PersimmonConfig(**no_gqa),
        "granite": lambda: t.GraniteConfig(**llama_like),
    }


ARCHITECTURES = [name for name in _configs() if name != "bert"]


def write_tiny_model(out_dir: str | Path, arch: str | None, tokenizer_dir: str | Path, *, weights: bool = True,
                     seed: int = 0, num_layers: int | None = None, config=None) -> Path:
    """config.json + tokenizer (+ random weights unless weights=False) of `arch` (or of a config built elsewhere)
    in out_dir; num_layers: other than LAYERS (streaming tests need more layers than stage slots)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    config = _configs()[arch]() if config is None else config
    config.vocab_size = len(tok)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = (config.layer_types * num_layers)[:num_layers]
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    if not weights:
        config.save_pretrained(out)
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default init spreads the logits, so greedy argmax is not decided by int8 rounding noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out
