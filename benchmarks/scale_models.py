"""Randomly initialised real architectures at a chosen size, saved as HF folders, for the
scale benchmark and the issue's 336 M probe: Llama (dense) and Qwen3-MoE, bf16, a word-level
tokenizer over the whole vocabulary, and a text file of paragraphs drawn from it.

    python benchmarks/scale_models.py llama-336m OUT   # the probe of issue 29
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch

#: name -> (family, config overrides); parameter counts are with a 32,000-word vocabulary
SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-10m": (
        "llama",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            intermediate_size=384,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "llama-100m": (
        "llama",
        dict(
            hidden_size=768,
            num_hidden_layers=8,
            intermediate_size=2048,
            num_attention_heads=12,
            num_key_value_heads=4,
        ),
    ),
    "llama-336m": (
        "llama",
        dict(
            hidden_size=1024,
            num_hidden_layers=24,
            intermediate_size=2816,
            num_attention_heads=16,
            num_key_value_heads=4,
        ),
    ),
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            num_hidden_layers=20,
            intermediate_size=5632,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
    ),
    "qwen3moe-10m": (
        "qwen3_moe",
        dict(
            hidden_size=128,
            num_hidden_layers=4,
            moe_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
        ),
    ),
    "qwen3moe-100m": (
        "qwen3_moe",
        dict(
            hidden_size=512,
            num_hidden_layers=8,
            moe_intermediate_size=256,
            num_experts=16,
            num_experts_per_tok=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
        ),
    ),
    "qwen3moe-350m": (
        "qwen3_moe",
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            moe_intermediate_size=384,
            num_experts=24,
            num_experts_per_tok=4,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
        ),
    ),
    "qwen3moe-1b": (
        "qwen3_moe",
        dict(
            hidden_size=1024,
            num_hidden_layers=16,
            moe_intermediate_size=512,
            num_experts=32,
            num_experts_per_tok=4,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
        ),
    ),
}
VOCAB = 32000


def build_config(name: str) -> Any:
    from transformers import LlamaConfig, Qwen3MoeConfig

    family, values = SIZES[name]
    common = dict(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        return LlamaConfig(**common, **values)
    return Qwen3MoeConfig(**common, **values, decoder_sparse_step=1, mlp_only_layers=[])


def word_tokenizer(vocab: int = VOCAB) -> Any:
    """Word-level: ``<pad> <s> </s> <unk> w4 … w{vocab-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab)}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def paragraphs(count: int, words: int = 600, seed: int = 0, vocab: int = VOCAB) -> list[str]:
    """Zipf-ish word draws, so some words recur as in text."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(vocab - 4)]
    names = [f"w{i}" for i in range(4, vocab)]
    return [" ".join(rng.choices(names, weights, k=words)) for _ in range(count)]


def build(name: str, out: Path, seed: int = 0, text_paragraphs: int = 64) -> Path:
    """Save the model (bf16 safetensors), its tokenizer and ``text.txt`` under ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = build_config(name)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    (out / "text.txt").write_text("\n\n".join(paragraphs(text_paragraphs, seed=seed)) + "\n")
    return out


def params_of(name: str) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(name))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SIZES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    build(args.name, args.out)
    print(f"{args.name}: {params_of(args.name):,} parameters -> {args.out}")


if __name__ == "__main__":
    main()
