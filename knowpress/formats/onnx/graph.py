"""ONNX export of a causal decoder with its KV cache as graph inputs and outputs.

Through ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript; optimum-onnx pins
transformers<4.58). The graph, for ``L`` layers::

    input_ids [batch, sequence] int64, attention_mask [batch, total_sequence] int64,
    position_ids [batch, sequence] int64,
    past_key_values.{i}.key|value [batch, kv_heads, past_sequence, head_dim] float32
      -> logits [batch, sequence, vocab] float32,
         present.{i}.key|value [batch, kv_heads, past_sequence + sequence, head_dim]

``total_sequence = past_sequence + sequence``; a prefill passes ``past_sequence = 0``. The
mask is the 2-D padding mask over past and current tokens (the causal part is in the
graph), ``position_ids`` are the rotary positions, so a caller that evicts past tokens
(``session.py``: the KV policy's layers) keeps positions running on from the tokens seen.
Exported with a KV policy, the graph also has the I/O that policy needs in the loop
(``policy_io.py``: ``queries.{i}`` outputs, ``past_valid.{i}`` inputs). Key and value
head dims may differ (DeepSeek-V3's MLA caches ``qk_nope + qk_rope`` keys, ``v_head_dim``
values). Weights go to external data (``model.onnx.data``) so graphs over 2 GB load.

MoE: transformers 5's fused experts dispatch through ``grouped_mm`` (``histc`` +
``transformers.grouped_mm_fallback``), which has no ONNX translation; exporting after
``model.set_experts_implementation("batched_mm")`` (a gather of each token's experts and a
batched matmul) works and is what is done here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowpress.core.errors import KnowpressError, error_summary

DENSE = ("llama",)
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 20


@dataclass(frozen=True)
class GraphSpec:
    """What a runtime needs to drive the graph (``knowpress_export.json``)."""

    model_type: str
    layers: int
    kv_heads: list[int]
    key_dims: list[int]
    value_dims: list[int]
    vocab_size: int
    max_positions: int
    parameter_count: int
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    #: each layer's attention scaling (what a policy scoring attention multiplies q·k by)
    scaling: list[float] = field(default_factory=list)
    #: the KV-policy I/O the graph carries (``policy_io.py``)
    io: list[str] = field(default_factory=list)

    def dump(self) -> dict[str, Any]:
        return asdict(self)


def supported() -> tuple[str, ...]:
    from knowpress.arch.moe import ARCHITECTURES

    return (*DENSE, *ARCHITECTURES)


def check_exportable(config: Any) -> None:
    """One line naming the architecture when the exporter does not handle it."""
    kind = getattr(config, "model_type", None)
    if kind not in supported():
        raise KnowpressError(
            f"model_type {kind!r}: ONNX export supports {', '.join(supported())}; "
            "export another architecture with its own exporter"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise KnowpressError(
            f"model_type {kind!r} with sliding_window {config.sliding_window}: the exported "
            "graph has full-attention KV inputs; export a model without a sliding window"
        )


class KVDecoder(torch.nn.Module):
    """The flat-tensor signature of the module docstring around a transformers decoder;
    ``io``: the KV-policy I/O it adds (``policy_io.py``)."""

    def __init__(
        self, model: torch.nn.Module, layers: int, io: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        from knowpress.formats.onnx.policy_io import attention_modules

        self.model, self.layers, self.io = model, layers, io
        self.attention = attention_modules(model) if io else []

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: tuple[torch.Tensor, ...],
        valid: tuple[torch.Tensor, ...] = (),
    ) -> tuple[Any, ...]:
        from transformers import DynamicCache

        from knowpress.formats.onnx.policy_io import QUERIES, close_slots, open_slots

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        slots = open_slots(self.attention, valid)
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            close_slots(self.attention)
        present = []
        for layer in out.past_key_values.layers[: self.layers]:
            present += [layer.keys, layer.values]
        queries = [slot["queries"] for slot in slots] if QUERIES in self.io else []
        return (out.logits, *present, *queries)


def io_names(layers: int, io: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    from knowpress.formats.onnx.policy_io import PAST_VALID, QUERIES

    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv)]
    outputs = ["logits", *(f"present.{n}" for n in kv)]
    if PAST_VALID in io:
        inputs += [f"past_valid.{i}" for i in range(layers)]
    if QUERIES in io:
        outputs += [f"queries.{i}" for i in range(layers)]
    return inputs, outputs


@torch.no_grad()
def graph_spec(model: torch.nn.Module) -> GraphSpec:
    """Shapes of the cache the model writes (read off a 2-token forward, so MLA and GQA are
    whatever the model does) and the ids a runtime needs."""
    from knowpress.formats.onnx.policy_io import attention_modules
    from knowpress.formats.sizes import parameter_count

    config = model.config.get_text_config(decoder=True)
    ids = torch.tensor([[1, 1]], device=next(model.parameters()).device)
    layers = model(input_ids=ids, use_cache=True).past_key_values.layers
    head_dim = int(layers[0].keys.shape[3])
    scaling = [float(getattr(m, "scaling", head_dim**-0.5)) for m in attention_modules(model)]
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) or config.eos_token_id
    return GraphSpec(
        model_type=config.model_type,
        layers=len(layers),
        kv_heads=[int(layer.keys.shape[1]) for layer in layers],
        key_dims=[int(layer.keys.shape[3]) for layer in layers],
        value_dims=[int(layer.values.shape[3]) for layer in layers],
        vocab_size=int(config.vocab_size),
        max_positions=int(config.max_position_embeddings),
        parameter_count=parameter_count(model),
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=config.pad_token_id,
        scaling=scaling,
    )


def example_inputs(spec: GraphSpec, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[Any, ...]:
    from knowpress.formats.onnx.policy_io import PAST_VALID

    ids = torch.ones((batch, seq), dtype=torch.long)
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = []
    for heads, kd, vd in zip(spec.kv_heads, spec.key_dims, spec.value_dims, strict=True):
        kv += [torch.zeros(batch, heads, past, kd), torch.zeros(batch, heads, past, vd)]
    valid = ()
    if PAST_VALID in spec.io:
        valid = tuple(torch.ones(batch, heads, past, dtype=torch.bool) for heads in spec.kv_heads)
    return ids, mask, pos, tuple(kv), valid


@torch.no_grad()
def as_float32(model: torch.nn.Module) -> None:
    """Float parameters and buffers to float32 on the CPU, in place (not ``.float()``:
    transformers refuses it on a model loaded through a quantizer)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to("cpu", torch.float32)
        else:
            tensor.data = tensor.data.cpu()
    model.eval()


def export_graph(model: torch.nn.Module, path: Path, io: frozenset[str] = frozenset()) -> GraphSpec:
    """Export ``model`` (float32, CPU, eval) to ``path`` (graph + ``DATA_FILE`` beside it),
    with the KV-policy I/O ``io`` (``policy_io.py``)."""
    from torch.export import Dim

    from knowpress.formats.onnx.policy_io import KNOWN, traced_with

    config = model.config.get_text_config(decoder=True)
    check_exportable(config)
    if io - KNOWN:
        raise KnowpressError(f"graph I/O {sorted(io - KNOWN)} is unknown to this exporter")
    if hasattr(model, "set_experts_implementation") and config.model_type != "llama":
        model.set_experts_implementation("batched_mm")  # grouped_mm has no ONNX translation
    as_float32(model)
    spec = replace(graph_spec(model), io=sorted(io))
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    example = example_inputs(spec)
    dynamic = (
        {0: batch, 1: seq},
        {0: batch, 1: Dim.AUTO},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past} for _ in range(2 * spec.layers)),
        tuple({0: batch, 2: past} for _ in example[4]),
    )
    if not example[4]:  # torch.onnx turns an empty tuple's shapes into a list: leave it out
        example, dynamic = example[:4], dynamic[:4]
    inputs, outputs = io_names(spec.layers, io)
    try:
        with traced_with(model, io):
            program = torch.onnx.export(
                KVDecoder(model, spec.layers, io).eval(),
                example,
                dynamic_shapes=dynamic,
                input_names=inputs,
                output_names=outputs,
                dynamo=True,
                opset_version=OPSET,
                external_data=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export's errors are pages long: name the model, cut it
        raise KnowpressError(
            f"model_type {config.model_type!r}: torch.onnx export failed ({error_summary(exc)})"
        ) from None
    program.save(str(path), external_data=True)
    finalize(path)
    return spec


def finalize(path: Path) -> None:
    """Tidy the exported graph in place: the mask's free axis (torch.export's ``s<n>``)
    named ``total_sequence``; a tied output head, which the exporter stores as a second,
    transposed copy of the embedding, read through a ``Transpose`` of the embedding instead
    (onnxruntime folds it once at load; the file holds the matrix once); per-node stack
    traces (``metadata_props``) dropped."""
    import onnx

    from knowpress.formats.onnx.nbits_graph import save

    model = onnx.load(str(path))
    graph = model.graph
    graph.input[1].type.tensor_type.shape.dim[1].dim_param = "total_sequence"
    share_transposed(graph)
    for node in graph.node:
        del node.metadata_props[:]
    save(model, path)


HALF_MIN = 1024  # float tensors at least this large are stored in float16 with store: float16


def store_half(path: Path) -> int:
    """Every float32 initializer of ``HALF_MIN``+ elements that is not a ``MatMulNBits``
    scale becomes float16 on disk behind a ``Cast`` to float32 (onnxruntime folds the cast
    once at load: the math stays float32); returns how many. In place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from knowpress.formats.onnx.nbits_graph import save

    model = onnx.load(str(path))
    graph = model.graph
    scales = {n.input[2] for n in graph.node if n.op_type == "MatMulNBits"}
    keep, casts = [], []
    for init in graph.initializer:
        if (
            init.data_type != TensorProto.FLOAT
            or init.name in scales
            or int(np.prod(init.dims)) < HALF_MIN
        ):
            keep.append(init)
            continue
        half = numpy_helper.from_array(
            numpy_helper.to_array(init).astype(np.float16), f"{init.name}.float16"
        )
        keep.append(half)
        casts.append(
            helper.make_node(
                "Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=f"{init.name}.Cast"
            )
        )
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in casts:
        graph.node.insert(0, node)
    save(model, path)
    return len(casts)


@torch.no_grad()
def round_half(model: torch.nn.Module, skip: set[str]) -> None:
    """The PyTorch side of ``store_half``: the same tensors rounded to float16 and back, so
    parity compares the weights the graph holds (``skip``: parameter names MatMulNBits
    holds as codes)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.numel() >= HALF_MIN and name not in skip:
            tensor.data = tensor.data.half().float()


def share_transposed(graph: Any) -> int:
    """Replace every 2-D constant that is the transpose of another initializer by a
    ``Transpose`` node of that initializer; returns how many were replaced."""
    import hashlib

    from onnx import helper, numpy_helper

    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 2}
    digest = {hashlib.sha1(a.tobytes()).hexdigest(): n for n, a in arrays.items()}
    other_uses = {i for n in graph.node if n.op_type != "MatMul" for i in n.input}
    aliases: dict[str, str] = {}
    for name, array in arrays.items():  # only a MatMul-only copy is replaced (not a Gather's)
        if name in other_uses or array.shape[0] == array.shape[1]:
            continue
        source = digest.get(hashlib.sha1(array.T.copy().tobytes()).hexdigest())
        if source is not None and source != name and source not in aliases:
            aliases[name] = source
    if not aliases:
        return 0
    nodes = [
        helper.make_node(
            "Transpose", [src], [f"{name}.shared"], perm=[1, 0], name=f"{name}.Transpose"
        )
        for name, src in aliases.items()
    ]
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in aliases:
                node.input[i] = f"{value}.shared"
    keep = [i for i in graph.initializer if i.name not in aliases]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in nodes:  # before every consumer: graphs are topologically sorted
        graph.node.insert(0, node)
    return len(aliases)


def graph_inputs(graph: Path) -> list[tuple[str, list[int | str]]]:
    """(name, dims) of the graph's inputs, symbolic axes by name (read without weights)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return [
        (i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
        for i in model.graph.input
    ]
