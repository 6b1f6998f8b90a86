"""``read_model``: a GGUF file back into a Hugging Face Llama, from the file alone.

The config comes from the file's ``llama.*`` metadata (and the special token ids from
``tokenizer.ggml.*``), every tensor is dequantized to float32 with ``gguf.quants.dequantize``
(``attn_q`` / ``attn_k`` rows un-permuted), and a file without ``output.weight`` ties the
head to the embedding, as llama.cpp does. Any other architecture, a missing tensor or one
of the wrong shape is one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.core.errors import KnowpressError, error_summary
from knowpress.formats.gguf.tensors import LAYER_TENSORS, decode, unpermute

_HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: Any, where: Path) -> Any:
    """The ``LlamaConfig`` a GGUF file's metadata describes."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise KnowpressError(f"{where}: GGUF architecture {arch!r}; knowpress reads llama only")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise KnowpressError(f"{where}: no token_embd.weight tensor")
    vocab, hidden = (int(d) for d in reversed(names["token_embd.weight"].shape.tolist()))

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise KnowpressError(f"{where}: no llama.{key} in the GGUF metadata")
        return value

    heads = int(need("attention.head_count"))
    dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=int(need("embedding_length")),
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=dim,
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _hf_name(name: str) -> tuple[str, str | None]:
    """(Hugging Face parameter name, ``attn_q`` / ``attn_k`` or None)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name], None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        kind = parts[2]
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[kind]}.weight", (
            kind if kind in ("attn_q", "attn_k") else None
        )
    raise KnowpressError(f"GGUF tensor {name!r} is not one of a dense Llama's")


def read_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The Llama stored in the GGUF file at ``path``, in ``dtype`` (see the module docstring)."""
    import gguf
    from transformers import LlamaForCausalLM

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise KnowpressError(f"{path}: not a readable GGUF file ({error_summary(exc)})") from None
    config = read_config(reader, path)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state = {}
    for tensor in reader.tensors:
        name, permuted = _hf_name(tensor.name)
        values = decode(np.asarray(tensor.data), tensor.tensor_type.name)
        if permuted is not None:
            values = unpermute(values, heads[permuted])
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {
        k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    missing = sorted(expected - set(state))
    if missing:
        raise KnowpressError(f"{path}: no GGUF tensor for {missing[0]} ({len(missing)} missing)")
    for key, value in model.state_dict().items():
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise KnowpressError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, the metadata says "
                f"{tuple(value.shape)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()
