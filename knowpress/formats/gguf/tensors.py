"""Which GGUF tensor each weight of a dense Llama becomes, and how it is stored.

Names are llama.cpp's (``token_embd``, ``blk.N.attn_q`` ... ``ffn_down``, ``output_norm``,
``output``; no ``output`` when the head is tied to the embedding). ``attn_q`` / ``attn_k``
rows are permuted as convert_hf_to_gguf does (llama.cpp's rotary embedding pairs
neighbouring dimensions, Hugging Face's the two halves of each head); the permutation moves
whole rows, so blocks of codes move with them.

Each matrix (weights ``q8_0`` / ``q4_0`` / ``q4_k``) is one of:

- **carried**: a symmetric packed module (``QuantLinear``, ``QuantEmbedding``) whose groups
  are whole 32-value blocks, written code for code. Q4_0 and Q8_0 are blocks of 32 values
  with one float16 scale ``d`` and value ``d·(q − 8)`` (Q4_0) or ``d·q`` (Q8_0, int8):
  knowpress's symmetric codes decode as ``(q − 2^(b−1))·s`` with a float16 ``s``, so a b-bit
  code becomes ``q − 2^(b−1) + 8`` (Q4_0, b <= 4) or ``q − 2^(b−1)`` (Q8_0, b <= 8) under
  the same scale (a group of 64 or 128 repeats it over its blocks). The written blocks are
  dequantized with ``gguf.quants.dequantize`` and must equal the module's own dequantized
  weight exactly, else the tensor is re-quantized.
- **requantized**: a packed module whose codes the type cannot hold (asymmetric, more bits
  than the type, groups that are not whole blocks, or any Q4_K target: its 6-bit sub-block
  scales and mins cannot hold float16 group scales), quantized again from its dequantized
  weight.
- **quantized**: a float weight quantized (``gguf.quants.quantize``; Q4_K by ``kquant.py``).

Rows whose length the type's block does not divide fall back as llama.cpp's quantizer does:
Q4_K -> Q5_0 -> F16, Q4_0 / Q8_0 -> F16. Norms stay F32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from knowpress.core.errors import KnowpressError
from knowpress.tensors.packing import sqnr_db, unpack

#: ``weights:`` -> the GGML type of every matrix
WEIGHT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K"}
#: a type -> what llama.cpp's quantizer uses when a row's length is not a multiple of its block
FALLBACK = {"Q4_K": "Q5_0", "Q5_0": "F16", "Q4_0": "F16", "Q8_0": "F16"}
#: the widest code each carrying type holds (signed, around its own offset)
CARRY_BITS = {"Q8_0": 8, "Q4_0": 4}

#: llama.cpp's per-layer tensor name -> the Hugging Face Llama module it comes from
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NORMS = {"attn_norm", "ffn_norm"}


@dataclass
class Stored:
    """One tensor of the file: GGUF name, the module it comes from, its GGML type name, the
    data as written (float32 / float16 values or uint8 blocks, rows in GGUF order), how it
    was stored (``carried`` / ``requantized`` / ``quantized`` / ``float``) and a note."""

    name: str
    source: str
    qtype: str
    data: np.ndarray
    how: str
    note: str = ""

    def line(self) -> str:
        return f"{self.qtype} {self.how}" + (f" ({self.note})" if self.note else "")


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's ``LlamaModel.permute`` of q/k rows (``heads``: KV heads for k)."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute`."""
    return (
        rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def tensor_names(config: Any, tied: bool) -> Iterator[tuple[str, str]]:
    """(GGUF name, Hugging Face module path) of every tensor, in file order."""
    yield "token_embd.weight", "model.embed_tokens"
    for i in range(config.num_hidden_layers):
        for short, module in LAYER_TENSORS.items():
            yield f"blk.{i}.{short}.weight", f"model.layers.{i}.{module}"
    yield "output_norm.weight", "model.norm"
    if not tied:
        yield "output.weight", "lm_head"


def head_counts(config: Any) -> dict[str, int]:
    """The rows permuted per GGUF tensor kind: query heads for q, KV heads for k."""
    heads = config.num_attention_heads
    return {"attn_q": heads, "attn_k": getattr(config, "num_key_value_heads", None) or heads}


def is_tied(model: Any) -> bool:
    """The output head reads the embedding's table (no ``output.weight`` in the file)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or type(head).__name__ == "TiedQuantHead":
        return True
    return getattr(head, "weight", None) is not None and head.weight is getattr(
        embed, "weight", None
    )


def _gguf() -> Any:
    import gguf

    return gguf


def _qtype(name: str) -> Any:
    return _gguf().GGMLQuantizationType[name]


def _block(name: str) -> int:
    return int(_gguf().GGML_QUANT_SIZES[_qtype(name)][0])


def encode(values: np.ndarray, qtype: str) -> np.ndarray:
    """``values`` (float32 rows) as stored in ``qtype``."""
    if qtype == "F32":
        return values.astype(np.float32)
    if qtype == "F16":
        return values.astype(np.float16)
    if qtype == "Q4_K":
        from knowpress.formats.gguf.kquant import quantize_q4_k

        return quantize_q4_k(values)
    return _gguf().quants.quantize(values, _qtype(qtype))


def decode(data: np.ndarray, qtype: str) -> np.ndarray:
    """Float32 values of stored ``data`` (``gguf.quants.dequantize``)."""
    return np.asarray(_gguf().quants.dequantize(data, _qtype(qtype)), dtype=np.float32)


def _packed(module: Any) -> bool:
    return all(hasattr(module, a) for a in ("weight_packed", "weight_scale", "bits", "group_size",
                                            "symmetric", "dequantized_weight"))  # fmt: skip


def carry(module: Any, qtype: str) -> tuple[np.ndarray | None, str]:
    """The module's codes as ``qtype`` blocks (Q4_0 / Q8_0), or None and why not."""
    bits, group, width = module.bits, module.group_size, _width(module)
    label = f"int{bits} g{group} {'symmetric' if module.symmetric else 'asymmetric'}"
    grid = getattr(module, "grid", "int")
    if grid != "int":
        return None, f"{grid} g{group} codes; {qtype} holds integer codes"
    if qtype not in CARRY_BITS:
        return None, f"{label} codes; Q4_K's 6-bit sub-block scales cannot hold fp16 group scales"
    if not module.symmetric:
        return None, f"{label} codes; {qtype} has no zero point"
    if bits > CARRY_BITS[qtype]:
        return None, f"{label} codes are wider than {qtype}'s"
    if (
        group % 32
        or width % 32
        or tuple(module.weight_scale.shape) != (module.weight_packed.shape[0], width // group)
    ):
        return None, f"{label} codes; {qtype} blocks are 32 values with a scale per row"
    codes = unpack(module.weight_packed.cpu(), bits, width).numpy().astype(np.int16)
    signed = codes - 2 ** (bits - 1)
    rows, blocks = signed.shape[0], width // 32
    scale = module.weight_scale.detach().cpu().to(torch.float16).numpy()
    scale = np.repeat(scale, group // 32, axis=1).reshape(rows, blocks, 1)
    scale_bytes = np.ascontiguousarray(scale).view(np.uint8)  # [rows, blocks, 2]
    signed = signed.reshape(rows, blocks, 32)
    if qtype == "Q8_0":
        payload = signed.astype(np.int8).view(np.uint8)
    else:
        q = (signed + 8).astype(np.uint8)
        payload = q[..., :16] | (q[..., 16:] << 4)
    data = np.concatenate([scale_bytes, payload], axis=-1).reshape(rows, -1)
    expected = module.dequantized_weight(torch.float32).detach().cpu().numpy()
    if not np.array_equal(decode(data, qtype), expected):
        return None, f"{label} codes do not decode identically as {qtype}"
    return data, f"{label} codes"


def _width(module: Any) -> int:
    return int(getattr(module, "in_features", None) or module.embedding_dim)


def _float_weight(module: Any) -> torch.Tensor:
    if _packed(module):
        return module.dequantized_weight(torch.float32)
    return module.weight.detach()


def store(name: str, source: str, module: Any, weights: str,
          heads: dict[str, int]) -> tuple[Stored, np.ndarray]:  # fmt: skip
    """The stored form of one tensor and its float32 values in Hugging Face row order (what
    the file decodes to)."""
    kind = name.split(".")[-2]
    if kind in NORMS or name == "output_norm.weight":
        values = module.weight.detach().float().cpu().numpy()
        return Stored(name, source, "F32", values.astype(np.float32), "float"), values
    target = WEIGHT_TYPES[weights]
    packed = _packed(module)
    data, note, how = None, "", "quantized"
    if packed:
        data, note = carry(module, target)
        how = "carried" if data is not None else "requantized"
    qtype = target
    if data is None:
        source_values = _float_weight(module).float().cpu().numpy()
        if kind in heads:
            source_values = permute(source_values, heads[kind])
        width = source_values.shape[-1]
        while qtype != "F16" and width % _block(qtype):
            fallback = FALLBACK[qtype]
            note = (note + "; " if note else "") + (
                f"fallback: {width} columns are no whole {qtype} block"
            )
            qtype = fallback
        data = encode(source_values, qtype)
        decoded = decode(data, qtype)
        note += ("; " if note else "") + (
            f"SQNR {sqnr_db(torch.from_numpy(source_values), torch.from_numpy(decoded)):.1f} dB"
        )  # fmt: skip
    else:
        if kind in heads:
            data = permute(data, heads[kind])
        decoded = decode(data, qtype)
    values = unpermute(decoded, heads[kind]) if kind in heads else decoded
    return Stored(name, source, qtype, data, how, note), values


def swap_in(model: Any, path: str, module: Any, values: np.ndarray) -> None:
    """Put a stored tensor's decoded ``values`` into the model: a float module's weight is
    overwritten, a packed one replaced by the float module it decodes to."""
    weight = torch.from_numpy(values).to(torch.float32)
    if not _packed(module):
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.dtype))
        return
    if hasattr(module, "in_features"):
        new: torch.nn.Module = torch.nn.Linear(module.in_features, module.out_features,
                                               bias=module.bias is not None)  # fmt: skip
        if module.bias is not None:
            new.bias = torch.nn.Parameter(module.bias.detach().float().clone())
    else:
        new = torch.nn.Embedding(*values.shape, padding_idx=module.padding_idx)
    new.weight = torch.nn.Parameter(weight, requires_grad=False)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new.eval())


def _retie(model: Any) -> None:
    """A head tied to a packed embedding (``TiedQuantHead``) reads the float table now."""
    head = model.get_output_embeddings()
    if head is not None and type(head).__name__ == "TiedQuantHead":
        table = model.get_input_embeddings().weight
        linear = torch.nn.Linear(table.shape[1], table.shape[0], bias=False)
        linear.weight = table
        model.set_output_embeddings(linear.eval())


def plan(model: Any, weights: str) -> list[Stored]:
    """Every tensor of the file (see the module docstring). The model is changed in place
    to hold what the file holds: each stored matrix's decoded values replace its weight
    (packed modules become float ones), so parity compares the file with the same weights."""
    if weights not in WEIGHT_TYPES:
        raise KnowpressError(f"gguf: weights {weights!r} (allowed: {', '.join(WEIGHT_TYPES)})")
    config = model.config.get_text_config(decoder=True)
    heads = head_counts(config)
    tied = is_tied(model)
    out = []
    for name, path in tensor_names(config, tied):
        module = model.get_submodule(path)
        stored, values = store(name, path, module, weights, heads)
        if stored.how != "float":
            swap_in(model, path, module, values)
        out.append(stored)
    if tied:
        _retie(model)
    return out
