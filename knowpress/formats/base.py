"""One registry of artifact formats: each format is one file that knows how to detect a
folder, save a model into one, load it back, list its payload and name the runtime that
scores it. ``formats/io.py`` (``load_model`` / ``save_model``), the manifest writer,
``load_runtime``, ``compress eval`` and the runner go through :func:`detect` and
:data:`FORMATS`; nothing else looks at a folder's files to tell its format.

Formats (the manifest's ``format``): ``hf`` (plain ``save_pretrained``), ``hf-compressed-tensors``
(stock transformers and vLLM load it), ``hf-packed`` (knowpress's own, only for what no public
format can hold: the manifest's ``format_reason`` says why), ``onnx`` (the export bundle),
``gguf`` (the export stage's llama.cpp file, scored dequantized in PyTorch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from knowpress.core.errors import KnowpressError
from knowpress.core.registry import Registry
from knowpress.core.specs import DEFAULT_MAX_SHARD_SIZE

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from knowpress.formats.manifest import Manifest


class Format:
    """A folder format. ``runtime`` names what scores it (``runtimes/loader.py``: ``torch``
    loads the model through ``load``; ``onnxruntime`` runs the bundle's graph;
    ``torch-gguf`` loads the model ``load`` rebuilds from a GGUF file). A runtime other
    than ``torch`` marks an exported artifact: no stage loads it as a model;
    ``detect_order``: lower is asked first (the most specific marker wins)."""

    name: ClassVar[str]
    runtime: ClassVar[str] = "torch"
    detect_order: ClassVar[int] = 50
    summary: ClassVar[str] = ""

    def detect(self, folder: Path) -> bool:
        """True when ``folder``'s files are this format (read without a manifest)."""
        return False

    def holds(self, modules: dict[str, Any]) -> str | None:
        """Why this format cannot store a model with these packed modules (None: it can)."""
        return f"{self.name} folders are written by their own stage, not by save_model"

    def save(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path,
             dtype: torch.dtype | None, modules: dict[str, Any],
             max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:  # fmt: skip
        raise KnowpressError(self.holds(modules) or f"{self.name}: cannot save a model")

    def load(
        self, location: str, dtype: torch.dtype, trust_remote_code: bool
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        raise KnowpressError(
            f"{location}: a {self.name} artifact is not a PyTorch model folder; score it "
            f"with compress eval --model {location}"
        )


FORMATS: Registry[Format] = Registry("artifact format")


def register(cls: type[Format]) -> type[Format]:
    FORMATS.register(cls.name)(cls())
    return cls


def detect_folder(folder: Path) -> Format:
    """The format of ``folder`` from its files (``hf`` when nothing more specific matches)."""
    ordered = sorted((FORMATS.get(n) for n in FORMATS.names()), key=lambda f: f.detect_order)
    return next((f for f in ordered if f.detect(folder)), FORMATS.get("hf"))


def detect(location: str | Path) -> tuple[Format, Manifest | None]:
    """The format of an artifact (its manifest's, else from its files; a hub id is ``hf``)
    and its manifest. An unknown manifest format is one line."""
    from knowpress.formats.manifest import read_manifest

    path = Path(location)
    if not path.is_dir():
        return FORMATS.get("hf"), None
    manifest = read_manifest(path)
    if manifest is None:
        return detect_folder(path), None
    try:
        return FORMATS.get(manifest.format), manifest
    except KnowpressError as exc:
        raise KnowpressError(f"{location}: {exc}; upgrade knowpress to score it") from None


def format_for(modules: dict[str, Any], order: tuple[str, ...]) -> Format:
    """The first format of ``order`` that holds a model with these packed modules."""
    for name in order:
        fmt = FORMATS.get(name)
        if fmt.holds(modules) is None:
            return fmt
    raise KnowpressError(f"no format of {', '.join(order)} holds these packed modules")
