"""Tiny random models built from configs: seeded, CPU, milliseconds."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)


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


def tiny_mixtral(seed: int = 0, layers: int = 1, vocab_size: int = 64) -> MixtralForCausalLM:
    """A random Mixtral-style MoE decoder: hidden 32, 4 experts (intermediate 64), top-2.

    transformers 5 fuses each block's experts into ``experts.gate_up_proj [4, 128, 32]`` and
    ``experts.down_proj [4, 32, 64]``; the router is ``mlp.gate.weight [4, 32]``.
    """
    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


_MOE_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "intermediate_size": 64},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 32, "intermediate_size": 64,
                  "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 32, "intermediate_size": 64,
                  "decoder_sparse_step": 1, "norm_topk_prob": True},
    "olmoe": {"num_experts": 4, "intermediate_size": 32},
    "deepseek_v3": {"n_routed_experts": 4, "moe_intermediate_size": 32, "intermediate_size": 64,
                    "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
                    "first_k_dense_replace": 0, "q_lora_rank": None, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                    "head_dim": 8, "norm_topk_prob": True},
}  # fmt: skip


def tiny_moe(arch: str, seed: int = 0, layers: int = 1, vocab_size: int = 64) -> Any:
    """A random tiny MoE decoder of ``arch`` (``_MOE_CONFIGS``): hidden 32, 4 routed experts,
    top-2, 4 heads; Qwen2-MoE and DeepSeek-V3 with a shared expert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch, vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=2,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **_MOE_CONFIGS[arch],
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
