"""Tiny random models built from configs: seeded, CPU, milliseconds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_llama(
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    vocab_size: int = 128,
    intermediate_size: int = 128,
) -> LlamaForCausalLM:
    """A random Llama-style decoder (GQA: 4 query heads, 2 KV heads)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``<pad> <s> </s> <unk> w0 w1 ...`` (ids match tiny_llama's
    special tokens: pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i + 4 for i in range(vocab_size - 4)}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | words
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
