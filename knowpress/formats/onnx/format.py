"""``onnx``: the export bundle (``model.onnx`` + external data, tokenizer, configs, README,
``genai_config.json``; ``knowpress_export.json`` records the graph's signature), scored by
the onnxruntime runtime (``runtimes/ort.py``); written by the export stage only."""

from __future__ import annotations

from pathlib import Path

from knowpress.formats.base import Format, register

EXPORT_FILE = "knowpress_export.json"
GRAPH_FILE = "model.onnx"


@register
class OnnxFormat(Format):
    name = "onnx"
    runtime = "onnxruntime"
    detect_order = 30
    summary = "ONNX bundle with KV cache I/O (onnxruntime, onnxruntime-genai)"

    def detect(self, folder: Path) -> bool:
        folder = Path(folder)
        return (folder / EXPORT_FILE).is_file() and (folder / GRAPH_FILE).is_file()
