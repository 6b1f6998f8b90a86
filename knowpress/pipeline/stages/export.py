"""``kind: export`` — a deployable ONNX bundle (scored by onnxruntime with every task) or a
GGUF file for llama.cpp (``format: gguf``).

```yaml
- kind: export
  format: onnx
  weights: int4            # float32 | int4 (MatMulNBits) | int8 (dynamic)
  block_size: 32           # int4 re-quantization of float linears (RTN)
  symmetric: true
  accuracy_level: auto     # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fast on
                           # CPU); auto: 4, and 0 when parity fails at 4

  ignore: [lm_head]        # float linears left float (globs)
  store: float32           # float16: tensors left float stored half size (cast in the graph)
  parity: {prompts: 4, new_tokens: 8, greedy_equal: true}
  tensorrt: null           # {precision: fp16} builds model.engine (CUDA + tensorrt only)
```

The stage folder *is* the edge bundle (``formats/onnx/bundle.py``): graph + external data,
tokenizer, configs, ``genai_config.json``, README; its manifest format is ``onnx``, so the
runner scores it through ``runtimes/ort.py``'s ``OrtRuntime`` (the attached KV policy applied
in the onnxruntime loop). Every linear the quantize stage packed exports
(``formats/onnx/nbits.py``): with ``weights: int4`` its codes are carried code for code — at its
group size when that is a power of two >= 16, else *re-blocked* (each group's scale repeated
over power-of-two blocks, a per-row group such as 172 in padded blocks: the same codes, a
few more bytes of scales) — and codes no block can hold (a group under 16, or several
groups per row of a size no power of two >= 16 divides) are *kept float32* as their
dequantized weight (exact, more bytes); ``weights: float32`` / ``int8`` export the
dequantized weights. Float linears ``block_size`` does not divide get a padded last block.
Export is the last stage: nothing loads an ONNX artifact as a model.
Details: parity (max |Δlogits|, greedy equality; at ``accuracy_level: auto`` the level used
and level 4's figures when it failed), MatMulNBits counts (carried / re-quantized),
``reblocked`` and ``kept_float`` layers, ``dequantized`` layers, file bytes.

```yaml
- kind: export
  format: gguf
  weights: q4_0            # q8_0 | q4_0 (default) | q4_k: every matrix's GGML type
  parity: {prompts: 4, new_tokens: 8, greedy_equal: true}
```

``format: gguf`` (``pipeline/export_gguf.py``, ``formats/gguf/``) writes ``model.gguf`` for
llama.cpp: dense Llama-style models only, no KV policy (the file cannot carry one). Symmetric
packed codes whose groups are whole 32-value blocks are carried code for code into Q4_0 /
Q8_0, other packed weights re-quantized, float weights quantized; the details list every
tensor's type and path. The row is scored in PyTorch from the file's dequantized tensors
(the ``torch-gguf`` runtime). The ONNX-only fields (``block_size``, ``symmetric``,
``accuracy_level``, ``ignore``, ``store``, ``tensorrt``) are refused with ``format: gguf``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from knowpress.core.config import FrozenConfig
from knowpress.core.errors import KnowpressError
from knowpress.core.progress import Progress
from knowpress.pipeline.context import Context
from knowpress.pipeline.stage import STAGES, StageConfig


class ParitySpec(FrozenConfig):
    prompts: int = Field(4, ge=1, le=64)
    new_tokens: int = Field(8, ge=1, le=256)
    max_rel_logits: float | None = Field(None, gt=0, description="max |Δlogits| / max |logits|")
    greedy_equal: bool = True


class TensorRTSpec(FrozenConfig):
    precision: Literal["fp16", "bf16"] = "fp16"
    opt_batch: int = Field(1, ge=1)
    max_batch: int = Field(8, ge=1)
    opt_sequence: int = Field(128, ge=1)


#: ``weights`` of each format (the first is the format's default)
FORMAT_WEIGHTS = {"onnx": ("int4", "float32", "int8"), "gguf": ("q4_0", "q8_0", "q4_k")}
#: fields only an ONNX export reads
ONNX_ONLY = ("block_size", "symmetric", "accuracy_level", "ignore", "store", "tensorrt")


@STAGES.register("export")
class ExportConfig(StageConfig):
    summary = (
        "ONNX bundle with KV cache (float32 / int4 MatMulNBits / int8), scored by onnxruntime; "
        "or a GGUF file for llama.cpp (Q8_0 / Q4_0 / Q4_K)"
    )
    paper = (
        "onnxruntime MatMulNBits; StreamingLLM arXiv:2309.17453 for the loop's policy; "
        "GGUF / llama.cpp (ggml block quantization)"
    )
    #: the runner saves nothing itself for a stage that writes its own artifact
    final: ClassVar[bool] = True

    kind: Literal["export"]
    format: Literal["onnx", "gguf"] = "onnx"
    #: onnx: float32 | int4 | int8; gguf: q8_0 | q4_0 | q4_k (default: the format's first)
    weights: Literal["float32", "int4", "int8", "q8_0", "q4_0", "q4_k"] = "int4"
    block_size: int = Field(32, ge=16)
    symmetric: bool = True
    #: MatMulNBits' minimum matmul precision: 0 unset (float math), 1 fp32, 2 fp16, 3 bf16,
    #: 4 int8 activation blocks (the fast CPU path, parity limit 0.05 of the logit scale).
    #: ``auto``: 4, and 0 (limit 1e-4) when parity fails at 4; the details record the level
    #: used. A fixed level whose parity fails stops the export naming ``accuracy_level: 0``.
    accuracy_level: Literal[0, 1, 2, 3, 4, "auto"] = "auto"
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="name globs")
    #: float tensors of 1024+ elements the graph keeps float (embeddings, linears left
    #: float): stored as float16 and cast to float32 in the graph, or stored float32
    store: Literal["float32", "float16"] = "float32"
    parity: ParitySpec = Field(default_factory=ParitySpec)
    tensorrt: TensorRTSpec | None = None

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"{value} is not a power of two (MatMulNBits: 16, 32, 64, 128)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_weights(cls, data: Any) -> Any:
        """``weights`` defaults to the format's first (onnx: int4, gguf: q4_0)."""
        if (
            isinstance(data, dict)
            and "weights" not in data
            and data.get("format") in FORMAT_WEIGHTS
        ):
            data = {**data, "weights": FORMAT_WEIGHTS[data["format"]][0]}
        return data

    @model_validator(mode="after")
    def _combination(self) -> ExportConfig:
        allowed = FORMAT_WEIGHTS[self.format]
        if self.weights not in allowed:
            other = next(f for f, w in FORMAT_WEIGHTS.items() if self.weights in w)
            raise ValueError(
                f"weights {self.weights} is a format {other} weight type; format {self.format} "
                f"takes {', '.join(allowed)}"
            )
        if self.format == "gguf":
            onnx_only = [f for f in ONNX_ONLY if f in self.model_fields_set]
            if onnx_only:
                raise ValueError(
                    f"{onnx_only[0]} applies to format onnx only; remove it for format gguf"
                )
        return self

    def build(self) -> Export:
        return Export(self)

    def check_runtime(self, attached: dict[str, Any], model: Any) -> None:
        """The policies the artifact carries must run in the onnxruntime loop; a GGUF file
        carries none."""
        from knowpress.methods.kv.base import CacheShape

        if self.format == "gguf":
            refuse_policies(attached)
            return
        if attached.get("expert_skip") is not None:
            raise KnowpressError(
                "expert_skip cannot run in the onnxruntime loop; "
                "export before skip_experts or without it"
            )
        policy = attached.get("kv_policy")
        if policy is not None:
            policy.check(CacheShape.of(model), "onnxruntime")

    def check(self, model: Any, deploy_dtype: str) -> list[str]:
        from knowpress.formats.onnx.graph import check_exportable

        if self.format == "gguf":
            from knowpress.formats.gguf.writer import check_model

            check_model(model.config.get_text_config(decoder=True))
            return [f"export gguf, weights {self.weights}"]
        check_exportable(model.config.get_text_config(decoder=True))
        from knowpress.pipeline.export import refuse_unholdable

        refuse_unholdable(model)  # packed by a quantize stage before (its structure_after)
        if self.tensorrt is not None:
            from knowpress.formats.onnx.tensorrt import check

            check(self.weights)
        return [
            f"export onnx, weights {self.weights}"
            + (
                f" (block {self.block_size}, accuracy_level {self.accuracy_level})"
                if self.weights == "int4"
                else ""
            )
        ]


def refuse_policies(attached: dict[str, Any]) -> None:
    """One line when a runtime policy other than the full cache is attached: a GGUF file
    cannot carry it (llama.cpp runs its own full KV cache and every expert)."""
    policy = attached.get("kv_policy")
    name = getattr(policy, "name", "?")
    if policy is not None and name != "full":
        raise KnowpressError(
            f"a GGUF file carries no KV policy, and KV policy {name} is attached (llama.cpp "
            "would run its own full cache); drop the compress_kv stage, or export with format: "
            "onnx, whose loop runs the policy"
        )
    if attached.get("expert_skip") is not None:
        raise KnowpressError("a GGUF file carries no expert_skip policy; export without it")


class Export:
    def __init__(self, config: ExportConfig) -> None:
        self.config = config

    def run(self, ctx: Context, progress: Progress) -> Context:
        from knowpress.pipeline.export import export_model

        if self.config.format == "gguf":
            from knowpress.pipeline.export_gguf import export_gguf

            refuse_policies({"kv_policy": ctx.kv_policy, "expert_skip": ctx.expert_skip})
            assert ctx.stage_dir is not None
            ctx.metrics.update(
                export_gguf(ctx.model, ctx.tokenizer, ctx.stage_dir, self.config, progress)
            )
            ctx.artifacts.update({"gguf": "model.gguf"})
            return ctx
        if ctx.expert_skip is not None:
            raise KnowpressError(
                "expert_skip cannot run in the onnxruntime loop; "
                "export before skip_experts or without it"
            )
        assert ctx.stage_dir is not None
        ctx.metrics.update(
            export_model(
                ctx.model, ctx.tokenizer, ctx.stage_dir, self.config, ctx.kv_policy, progress
            )
        )
        ctx.artifacts.update({"onnx_graph": "model.onnx", "onnx_data": "model.onnx.data"})
        return ctx

    def save(self, ctx: Context, folder: Path) -> str:
        """The bundle or file is already in ``folder`` (``run``): no model save; the format."""
        return self.config.format
