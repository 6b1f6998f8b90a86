"""``write_gguf``: a dense Llama (its tensors planned by ``tensors.py``) and its tokenizer
(``vocab.py``) into one GGUF file, architecture ``llama``.

Metadata: ``llama.context_length`` (max positions), ``embedding_length``, ``block_count``,
``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``,
``attention.layer_norm_rms_epsilon``, ``rope.dimension_count`` (the head dimension),
``rope.freq_base``, ``attention.key_length`` / ``value_length`` (when the head dimension is
not hidden / heads), ``vocab_size``, ``general.file_type`` and
``general.quantization_version``; the tokenizer's ``tokenizer.ggml.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowpress.core.errors import KnowpressError
from knowpress.formats.gguf.tensors import Stored, plan

ARCH = "llama"
#: weights -> llama.cpp's general.file_type (LlamaFileType)
FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_k": "MOSTLY_Q4_K_S"}


def check_model(config: Any) -> None:
    """One line when ``config`` is not a dense Llama-style decoder this writer maps."""
    kind = getattr(config, "model_type", None)
    if kind != "llama":
        what = "a mixture of experts" if _experts(config) else f"model_type {kind!r}"
        raise KnowpressError(
            f"GGUF export writes dense Llama-style models (llama.cpp architecture llama); "
            f"{what} is not one: export it with format: onnx"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise KnowpressError(
            "GGUF export: this Llama has attention or MLP biases, which the writer does not "
            "map; export it with format: onnx"
        )
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise KnowpressError(
            f"GGUF export: rope_type {rope.get('rope_type')!r} (rope scaling) is not written "
            "to GGUF here; export it with format: onnx"
        )


def _experts(config: Any) -> bool:
    return any(getattr(config, key, None) for key in (
        "num_local_experts", "num_experts", "n_routed_experts"))  # fmt: skip


def rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params = {**params, "rope_theta": config.rope_theta}
    return dict(params)


def head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def _metadata(writer: Any, config: Any, weights: str) -> None:
    import gguf

    heads = config.num_attention_heads
    writer.add_name("knowpress export")
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[weights]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    if dim != config.hidden_size // heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_vocab_size(int(config.vocab_size))


def write_gguf(path: Path, model: Any, tokenizer: Any, weights: str) -> tuple[list[Stored], str]:
    """Write ``model`` (changed in place to hold the stored weights: ``tensors.plan``) and
    ``tokenizer`` to ``path``; (the stored tensors, how the tokenizer was written)."""
    import gguf

    from knowpress.formats.gguf.vocab import add_vocab

    config = model.config.get_text_config(decoder=True)
    check_model(config)
    stored = plan(model, weights)
    writer = gguf.GGUFWriter(str(path), ARCH)
    try:
        _metadata(writer, config, weights)
        rows = int(model.get_input_embeddings().weight.shape[0])
        vocab = add_vocab(writer, tokenizer, rows)
        for tensor in stored:
            qtype = gguf.GGMLQuantizationType[tensor.qtype]
            raw = None if tensor.qtype in ("F32", "F16") else qtype
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return stored, vocab
