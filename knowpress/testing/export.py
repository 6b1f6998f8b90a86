"""Export a tiny model into an ``onnx`` artifact folder (graph, bundle, manifest) or a ``gguf``
one (``model.gguf``, tokenizer, manifest) for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowpress.core.progress import Progress
from knowpress.formats.manifest import build_manifest, write_manifest


def export_folder(model: Any, tokenizer: Any, path: Path, policy: Any = None,
                  **options: Any) -> dict[str, Any]:  # fmt: skip
    """``stages.export.ExportConfig(**options)`` applied to ``model`` into ``path`` with a
    manifest of format ``onnx`` (``policy`` attached as ``runtime.kv_policy``); the metrics."""
    from knowpress.pipeline.export import export_model
    from knowpress.pipeline.stages.export import ExportConfig

    config = ExportConfig(kind="export", **({"weights": "float32"} | options))
    path.mkdir(parents=True, exist_ok=True)
    metrics = export_model(model, tokenizer, path, config, policy, Progress(enabled=False))
    runtime = {} if policy is None else {"kv_policy": policy.model_dump(mode="json")}
    write_manifest(path, build_manifest(path, format="onnx", dtype="float32", runtime=runtime))
    return metrics


def gguf_folder(model: Any, tokenizer: Any, path: Path, **options: Any) -> dict[str, Any]:
    """``ExportConfig(format="gguf", **options)`` applied to ``model`` into ``path`` with a
    manifest of format ``gguf``; the metrics. ``model`` then holds the weights the file
    stores (``formats/gguf/tensors.plan``)."""
    from knowpress.pipeline.export_gguf import export_gguf
    from knowpress.pipeline.stages.export import ExportConfig

    config = ExportConfig(kind="export", format="gguf", **options)
    path.mkdir(parents=True, exist_ok=True)
    metrics = export_gguf(model, tokenizer, path, config, Progress(enabled=False))
    write_manifest(path, build_manifest(path, format="gguf", dtype="float32"))
    return metrics
