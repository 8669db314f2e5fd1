"""A tiny, randomly initialised Llama + a tokenizer trained on the fly: an offline stand-in for a real model.

Its output is gibberish by design (random weights); it exists so the README's main job, the tests
and CI exercise the real load-in-8-bit and generation paths without a model hub.
"""

from pathlib import Path

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "batch generation keeps the gpu busy all night long",
    "write a short poem about the sea and the stars",
    "summarise the following text in one sentence please",
    "translate hello world into french german and spanish",
    "what is the capital of france and why is it famous",
    "list three prime numbers larger than one hundred",
    "explain how a queue of jobs works in redis",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def write_demo_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 384,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """Writes config, random weights and tokenizer to out_dir; loads like any local HF model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    if chat_template:
        hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Larger-than-default init spreads the logits, so greedy argmax is not decided by int8 rounding noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out)
    (out / "RANDOM_WEIGHTS.txt").write_text("Randomly initialised demo model: output is meaningless by design.\n")
    return out
