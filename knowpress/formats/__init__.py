"""Artifact formats behind one registry (``base.py``: ``FORMATS``, ``detect``): one file each
(``hf.py``, ``compressed_tensors.py``, ``knowpress_packed.py``, ``onnx/format.py``,
``gguf/format.py``), loading
and saving (``io.py``), manifests (``manifest.py``) and size accounting (``sizes.py``)."""

from knowpress.core.io import atomic_dir
from knowpress.formats import (  # noqa: F401  (registers them)
    compressed_tensors,
    hf,
    knowpress_packed,
)
from knowpress.formats.base import FORMATS, Format, detect
from knowpress.formats.gguf import format as gguf_format  # noqa: F401  (registers it)
from knowpress.formats.io import load_model, save_model
from knowpress.formats.manifest import stored_bytes
from knowpress.formats.onnx import format as onnx_format  # noqa: F401  (registers it)
from knowpress.formats.sizes import bf16_bytes, parameter_count

__all__ = [
    "FORMATS",
    "Format",
    "atomic_dir",
    "bf16_bytes",
    "detect",
    "load_model",
    "parameter_count",
    "save_model",
    "stored_bytes",
]
